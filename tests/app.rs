//! The desktop app, driven headless through its widgets' labels with egui_kittest: typing a
//! prompt, generating, progress, the gallery, cancelling, export with metadata, restoring
//! parameters from a dropped PNG, autosave, failures as notices, the canvas, and a rendered
//! snapshot of the main window on a software wgpu adapter.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use eframe::egui;
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use tch::Device;
use tessera::app::canvas::{Brush, Canvas, Tool};
use tessera::app::store::{self, SampleParams, SampleStore};
use tessera::app::worker::ModelSource;
use tessera::app::{AppOptions, JobStatus, Level, Persisted, TesseraApp};

#[derive(Debug)]
struct Dropped(PathBuf);

impl egui::DroppedFile for Dropped {
    fn path(&self) -> &Path {
        &self.0
    }
    fn bytes(&self) -> Result<Vec<u8>, String> {
        std::fs::read(&self.0).map_err(|e| e.to_string())
    }
}

fn options(model: ModelSource, data_dir: Option<PathBuf>) -> AppOptions {
    AppOptions { model, device: Device::Cpu, threads: None, data_dir }
}

fn harness(app: TesseraApp) -> Harness<'static, TesseraApp> {
    Harness::builder().with_size([1280.0, 820.0]).build_ui_state(|ui, app: &mut TesseraApp| app.show(ui), app)
}

/// Steps frames until `cond` holds (the worker runs on its own thread).
fn step_until(h: &mut Harness<'static, TesseraApp>, what: &str, cond: impl Fn(&TesseraApp) -> bool) {
    let t0 = Instant::now();
    while !cond(h.state()) {
        assert!(t0.elapsed() < Duration::from_secs(120), "timed out waiting for {what}");
        h.step();
        std::thread::sleep(Duration::from_millis(5));
    }
    h.step();
}

fn tiny_dir(tmp: &Path) -> PathBuf {
    crate::common::saved_tiny_model(&tmp.join("tiny-model"), 3)
}

fn ready_app(model: ModelSource, data_dir: Option<PathBuf>) -> Harness<'static, TesseraApp> {
    let mut h = harness(TesseraApp::new(options(model, data_dir), Persisted::default()));
    step_until(&mut h, "the model", |a| a.model.is_some() || a.errors().next().is_some());
    assert!(h.state().model.is_some(), "model failed: {:?}", h.state().errors().map(|n| &n.text).collect::<Vec<_>>());
    h
}

fn type_prompt(h: &mut Harness<'static, TesseraApp>, text: &str) {
    h.get_by_label("Prompt").focus();
    h.step();
    h.get_by_label("Prompt").type_text(text);
    h.step();
}

fn set_fixed(h: &mut Harness<'static, TesseraApp>, n: usize, keep: usize, chunk: usize, seed: u64) {
    let s = &mut h.state_mut().settings;
    (s.n, s.keep, s.chunk, s.seed, s.random_seed) = (n, keep, chunk, seed, false);
}

fn job_done(a: &TesseraApp, id: u64) -> bool {
    a.jobs.iter().any(|j| j.id == id && !matches!(j.status, JobStatus::Queued | JobStatus::Running))
}

#[test]
fn typing_a_prompt_and_generating_fills_the_gallery_best_first() {
    let tmp = tempfile::tempdir().unwrap();
    let mut h = ready_app(ModelSource::Dir(tiny_dir(tmp.path())), None);
    type_prompt(&mut h, "a red circle");
    assert_eq!(h.state().prompt, "a red circle");
    assert!(h.query_by_label_contains("/8 tokens").is_some(), "the prompt's token count is shown");
    set_fixed(&mut h, 6, 4, 2, 7);
    h.get_by_label("Generate").click();
    h.step();
    assert_eq!(h.state().jobs.len(), 1, "Generate queued a job");
    let id = h.state().jobs[0].id;
    step_until(&mut h, "progress", |a| a.jobs[0].done > 0 || job_done(a, id));
    step_until(&mut h, "the job", |a| job_done(a, id));
    let app = h.state();
    assert_eq!(app.jobs[0].status, JobStatus::Done);
    assert_eq!(app.jobs[0].done, app.jobs[0].total, "progress reached the end");
    assert_eq!(app.gallery.len(), 6, "every sample arrives");
    let kept: Vec<_> = app.gallery.iter().filter(|g| g.kept).collect();
    assert_eq!(kept.len(), 4, "the best 4 of 6 are kept");
    // Kept samples are the best scored; the gallery shows them in score order.
    let worst_kept = kept.iter().filter_map(|g| g.params.score).fold(f32::INFINITY, f32::min);
    for g in app.gallery.iter().filter(|g| !g.kept) {
        assert!(g.params.score.unwrap_or(f32::NEG_INFINITY) <= worst_kept);
    }
    let seeds: Vec<u64> = app.gallery.iter().map(|g| g.params.seed).collect();
    assert_eq!(seeds, (7..13).collect::<Vec<_>>(), "sample i has seed S + i");
    for g in &kept {
        h.get_by_label(&format!("sample {}", g.params.seed));
    }
    // Same seed, same prompt: the same pixels as the library's own generate.
    let model = tessera::Model::load(&tmp.path().join("tiny-model"), Device::Cpu).unwrap();
    let want = model.generate("a red circle", 2, 7, None, &tessera::SampleOptions::default(), |_| true).unwrap();
    let got = h.state().gallery.iter().find(|g| g.params.seed == 8).and_then(|g| g.rgb.clone()).unwrap();
    assert!(want[1].rgb == *got, "the app's sample differs from the library's for the same seed");
}

