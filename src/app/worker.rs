//! The worker thread: it owns the model and every tensor. The UI sends [`Command`]s and
//! drains [`Event`]s; it never waits on the worker. Jobs queue up and run one at a time, in
//! chunks of a few samples, so a cancel keeps the chunks already finished; a cancel is seen
//! between two sampling steps. A panic inside a job (a libtorch error, say) becomes an
//! event and the worker goes on.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::model::Model;
use crate::model::panic_message;
use crate::sample::SampleOptions;
use crate::text::TextTokenizer;

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// The model compiled into the binary.
    Embedded,
    /// A model directory.
    Dir(PathBuf),
    /// A randomly initialised preset (for tests and demos).
    Random(String),
}

impl ModelSource {
    pub fn describe(&self) -> String {
        match self {
            ModelSource::Embedded => "embedded default".into(),
            ModelSource::Dir(p) => p.display().to_string(),
            ModelSource::Random(p) => format!("random {p}"),
        }
    }
}

/// The top of an image to keep: an RGB8 image at the model's resolution and the number of
/// image tokens (in raster order) to keep from it.
#[derive(Debug, Clone)]
pub struct Prefix {
    pub rgb: Vec<u8>,
    pub keep_tokens: usize,
}

/// One generation request.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub id: u64,
    pub prompt: String,
    pub n: usize,
    pub seed: u64,
    pub opts: SampleOptions,
    pub prefix: Option<Prefix>,
    /// Samples drawn together; a cancel keeps finished chunks.
    pub chunk: usize,
    /// Decode a live preview every this many grid rows (0 = never).
    pub preview_rows: usize,
}

#[derive(Debug)]
pub enum Command {
    Load(ModelSource),
    Generate(JobSpec),
    /// Cancel a queued or running job.
    Cancel(u64),
    Shutdown,
    /// Panics inside the worker's job guard (tests prove a crash becomes a notice).
    #[doc(hidden)]
    Crash,
    /// Test hook: sampling batches larger than this fail as out of memory.
    InjectOom(Option<usize>),
}

/// What the UI needs to know about a loaded model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    pub source: ModelSource,
    pub image_size: usize,
    pub grid: usize,
    pub text_len: usize,
    pub device: String,
    pub dtype: String,
    pub has_reranker: bool,
    pub params: usize,
    /// For counting prompt tokens in the UI (no tensors inside).
    pub tokenizer: Arc<TextTokenizer>,
    /// The model's own sampling settings (its config's `sampling`).
    pub sampling: crate::sample::SampleOptions,
}

/// A finished sample.
#[derive(Debug, Clone)]
pub struct Finished {
    pub seed: u64,
    pub rgb: Vec<u8>,
    pub score: Option<f32>,
}

/// When a job's next live preview is due. A preview decodes every picture of the chunk, which
/// on a CPU costs as much as tens of sampling steps (the default model: ~175 ms for 4 pictures
/// on one thread, against 6–10 ms a step), so previews come every `every` rows of tokens but,
/// after the first, only once the time since the last one is at least [`PreviewPacer::SPACING`]
/// times what it cost: drawing previews takes at most a quarter of the worker's time, however
/// slow the decoder is against the sampler.
#[derive(Debug, Clone)]
pub struct PreviewPacer {
    every: usize,
    rows: usize,
    last: Option<(Instant, Duration)>,
}

impl PreviewPacer {
    /// The wait after a preview, in multiples of its cost.
    pub const SPACING: u32 = 3;

    /// Previews every `every` rows (0: never), the first once `every` rows past `start_rows`
    /// (the rows a prefix already gives).
    pub fn new(every: usize, start_rows: usize) -> Self {
        Self { every, rows: start_rows, last: None }
    }

    /// Whether a preview of `rows` known rows is due at `now`.
    pub fn due(&self, rows: usize, now: Instant) -> bool {
        self.every > 0
            && rows >= self.rows + self.every
            && self.last.is_none_or(|(end, cost)| now.saturating_duration_since(end) >= cost * Self::SPACING)
    }

    /// A preview of `rows` rows was drawn from `began` to `ended`.
    pub fn record(&mut self, rows: usize, began: Instant, ended: Instant) {
        self.rows = rows;
        self.last = Some((ended, ended.saturating_duration_since(began)));
    }
}

