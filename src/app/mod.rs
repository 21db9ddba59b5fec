//! The desktop app: prompt, completion canvas, reranked gallery and export, on egui/eframe.
//!
//! [`TesseraApp`] holds the UI state and never touches a tensor: a [`worker::Worker`]
//! thread owns the model, takes commands over a channel and answers with events, which the
//! app drains at the start of every frame. Everything the app does is reachable through
//! methods here (used by the UI and the tests alike); [`ui`] draws it.

pub mod canvas;
pub mod grid;
pub mod run;
pub use crate::store;
pub mod ui;
pub mod worker;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::sample::SampleOptions;
use canvas::{Brush, Canvas, ImportInfo, Tool};
use store::{SampleParams, SampleStore, StoredSample};
use worker::{Command, Event, Finished, JobSpec, ModelInfo, ModelSource, Prefix, Worker};

/// Generation settings shown beside the prompt (persisted).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub n: usize,
    pub keep: usize,
    pub temperature: f64,
    pub top_k: usize,
    pub top_p: f64,
    pub guidance: f64,
    /// A new random seed per job, or the fixed `seed`.
    pub random_seed: bool,
    pub seed: u64,
    /// Samples drawn together (a cancel keeps finished chunks).
    pub chunk: usize,
    /// Complete the canvas instead of drawing from scratch.
    pub use_canvas: bool,
    pub brush: Brush,
    pub tool: Tool,
    pub sort: SortMode,
    pub show_all: bool,
    pub thumb: f32,
    pub export_dir: Option<PathBuf>,
    /// The model's own sampling settings that temperature, top-k, top-p and guidance were last
    /// set from (see [`Settings::adopt_model_sampling`]).
    pub model_sampling: SampleOptions,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            n: 16,
            keep: 8,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            guidance: 1.0,
            random_seed: true,
            seed: 1,
            chunk: 4,
            use_canvas: false,
            brush: Brush::default(),
            tool: Tool::Brush,
            sort: SortMode::Score,
            show_all: false,
            thumb: 128.0,
            export_dir: None,
            model_sampling: SampleOptions::default(),
        }
    }
}

impl Settings {
    /// The sampling settings of the next job.
    pub fn sample_options(&self) -> SampleOptions {
        SampleOptions { temperature: self.temperature, top_k: self.top_k, top_p: self.top_p, guidance: self.guidance }
    }

    /// Takes a loaded model's own sampling settings (its config's `sampling`) where temperature,
    /// top-k, top-p and guidance still hold the ones last taken from a model (or the plain
    /// defaults): settings the user changed stay as they are. Returns whether it took them.
    pub fn adopt_model_sampling(&mut self, model: &SampleOptions) -> bool {
        if self.sample_options() != self.model_sampling {
            return false;
        }
        (self.temperature, self.top_k, self.top_p, self.guidance) =
            (model.temperature, model.top_k, model.top_p, model.guidance);
        self.model_sampling = model.clone();
        true
    }

    /// Puts temperature, top-k, top-p and guidance back to a model's own settings (the
    /// "Model's settings" button); the next model loaded then brings its own again.
    pub fn reset_to_model_sampling(&mut self, model: &SampleOptions) {
        (self.temperature, self.top_k, self.top_p, self.guidance) =
            (model.temperature, model.top_k, model.top_p, model.guidance);
        self.model_sampling = model.clone();
    }
}

/// Gallery order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SortMode {
    /// Best reranker score first.
    Score,
    /// Newest job first, best first within a job.
    Newest,
}

/// What persists across restarts (besides eframe's window layout).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Persisted {
    pub settings: Settings,
    pub prompt: String,
    pub history: Vec<String>,
}