#[test]
fn ctrl_enter_generates_and_an_empty_prompt_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut h = ready_app(ModelSource::Dir(tiny_dir(tmp.path())), None);
    h.state_mut().prompt = "   ".into();
    assert!(h.state_mut().generate().is_none());
    assert!(h.state().errors().any(|n| n.text.contains("prompt")), "an empty prompt gets a notice");
    type_prompt(&mut h, "two blue squares");
    set_fixed(&mut h, 2, 2, 2, 1);
    h.key_press_modifiers(egui::Modifiers::CTRL | egui::Modifiers::COMMAND, egui::Key::Enter);
    h.step();
    assert_eq!(h.state().jobs.len(), 1, "Ctrl+Enter queued a job");
    assert_eq!(h.state().history.last().map(String::as_str), Some("two blue squares"));
}

#[test]
fn cancel_mid_run_keeps_finished_batches_and_the_queue_cancels_too() {
    let tmp = tempfile::tempdir().unwrap();
    let mut h = ready_app(ModelSource::Dir(tiny_dir(tmp.path())), None);
    type_prompt(&mut h, "a green star");
    set_fixed(&mut h, 400, 400, 1, 1);
    let first = h.state_mut().generate().unwrap();
    let second = h.state_mut().generate().unwrap();
    step_until(&mut h, "the first batch", |a| !a.gallery.is_empty());
    h.get_by_label(&format!("Cancel job {second}")).click();
    h.step();
    h.get_by_label(&format!("Cancel job {first}")).click();
    h.step();
    step_until(&mut h, "the cancels", |a| job_done(a, first) && job_done(a, second));
    let app = h.state();
    let j = app.jobs.iter().find(|j| j.id == first).unwrap();
    assert_eq!(j.status, JobStatus::Cancelled);
    assert!(j.cancel_ack.is_some(), "the worker acknowledged the cancel");
    let n = app.gallery.len();
    assert!((1..400).contains(&n), "finished batches are kept, the rest is not drawn ({n})");
    assert_eq!(app.jobs.iter().find(|j| j.id == second).unwrap().status, JobStatus::Cancelled);
    assert!(app.gallery.iter().all(|g| g.job == first));
}

#[test]
fn export_writes_pngs_with_parameters_and_dropping_one_restores_them() {
    let tmp = tempfile::tempdir().unwrap();
    let mut h = ready_app(ModelSource::Dir(tiny_dir(tmp.path())), None);
    type_prompt(&mut h, "a yellow heart");
    set_fixed(&mut h, 3, 3, 3, 40);
    h.state_mut().settings.temperature = 0.8;
    let id = h.state_mut().generate().unwrap();
    step_until(&mut h, "the job", |a| job_done(a, id));
    h.get_by_label("sample 40").click();
    h.step();
    h.get_by_label("sample 41").click();
    h.step();
    assert_eq!(h.state().selected().len(), 2);
    h.step();
    let out = tmp.path().join("export");
    h.state_mut().settings.export_dir = Some(out.clone());
    h.get_by_label("Export selected (2)").click();
    h.step();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert_eq!(files.len(), 2, "{files:?}");
    let p = store::read_png_params(&files[0]).unwrap().expect("parameters in the PNG");
    assert_eq!((p.prompt.as_str(), p.seed, p.temperature, p.n), ("a yellow heart", 40, 0.8, 3));
    assert!(p.score.is_some() && p.model.contains("tiny"));
    // Exporting again never overwrites.
    h.get_by_label("Export selected (2)").click();
    h.step();
    h.step();
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 4);
    // Dropped on a fresh app, the PNG restores prompt, seed and settings.
    let mut h2 = ready_app(ModelSource::Dir(tmp.path().join("tiny-model")), None);
    h2.input_mut().dropped_files.push(Arc::new(Dropped(files[0].clone())));
    h2.step();
    h2.step();
    let a = h2.state();
    assert_eq!(a.prompt, "a yellow heart");
    assert_eq!((a.settings.seed, a.settings.random_seed, a.settings.temperature), (40, false, 0.8));
    assert!(a.settings.use_canvas, "the dropped image went onto the canvas");
}

