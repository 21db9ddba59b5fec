//! Running the app in a native window, and its built-in diagnostic: a scripted session that
//! generates, cancels and measures frame times, first-preview latency and cancel latency.

use std::path::PathBuf;
use std::time::Instant;

use eframe::egui;
use serde::Serialize;

use super::worker::ModelSource;
use super::{AppOptions, JobStatus, Persisted, TesseraApp};

/// The platform's data folder for autosaved samples.
pub fn default_data_dir() -> Option<PathBuf> {
    directories::ProjectDirs::from("org", "Tessera", "Tessera").map(|d| d.data_dir().to_path_buf())
}

struct Shell {
    app: TesseraApp,
    diag: Option<Diagnostic>,
}

impl eframe::App for Shell {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.app.show(ui);
        if let Some(d) = &mut self.diag
            && d.tick(&mut self.app, ui.ctx())
        {
            ui.ctx().send_viewport_cmd(egui::ViewportCommand::Close);
        }
        if self.diag.is_some() {
            ui.ctx().request_repaint();
        }
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        if self.diag.is_none() {
            eframe::set_value(storage, eframe::APP_KEY, &self.app.persisted());
        }
    }
}

/// Opens the app window; returns when it is closed.
pub fn run(opts: AppOptions, diagnostics: Option<PathBuf>) -> anyhow::Result<()> {
    let native = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("Tessera")
            .with_app_id("tessera")
            .with_inner_size([1280.0, 820.0])
            .with_min_inner_size([800.0, 500.0])
            .with_drag_and_drop(true),
        renderer: eframe::Renderer::Wgpu,
        persist_window: diagnostics.is_none(),
        ..Default::default()
    };
    let result = eframe::run_native(
        "tessera",
        native,
        Box::new(move |cc| {
            let persisted: Persisted = if diagnostics.is_some() {
                Persisted::default()
            } else {
                cc.storage.and_then(|s| eframe::get_value(s, eframe::APP_KEY)).unwrap_or_default()
            };
            let mut app = TesseraApp::new(opts, persisted);
            app.grid_gpu = super::grid::install(cc.wgpu_render_state.as_ref());
            app.set_context(&cc.egui_ctx);
            let diag = diagnostics.map(Diagnostic::new);
            Ok(Box::new(Shell { app, diag }))
        }),
    );
    result.map_err(|e| anyhow::anyhow!("the window could not be opened: {e}"))
}

/// What `tessera app --diagnostics` measures and writes.
#[derive(Debug, Serialize)]
pub struct DiagReport {
    pub model: String,
    pub device: String,
    pub samples: usize,
    pub batch: usize,
    pub frames_while_sampling: usize,
    /// Time to build a frame's UI (ms), while the model samples.
    pub ui_ms_p50: f64,
    pub ui_ms_p99: f64,
    /// Interval between frames (ms), while the model samples (includes rendering and vsync).
    pub frame_interval_ms_p50: f64,
    pub frame_interval_ms_p99: f64,
    pub first_preview_s: Option<f64>,
    pub tokens_per_s: f64,
    /// One sampling step (ms) = batch / tokens per second.
    pub step_ms: f64,
    pub cancel_ack_ms: Option<f64>,
    pub job_seconds: f64,
}

pub fn percentile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let k = ((s.len() - 1) as f64 * q).round() as usize;
    s[k]
}

enum Stage {
    WaitModel,
    Full(u64, Instant),
    Cancel(u64),
    WaitCancel(u64),
    Done,
}

/// The scripted session behind `--diagnostics`.
pub struct Diagnostic {
    out: PathBuf,
    stage: Stage,
    report: Option<DiagReport>,
}

impl Diagnostic {
    pub fn new(out: PathBuf) -> Self {
        Self { out, stage: Stage::WaitModel, report: None }
    }