/// One image in the gallery.
#[derive(Debug, Clone)]
pub struct GalleryItem {
    pub id: u64,
    pub job: u64,
    pub size: usize,
    pub params: SampleParams,
    /// Pixels, loaded on demand for items restored from the store.
    pub rgb: Option<Arc<Vec<u8>>>,
    pub stored: Option<StoredSample>,
    pub selected: bool,
    /// Among the best `keep` of its job.
    pub kept: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatus {
    Queued,
    Running,
    Done,
    Cancelled,
    Failed,
}

/// A job as the queue shows it.
#[derive(Debug, Clone)]
pub struct JobView {
    pub id: u64,
    pub prompt: String,
    pub n: usize,
    pub keep: usize,
    pub status: JobStatus,
    pub done: usize,
    pub total: usize,
    pub tokens_per_s: f64,
    pub eta_s: f64,
    pub previews: Vec<(u64, Vec<u8>)>,
    pub preview_rows: usize,
    pub submitted: Instant,
    pub first_preview: Option<Duration>,
    pub cancel_sent: Option<Instant>,
    pub cancel_ack: Option<Duration>,
    pub template: SampleParams,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Error,
}

/// A message shown to the person (errors stay until dismissed).
#[derive(Debug, Clone)]
pub struct Notice {
    pub level: Level,
    pub text: String,
    pub at: Instant,
}

/// How the app is started.
#[derive(Debug, Clone)]
pub struct AppOptions {
    pub model: ModelSource,
    pub device: tch::Device,
    pub threads: Option<usize>,
    /// Autosave folder; `None` = no autosave (tests).
    pub data_dir: Option<PathBuf>,
}

/// Results of file dialogs, which run on their own threads.
enum DialogResult {
    OpenModel(PathBuf),
    ImportImage(PathBuf),
    ExportDir(PathBuf),
}

pub struct TesseraApp {
    worker: Worker,
    pub model: Option<ModelInfo>,
    pub loading: Option<(String, f32)>,
    pub prompt: String,
    pub history: Vec<String>,
    pub settings: Settings,
    pub canvas: Option<Canvas>,
    pub gallery: Vec<GalleryItem>,
    order: Vec<usize>,
    order_dirty: bool,
    pub jobs: Vec<JobView>,
    pub notices: Vec<Notice>,
    store: Option<SampleStore>,
    /// Gallery indices whose pixels were read back from the store, oldest first: beyond
    /// [`RESTORED_PIXELS_CAP`] the oldest are dropped again (they are re-read when shown), so
    /// scrolling through a large gallery does not keep every picture in memory.
    restored: std::collections::VecDeque<usize>,
    next_job: u64,
    next_item: u64,
    pub viewer: Option<u64>,
    pub compare: bool,
    dialogs: (crossbeam_channel::Sender<DialogResult>, crossbeam_channel::Receiver<DialogResult>),
    repaint: Arc<std::sync::Mutex<Option<eframe::egui::Context>>>,
    thumbs: ui::ThumbCache,
    pub canvas_view: ui::CanvasView,
    /// Frame timings for diagnostics (UI time per frame, in seconds).
    pub frame_times: Vec<f64>,
    pub frame_intervals: Vec<f64>,
    last_frame: Option<Instant>,
    pub grid_gpu: bool,
}

/// Most gallery pictures kept in memory after being read back from the autosave store.
pub const RESTORED_PIXELS_CAP: usize = 1024;

impl TesseraApp {
    /// Starts the worker and asks it to load the model; returns at once (the window shows
    /// while the model loads).
    pub fn new(opts: AppOptions, persisted: Persisted) -> Self {
        let repaint: Arc<std::sync::Mutex<Option<eframe::egui::Context>>> = Arc::new(std::sync::Mutex::new(None));
        let r = repaint.clone();
        let notify: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
            if let Ok(guard) = r.lock()
                && let Some(ctx) = guard.as_ref()
            {
                ctx.request_repaint();
            }
        });
        let worker = Worker::spawn(opts.device, opts.threads, notify);
        worker.send(Command::Load(opts.model.clone()));
        let mut app = Self {
            worker,
            model: None,
            loading: Some((format!("loading {}", opts.model.describe()), 0.0)),
            prompt: persisted.prompt,
            history: persisted.history,
            settings: persisted.settings,
            canvas: None,
            gallery: Vec::new(),
            order: Vec::new(),
            order_dirty: true,
            jobs: Vec::new(),
            notices: Vec::new(),
            store: None,
            restored: Default::default(),
            next_job: 1,
            next_item: 1,
            viewer: None,
            compare: false,
            dialogs: crossbeam_channel::unbounded(),
            repaint,
            thumbs: ui::ThumbCache::default(),
            canvas_view: ui::CanvasView::default(),
            frame_times: Vec::new(),
            frame_intervals: Vec::new(),
            last_frame: None,
            grid_gpu: false,
        };
        if let Some(dir) = &opts.data_dir {
            app.open_store(dir);
        }
        app
    }

    /// The state to persist.
    pub fn persisted(&self) -> Persisted {
        Persisted { settings: self.settings.clone(), prompt: self.prompt.clone(), history: self.history.clone() }
    }

    /// Lets the worker wake the UI when an event arrives.
    pub fn set_context(&self, ctx: &eframe::egui::Context) {
        if let Ok(mut g) = self.repaint.lock()
            && g.is_none()
        {
            *g = Some(ctx.clone());
        }
    }

    fn open_store(&mut self, dir: &Path) {
        let result = SampleStore::open(dir).and_then(|s| s.load().map(|l| (s, l)));
        match result {
            Ok((store, (samples, skipped))) => {
                self.next_job = SampleStore::next_job(&samples);
                for s in samples {
                    let id = self.next_item;
                    self.next_item += 1;
                    self.gallery.push(GalleryItem {
                        id,
                        job: s.job,
                        size: s.size,
                        params: s.params.clone(),
                        rgb: None,
                        stored: Some(s),
                        selected: false,
                        kept: false,
                    });
                }
                let jobs: std::collections::BTreeSet<u64> = self.gallery.iter().map(|g| g.job).collect();
                for j in jobs {
                    self.mark_kept(j);
                }
                if skipped > 0 {
                    self.notify(
                        Level::Info,
                        format!("{skipped} saved samples could not be restored (missing or torn)"),
                    );
                }
                self.store = Some(store);
                self.order_dirty = true;
            }
            Err(e) => self.notify(Level::Error, format!("samples will not be saved: {e}")),
        }
    }

    pub fn notify(&mut self, level: Level, text: impl Into<String>) {
        self.notices.push(Notice { level, text: text.into(), at: Instant::now() });
    }

    pub fn errors(&self) -> impl Iterator<Item = &Notice> {
        self.notices.iter().filter(|n| n.level == Level::Error)
    }

    /// Prompt tokens (as text: "40", or "2560+" when the prompt is so long that only its
    /// beginning was counted), whether it is longer than the model's text length, and that
    /// length (None before a model is loaded).
    pub fn prompt_tokens(&self) -> Option<(String, bool, usize)> {
        let m = self.model.as_ref()?;
        let enc = m.tokenizer.encode(&self.prompt, m.text_len).ok()?;
        let n = if enc.cut { format!("{}+", enc.full_len) } else { enc.full_len.to_string() };
        Some((n, enc.truncated(), m.text_len))
    }

    pub fn is_busy(&self) -> bool {
        self.jobs.iter().any(|j| matches!(j.status, JobStatus::Queued | JobStatus::Running))
    }

    /// Drains the worker's events; called at the start of every frame.
    pub fn poll_worker(&mut self) {
        while let Ok(ev) = self.worker.rx.try_recv() {
            self.on_event(ev);
        }
        while let Ok(d) = self.dialogs.1.try_recv() {
            match d {
                DialogResult::OpenModel(p) => self.load_model(ModelSource::Dir(p)),
                DialogResult::ImportImage(p) => self.import_image(&p),
                DialogResult::ExportDir(p) => {
                    self.settings.export_dir = Some(p);
                    self.export_selected();
                }
            }
        }
        if !self.worker.alive() && !self.notices.iter().any(|n| n.text.starts_with("the worker stopped")) {
            self.notify(Level::Error, "the worker stopped; restart the app to generate again");
        }
    }

    fn job_mut(&mut self, id: u64) -> Option<&mut JobView> {
        self.jobs.iter_mut().find(|j| j.id == id)
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Loading { what, fraction } => self.loading = Some((what, fraction)),
            Event::ModelReady(info) => {
                self.loading = None;
                let fits = self.canvas.as_ref().is_some_and(|c| c.size() == info.image_size && c.grid() == info.grid);
                if !fits {
                    self.canvas = Some(Canvas::new(info.image_size, info.grid));
                }
                self.notify(Level::Info, format!("model {} ready on {}", info.name, info.device));
                self.settings.adopt_model_sampling(&info.sampling);
                self.model = Some(info);
            }
            Event::ModelFailed(e) => {
                self.loading = None;
                self.model = None;
                self.notify(Level::Error, format!("could not load the model: {e}"));
            }
            Event::JobStarted { id } => {
                if let Some(j) = self.job_mut(id) {
                    j.status = JobStatus::Running;
                }
            }
            Event::Progress { id, done, total, tokens_per_s, eta_s } => {
                if let Some(j) = self.job_mut(id) {
                    (j.done, j.total, j.tokens_per_s, j.eta_s) = (done, total, tokens_per_s, eta_s);
                }
            }
            Event::Preview { id, seeds, images, rows } => {
                if let Some(j) = self.job_mut(id) {
                    if j.first_preview.is_none() {
                        j.first_preview = Some(j.submitted.elapsed());
                    }
                    j.previews = seeds.into_iter().zip(images).collect();
                    j.preview_rows = rows;
                }
            }
            Event::Samples { id, samples } => self.add_samples(id, samples),
            Event::Cancelled { id, at } => {
                if let Some(j) = self.job_mut(id) {
                    j.cancel_ack = j.cancel_sent.map(|t| at.saturating_duration_since(t));
                }
            }
            Event::JobDone { id, cancelled, .. } => {
                if let Some(j) = self.job_mut(id) {
                    j.status = if cancelled { JobStatus::Cancelled } else { JobStatus::Done };
                    j.previews.clear();
                }
                self.mark_kept(id);
            }
            Event::WorkerCrashed(msg) => self.notify(Level::Error, format!("the worker crashed: {msg}")),
            Event::JobFailed { id, error } => {
                if let Some(j) = self.job_mut(id) {
                    j.status = JobStatus::Failed;
                    j.error = Some(error.clone());
                    j.previews.clear();
                }
                self.mark_kept(id);
                self.notify(Level::Error, format!("job {id} failed: {error}"));
            }
        }
    }

    fn add_samples(&mut self, job: u64, samples: Vec<Finished>) {
        let Some(j) = self.jobs.iter().find(|j| j.id == job) else { return };
        let template = j.template.clone();
        let size = self.model.as_ref().map_or(0, |m| m.image_size);
        for s in samples {
            let params = SampleParams { seed: s.seed, score: s.score, ..template.clone() };
            let stored = match &self.store {
                Some(store) => match store.add(job, &s.rgb, size, &params) {
                    Ok(st) => Some(st),
                    Err(e) => {
                        self.notify(Level::Error, format!("could not save a sample: {e}"));
                        None
                    }
                },
                None => None,
            };
            let id = self.next_item;
            self.next_item += 1;
            self.gallery.push(GalleryItem {
                id,
                job,
                size,
                params,
                rgb: Some(Arc::new(s.rgb)),
                stored,
                selected: false,
                kept: true,
            });
        }
        self.mark_kept(job);
    }

    /// Marks the best `keep` samples of a job (by score, then seed) as kept.
    fn mark_kept(&mut self, job: u64) {
        let mut idx: Vec<usize> = (0..self.gallery.len()).filter(|&i| self.gallery[i].job == job).collect();
        idx.sort_by(|&a, &b| cmp_score(&self.gallery[a], &self.gallery[b]));
        for (rank, &i) in idx.iter().enumerate() {
            let keep = self.gallery[i].params.keep.max(1);
            self.gallery[i].kept = rank < keep;
        }
        self.order_dirty = true;
    }

    /// Indices into `gallery` in display order (kept only unless `show_all`).
    pub fn order(&mut self) -> &[usize] {
        if self.order_dirty {
            let mut idx: Vec<usize> =
                (0..self.gallery.len()).filter(|&i| self.settings.show_all || self.gallery[i].kept).collect();
            match self.settings.sort {
                SortMode::Score => idx.sort_by(|&a, &b| cmp_score(&self.gallery[a], &self.gallery[b])),
                SortMode::Newest => idx.sort_by(|&a, &b| {
                    let (x, y) = (&self.gallery[a], &self.gallery[b]);
                    y.job.cmp(&x.job).then_with(|| cmp_score(x, y))
                }),
            }
            self.order = idx;
            self.order_dirty = false;
        }
        &self.order
    }

    pub fn resort(&mut self) {
        self.order_dirty = true;
    }

    /// Pixels of a gallery item, reading them from the store when needed.
    pub fn item_rgb(&mut self, i: usize) -> Option<Arc<Vec<u8>>> {
        let item = self.gallery.get(i)?;
        if let Some(rgb) = &item.rgb {
            return Some(rgb.clone());
        }
        let (store, stored) = (self.store.as_ref()?, item.stored.as_ref()?);
        match store.read_rgb(stored) {
            Ok(rgb) => {
                let rgb = Arc::new(rgb);
                self.gallery[i].rgb = Some(rgb.clone());
                self.restored.push_back(i);
                while self.restored.len() > RESTORED_PIXELS_CAP {
                    if let Some(old) = self.restored.pop_front()
                        && let Some(item) = self.gallery.get_mut(old)
                        && item.stored.is_some()
                    {
                        item.rgb = None;
                    }
                }
                Some(rgb)
            }
            Err(e) => {
                let msg = format!("a saved sample is unreadable: {e}");
                self.gallery[i].stored = None;
                self.notify(Level::Error, msg);
                None
            }
        }
    }

    /// Queues a job for the current prompt and settings; returns its id.
    pub fn generate(&mut self) -> Option<u64> {
        let Some(model) = self.model.clone() else {
            self.notify(Level::Error, "no model is loaded yet");
            return None;
        };
        let prompt = self.prompt.trim().to_string();
        if prompt.is_empty() {
            self.notify(Level::Error, "type a prompt first");
            return None;
        }
        let s = self.settings.clone();
        let opts = s.sample_options();
        if let Err(e) = opts.validate() {
            self.notify(Level::Error, e.to_string());
            return None;
        }
        if let Some((n, true, len)) = self.prompt_tokens() {
            self.notify(Level::Info, format!("the prompt has {n} tokens; only the first {len} are used"));
        }
        let seed = if s.random_seed { random_seed() } else { s.seed };
        let prefix = match (&self.canvas, s.use_canvas) {
            (Some(c), true) => Some(Prefix { rgb: c.pixels().to_vec(), keep_tokens: c.keep_tokens() }),
            _ => None,
        };
        let id = self.next_job;
        self.next_job += 1;
        let n = s.n.clamp(1, 1024);
        let keep = s.keep.clamp(1, n);
        let template = SampleParams {
            prompt: prompt.clone(),
            seed,
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            guidance: s.guidance,
            n,
            keep,
            model: format!("{} ({})", model.name, model.source.describe()),
            score: None,
            kept_tokens: prefix.as_ref().map_or(0, |p| p.keep_tokens),
        };
        let preview_rows = (model.grid / 8).max(1);
        self.worker.send(Command::Generate(JobSpec {
            id,
            prompt: prompt.clone(),
            n,
            seed,
            opts,
            prefix,
            chunk: s.chunk.clamp(1, n),
            preview_rows,
        }));
        self.jobs.push(JobView {
            id,
            prompt: prompt.clone(),
            n,
            keep,
            status: JobStatus::Queued,
            done: 0,
            total: 0,
            tokens_per_s: 0.0,
            eta_s: 0.0,
            previews: Vec::new(),
            preview_rows: 0,
            submitted: Instant::now(),
            first_preview: None,
            cancel_sent: None,
            cancel_ack: None,
            template,
            error: None,
        });
        self.history.retain(|h| h != &prompt);
        self.history.push(prompt);
        if self.history.len() > 200 {
            self.history.remove(0);
        }
        Some(id)
    }

    pub fn cancel(&mut self, id: u64) {
        if let Some(j) = self.job_mut(id)
            && matches!(j.status, JobStatus::Queued | JobStatus::Running)
        {
            j.cancel_sent = Some(Instant::now());
            self.worker.send(Command::Cancel(id));
        }
    }

    #[doc(hidden)]
    pub fn crash_worker_for_test(&self) {
        self.worker.send(Command::Crash);
    }

    /// Test hook: the worker's sampling batches larger than `limit` fail as out of memory.
    #[doc(hidden)]
    pub fn inject_oom_for_test(&self, limit: Option<usize>) {
        self.worker.send(Command::InjectOom(limit));
    }

    pub fn cancel_all(&mut self) {
        let ids: Vec<u64> = self.jobs.iter().map(|j| j.id).collect();
        for id in ids {
            self.cancel(id);
        }
    }

    pub fn load_model(&mut self, src: ModelSource) {
        self.loading = Some((format!("loading {}", src.describe()), 0.0));
        self.model = None;
        for j in &mut self.jobs {
            if j.status == JobStatus::Queued {
                j.status = JobStatus::Cancelled;
            }
        }
        self.worker.send(Command::Load(src));
    }

    /// Puts an image file on the canvas (centre-cropped and resized), or, for a Tessera PNG,
    /// also restores its parameters.
    pub fn import_image(&mut self, path: &Path) {
        if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")) {
            match store::read_png_params(path) {
                Ok(Some(p)) => self.restore_params(&p),
                Ok(None) => {}
                Err(e) => {
                    self.notify(Level::Error, e.to_string());
                    return;
                }
            }
        }
        let Some(size) = self.canvas.as_ref().map(|c| c.size()) else {
            self.notify(Level::Error, "load a model before importing an image");
            return;
        };
        match store::read_image(path) {
            Ok(rgb) => {
                let (w, h) = rgb.dimensions();
                let (pixels, _, crop) = store::square_rgb(&rgb, Some(size));
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                if let Some(c) = self.canvas.as_mut() {
                    c.set_image(pixels, Some(ImportInfo { name, width: w, height: h, crop }));
                }
                self.settings.use_canvas = true;
            }
            Err(e) => self.notify(Level::Error, format!("cannot read the image: {e}")),
        }
    }

    /// Puts a pasted image on the canvas.
    pub fn paste_image(&mut self, img: &eframe::egui::ColorImage) {
        let [w, h] = img.size;
        let mut rgb = image::RgbImage::new(w as u32, h as u32);
        for (p, c) in rgb.pixels_mut().zip(img.pixels.iter()) {
            *p = image::Rgb([c.r(), c.g(), c.b()]);
        }
        if let Some(c) = self.canvas.as_mut() {
            let (pixels, _, crop) = store::square_rgb(&rgb, Some(c.size()));
            c.set_image(
                pixels,
                Some(ImportInfo { name: "pasted image".into(), width: w as u32, height: h as u32, crop }),
            );
            self.settings.use_canvas = true;
        }
    }

    /// Restores the prompt and settings a sample was made with.
    pub fn restore_params(&mut self, p: &SampleParams) {
        self.prompt = p.prompt.clone();
        let s = &mut self.settings;
        (s.temperature, s.top_k, s.top_p, s.guidance) = (p.temperature, p.top_k, p.top_p, p.guidance);
        (s.n, s.keep, s.seed, s.random_seed) = (p.n, p.keep, p.seed, false);
        self.notify(Level::Info, format!("restored the parameters of seed {}", p.seed));
    }

    /// Sends a gallery item to the canvas, to complete from it.
    pub fn complete_from(&mut self, i: usize) {
        let Some(rgb) = self.item_rgb(i) else { return };
        let Some(c) = self.canvas.as_mut() else { return };
        if rgb.len() != c.size() * c.size() * 3 {
            self.notify(Level::Error, "that sample was made by a model of another resolution");
            return;
        }
        let info = ImportInfo {
            name: format!("sample {}", self.gallery[i].params.seed),
            width: c.size() as u32,
            height: c.size() as u32,
            crop: [0, 0, c.size() as u32],
        };
        c.set_image(rgb.to_vec(), Some(info));
        self.settings.use_canvas = true;
        self.prompt = self.gallery[i].params.prompt.clone();
    }

    pub fn selected(&self) -> Vec<usize> {
        (0..self.gallery.len()).filter(|&i| self.gallery[i].selected).collect()
    }

    /// Exports the selected samples into `settings.export_dir`; returns the files written.
    pub fn export_selected(&mut self) -> Vec<PathBuf> {
        let Some(dir) = self.settings.export_dir.clone() else {
            self.notify(Level::Error, "choose an export folder first");
            return Vec::new();
        };
        let sel = self.selected();
        if sel.is_empty() {
            self.notify(Level::Error, "select samples to export (click a thumbnail)");
            return Vec::new();
        }
        let mut data = Vec::new();
        for i in sel {
            if let Some(rgb) = self.item_rgb(i) {
                data.push((rgb, self.gallery[i].size, self.gallery[i].params.clone()));
            }
        }
        let items: Vec<(&[u8], usize, &SampleParams)> = data.iter().map(|(r, s, p)| (r.as_slice(), *s, p)).collect();
        match store::export(&dir, &items) {
            Ok(paths) => {
                self.notify(Level::Info, format!("exported {} PNGs to {}", paths.len(), dir.display()));
                paths
            }
            Err(e) => {
                self.notify(Level::Error, format!("export failed: {e}"));
                Vec::new()
            }
        }
    }

    /// Opens a file dialog on its own thread (the UI keeps drawing).
    fn dialog(&self, kind: &'static str) {
        let tx = self.dialogs.0.clone();
        let ctx = self.repaint.lock().ok().and_then(|g| g.clone());
        let _ = std::thread::Builder::new().name("tessera-dialog".into()).spawn(move || {
            let result = match kind {
                "model" => rfd::FileDialog::new()
                    .set_title("Open a model directory")
                    .pick_folder()
                    .map(DialogResult::OpenModel),
                "image" => rfd::FileDialog::new()
                    .set_title("Open an image")
                    .add_filter("Images", &["png", "jpg", "jpeg"])
                    .pick_file()
                    .map(DialogResult::ImportImage),
                _ => rfd::FileDialog::new().set_title("Export to folder").pick_folder().map(DialogResult::ExportDir),
            };
            if let Some(r) = result {
                let _ = tx.send(r);
                if let Some(ctx) = ctx {
                    ctx.request_repaint();
                }
            }
        });
    }

    /// Records the time spent building one frame and the interval since the last one.
    fn record_frame(&mut self, started: Instant) {
        if self.is_busy() {
            self.frame_times.push(started.elapsed().as_secs_f64());
            if let Some(last) = self.last_frame {
                self.frame_intervals.push(started.duration_since(last).as_secs_f64());
            }
        }
        self.last_frame = Some(started);
    }
}

fn cmp_score(a: &GalleryItem, b: &GalleryItem) -> std::cmp::Ordering {
    let (x, y) = (a.params.score.unwrap_or(f32::NEG_INFINITY), b.params.score.unwrap_or(f32::NEG_INFINITY));
    y.total_cmp(&x).then(a.params.seed.cmp(&b.params.seed))
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish() % 1_000_000_000
}