#[test]
fn samples_are_autosaved_and_the_gallery_comes_back_after_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let model = tiny_dir(tmp.path());
    let mut h = ready_app(ModelSource::Dir(model.clone()), Some(data.clone()));
    type_prompt(&mut h, "a purple hexagon");
    set_fixed(&mut h, 4, 2, 2, 5);
    let id = h.state_mut().generate().unwrap();
    step_until(&mut h, "the job", |a| job_done(a, id));
    let before: Vec<(u64, bool)> = h.state().gallery.iter().map(|g| (g.params.seed, g.kept)).collect();
    drop(h);
    // A torn last index line (a kill mid-write) is skipped, not fatal.
    let index = data.join("index.jsonl");
    let mut text = std::fs::read_to_string(&index).unwrap();
    text.push_str("{\"file\": \"torn");
    std::fs::write(&index, text).unwrap();
    let mut h = ready_app(ModelSource::Dir(model), Some(data));
    h.step();
    let mut after: Vec<(u64, bool)> = h.state().gallery.iter().map(|g| (g.params.seed, g.kept)).collect();
    after.sort();
    let mut before = before;
    before.sort();
    assert_eq!(after, before, "the same samples, and the same ones kept");
    assert!(h.state().notices.iter().any(|n| n.text.contains("could not be restored")));
    let kept = after.iter().find(|(_, k)| *k).map(|(s, _)| *s).unwrap();
    h.get_by_label(&format!("sample {kept}"));
}

#[test]
fn a_corrupt_checkpoint_is_a_notice_and_the_app_keeps_running() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_dir(tmp.path());
    let w = dir.join("transformer.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    let mut h = harness(TesseraApp::new(options(ModelSource::Dir(dir), None), Persisted::default()));
    step_until(&mut h, "the load error", |a| a.errors().next().is_some());
    let err = h.state().errors().next().unwrap().text.clone();
    assert!(err.contains("transformer.safetensors"), "the notice names the file: {err}");
    assert!(h.state().model.is_none());
    h.get_by_label_contains("could not load the model");
    // The app still works: load a good model and generate.
    let good = tiny_dir(&tmp.path().join("good"));
    h.state_mut().load_model(ModelSource::Dir(good));
    step_until(&mut h, "the good model", |a| a.model.is_some());
    type_prompt(&mut h, "a circle");
    set_fixed(&mut h, 1, 1, 1, 1);
    let id = h.state_mut().generate().unwrap();
    step_until(&mut h, "the job", |a| job_done(a, id));
    assert_eq!(h.state().gallery.len(), 1);
    // An unreadable image is a notice too.
    let bad = tmp.path().join("bad.png");
    std::fs::write(&bad, b"not a png").unwrap();
    h.state_mut().import_image(&bad);
    assert!(h.state().errors().any(|n| n.text.contains("bad.png")));
}

#[test]
fn completing_the_canvas_keeps_the_pixels_before_the_handle_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let mut h = ready_app(ModelSource::Dir(tiny_dir(tmp.path())), None);
    let (size, grid) = {
        let c = h.state().canvas.as_ref().unwrap();
        (c.size(), c.grid())
    };
    {
        let c = h.state_mut().canvas.as_mut().unwrap();
        let brush = Brush { radius: 3.0, softness: 0.0, colour: [10, 200, 30] };
        c.stroke_to(Tool::Brush, &brush, 2.0, 2.0);
        c.stroke_to(Tool::Brush, &brush, 14.0, 5.0);
        c.end_stroke();
        c.set_keep_tokens(grid + 1); // the first row and one cell
    }
    type_prompt(&mut h, "a green line");
    set_fixed(&mut h, 2, 2, 2, 3);
    h.state_mut().settings.use_canvas = true;
    let canvas = h.state().canvas.as_ref().unwrap().pixels().to_vec();
    let id = h.state_mut().generate().unwrap();
    step_until(&mut h, "the job", |a| job_done(a, id));
    let cell = size / grid;
    for g in &h.state().gallery {
        let rgb = g.rgb.as_ref().unwrap();
        assert_eq!(g.params.kept_tokens, grid + 1);
        for y in 0..size {
            for x in 0..size {
                let t = (y / cell) * grid + x / cell;
                let i = (y * size + x) * 3;
                if t < grid + 1 {
                    assert_eq!(rgb[i..i + 3], canvas[i..i + 3], "kept pixel ({x}, {y}) changed");
                }
            }
        }
    }
}