#[derive(Debug)]
pub enum Event {
    Loading {
        what: String,
        fraction: f32,
    },
    ModelReady(ModelInfo),
    ModelFailed(String),
    JobStarted {
        id: u64,
    },
    Progress {
        id: u64,
        done: usize,
        total: usize,
        tokens_per_s: f64,
        eta_s: f64,
    },
    /// Partial images of the chunk being sampled (unsampled rows grey), with their seeds.
    Preview {
        id: u64,
        seeds: Vec<u64>,
        images: Vec<Vec<u8>>,
        rows: usize,
    },
    Samples {
        id: u64,
        samples: Vec<Finished>,
    },
    JobDone {
        id: u64,
        cancelled: bool,
        seconds: f64,
    },
    JobFailed {
        id: u64,
        error: String,
    },
    /// A command crashed inside the worker (which carries on).
    WorkerCrashed(String),
    /// Acknowledges a cancel of a job that was queued or running; `at` is when the worker
    /// stopped (so the latency does not include the UI's next frame).
    Cancelled {
        id: u64,
        at: Instant,
    },
}

/// The UI's handle on the worker.
pub struct Worker {
    pub tx: Sender<Command>,
    pub rx: Receiver<Event>,
    handle: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts the worker thread. `notify` is called after every event (the app passes a
    /// repaint request); `threads` sets libtorch's CPU threads when given.
    pub fn spawn(device: Device, threads: Option<usize>, notify: Arc<dyn Fn() + Send + Sync>) -> Self {
        let (tx, cmd_rx) = crossbeam_channel::unbounded();
        let (ev_tx, rx) = crossbeam_channel::unbounded();
        let handle = std::thread::Builder::new()
            .name("tessera-worker".into())
            .spawn(move || {
                if let Some(t) = threads {
                    tch::set_num_threads(t as i32);
                }
                let mut w = WorkerState {
                    device,
                    model: None,
                    queue: VecDeque::new(),
                    deferred: VecDeque::new(),
                    cmd_rx,
                    ev_tx,
                    notify,
                };
                w.run();
            })
            .ok();
        Self { tx, rx, handle }
    }

    pub fn send(&self, cmd: Command) {
        // A send fails only when the worker has gone; the UI notices through `alive`.
        let _ = self.tx.send(cmd);
    }

    pub fn alive(&self) -> bool {
        self.handle.as_ref().is_some_and(|h| !h.is_finished())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.tx.send(Command::Shutdown);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

struct WorkerState {
    device: Device,
    model: Option<(Model, ModelInfo)>,
    queue: VecDeque<JobSpec>,
    /// Commands that wait for the running job to end (a model load, a shutdown).
    deferred: VecDeque<Command>,
    cmd_rx: Receiver<Command>,
    ev_tx: Sender<Event>,
    notify: Arc<dyn Fn() + Send + Sync>,
}

/// Copies the first `keep` token cells (raster order) of `src` into `dst`, so the kept part
/// of a completed image is exactly the given pixels, not their dVAE reconstruction.
pub fn composite_prefix(dst: &mut [u8], src: &[u8], size: usize, grid: usize, keep: usize) {
    let cell = size / grid.max(1);
    for t in 0..keep.min(grid * grid) {
        let (r, c) = (t / grid, t % grid);
        for y in r * cell..(r + 1) * cell {
            let a = (y * size + c * cell) * 3;
            let b = a + cell * 3;
            if b <= dst.len() && b <= src.len() {
                dst[a..b].copy_from_slice(&src[a..b]);
            }
        }
    }
}

/// Greys out token cells from `known` on (raster order): how a partial image is previewed.
pub fn grey_unknown(img: &mut [u8], size: usize, grid: usize, known: usize) {
    let cell = size / grid.max(1);
    for t in known..grid * grid {
        let (r, c) = (t / grid, t % grid);
        for y in r * cell..(r + 1) * cell {
            let a = (y * size + c * cell) * 3;
            let b = (a + cell * 3).min(img.len());
            if a < b {
                img[a..b].fill(96);
            }
        }
    }
}

impl WorkerState {
    fn emit(&self, e: Event) {
        let _ = self.ev_tx.send(e);
        (self.notify)();
    }

    fn run(&mut self) {
        loop {
            if let Some(cmd) = self.deferred.pop_front() {
                if !self.handle(cmd, None) {
                    return;
                }
                continue;
            }
            if let Some(job) = self.queue.pop_front() {
                self.run_job(job);
                continue;
            }
            match self.cmd_rx.recv() {
                Ok(cmd) => {
                    if !self.handle(cmd, None) {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    }

    /// Handles a command outside a job's sampling loop; returns false on shutdown.
    fn handle(&mut self, cmd: Command, running: Option<u64>) -> bool {
        match cmd {
            Command::Shutdown => return false,
            Command::Generate(job) => self.queue.push_back(job),
            Command::Cancel(id) => {
                let before = self.queue.len();
                self.queue.retain(|j| j.id != id);
                if self.queue.len() != before && running != Some(id) {
                    self.emit(Event::Cancelled { id, at: Instant::now() });
                    self.emit(Event::JobDone { id, cancelled: true, seconds: 0.0 });
                }
            }
            Command::Load(src) => self.load(src),
            Command::InjectOom(limit) => {
                if let Some((m, _)) = &mut self.model {
                    m.inject_oom_above = limit;
                }
            }
            Command::Crash => {
                let r: std::thread::Result<()> = std::panic::catch_unwind(|| panic!("deliberate crash"));
                if let Err(p) = r {
                    self.emit(Event::WorkerCrashed(panic_message(&*p)));
                }
            }
        }
        true
    }

    fn load(&mut self, src: ModelSource) {
        self.emit(Event::Loading { what: format!("loading {}", src.describe()), fraction: 0.1 });
        self.model = None;
        let device = self.device;
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| -> Result<Model> {
            let mut m = match &src {
                ModelSource::Embedded => Model::load_embedded_default(device)?,
                ModelSource::Dir(d) => Model::load(d, device)?,
                ModelSource::Random(p) => Model::random_init(&crate::Config::preset(p)?, device, 0)?,
            };
            // as `generate --dtype auto` samples, so that a seed draws the same picture in both
            let kind = crate::parse_dtype("auto", device)?;
            if kind != Kind::Float {
                m.set_dtype(kind)?;
            }
            Ok(m)
        }));
        match result {
            Ok(Ok(model)) => {
                let info = ModelInfo {
                    name: model.config.name.clone(),
                    source: src,
                    image_size: model.config.dvae.image_size,
                    grid: model.config.grid_size(),
                    text_len: model.config.text.text_len,
                    device: crate::device_name(device),
                    dtype: crate::compute_name(Some(model.transformer.net.cache_kind())).into(),
                    has_reranker: model.reranker.is_some(),
                    params: crate::params::count(&model.config).total as usize,
                    tokenizer: Arc::new(model.tokenizer.clone()),
                    sampling: model.config.sampling.clone(),
                };
                self.model = Some((model, info.clone()));
                self.emit(Event::ModelReady(info));
            }
            Ok(Err(e)) => self.emit(Event::ModelFailed(e.to_string())),
            Err(p) => self.emit(Event::ModelFailed(format!("the model crashed while loading: {}", panic_message(&*p)))),
        }
    }

    /// Drains pending commands during a job; returns true when the job must stop.
    fn poll(&mut self, id: u64) -> bool {
        let mut stop = false;
        loop {
            match self.cmd_rx.try_recv() {
                Ok(Command::Cancel(c)) if c == id => stop = true,
                Ok(cmd @ (Command::Load(_) | Command::Shutdown)) => {
                    // Another model or quitting ends the running job first.
                    self.deferred.push_back(cmd);
                    stop = true;
                }
                Ok(cmd) => {
                    self.handle(cmd, Some(id));
                }
                Err(TryRecvError::Empty) => return stop,
                Err(TryRecvError::Disconnected) => return true,
            }
        }
    }

    fn run_job(&mut self, job: JobSpec) {
        let id = job.id;
        let Some((model, info)) = self.model.take() else {
            self.emit(Event::JobFailed { id, error: "no model is loaded".into() });
            return;
        };
        self.emit(Event::JobStarted { id });
        let start = Instant::now();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| self.sample_job(&model, &job, start)));
        self.model = Some((model, info));
        let seconds = start.elapsed().as_secs_f64();
        match outcome {
            Ok(Ok(cancelled)) => {
                if cancelled {
                    self.emit(Event::Cancelled { id, at: Instant::now() });
                }
                self.emit(Event::JobDone { id, cancelled, seconds });
            }
            Ok(Err(e)) => self.emit(Event::JobFailed { id, error: e.to_string() }),
            Err(p) => self.emit(Event::JobFailed { id, error: format!("the worker crashed: {}", panic_message(&*p)) }),
        }
    }

    /// Samples a job chunk by chunk; returns whether it was cancelled.
    fn sample_job(&mut self, model: &Model, job: &JobSpec, start: Instant) -> Result<bool> {
        if job.n == 0 {
            return Err(Error::Invalid("the number of samples must be at least 1".into()));
        }
        let g = model.config.grid_size();
        let size = model.config.dvae.image_size;
        let image_len = g * g;
        let kept = job.prefix.as_ref().map_or(0, |p| p.keep_tokens.min(image_len));
        let prefix = match &job.prefix {
            Some(p) if kept > 0 => {
                if p.rgb.len() != size * size * 3 {
                    return Err(Error::Invalid(format!("the canvas is not a {size}×{size} RGB image")));
                }
                Some(model.prefix_tokens_n(&p.rgb, kept)?)
            }
            _ => None,
        };
        let total = job.n * (image_len - kept);
        // chunks that run out of memory are halved: the same seeds, the same images
        crate::model::in_batches(job.n, job.chunk, |first, m| {
            let c = Chunk { first, m, kept, total, start, prefix: prefix.as_ref() };
            // the tokens of the chunks before (a retried chunk counts from its start again)
            let mut done = first * (image_len - kept);
            self.sample_chunk(model, job, &c, &mut done)
        })
    }

    /// Samples one chunk of a job, emitting progress, previews and the finished samples;
    /// returns whether the job was cancelled.
    fn sample_chunk(&mut self, model: &Model, job: &JobSpec, c: &Chunk, done: &mut usize) -> Result<bool> {
        let g = model.config.grid_size();
        let size = model.config.dvae.image_size;
        let (m, kept) = (c.m, c.kept);
        let seed = job.seed.wrapping_add(c.first as u64);
        let seeds = crate::sample::batch_seeds(seed, m);
        let mut sampler = model.sampler(&job.prompt, m, seed, c.prefix, &job.opts)?;
        let mut last_progress: Option<Instant> = None;
        let mut pacer = PreviewPacer::new(job.preview_rows, kept / g);
        if self.poll(job.id) {
            return Ok(true);
        }
        while sampler.step().is_some() {
            *done += m;
            if self.poll(job.id) {
                return Ok(true);
            }
            if last_progress.is_none_or(|t| t.elapsed().as_millis() >= 40) || sampler.is_done() {
                last_progress = Some(Instant::now());
                let secs = c.start.elapsed().as_secs_f64().max(1e-6);
                let rate = *done as f64 / secs;
                let eta = (c.total - *done) as f64 / rate.max(1e-9);
                self.emit(Event::Progress { id: job.id, done: *done, total: c.total, tokens_per_s: rate, eta_s: eta });
            }
            let known = sampler.progress().done;
            let rows = known / g;
            let began = Instant::now();
            if !sampler.is_done() && pacer.due(rows, began) {
                let mut images = model.decode(sampler.tokens())?;
                for img in &mut images {
                    grey_unknown(img, size, g, known);
                    if let Some(p) = &job.prefix {
                        composite_prefix(img, &p.rgb, size, g, kept);
                    }
                }
                pacer.record(rows, began, Instant::now());
                self.emit(Event::Preview { id: job.id, seeds: seeds.clone(), images, rows });
            }
        }
        let tokens: Tensor = sampler.tokens().shallow_clone();
        drop(sampler);
        let mut images = model.decode(&tokens)?;
        if let Some(p) = &job.prefix {
            for img in &mut images {
                composite_prefix(img, &p.rgb, size, g, kept);
            }
        }
        let scores = model.rerank(&job.prompt, &images)?;
        let samples = images
            .into_iter()
            .enumerate()
            .map(|(i, rgb)| Finished { seed: seeds[i], rgb, score: scores.as_ref().map(|s| s[i]) })
            .collect();
        self.emit(Event::Samples { id: job.id, samples });
        Ok(false)
    }
}

/// Where one chunk of a job lies in it.
struct Chunk<'a> {
    first: usize,
    m: usize,
    kept: usize,
    total: usize,
    start: Instant,
    prefix: Option<&'a Tensor>,
}