    /// Advances the script; returns true when it has finished (and written its report).
    pub fn tick(&mut self, app: &mut TesseraApp, ctx: &egui::Context) -> bool {
        match self.stage {
            Stage::WaitModel => {
                if app.model.is_some() {
                    app.prompt = "a small red circle above a large green square".into();
                    app.settings.n = 8;
                    app.settings.keep = 8;
                    app.settings.chunk = 4;
                    app.settings.random_seed = false;
                    app.settings.seed = 1;
                    app.settings.use_canvas = false;
                    app.frame_times.clear();
                    app.frame_intervals.clear();
                    if let Some(id) = app.generate() {
                        self.stage = Stage::Full(id, Instant::now());
                    }
                } else if app.loading.is_none() {
                    eprintln!("diagnostics: the model did not load");
                    self.stage = Stage::Done;
                    return true;
                }
            }
            Stage::Full(id, t0) => {
                let Some(j) = app.jobs.iter().find(|j| j.id == id).cloned() else { return true };
                if matches!(j.status, JobStatus::Done | JobStatus::Failed | JobStatus::Cancelled) {
                    let m = app.model.clone();
                    let batch = app.settings.chunk;
                    self.report = Some(DiagReport {
                        model: m.as_ref().map_or("?".into(), |m| format!("{} ({})", m.name, m.source.describe())),
                        device: m.as_ref().map_or("?".into(), |m| m.device.clone()),
                        samples: j.n,
                        batch,
                        frames_while_sampling: app.frame_times.len(),
                        ui_ms_p50: percentile(&app.frame_times, 0.5) * 1e3,
                        ui_ms_p99: percentile(&app.frame_times, 0.99) * 1e3,
                        frame_interval_ms_p50: percentile(&app.frame_intervals, 0.5) * 1e3,
                        frame_interval_ms_p99: percentile(&app.frame_intervals, 0.99) * 1e3,
                        first_preview_s: j.first_preview.map(|d| d.as_secs_f64()),
                        tokens_per_s: j.tokens_per_s,
                        step_ms: batch as f64 / j.tokens_per_s.max(1e-9) * 1e3,
                        cancel_ack_ms: None,
                        job_seconds: t0.elapsed().as_secs_f64(),
                    });
                    // A screenshot of the window with the finished gallery, beside the report.
                    let shot = self.out.with_extension("png");
                    ctx.send_viewport_cmd(egui::ViewportCommand::Screenshot(egui::ScreenshotCallback::new(
                        move |img| {
                            let [w, h] = img.size;
                            let rgba: Vec<u8> = img.pixels.iter().flat_map(|c| c.to_array()).collect();
                            match image::RgbaImage::from_raw(w as u32, h as u32, rgba) {
                                Some(im) => {
                                    let mut png = Vec::new();
                                    let encoded =
                                        im.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png);
                                    let written = encoded
                                        .map_err(|e| e.to_string())
                                        .and_then(|_| crate::io::write_atomic(&shot, &png).map_err(|e| e.to_string()));
                                    if let Err(e) = written {
                                        eprintln!("diagnostics: screenshot {}: {e}", shot.display());
                                    }
                                }
                                None => eprintln!("diagnostics: screenshot has an unexpected size"),
                            }
                        },
                    )));
                    app.settings.seed = 100;
                    app.settings.n = 32;
                    if let Some(id2) = app.generate() {
                        self.stage = Stage::Cancel(id2);
                    }
                }
            }
            Stage::Cancel(id) => {
                let Some(j) = app.jobs.iter().find(|j| j.id == id) else { return true };
                if j.status == JobStatus::Running && j.total > 0 && j.done * 4 >= j.total {
                    app.cancel(id);
                    self.stage = Stage::WaitCancel(id);
                } else if !matches!(j.status, JobStatus::Running | JobStatus::Queued) {
                    // Finished before a frame saw it a quarter done: no cancel to measure.
                    self.finish();
                    return true;
                }
            }
            Stage::WaitCancel(id) => {
                let j = app.jobs.iter().find(|j| j.id == id);
                if j.is_some_and(|j| j.status != JobStatus::Running && j.status != JobStatus::Queued) {
                    if let Some(r) = &mut self.report {
                        r.cancel_ack_ms = j.and_then(|j| j.cancel_ack).map(|d| d.as_secs_f64() * 1e3);
                    }
                    self.finish();
                    return true;
                }
            }
            Stage::Done => return true,
        }
        false
    }

    fn finish(&mut self) {
        self.stage = Stage::Done;
        if let Some(r) = &self.report {
            let json = serde_json::to_string_pretty(r).unwrap_or_default();
            println!("{json}");
            if let Err(e) = crate::io::write_atomic(&self.out, json.as_bytes()) {
                eprintln!("diagnostics: {e}");
            }
        }
    }
}

/// The model the app starts with when none is named: the embedded default when the binary
/// has one, else a randomly initialised `default` preset.
pub fn startup_model(dir: Option<PathBuf>, random: Option<String>) -> ModelSource {
    match (dir, random) {
        (Some(d), _) => ModelSource::Dir(d),
        (None, Some(p)) => ModelSource::Random(p),
        (None, None) if crate::Model::has_embedded_default() => ModelSource::Embedded,
        (None, None) => ModelSource::Random("default".into()),
    }
}