#[test]
fn canvas_strokes_undo_redo_and_the_handle_snaps_to_the_grid() {
    let mut c = Canvas::new(64, 16);
    let blank = c.pixels().to_vec();
    let brush = Brush { radius: 4.0, softness: 0.5, colour: [0, 0, 255] };
    c.stroke_to(Tool::Brush, &brush, 10.0, 10.0);
    c.stroke_to(Tool::Brush, &brush, 50.0, 10.0);
    c.end_stroke();
    let painted = c.pixels().to_vec();
    // A fast stroke leaves no gaps: every pixel on the segment is painted.
    for x in 10..50 {
        assert_eq!(c.pixel(x, 10), Some([0, 0, 255]), "gap at x = {x}");
    }
    // Soft edge: partly blended pixels just inside the radius.
    let edge = c.pixel(30, 13).unwrap();
    assert!(edge[0] > 0 && edge[0] < 255, "soft edge {edge:?}");
    c.stroke_to(Tool::Eraser, &brush, 30.0, 10.0);
    c.end_stroke();
    assert_eq!(c.pixel(30, 10), Some([255, 255, 255]));
    assert!(c.undo());
    assert_eq!(c.pixels(), painted.as_slice());
    assert!(c.undo());
    assert_eq!(c.pixels(), blank.as_slice());
    assert!(!c.undo());
    assert!(c.redo() && c.redo());
    assert_ne!(c.pixels(), painted.as_slice());
    // Handle: row under the pointer, column rounded to the nearest cell boundary.
    assert_eq!(c.handle_at(0.0, 0.0), 0);
    assert_eq!(c.handle_at(9.0, 3.0), 2);
    assert_eq!(c.handle_at(9.0, 5.0), 16 + 2);
    assert_eq!(c.handle_at(63.0, 63.0), 15 * 16 + 16);
    c.set_keep_tokens(10_000);
    assert_eq!(c.keep_tokens(), 256);
}

#[test]
fn files_are_never_overwritten_and_png_parameters_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let params = SampleParams {
        prompt: "ünïcode prompt ✓".into(),
        seed: 9,
        temperature: 1.0,
        top_k: 5,
        top_p: 0.9,
        guidance: 2.0,
        n: 4,
        keep: 1,
        model: "m".into(),
        score: Some(0.5),
        kept_tokens: 0,
    };
    let rgb = vec![7u8; 8 * 8 * 3];
    let path = tmp.path().join("x.png");
    assert!(store::write_new_atomic(&path, &store::encode_png(&rgb, 8, Some(&params)).unwrap()).unwrap());
    assert!(!store::write_new_atomic(&path, b"other").unwrap(), "an existing file is not replaced");
    assert_eq!(store::read_png_params(&path).unwrap(), Some(params.clone()));
    let (back, size) = store::read_rgb_square(&path, None).unwrap();
    assert_eq!((size, back == rgb), (8, true));
    let leftovers = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter(|e| e.as_ref().map(|e| e.file_name().to_string_lossy().ends_with(".tmp")).unwrap_or(false));
    assert_eq!(leftovers.count(), 0, "no temporary files left behind");
    // The store: a deleted image is skipped on load.
    let s = SampleStore::open(&tmp.path().join("store")).unwrap();
    let a = s.add(1, &rgb, 8, &params).unwrap();
    let b = s.add(1, &rgb, 8, &params).unwrap();
    assert_ne!(a.file, b.file);
    std::fs::remove_file(s.path_of(&a)).unwrap();
    let (loaded, skipped) = s.load().unwrap();
    assert_eq!((loaded.len(), skipped), (1, 1));
}

#[test]
fn a_worker_panic_becomes_a_notice() {
    let tmp = tempfile::tempdir().unwrap();
    let mut h = ready_app(ModelSource::Dir(tiny_dir(tmp.path())), None);
    h.state_mut().crash_worker_for_test();
    step_until(&mut h, "the crash notice", |a| a.errors().any(|n| n.text.contains("crashed")));
    type_prompt(&mut h, "still works");
    set_fixed(&mut h, 1, 1, 1, 1);
    let id = h.state_mut().generate().unwrap();
    step_until(&mut h, "the job", |a| job_done(a, id));
    assert_eq!(h.state().jobs.last().unwrap().status, JobStatus::Done);
    assert!(h.state().notices.iter().any(|n| n.level == Level::Error));
}

#[test]
fn main_window_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let app = TesseraApp::new(options(ModelSource::Dir(tiny_dir(tmp.path())), None), Persisted::default());
    let rs = egui_kittest::wgpu::create_render_state(
        egui_kittest::wgpu::default_wgpu_setup(),
        eframe::egui_wgpu::RendererOptions::PREDICTABLE,
    );
    let mut app = app;
    app.grid_gpu = tessera::app::grid::install(Some(&rs));
    let mut h = Harness::builder()
        .with_size([1280.0, 820.0])
        .renderer(egui_kittest::wgpu::WgpuTestRenderer::from_render_state(rs))
        .build_ui_state(|ui, app: &mut TesseraApp| app.show(ui), app);
    step_until(&mut h, "the model", |a| a.model.is_some());
    type_prompt(&mut h, "a small red circle above a large green square");
    set_fixed(&mut h, 8, 8, 4, 1);
    let id = h.state_mut().generate().unwrap();
    step_until(&mut h, "the job", |a| job_done(a, id));
    h.state_mut().notices.clear();
    h.state_mut().canvas.as_mut().unwrap().set_keep_tokens(6);
    h.run_steps(3);
    // The thumbnails depend on the random weights, which libtorch draws from one global
    // generator shared with the tests running beside this one: mask the gallery's images
    // (their count, order and layout are checked by the tests above).
    let rects: Vec<egui::Rect> =
        h.state().gallery.iter().map(|g| h.get_by_label(&format!("sample {}", g.params.seed)).rect()).collect();
    let all = rects.iter().fold(rects[0], |a, r| a.union(*r));
    h.mask(all.expand2(egui::vec2(4.0, 18.0)));
    h.snapshot("main_window");
}

#[test]
fn a_model_from_train_all_finishes_in_its_budget_and_opens_in_the_app() {
    let _cpu = crate::common::exclusive_cpu();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("trained");
    let mut o = tessera::pipeline::AllOptions::new(&dir, 30.0, Device::Cpu);
    o.preset = Some("tiny".into());
    o.data = "world:4".into();
    (o.eval_captions, o.eval_samples, o.quiet, o.workers) = (2, 2, true, 1);
    let t0 = Instant::now();
    let plan = tessera::pipeline::train_all(&o).unwrap();
    let took = t0.elapsed().as_secs_f64();
    assert!(plan.stages.iter().all(|s| s.done), "{plan:#?}");
    assert!(took <= 30.0, "train all took {took:.1}s of a 30s budget: {plan:#?}");
    let mut h = ready_app(ModelSource::Dir(dir), None);
    type_prompt(&mut h, "a blue square");
    set_fixed(&mut h, 2, 1, 2, 1);
    h.get_by_label("Generate").click();
    h.step();
    let id = h.state().jobs[0].id;
    step_until(&mut h, "the job", |a| job_done(a, id));
    assert_eq!(h.state().jobs[0].status, JobStatus::Done);
    assert_eq!(h.state().gallery.len(), 2);
}

#[test]
fn the_papers_512_to_best_32_preset_runs_as_one_job() {
    let tmp = tempfile::tempdir().unwrap();
    let mut h = ready_app(ModelSource::Dir(tiny_dir(tmp.path())), None);
    type_prompt(&mut h, "a green star");
    h.get_by_label("512, keep best 32").click();
    h.step();
    let s = &h.state().settings;
    assert_eq!((s.n, s.keep, s.chunk), (512, 32, 64));
    h.get_by_label("Generate").click();
    h.step();
    let id = h.state().jobs[0].id;
    step_until(&mut h, "the 512-sample job", |a| job_done(a, id));
    let app = h.state();
    assert_eq!(app.jobs[0].status, JobStatus::Done);
    assert_eq!(app.gallery.len(), 512);
    let kept: Vec<_> = app.gallery.iter().filter(|g| g.kept).collect();
    assert_eq!(kept.len(), 32, "the best 32 of 512 are kept");
    let worst_kept = kept.iter().filter_map(|g| g.params.score).fold(f32::INFINITY, f32::min);
    assert!(app.gallery.iter().filter(|g| !g.kept).all(|g| g.params.score.unwrap_or(f32::NEG_INFINITY) <= worst_kept));
}

#[test]
fn a_model_around_an_imported_dvae_opens_with_a_256_px_canvas_and_completes_a_photograph() {
    let _cpu = crate::common::heavy_cpu();
    let tmp = tempfile::tempdir().unwrap();
    let model = crate::openai_dvae::imported_model(tmp.path());
    let mut h = ready_app(ModelSource::Dir(model), None);
    let (size, grid) = {
        let c = h.state().canvas.as_ref().unwrap();
        (c.size(), c.grid())
    };
    assert_eq!((size, grid), (256, 32));
    // an upload is centre-cropped and resized to the canvas
    let photo = tmp.path().join("photo.png");
    image::RgbImage::from_fn(400, 300, |x, y| image::Rgb([(x % 256) as u8, (y % 256) as u8, 90])).save(&photo).unwrap();
    h.state_mut().import_image(&photo);
    h.step();
    assert!(h.state().errors().next().is_none(), "{:?}", h.state().errors().map(|n| &n.text).collect::<Vec<_>>());
    let canvas = h.state().canvas.as_ref().unwrap().pixels().to_vec();
    assert_eq!(canvas.len(), 256 * 256 * 3);
    let keep = 28 * grid; // complete the bottom four rows
    h.state_mut().canvas.as_mut().unwrap().set_keep_tokens(keep);
    type_prompt(&mut h, "a red circle");
    set_fixed(&mut h, 1, 1, 1, 5);
    h.state_mut().settings.use_canvas = true;
    let id = h.state_mut().generate().unwrap();
    step_until(&mut h, "the completion", |a| job_done(a, id));
    let g = h.state().gallery.first().expect("a completed sample");
    let rgb = g.rgb.as_ref().unwrap();
    assert_eq!(g.params.kept_tokens, keep);
    let kept = 28 * (size / grid) * size * 3;
    assert_eq!(rgb[..kept], canvas[..kept], "the kept rows changed");
}

#[test]
fn an_out_of_memory_job_is_a_notice_and_the_next_job_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let mut h = ready_app(ModelSource::Dir(tiny_dir(tmp.path())), None);
    type_prompt(&mut h, "a red circle");
    set_fixed(&mut h, 4, 2, 4, 1);
    h.state_mut().inject_oom_for_test(Some(0)); // every batch, even of one, fails
    let id = h.state_mut().generate().unwrap();
    step_until(&mut h, "the failed job", |a| job_done(a, id));
    assert!(matches!(h.state().jobs.last().unwrap().status, JobStatus::Failed), "{:?}", h.state().jobs.last());
    assert!(h.state().errors().any(|n| n.text.contains("out of memory")), "no notice");
    assert!(h.state().gallery.is_empty());
    // batches above 1 fail: the job halves down to batches that fit and completes, its
    // progress counted once per token (a retried chunk starts its count again)
    h.state_mut().inject_oom_for_test(Some(1));
    let id = h.state_mut().generate().unwrap();
    step_until(&mut h, "the halved job", |a| job_done(a, id));
    let job = h.state().jobs.last().unwrap();
    assert_eq!(job.status, JobStatus::Done);
    assert_eq!(job.done, job.total, "{job:?}");
    assert_eq!(h.state().gallery.len(), 4);
    // the same seeds in one chunk of 4: the same pictures
    h.state_mut().inject_oom_for_test(None);
    let id2 = h.state_mut().generate().unwrap();
    step_until(&mut h, "the unhalved job", |a| job_done(a, id2));
    let pictures = |job: u64| {
        let mut v: Vec<(u64, Vec<u8>)> = h
            .state()
            .gallery
            .iter()
            .filter(|g| g.job == job)
            .map(|g| (g.params.seed, g.rgb.as_ref().unwrap().to_vec()))
            .collect();
        v.sort();
        v
    };
    let (halved, whole) = (pictures(id), pictures(id2));
    assert_eq!(halved.len(), 4);
    assert!(halved == whole, "halving the chunks changed the pictures");
}

#[test]
fn a_model_directory_changed_on_disk_keeps_the_loaded_model_and_a_reload_names_the_damage() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_dir(tmp.path());
    let mut h = ready_app(ModelSource::Dir(dir.clone()), None);
    // the files change under the open app: it samples from what it loaded
    std::fs::write(dir.join("transformer.safetensors"), b"overwritten by another program").unwrap();
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    type_prompt(&mut h, "a red circle");
    set_fixed(&mut h, 2, 2, 2, 1);
    let id = h.state_mut().generate().unwrap();
    step_until(&mut h, "the job", |a| job_done(a, id));
    assert_eq!(h.state().gallery.len(), 2);
    // loading it again reports the damaged directory, and the app keeps running
    h.state_mut().load_model(ModelSource::Dir(dir.clone()));
    step_until(&mut h, "the load error", |a| a.errors().next().is_some());
    let err = h.state().errors().next().unwrap().text.clone();
    assert!(err.contains("tokenizer.json") || err.contains("transformer.safetensors"), "{err}");
    h.state_mut().load_model(ModelSource::Dir(tiny_dir(&tmp.path().join("good"))));
    step_until(&mut h, "the good model", |a| a.model.is_some());
    let id = h.state_mut().generate().unwrap();
    step_until(&mut h, "the job", |a| job_done(a, id));
    assert_eq!(h.state().gallery.len(), 4);
}

/// Resident memory of this process, bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()).unwrap_or(0) * 4096
}

/// Run in a process of its own by the test below, so that no other test's memory is counted:
/// 1,000 samples through the app's worker in many jobs, every fourth cancelled mid-run.
#[test]
#[ignore = "a child process of the long-run test"]
fn long_run_child() {
    let Ok(dir) = std::env::var("TESSERA_LONG_RUN_DIR") else { return };
    let dir = PathBuf::from(dir);
    let mut h = ready_app(ModelSource::Dir(tiny_dir(&dir)), Some(dir.join("data")));
    type_prompt(&mut h, "a red circle above a green square");
    let mut made = 0;
    let mut start = None;
    let mut jobs = 0;
    while made < 1000 {
        set_fixed(&mut h, 20, 20, 4, jobs as u64 * 100);
        let before = h.state().gallery.len();
        let id = h.state_mut().generate().unwrap();
        if jobs % 4 == 3 {
            step_until(&mut h, "a first batch", |a| a.gallery.len() > before || job_done(a, id));
            h.state_mut().cancel(id);
        }
        step_until(&mut h, "the job", |a| job_done(a, id));
        made = h.state().gallery.len();
        jobs += 1;
        if jobs == 2 {
            start = Some((rss(), made)); // after the first jobs have warmed every cache
        }
    }
    let (start, at) = start.unwrap();
    println!("LONG_RUN rss_start={start} rss_end={} samples={made} jobs={jobs} from={at}", rss());
}

#[test]
fn a_thousand_samples_through_the_worker_keep_memory_flat() {
    let _cpu = crate::common::heavy_cpu();
    let tmp = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "app::long_run_child", "--ignored", "--test-threads", "1", "--nocapture"])
        .env("TESSERA_LONG_RUN_DIR", tmp.path())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}\n{}", String::from_utf8_lossy(&o.stderr));
    let line = out.lines().find_map(|l| l.find("LONG_RUN").map(|i| &l[i..])).expect("the child's figures");
    let field = |k: &str| -> f64 {
        line.split_whitespace().find_map(|w| w.strip_prefix(&format!("{k}="))).unwrap().parse().unwrap()
    };
    let (start, end) = (field("rss_start"), field("rss_end"));
    eprintln!(
        "1,000 samples in {} jobs: resident memory {:.1} MB → {:.1} MB ({:+.1}%)",
        field("jobs"),
        start / 1e6,
        end / 1e6,
        100.0 * (end / start - 1.0)
    );
    assert!(field("samples") >= 1000.0);
    assert!(end <= start * 1.05, "resident memory grew from {start} to {end} bytes");
}

#[test]
fn a_gallery_of_ten_thousand_autosaved_samples_restores_and_scrolls() {
    let _cpu = crate::common::heavy_cpu();
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_dir(tmp.path());
    let data = tmp.path().join("data");
    let samples = data.join("samples");
    std::fs::create_dir_all(&samples).unwrap();
    // 10,000 samples in jobs of 10 (written directly: the store's format is the file names,
    // the PNGs and one index line each)
    let size = tessera::Config::tiny().dvae.image_size;
    let mut index = String::new();
    for i in 0..10_000u64 {
        let rgb: Vec<u8> = (0..size * size * 3).map(|k| ((k as u64 * 7 + i) % 256) as u8).collect();
        let p = SampleParams {
            n: 10,
            keep: 10,
            score: Some((i % 97) as f32),
            ..crate::common::sample_params(&format!("sample {i}"), i)
        };
        let file = format!("{:06}-{i}-0.png", i / 10 + 1);
        std::fs::write(samples.join(&file), store::encode_png(&rgb, size, Some(&p)).unwrap()).unwrap();
        let entry = store::StoredSample { file, job: i / 10 + 1, size, params: p };
        index.push_str(&serde_json::to_string(&entry).unwrap());
        index.push('\n');
    }
    std::fs::write(data.join("index.jsonl"), index).unwrap();
    let t0 = Instant::now();
    let app = TesseraApp::new(options(ModelSource::Dir(model), Some(data)), Persisted::default());
    let restore = t0.elapsed();
    assert_eq!(app.gallery.len(), 10_000);
    let mut h = harness(app);
    step_until(&mut h, "the model", |a| a.model.is_some());
    let first_frame = {
        let t = Instant::now();
        h.step();
        t.elapsed()
    };
    // scroll the gallery from top to bottom with the mouse wheel, timing every frame
    let mut frames = Vec::new();
    for _ in 0..120 {
        h.hover_at(egui::pos2(900.0, 420.0));
        h.event(egui::Event::MouseWheel {
            unit: egui::MouseWheelUnit::Point,
            delta: egui::vec2(0.0, -2000.0),
            modifiers: egui::Modifiers::NONE,
            phase: egui::TouchPhase::Move,
            source: egui::MouseWheelSource::Wheel,
        });
        let t = Instant::now();
        h.step();
        frames.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let loaded = h.state().gallery.iter().filter(|g| g.rgb.is_some()).count();
    // scrolling to the bottom read the pictures on the way, and kept only the most recent
    assert_eq!(loaded, tessera::app::RESTORED_PIXELS_CAP, "pictures held after scrolling 10,000");
    assert!(h.state().errors().next().is_none());
    frames.sort_by(f64::total_cmp);
    let (p50, p99) = (frames[frames.len() / 2], frames[frames.len() * 99 / 100]);
    eprintln!(
        "10,000 autosaved samples: restored in {:.0} ms; first frame {:.1} ms; scrolling: frame p50 {p50:.1} ms, p99 {p99:.1} ms; {loaded} pictures held",
        restore.as_secs_f64() * 1e3,
        first_frame.as_secs_f64() * 1e3,
    );
    assert!(restore < Duration::from_secs(20), "restoring took {restore:?}");
}

#[test]
fn a_loaded_models_sampling_settings_replace_untouched_ones_only() {
    use tessera::SampleOptions;
    use tessera::app::Settings;
    let warm = SampleOptions { temperature: 0.8, ..Default::default() };
    let guided = SampleOptions { temperature: 0.9, top_k: 40, top_p: 1.0, guidance: 2.0 };
    // untouched settings (fresh, or persisted before models had settings) take the model's
    let mut s = Settings::default();
    assert!(s.adopt_model_sampling(&warm));
    assert_eq!(s.sample_options(), warm);
    // and the next model's, as long as the user has not changed them since
    assert!(s.adopt_model_sampling(&guided));
    assert_eq!(s.sample_options(), guided);
    // a setting the user changed stays, for this model and the next
    s.temperature = 1.3;
    assert!(!s.adopt_model_sampling(&warm));
    assert_eq!(s.sample_options(), SampleOptions { temperature: 1.3, ..guided.clone() });
    // through the app: a model whose config.json asks for temperature 0.5
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_dir(tmp.path());
    let mut cfg = tessera::Model::load_config(&dir).unwrap();
    cfg.sampling.temperature = 0.5;
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    let h = ready_app(ModelSource::Dir(dir.clone()), Some(tmp.path().join("data")));
    assert_eq!(h.state().settings.temperature, 0.5);
    assert_eq!(h.state().model.as_ref().map(|m| m.sampling.temperature), Some(0.5));
    // one the user set before keeps it
    let mut persisted = Persisted::default();
    persisted.settings.temperature = 1.3;
    let mut h = harness(TesseraApp::new(options(ModelSource::Dir(dir), Some(tmp.path().join("data2"))), persisted));
    step_until(&mut h, "the model", |a| a.model.is_some() || a.errors().next().is_some());
    assert_eq!(h.state().settings.temperature, 1.3);
    // "Model's settings" puts them back to the model's own, and the next model's are taken
    use egui_kittest::kittest::NodeT;
    let disabled = |h: &Harness<'static, TesseraApp>| h.get_by_label("Model's settings").accesskit_node().is_disabled();
    h.state_mut().settings.guidance = 3.0;
    h.run();
    assert!(!disabled(&h));
    h.get_by_label("Model's settings").click();
    h.run();
    let model = SampleOptions { temperature: 0.5, ..Default::default() };
    assert_eq!(h.state().settings.sample_options(), model);
    assert!(disabled(&h), "the button stays enabled with the model's own settings");
    assert!(h.state_mut().settings.adopt_model_sampling(&warm));
}

#[test]
fn live_previews_take_at_most_a_quarter_of_the_workers_time() {
    use tessera::app::worker::PreviewPacer;
    let t0 = Instant::now();
    let ms = |n: u64| t0 + Duration::from_millis(n);
    // every 2 rows; the first preview as soon as two rows are known
    let mut p = PreviewPacer::new(2, 0);
    assert!(!p.due(1, t0));
    assert!(p.due(2, t0));
    // it took 100 ms: the next waits for 2 more rows and 3 × 100 ms after it ended
    p.record(2, ms(0), ms(100));
    assert!(!p.due(3, ms(1_000)), "due before two more rows");
    assert!(!p.due(4, ms(399)), "due 299 ms after a preview that cost 100 ms");
    assert!(p.due(4, ms(400)));
    assert!(p.due(9, ms(400)));
    // a cheap preview lets the next come as soon as the rows are there
    p.record(9, ms(400), ms(401));
    assert!(p.due(11, ms(404)));
    // a prefix of 6 rows: the first preview once 2 rows are sampled below it
    let p = PreviewPacer::new(2, 6);
    assert!(!p.due(7, t0));
    assert!(p.due(8, t0));
    // previews off
    assert!(!PreviewPacer::new(0, 0).due(16, ms(10_000)));
}
