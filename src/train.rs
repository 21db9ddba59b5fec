//! Training from the command line: the tokenizer, the dVAE and the transformer, with the
//! paper's recipes as defaults [P A.2, B.2]. Progress goes to stderr, losses and learning rates
//! to `<component>.log.jsonl` in the model directory, sample grids to `samples/`. Every
//! `checkpoint_every` steps the weights (EMA) and the whole training state (raw weights, AdamW
//! moments, EMA, step) are written atomically; `resume` continues from that state with the same
//! data order (batch k is always examples k·B..(k+1)·B) and the same random draws (reseeded
//! from the step), so a killed run picks up exactly where its last checkpoint was.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::config::Config;
use crate::data::{Example, Source};
use crate::dvae::{DvaeSchedule, cosine_anneal};
use crate::error::{Error, Result};
use crate::io::{load_varstore, write_atomic};
use crate::model::{CONFIG_FILE, DVAE_FILE, DvaeModel, TOKENIZER_FILE, TransformerModel, from_rgb8};
use crate::optim::{AdamW, Ema};
use crate::sample::SeedRng;
use crate::shards::TokenShards;
use crate::text::TextTokenizer;

/// Knobs shared by every trainer.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub data: String,
    pub dir: PathBuf,
    pub steps: usize,
    pub batch: usize,
    pub checkpoint_every: usize,
    pub sample_every: usize,
    pub log_every: usize,
    pub seed: u64,
    pub device: Device,
    /// Compute precision of the transformer's matrix products and the dVAE's convolutions
    /// (bf16 = mixed precision: f32 master weights, losses and hard codes); `None` = f32. The
    /// reranker trains in f32 whatever it is.
    pub compute: Option<Kind>,
    pub resume: bool,
    /// Stop after this many steps of this invocation (tests use it to simulate a kill).
    pub stop_after: Option<usize>,
    pub quiet: bool,
    /// Loader threads (0: every core but one).
    pub workers: usize,
    /// Train the transformer and the reranker from the token shards in this folder instead of
    /// rendering and encoding pictures.
    pub shards: Option<PathBuf>,
    /// Measure only: write no weights, state, log or samples (used to plan a time budget).
    pub calibrate: bool,
    /// Store the averaged weights in bf16 (half the size; training state stays f32).
    pub weights_bf16: bool,
    /// Shown in front of the progress line when the trainer runs as a stage of a longer run.
    pub stage: Option<StageProgress>,
    /// Stop (with a checkpoint) at the first step that starts later than this, whatever
    /// `steps` says: the guard that keeps a timed run inside its budget.
    pub deadline: Option<Instant>,
}

impl TrainOptions {
    /// Options with the command line's defaults for a model directory.
    pub fn new(dir: &Path) -> Self {
        Self {
            data: "world".into(),
            dir: dir.to_path_buf(),
            steps: 10_000,
            batch: 32,
            checkpoint_every: 500,
            sample_every: 1000,
            log_every: 10,
            seed: 0,
            device: Device::Cpu,
            compute: None,
            resume: false,
            stop_after: None,
            quiet: false,
            workers: 0,
            shards: None,
            calibrate: false,
            weights_bf16: false,
            stage: None,
            deadline: None,
        }
    }

    fn loader_workers(&self) -> usize {
        if self.workers == 0 { default_workers() } else { self.workers }
    }
}

/// Where a stage stands in a whole run (`train all`): its label and the run's clock.
#[derive(Debug, Clone)]
pub struct StageProgress {
    pub label: String,
    /// When this invocation of the whole run started.
    pub started: Instant,
    /// Seconds the run had spent before this invocation (a resumed run).
    pub spent_before: f64,
    pub budget: f64,
}

impl StageProgress {
    pub fn elapsed(&self) -> f64 {
        self.spent_before + self.started.elapsed().as_secs_f64()
    }
}

/// dVAE recipe.
#[derive(Debug, Clone)]
pub struct DvaeRecipe {
    pub schedule: DvaeSchedule,
    pub ema: f64,
    pub weight_decay: f64,
    /// Fine-tune the decoder of the directory's trained dVAE on hard codes, the encoder (and so
    /// every image's tokens) frozen; its training state is `dvae-decoder.state.safetensors`,
    /// its log `dvae-decoder.log.jsonl`, and the result replaces `dvae.safetensors`.
    pub decoder_only: bool,
    /// Weight of the codebook-usage term ([`crate::dvae::Dvae::loss_with_usage`]); 0 is the
    /// paper's objective.
    pub usage_weight: f64,
    /// Steps from which the decoder is trained on hard codes with the straight-through
    /// estimator ([`crate::dvae::Dvae::loss_variant`]); `None`: never (the paper's recipe).
    pub hard_from: Option<usize>,
    /// The reconstruction term (the paper's logit-Laplace by default).
    pub recon: crate::dvae::Recon,
    /// With `decoder_only`: grow the decoder to this base width before fine-tuning
    /// ([`crate::dvae::grow_decoder`]; `config.json` records it).
    pub decoder_hidden: Option<usize>,
    /// With `decoder_only`: grow the decoder to this many blocks per group.
    pub decoder_blocks: Option<usize>,
    /// Start every weight from this trained dVAE (the directory's shapes) instead of random
    /// ones; ignored when resuming. Not with `decoder_only`, which starts from the directory's.
    pub init_from: Option<PathBuf>,
    /// With `hard_from`: straight-through from the encoder's argmax codes, as at inference,
    /// instead of Gumbel samples ([`crate::dvae::Dvae::set_argmax_codes`]).
    pub argmax_codes: bool,
    /// With `init_from`: split each of its codes into this many / its codebook size codes
    /// before training ([`crate::dvae::split_codebook`]; `config.json` records the new size).
    pub codebook: Option<usize>,
    /// Train only the encoder's codebook logits and the decoder; the encoder's convolutions
    /// before them keep the `init_from` weights ([`crate::dvae::Dvae::freeze_encoder_trunk`]).
    pub freeze_trunk: bool,
}

impl Default for DvaeRecipe {
    fn default() -> Self {
        Self {
            schedule: DvaeSchedule::default(),
            ema: 0.999,
            weight_decay: 1e-4,
            decoder_only: false,
            usage_weight: 0.0,
            hard_from: None,
            recon: crate::dvae::Recon::default(),
            decoder_hidden: None,
            decoder_blocks: None,
            init_from: None,
            argmax_codes: false,
            codebook: None,
            freeze_trunk: false,
        }
    }
}

/// Transformer recipe.
#[derive(Debug, Clone)]
pub struct TransformerRecipe {
    pub lr: f64,
    pub warmup: usize,
    pub ema: f64,
    pub clip: f64,
    pub weight_decay: f64,
    /// Start from these transformer weights (a model of the same shape) instead of a random
    /// initialisation, e.g. to retrain a model's transformer on a new dVAE: what it learnt of
    /// captions, layout and counting carries over, the image tokens' meanings are relearnt.
    pub init_from: Option<PathBuf>,
    /// The model directory whose dVAE made the codes the `init_from` transformer was trained
    /// on, when it is not this directory's: the image tokens' embedding and head are carried
    /// over to this directory's codes ([`crate::remap`]) before training starts.
    pub codes_from: Option<PathBuf>,
}

impl Default for TransformerRecipe {
    fn default() -> Self {
        Self {
            lr: 4.5e-4,
            warmup: 5_000,
            ema: 0.99,
            clip: 4.0,
            weight_decay: 4.5e-2,
            init_from: None,
            codes_from: None,
        }
    }
}

/// Linear warm-up to `peak`, then cosine decay to zero at `total`.
pub fn warmup_cosine(peak: f64, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    cosine_anneal(peak, 0.0, step - warmup, total.saturating_sub(warmup).max(1))
}

/// What a finished (or stopped) run reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub step: usize,
    pub last_loss: f64,
    pub examples_per_s: f64,
    /// Fraction of the time the trainer waited for data.
    pub data_wait: f64,
    pub skipped_files: usize,
    /// Examples per second after the first steps (start-up and kernel selection excluded).
    pub steady_examples_per_s: f64,
}

// ---------------------------------------------------------------------------------------
// Model directories

/// Writes `config.json` for a new model directory (not overwriting one that differs).
pub fn init_dir(dir: &Path, cfg: &Config) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let path = dir.join(CONFIG_FILE);
    if path.exists() {
        let old = crate::model::Model::load_config(dir)?;
        if &old != cfg {
            return Err(Error::Invalid(format!(
                "{} already holds another configuration; use a new directory",
                path.display()
            )));
        }
        return Ok(());
    }
    crate::model::Model::save_config(dir, cfg)
}

/// Trains the BPE tokenizer on `n` captions of the data and saves `tokenizer.json`.
pub fn train_tokenizer(dir: &Path, data: &str, n: usize) -> Result<TextTokenizer> {
    let cfg = crate::model::Model::load_config(dir)?;
    let source = Source::open(data)?.for_captions("tokenizer")?;
    let mut rng = SeedRng::new(0);
    let captions: Vec<String> = (0..n as u64).filter_map(|i| source.get(i, 8, &mut rng).map(|e| e.caption)).collect();
    if captions.is_empty() {
        return Err(Error::Invalid(format!("no captions could be read from {data}")));
    }
    let tok = TextTokenizer::train(captions.iter(), cfg.text.vocab_size)?;
    tok.save(&dir.join(TOKENIZER_FILE))?;
    Ok(tok)
}

// ---------------------------------------------------------------------------------------
// Data loading

/// One training batch: pictures (the world, image files) or image tokens (token shards), with
/// their captions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    /// RGB8 pictures, `size × size × 3` each (empty when the batch comes from token shards).
    pub images: Vec<Vec<u8>>,
    /// `captions.len() × image_len` image tokens (empty when the batch holds pictures).
    pub tokens: Vec<u16>,
    pub captions: Vec<String>,
    /// The scenes drawn, one per picture, when every picture comes from the synthetic world.
    pub scenes: Vec<crate::world::Scene>,
}

/// Where a trainer's batches come from.
#[derive(Debug, Clone)]
pub enum Feed {
    /// Pictures rendered or decoded at `size`.
    Images { source: Source, size: usize },
    /// Pre-encoded image tokens.
    Tokens(Arc<TokenShards>),
}

/// Batch `step` of a training stream. It depends on (feed, batch size, seed, step) alone, never
/// on which thread makes it or when, so resumed and parallel runs see exactly the same data.
/// `None` when nothing in the data can be read.
pub fn make_batch(feed: &Feed, batch: usize, seed: u64, step: usize) -> Option<Batch> {
    let mut out = Batch::default();
    match feed {
        Feed::Images { source, size } => {
            let mut k = 0u64;
            while out.images.len() < batch {
                // example indices are fixed by the step; unreadable ones are replaced by the
                // next index past the batch, so the order stays reproducible
                let index =
                    if k < batch as u64 { (step * batch) as u64 + k } else { u64::MAX / 2 + (step * batch) as u64 + k };
                let mut rng = SeedRng::new(seed ^ index.wrapping_mul(0x2545_F491_4F6C_DD1D));
                if let Some(Example { rgb, caption, scene }) = source.get(index, *size, &mut rng) {
                    out.images.push(rgb);
                    out.captions.push(caption);
                    out.scenes.extend(scene);
                }
                k += 1;
                if k > 100 * batch as u64 {
                    return None;
                }
            }
        }
        Feed::Tokens(shards) => {
            if shards.is_empty() {
                return None;
            }
            for k in 0..batch as u64 {
                let (tokens, caption) = shards.get(shards.stream_index(seed, (step * batch) as u64 + k));
                out.tokens.extend_from_slice(tokens);
                out.captions.push(caption.to_string());
            }
        }
    }
    Some(out)
}

/// Loader threads to use by default: every core but one (the trainer's).
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).saturating_sub(1).clamp(1, 64)
}

/// Batches `first..last` made by a pool of worker threads: worker w makes batches
/// `first + w`, `first + w + W`, … two ahead, and they are handed out in step order, so the
/// stream is the same for any number of workers.
pub struct Loader {
    rxs: Vec<std::sync::mpsc::Receiver<Batch>>,
    next: usize,
    first: usize,
    last: usize,
}

/// Starts the loader threads for batches `first..last`.
pub fn spawn_loader(feed: Feed, batch: usize, seed: u64, first: usize, last: usize, workers: usize) -> Loader {
    let workers = workers.clamp(1, last.saturating_sub(first).max(1));
    let rxs = (0..workers)
        .map(|w| {
            let (tx, rx) = std::sync::mpsc::sync_channel(2);
            let feed = feed.clone();
            std::thread::spawn(move || {
                for step in (first + w..last).step_by(workers) {
                    // nothing readable: the trainer sees the channel close
                    let Some(b) = make_batch(&feed, batch, seed, step) else { return };
                    if tx.send(b).is_err() {
                        return;
                    }
                }
            });
            rx
        })
        .collect();
    Loader { rxs, next: first, first, last }
}

impl Iterator for Loader {
    type Item = Batch;
    fn next(&mut self) -> Option<Batch> {
        if self.next >= self.last {
            return None;
        }
        let w = (self.next - self.first) % self.rxs.len();
        self.next += 1;
        self.rxs[w].recv().ok()
    }
}

// ---------------------------------------------------------------------------------------
// Checkpoints of training state

fn state_path(dir: &Path, component: &str) -> PathBuf {
    dir.join(format!("{component}.state.safetensors"))
}

fn save_state(dir: &Path, component: &str, step: usize, vs: &VarStore, opt: &AdamW, ema: &Ema) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> =
        vs.variables().into_iter().map(|(n, t)| (format!("param.{n}"), t)).collect();
    tensors.extend(opt.state());
    tensors.extend(ema.tensors().into_iter().map(|(n, t)| (format!("ema.{n}"), t)));
    let mut meta = HashMap::new();
    meta.insert("step".to_string(), step.to_string());
    meta.insert("adam_step".to_string(), opt.step.to_string());
    let bytes = crate::io::tensors_to_safetensors(&tensors, Some(meta))?;
    write_atomic(&state_path(dir, component), &bytes)
}

/// Restores a training state; returns the step it was saved at.
fn load_state(dir: &Path, component: &str, vs: &VarStore, opt: &mut AdamW, ema: &mut Ema) -> Result<usize> {
    let path = state_path(dir, component);
    let (tensors, meta) = crate::io::read_safetensors(&path)?;
    let get = |k: &str| -> Result<usize> {
        meta.get(k)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| Error::checkpoint(&path, format!("training state lacks {k}")))
    };
    let step = get("step")?;
    opt.step = get("adam_step")?;
    let params: BTreeMap<String, Tensor> = tensors
        .iter()
        .filter_map(|(n, t)| n.strip_prefix("param.").map(|n| (n.to_string(), t.shallow_clone())))
        .collect();
    tch::no_grad(|| -> Result<()> {
        for (name, var) in vs.variables() {
            let t =
                params.get(&name).ok_or_else(|| Error::checkpoint(&path, format!("training state lacks {name}")))?;
            var.shallow_clone().f_copy_(t)?;
        }
        Ok(())
    })?;
    let all: BTreeMap<String, Tensor> = tensors.into_iter().collect();
    opt.load_state(&all).map_err(|e| Error::checkpoint(&path, e.to_string()))?;
    ema.load(&all, "ema.").map_err(|e| Error::checkpoint(&path, e.to_string()))?;
    Ok(step)
}

struct Logger {
    file: Option<std::fs::File>,
    quiet: bool,
    started: Instant,
    stage: Option<StageProgress>,
}

/// Seconds as `42s` or `3m07s`.
pub fn fmt_secs(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    if s >= 60 { format!("{}m{:02}s", s / 60, s % 60) } else { format!("{s}s") }
}

impl Logger {
    /// Opens the log; a run resumed at step `start` first drops the records of steps after it
    /// (written by the killed run past its last checkpoint), so every step is logged once.
    fn open(opts: &TrainOptions, component: &str, start: usize) -> Result<Self> {
        let resume = opts.resume && start > 0;
        let path = opts.dir.join(format!("{component}.log.jsonl"));
        if resume
            && !opts.calibrate
            && let Ok(text) = std::fs::read_to_string(&path)
        {
            let kept: String = text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s as usize <= start)
                })
                .map(|l| format!("{l}\n"))
                .collect();
            write_atomic(&path, kept.as_bytes())?;
        }
        let file = if opts.calibrate {
            None
        } else {
            Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(resume)
                    .write(true)
                    .truncate(!resume)
                    .open(&path)
                    .map_err(|e| Error::io(&path, e))?,
            )
        };
        Ok(Self { file, quiet: opts.quiet || opts.calibrate, started: Instant::now(), stage: opts.stage.clone() })
    }

    fn log(&mut self, record: serde_json::Value) {
        if let Some(f) = &mut self.file {
            let _ = writeln!(f, "{record}");
        }
    }

    /// `done` steps of this invocation so far, `step` of `total` overall.
    fn progress(&self, step: usize, done: usize, total: usize, loss: f64, rate: f64, unit: &str) {
        if self.quiet {
            return;
        }
        let per_step = self.started.elapsed().as_secs_f64() / done.max(1) as f64;
        let left = (total - step) as f64 * per_step;
        let width = 30;
        let filled = width * step / total.max(1);
        let bar = format!("{}{}", "#".repeat(filled), "-".repeat(width - filled));
        match &self.stage {
            Some(st) => eprint!(
                "\r[{}] [{bar}] {step}/{total} loss {loss:.4} {rate:.0} {unit}/s · stage {} left · run {} of {}   ",
                st.label,
                fmt_secs(left),
                fmt_secs(st.elapsed()),
                fmt_secs(st.budget)
            ),
            None => eprint!(
                "\r[{bar}] {step}/{total} loss {loss:.4} {rate:.2} {unit}/s, {:.0}s elapsed, {:.0}s left   ",
                self.started.elapsed().as_secs_f64(),
                left
            ),
        }
        let _ = std::io::stderr().flush();
    }
}

/// Steps after which the steady rate is measured (the first ones pay for start-up).
const WARM_STEPS: usize = 3;

/// The part every training loop shares: batches from the loader (timing the wait), the
/// per-step reseeding, the step counter, the log and the final summary.
struct Run {
    loader: Loader,
    log: Logger,
    wait: f64,
    t0: Instant,
    warm: Option<Instant>,
    start: usize,
    end: usize,
    step: usize,
    /// The last step's loss, still on the device: read only when logged.
    last: Option<Tensor>,
}

impl Run {
    fn begin(opts: &TrainOptions, component: &str, feed: Feed, start: usize) -> Result<Self> {
        crate::io::remove_stale_temps(&opts.dir); // what a killed run was writing
        let end = opts.stop_after.map(|n| (start + n).min(opts.steps)).unwrap_or(opts.steps);
        Ok(Self {
            loader: spawn_loader(feed, opts.batch, opts.seed, start, end, opts.loader_workers()),
            log: Logger::open(opts, component, start)?,
            wait: 0.0,
            t0: Instant::now(),
            warm: None,
            start,
            end,
            step: start,
            last: None,
        })
    }

    /// The next batch, with libtorch's generator reseeded for this step; `None` at the end.
    fn next_batch(&mut self, opts: &TrainOptions) -> Result<Option<Batch>> {
        if self.step >= self.end {
            return Ok(None);
        }
        if self.step > self.start && opts.deadline.is_some_and(|d| Instant::now() >= d) {
            // out of time: this step is the last one (and checkpoints)
            self.end = self.step + 1;
        }
        let tw = Instant::now();
        let batch = self.loader.next().ok_or_else(|| Error::Invalid(format!("no readable images in {}", opts.data)))?;
        self.wait += tw.elapsed().as_secs_f64();
        tch::manual_seed((opts.seed ^ self.step as u64) as i64);
        Ok(Some(batch))
    }

    /// Counts a finished step with its loss (kept on the device: no step waits for the device
    /// unless it logs); returns the new step number.
    fn advance(&mut self, loss: &Tensor) -> usize {
        self.step += 1;
        self.last = Some(loss.detach());
        if self.step == self.start + WARM_STEPS {
            self.warm = Some(Instant::now());
        }
        self.step
    }

    fn is_last(&self) -> bool {
        self.step == self.end
    }

    /// The last step's loss (waits for the device).
    fn last_loss(&self) -> f64 {
        self.last.as_ref().map_or(f64::NAN, |t| t.double_value(&[]))
    }

    /// Items per second over this invocation, `per_step` items a step.
    fn rate(&self, per_step: usize) -> f64 {
        ((self.step - self.start) * per_step) as f64 / self.t0.elapsed().as_secs_f64()
    }

    fn data_wait(&self) -> f64 {
        self.wait / self.t0.elapsed().as_secs_f64()
    }

    fn record(&mut self, steps: usize, record: serde_json::Value, rate: f64, unit: &str) {
        self.log.log(record);
        self.log.progress(self.step, self.step - self.start, steps, self.last_loss(), rate, unit);
    }

    fn finish(self, opts: &TrainOptions, skipped_files: usize) -> TrainSummary {
        if !self.log.quiet && opts.stage.is_none() {
            eprintln!();
        }
        let steady = match self.warm {
            Some(w) if self.step > self.start + WARM_STEPS => {
                ((self.step - self.start - WARM_STEPS) * opts.batch) as f64 / w.elapsed().as_secs_f64().max(1e-9)
            }
            _ => self.rate(opts.batch),
        };
        TrainSummary {
            step: self.step,
            last_loss: self.last_loss(),
            examples_per_s: self.rate(opts.batch),
            data_wait: self.data_wait(),
            skipped_files,
            steady_examples_per_s: steady,
        }
    }
}

/// Images in a row, as one PNG.
fn save_grid(path: &Path, images: &[Vec<u8>], size: usize) -> Result<()> {
    let n = images.len().max(1);
    let mut grid = image::RgbImage::new((size * n) as u32, size as u32);
    for (i, img) in images.iter().enumerate() {
        for y in 0..size {
            for x in 0..size {
                let p = (y * size + x) * 3;
                grid.put_pixel((i * size + x) as u32, y as u32, image::Rgb([img[p], img[p + 1], img[p + 2]]));
            }
        }
    }
    let mut bytes = Vec::new();
    grid.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
        .map_err(|e| Error::Image { path: path.to_path_buf(), msg: e.to_string() })?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    write_atomic(path, &bytes)
}

// ---------------------------------------------------------------------------------------
// dVAE

/// Trains the dVAE of the model directory.
pub fn train_dvae(opts: &TrainOptions, recipe: &DvaeRecipe) -> Result<TrainSummary> {
    if recipe.init_from.is_some() && recipe.decoder_only {
        return Err(Error::Invalid(
            "--init-from and --decoder-only: the decoder fine-tune starts from the directory's dVAE".into(),
        ));
    }
    if (recipe.codebook.is_some() || recipe.freeze_trunk) && recipe.init_from.is_none() {
        return Err(Error::Invalid(
            "--codebook and --freeze-trunk start from a trained dVAE's codes and features: give --init-from".into(),
        ));
    }
    let mut cfg = crate::model::Model::load_config(&opts.dir)?;
    let source = Source::open(&opts.data)?;
    let component = if recipe.decoder_only { "dvae-decoder" } else { "dvae" };
    let grow = recipe.decoder_hidden.is_some() || recipe.decoder_blocks.is_some();
    if grow {
        cfg = grown_config(opts, recipe, &cfg, component)?;
    }
    if let Some(n) = recipe.codebook {
        cfg = split_config(opts, &cfg, n)?;
    }
    tch::manual_seed(opts.seed as i64); // the initial weights depend on the seed alone
    let mut model = DvaeModel::new(&cfg, opts.device);
    model.net.set_compute_kind(opts.compute);
    model.net.set_recon(recipe.recon);
    model.net.set_argmax_codes(recipe.argmax_codes);
    if recipe.decoder_only {
        let trained = opts.dir.join(DVAE_FILE);
        if !trained.exists() {
            return Err(Error::Invalid(format!(
                "--decoder-only fine-tunes a trained dVAE, and {} does not exist: train the dVAE first",
                trained.display()
            )));
        }
        load_or_grow_dvae(&mut model, &cfg, &trained, opts)?;
        crate::dvae::Dvae::freeze_encoder(&model.vs);
    }
    let resuming = opts.resume && state_path(&opts.dir, component).exists();
    if let (Some(from), false) = (&recipe.init_from, resuming) {
        // before the average is made, so that it starts from these weights too
        load_or_grow_dvae(&mut model, &cfg, from, opts)?;
    }
    if recipe.freeze_trunk {
        // before the optimizer is made, as in a resumed run
        crate::dvae::Dvae::freeze_encoder_trunk(&model.vs);
    }
    let mut opt = AdamW::new(&model.vs, 0.9, 0.999, 1e-8, recipe.weight_decay);
    let mut ema = Ema::new(&model.vs, recipe.ema);
    let mut start = 0;
    if resuming {
        start = load_state(&opts.dir, component, &model.vs, &mut opt, &mut ema)?;
    }
    let size = cfg.dvae.image_size;
    let mut run = Run::begin(opts, component, Feed::Images { source: source.clone(), size }, start)?;
    let s = &recipe.schedule;
    while let Some(batch) = run.next_batch(opts)? {
        let step = run.step;
        let x = from_rgb8(&batch.images, size, opts.device)?;
        let (tau, beta, lr) = (s.tau(step), s.beta(step), s.lr(step));
        let hard = recipe.hard_from.is_some_and(|h| step >= h);
        let l = if recipe.decoder_only {
            model.net.decoder_loss(&x)
        } else {
            model.net.loss_variant(&x, tau, beta, recipe.usage_weight, hard)
        };
        opt.zero_grad();
        l.loss.backward();
        opt.step(lr);
        ema.update(step);
        let step = run.advance(&l.loss);
        if step % opts.log_every == 0 || run.is_last() {
            let mse = l.mse.double_value(&[]);
            let rate = run.rate(opts.batch);
            let mut record = serde_json::json!({
                "step": step, "loss": run.last_loss(), "nll": l.nll.double_value(&[]), "mse": mse,
                "psnr_db": -10.0 * mse.max(1e-12).log10(), "lr": lr, "images_per_s": rate, "data_wait": run.data_wait(),
            });
            if !recipe.decoder_only {
                // the relaxation's terms (hard codes have none)
                record["kl"] = l.kl.double_value(&[]).into();
                record["usage_deficit"] = l.usage.double_value(&[]).into();
                record["tau"] = tau.into();
                record["beta"] = beta.into();
                record["straight_through"] = hard.into();
            }
            run.record(opts.steps, record, rate, "images");
        }
        if opts.calibrate {
            continue;
        }
        if step % opts.checkpoint_every == 0 || run.is_last() {
            save_state(&opts.dir, component, step, &model.vs, &opt, &ema)?;
            write_weights(opts, "dvae", &ema)?;
            // what the model will actually use: the weights just written, hard codes, scored as
            // `tessera eval` scores them
            let mut written = DvaeModel::new(&cfg, opts.device);
            load_varstore(&mut written.vs, &opts.dir.join(DVAE_FILE))?;
            let check = crate::report::dvae_check(&written.net, opts.device, DVAE_CHECK_SCENES, opts.seed)?;
            run.log.log(serde_json::json!({
                "step": step, "hard_psnr_db": check.psnr_db, "roundtrip": check.roundtrip, "codes_used": check.codes_used,
            }));
        }
        if opts.sample_every > 0 && step % opts.sample_every == 0 {
            let n = batch.images.len().min(8);
            let rec = tch::no_grad(|| model.net.decode(&model.net.encode(&x.narrow(0, 0, n as i64))));
            let mut row = batch.images[..n].to_vec();
            row.extend(crate::model::to_rgb8(&rec)?);
            save_grid(&opts.dir.join("samples").join(format!("{component}-{step:07}.png")), &row, size)?;
        }
    }
    Ok(run.finish(opts, source.skipped()))
}

/// The configuration a decoder-only run that grows the decoder trains: the directory's with
/// the decoder's width and depth asked for, written to `config.json` (atomically) before any
/// weights change. Refused without `--decoder-only`, and when resuming a run of another size.
fn grown_config(opts: &TrainOptions, recipe: &DvaeRecipe, cfg: &Config, component: &str) -> Result<Config> {
    if !recipe.decoder_only {
        return Err(Error::Invalid(
            "--decoder-hidden and --decoder-blocks grow a trained decoder: they need --decoder-only".into(),
        ));
    }
    let mut grown = cfg.clone();
    let d = &mut grown.dvae;
    let hidden = recipe.decoder_hidden.unwrap_or(d.dec_hidden());
    let blocks = recipe.decoder_blocks.unwrap_or(d.dec_blocks_per_group());
    if hidden < d.dec_hidden() || blocks < d.dec_blocks_per_group() {
        return Err(Error::Invalid(format!(
            "the decoder has width {} and {} blocks per group; it can grow, not shrink (asked for {hidden} and {blocks})",
            d.dec_hidden(),
            d.dec_blocks_per_group()
        )));
    }
    *d = d.with_decoder(hidden, blocks);
    grown.validate()?;
    if grown == *cfg {
        return Ok(grown);
    }
    if opts.resume && state_path(&opts.dir, component).exists() {
        return Err(Error::Invalid(format!(
            "the run being resumed trains a decoder of width {} and {} blocks per group: drop --decoder-hidden/--decoder-blocks, or start afresh",
            cfg.dvae.dec_hidden(),
            cfg.dvae.dec_blocks_per_group()
        )));
    }
    crate::model::Model::save_config(&opts.dir, &grown)?;
    Ok(grown)
}

/// The configuration a run that splits the codebook trains (`--codebook n`): the directory's
/// with `n` codes, written to `config.json` (atomically) before any weights change. Refused when
/// resuming a run of another codebook size.
fn split_config(opts: &TrainOptions, cfg: &Config, n: usize) -> Result<Config> {
    let mut split = cfg.clone();
    split.dvae.vocab_size = n;
    split.validate()?;
    if split == *cfg {
        return Ok(split);
    }
    if opts.resume && state_path(&opts.dir, "dvae").exists() {
        return Err(Error::Invalid(format!(
            "the run being resumed trains a codebook of {} codes: drop --codebook, or start afresh",
            cfg.dvae.vocab_size
        )));
    }
    crate::model::Model::save_config(&opts.dir, &split)?;
    Ok(split)
}

/// Loads a trained dVAE into `model`; when the file's decoder is smaller than `cfg`'s (a run that
/// grows it, or one killed before its first checkpoint), grows it ([`crate::dvae::grow_decoder`]);
/// when its codebook is smaller by a whole factor (a run that splits it), splits it
/// ([`crate::dvae::split_codebook`], noise drawn from the run's seed).
fn load_or_grow_dvae(model: &mut DvaeModel, cfg: &Config, path: &Path, opts: &TrainOptions) -> Result<()> {
    let device = opts.device;
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    // an unreadable file is named by the plain load below
    let st = safetensors::SafeTensors::deserialize(&bytes).ok();
    let codes = st.as_ref().and_then(crate::dvae::codebook_size);
    let d = &cfg.dvae;
    if let Some(v) = codes.filter(|&v| v > 0 && v < d.vocab_size) {
        let mut small = cfg.clone();
        small.dvae.vocab_size = v;
        let mut trained = DvaeModel::new(&small, device);
        crate::io::load_varstore_bytes(&mut trained.vs, &bytes, path)?;
        crate::dvae::split_codebook(&trained.vs, &small.dvae, &model.vs, d, opts.seed)
            .map_err(|e| Error::checkpoint(path, format!("cannot split its codebook: {e}")))?;
        if !opts.quiet {
            eprintln!(
                "split each of the {v} codes of {} into {} ({} codes; the same images from the same pictures)",
                path.display(),
                d.vocab_size / v,
                d.vocab_size
            );
        }
        return Ok(());
    }
    let dims = st.as_ref().and_then(crate::dvae::decoder_dims);
    match dims {
        Some((h, b))
            if (h, b) != (d.dec_hidden(), d.dec_blocks_per_group())
                && h <= d.dec_hidden()
                && b <= d.dec_blocks_per_group() =>
        {
            let mut small = cfg.clone();
            small.dvae = d.with_decoder(h, b);
            let mut trained = DvaeModel::new(&small, device);
            crate::io::load_varstore_bytes(&mut trained.vs, &bytes, path)?;
            crate::dvae::grow_decoder(&trained.vs, &small.dvae, &model.vs, d)
                .map_err(|e| Error::checkpoint(path, format!("cannot grow its decoder: {e}")))?;
            eprintln!(
                "grew the decoder of {} from width {h}, {b} blocks per group to width {}, {} (the same images from the same codes)",
                path.display(),
                d.dec_hidden(),
                d.dec_blocks_per_group()
            );
            Ok(())
        }
        _ => crate::io::load_varstore_bytes(&mut model.vs, &bytes, path),
    }
}

/// Scenes per capability for the dVAE check logged at every checkpoint (hard-code PSNR and
/// round trips, computed as `tessera eval` computes them).
const DVAE_CHECK_SCENES: usize = 20;

/// Writes the training state and the averaged weights a model directory loads.
fn checkpoint(opts: &TrainOptions, component: &str, step: usize, vs: &VarStore, opt: &AdamW, ema: &Ema) -> Result<()> {
    if opts.calibrate {
        return Ok(());
    }
    save_state(&opts.dir, component, step, vs, opt, ema)?;
    write_weights(opts, component, ema)
}

/// Writes the averaged weights as `<name>.safetensors`, the file a model directory loads.
/// With `weights_bf16`, the trained tensors are stored in bf16 and frozen ones (the encoder of
/// a decoder-only fine-tune) in f32 as loaded: rounding the encoder would change its near-tie
/// codes, the very tokens a transformer was trained on.
fn write_weights(opts: &TrainOptions, name: &str, ema: &Ema) -> Result<()> {
    let kind = |n: &str| if opts.weights_bf16 && !ema.is_frozen(n) { Kind::BFloat16 } else { Kind::Float };
    let weights = crate::io::tensors_to_safetensors_each(&ema.tensors(), None, kind)?;
    write_atomic(&opts.dir.join(format!("{name}.safetensors")), &weights)
}

// ---------------------------------------------------------------------------------------
// Transformer

/// Trains the transformer of a model directory that already has its tokenizer and dVAE.
pub fn train_transformer(opts: &TrainOptions, recipe: &TransformerRecipe) -> Result<TrainSummary> {
    if recipe.codes_from.is_some() && recipe.init_from.is_none() {
        return Err(Error::Invalid(
            "--codes-from names the dVAE an --init-from transformer learnt; give --init-from too".into(),
        ));
    }
    let cfg = crate::model::Model::load_config(&opts.dir)?;
    let tok = TextTokenizer::load(&opts.dir.join(TOKENIZER_FILE))?.with_dropout(cfg.text.bpe_dropout)?;
    let mut dvae = DvaeModel::new(&cfg, opts.device);
    load_varstore(&mut dvae.vs, &opts.dir.join(DVAE_FILE))?;
    dvae.vs.freeze();
    let source = Source::open(&opts.data)?.for_captions("transformer")?;
    tch::manual_seed(opts.seed as i64);
    let mut model = TransformerModel::new(&cfg, opts.device);
    model.net.set_compute_kind(opts.compute);
    let resuming = opts.resume && state_path(&opts.dir, "transformer").exists();
    if let (Some(from), false) = (&recipe.init_from, resuming) {
        // before the average is made, so that it starts from these weights too
        match &recipe.codes_from {
            Some(old_dir) => {
                let found = carry_codes_over(opts, &cfg, &source, &model, from, old_dir, &dvae)?;
                if !opts.quiet {
                    eprintln!("carried the image codes of {} over to this dVAE's: {found}", old_dir.display());
                }
            }
            None => load_or_grow_transformer(&mut model, &cfg, from, opts)?,
        }
    }
    let mut opt = AdamW::new(&model.vs, 0.9, 0.96, 1e-8, recipe.weight_decay);
    let mut ema = Ema::new(&model.vs, recipe.ema);
    let mut start = 0;
    if resuming {
        start = load_state(&opts.dir, "transformer", &model.vs, &mut opt, &mut ema)?;
    }
    let size = cfg.dvae.image_size;
    let feed = feed_for(opts, &cfg, &source)?;
    let skipped = skipped_count(&source, &feed);
    let mut run = Run::begin(opts, "transformer", feed, start)?;
    let tokens_per_example = cfg.seq_len();
    while let Some(batch) = run.next_batch(opts)? {
        let step = run.step;
        let codes = if batch.tokens.is_empty() {
            let x = from_rgb8(&batch.images, size, opts.device)?;
            tch::no_grad(|| dvae.net.encode(&x)).flatten(1, -1)
        } else {
            tokens_tensor(&batch, cfg.image_len(), opts.device)
        };
        let caps: Vec<Vec<i64>> = batch
            .captions
            .iter()
            .map(|c| tok.encode_train(c, cfg.text.text_len).map(|e| e.ids).unwrap_or_default())
            .collect();
        let text = model.net.pad_text(&caps);
        let lr = warmup_cosine(recipe.lr, step, recipe.warmup, opts.steps);
        let l = model.net.loss(&text, &codes, true);
        opt.zero_grad();
        l.loss.backward();
        let grad_norm = opt.clip_grad_norm(recipe.clip);
        opt.step(lr);
        ema.update(step);
        let step = run.advance(&l.loss);
        if step % opts.log_every == 0 || run.is_last() {
            let rate = run.rate(opts.batch * tokens_per_example);
            let record = serde_json::json!({
                "step": step, "loss": run.last_loss(), "text_loss": l.text.double_value(&[]),
                "image_loss": l.image.double_value(&[]), "lr": lr, "grad_norm": grad_norm.double_value(&[]),
                "tokens_per_s": rate, "data_wait": run.data_wait(),
            });
            run.record(opts.steps, record, rate, "tokens");
        }
        if step % opts.checkpoint_every == 0 || run.is_last() {
            checkpoint(opts, "transformer", step, &model.vs, &opt, &ema)?;
        }
        if opts.sample_every > 0 && step % opts.sample_every == 0 && !opts.calibrate {
            sample_grid(opts, &cfg, &tok, &dvae, &model, &batch.captions, step)?;
        }
    }
    Ok(run.finish(opts, skipped))
}

/// Loads the transformer `from` (trained on the codes of the dVAE of `old_dir`, whose codebook
/// may be of another size) into `model` carried over to `dvae`'s codes
/// ([`crate::remap::remap_image_codes`]), counted on [`crate::remap::REMAP_PICTURES`] pictures
/// of the training data (a fixed set, drawn from the run's seed, so a run started again starts
/// the same).
fn carry_codes_over(
    opts: &TrainOptions,
    cfg: &Config,
    source: &Source,
    model: &TransformerModel,
    from: &Path,
    old_dir: &Path,
    dvae: &DvaeModel,
) -> Result<crate::remap::CodeRemap> {
    let old_cfg = crate::model::Model::load_config(old_dir)?;
    if old_cfg.dvae.image_size != cfg.dvae.image_size || old_cfg.grid_size() != cfg.grid_size() {
        return Err(Error::Invalid(format!(
            "the dVAE of {} reads {} px pictures into a {}×{} grid, this one {} px into {}×{}: --codes-from needs the same picture and grid sizes",
            old_dir.display(),
            old_cfg.dvae.image_size,
            old_cfg.grid_size(),
            old_cfg.grid_size(),
            cfg.dvae.image_size,
            cfg.grid_size(),
            cfg.grid_size()
        )));
    }
    let path = old_dir.join(DVAE_FILE);
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    let old = DvaeModel::from_bytes(&old_cfg, opts.device, &bytes, &path)?;
    let size = cfg.dvae.image_size;
    let mut rng = SeedRng::new(opts.seed ^ 0xC0DE_5EED);
    let pictures: Vec<Vec<u8>> = (0..crate::remap::REMAP_PICTURES as u64 * 2)
        .filter_map(|i| source.get(i, size, &mut rng).map(|e| e.rgb))
        .take(crate::remap::REMAP_PICTURES)
        .collect();
    // a few pictures at a time, so that large pictures never sit in memory all at once
    let mut counts: Option<Tensor> = None;
    for chunk in pictures.chunks(64) {
        let c = crate::remap::count_codes(&old, dvae, &from_rgb8(chunk, size, opts.device)?)?;
        counts = Some(match counts {
            Some(sum) => sum + c,
            None => c,
        });
    }
    let counts = counts.ok_or_else(|| Error::Invalid("no pictures to carry the codes over with".into()))?;
    let mut old_shape = cfg.clone();
    old_shape.dvae.vocab_size = old_cfg.dvae.vocab_size;
    let mut trained = TransformerModel::new(&old_shape, opts.device);
    load_varstore(&mut trained.vs, from)?;
    crate::remap::remap_image_codes(&trained, model, &counts)
}

fn sample_grid(
    opts: &TrainOptions,
    cfg: &Config,
    tok: &TextTokenizer,
    dvae: &DvaeModel,
    model: &TransformerModel,
    captions: &[String],
    step: usize,
) -> Result<()> {
    let n = captions.len().min(4);
    let caps: Vec<Vec<i64>> =
        captions[..n].iter().map(|c| tok.encode(c, cfg.text.text_len).map(|e| e.ids)).collect::<Result<_>>()?;
    let text = model.net.pad_text(&caps);
    let seeds: Vec<u64> = (0..n as u64).collect();
    let tokens = crate::sample::Sampler::new(&model.net, &text, None, &seeds, &Default::default())?.run(|_| true)?;
    let g = cfg.grid_size() as i64;
    let imgs = tch::no_grad(|| dvae.net.decode(&tokens.view([-1, g, g])));
    save_grid(
        &opts.dir.join("samples").join(format!("transformer-{step:07}.png")),
        &crate::model::to_rgb8(&imgs)?,
        cfg.dvae.image_size,
    )?;
    let _ = write_atomic(
        &opts.dir.join("samples").join(format!("transformer-{step:07}.txt")),
        captions[..n].join("\n").as_bytes(),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Reranker

/// How the reranker trains.
#[derive(Debug, Clone)]
pub struct RerankerRecipe {
    pub lr: f64,
    pub warmup: usize,
    /// Start from this reranker.safetensors (same shape) instead of random weights, e.g. to fit
    /// a reranker to the pictures of a new dVAE; ignored when a run is resumed.
    pub init_from: Option<PathBuf>,
    /// Contrasting captions per picture ([`crate::world::contrast_captions`]: one colour,
    /// shape, size, count, relation, order, letter or transform changed) that the picture must
    /// score below its own caption, beside the batch's other captions. 0: the batch alone, as
    /// in CLIP.
    pub contrasts: usize,
    /// Contrasting pictures per caption ([`crate::world::contrast_scene`]: the scene with one
    /// detail its caption names changed, rendered) that the caption must score below its own
    /// picture, beside the batch's other pictures. Needs pictures of the synthetic world.
    /// Both kinds of contrast may be given together.
    pub contrast_images: usize,
    /// Pass pictures (and contrasting pictures) through the model's dVAE, encoded to codes and
    /// decoded, before the reranker sees them: the samples it will rank are dVAE decodings, so
    /// it learns on pictures like them. Pictures from token shards are always decodings.
    pub through_dvae: bool,
    /// Which changes the contrasting pictures make ([`crate::world::Contrasts`]): any, or near
    /// misses (look-alike shapes, a stack block off its column).
    pub contrast_kind: crate::world::Contrasts,
    /// Judged samples ([`crate::judged`]): the model's own samples of world scenes, right and
    /// wrong. Each step adds `judged_batch` of their scenes to the batch, a right sample as the
    /// caption's picture and `judged_negatives` wrong ones that the caption must score below
    /// it: the near misses it will have to rank down at inference.
    pub judged: Option<PathBuf>,
    pub judged_batch: usize,
    pub judged_negatives: usize,
    /// The judged set once read (the folder and picture size it was read from), kept for the
    /// next run of this recipe: `--time` plans with throwaway steps, then trains, and a bank of
    /// thousands of scenes is read once, not twice. Leave it empty (`Default::default()`).
    pub judged_loaded: std::sync::OnceLock<(PathBuf, usize, std::sync::Arc<crate::judged::JudgedSet>)>,
}

impl Default for RerankerRecipe {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            warmup: 200,
            init_from: None,
            contrasts: 0,
            contrast_images: 0,
            through_dvae: false,
            contrast_kind: crate::world::Contrasts::Any,
            judged: None,
            judged_batch: 32,
            judged_negatives: 4,
            judged_loaded: std::sync::OnceLock::new(),
        }
    }
}

/// Loads the weight file `path` into `vs`; a file that holds fewer of what the config grows
/// (`have_of` counts them from its tensor names) than `want` goes to `grow` instead (with its
/// bytes), which fills `vs` from it and says what it did.
fn load_or_grow(
    vs: &mut VarStore,
    path: &Path,
    want: usize,
    have_of: impl Fn(Vec<&str>) -> Option<usize>,
    grow: impl FnOnce(usize, &[u8], &VarStore) -> Result<String>,
    quiet: bool,
) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    // an unreadable file is named by the plain load below
    let st = safetensors::SafeTensors::deserialize(&bytes).ok();
    match st.as_ref().and_then(|st| have_of(st.names().into_iter().map(|n| n.as_str()).collect())) {
        Some(n) if n < want => {
            let done = grow(n, &bytes, vs)?;
            if !quiet {
                eprintln!("{done}");
            }
            Ok(())
        }
        _ => crate::io::load_varstore_bytes(vs, &bytes, path),
    }
}

/// Loads `path` into the transformer; a file with fewer layers than the config asks for is
/// grown into it ([`crate::transformer::grow_layers`]: the same logits until it trains).
fn load_or_grow_transformer(
    model: &mut TransformerModel,
    cfg: &Config,
    path: &Path,
    opts: &TrainOptions,
) -> Result<()> {
    let want = cfg.transformer.n_layers;
    let grow = |n: usize, bytes: &[u8], to: &VarStore| -> Result<String> {
        // the kept layers keep the kinds the grown config gives them: its first n − 1 and its last
        let kinds = cfg.transformer.layer_kinds();
        let mut small = cfg.clone();
        small.transformer.n_layers = n;
        small.transformer.attention =
            crate::config::AttentionPattern::Layers(kinds[..n - 1].iter().chain(kinds.last()).copied().collect());
        let mut trained = TransformerModel::new(&small, opts.device);
        crate::io::load_varstore_bytes(&mut trained.vs, bytes, path)?;
        crate::transformer::grow_layers(&trained.vs, &small.transformer, to, &cfg.transformer)
            .map_err(|e| Error::checkpoint(path, format!("cannot grow its layers: {e}")))?;
        Ok(format!(
            "grew {} from {n} to {want} layers (the new ones inserted before the last, the same logits until it trains)",
            path.display()
        ))
    };
    // said once: not again by the throwaway steps that plan `--time`
    load_or_grow(
        &mut model.vs,
        path,
        want,
        |names| crate::transformer::layers_of(names),
        grow,
        opts.quiet || opts.calibrate,
    )
}

/// Loads `path` into the reranker; a file with fewer residual image blocks per stage than the
/// config asks for is grown into it ([`crate::clip::grow_image_blocks`]: the same scores until
/// it trains).
fn load_or_grow_reranker(
    model: &mut crate::model::RerankerModel,
    cfg: &Config,
    path: &Path,
    opts: &TrainOptions,
) -> Result<()> {
    let want = cfg.reranker.image_blocks;
    let grow = |b: usize, bytes: &[u8], to: &VarStore| -> Result<String> {
        let mut small = cfg.clone();
        small.reranker.image_blocks = b;
        let mut trained = crate::model::RerankerModel::new(&small, opts.device);
        crate::io::load_varstore_bytes(&mut trained.vs, bytes, path)?;
        crate::clip::grow_image_blocks(&trained.vs, &small.reranker, to, &cfg.reranker)
            .map_err(|e| Error::checkpoint(path, format!("cannot grow its image stages: {e}")))?;
        Ok(format!(
            "grew the image stages of {} from {b} to {want} residual blocks each (the same scores until it trains)",
            path.display()
        ))
    };
    load_or_grow(
        &mut model.vs,
        path,
        want,
        |names| crate::clip::image_blocks_of(names),
        grow,
        opts.quiet || opts.calibrate,
    )
}

/// Trains the contrastive reranker of a model directory that has its tokenizer.
pub fn train_reranker(opts: &TrainOptions, recipe: &RerankerRecipe) -> Result<TrainSummary> {
    let (lr, warmup, k, k_img) = (recipe.lr, recipe.warmup, recipe.contrasts, recipe.contrast_images);
    if k_img == 0 && recipe.contrast_kind != crate::world::Contrasts::Any {
        return Err(Error::Invalid(
            "near-miss contrasts change the contrasting pictures: give --contrast-images K (K ≥ 1) too".into(),
        ));
    }
    if recipe.judged.is_some() && k_img > 0 {
        return Err(Error::Invalid(
            "judged samples bring their own contrasting pictures (the wrong samples): give --judged or --contrast-images, not both".into(),
        ));
    }
    if recipe.judged.is_some() && (recipe.judged_batch == 0 || recipe.judged_negatives == 0) {
        return Err(Error::Invalid("--judged-batch and --judged-negatives must be at least 1".into()));
    }
    let cfg = crate::model::Model::load_config(&opts.dir)?;
    let tok = TextTokenizer::load(&opts.dir.join(TOKENIZER_FILE))?;
    let source = Source::open(&opts.data)?.for_captions("reranker")?;
    let judged = match &recipe.judged {
        Some(dir) => {
            let size = cfg.dvae.image_size;
            let set = match recipe.judged_loaded.get() {
                Some((read_from, read_at, set)) if read_from == dir && *read_at == size => set.clone(),
                _ => {
                    let set = std::sync::Arc::new(crate::judged::JudgedSet::load(dir, size)?);
                    // a recipe run on another folder or size keeps the first set, reads its own
                    let _ = recipe.judged_loaded.set((dir.clone(), size, set.clone()));
                    set
                }
            };
            // said once: not again by the throwaway steps that plan `--time`
            if !opts.quiet && !opts.calibrate {
                eprintln!(
                    "judged samples: {} of {} scenes have a right and a wrong sample ({} pictures)",
                    set.scenes.len(),
                    set.read,
                    set.pictures.len()
                );
            }
            Some(set)
        }
        None => None,
    };
    if recipe.through_dvae && !opts.dir.join(DVAE_FILE).exists() {
        return Err(Error::Invalid(format!(
            "--through-dvae shows the reranker pictures through the model's dVAE, and {} does not exist: train the dVAE first",
            opts.dir.join(DVAE_FILE).display()
        )));
    }
    tch::manual_seed(opts.seed as i64);
    let mut model = crate::model::RerankerModel::new(&cfg, opts.device);
    let resuming = opts.resume && state_path(&opts.dir, "reranker").exists();
    if let (Some(from), false) = (&recipe.init_from, resuming) {
        // before the average is made, so that it starts from these weights too
        load_or_grow_reranker(&mut model, &cfg, from, opts)?;
    }
    let mut opt = AdamW::new(&model.vs, 0.9, 0.98, 1e-6, 0.2);
    let mut ema = Ema::new(&model.vs, 0.99);
    let mut start = 0;
    if resuming {
        start = load_state(&opts.dir, "reranker", &model.vs, &mut opt, &mut ema)?;
    }
    let size = cfg.dvae.image_size;
    let feed = feed_for(opts, &cfg, &source)?;
    if k_img > 0 && !matches!(&feed, Feed::Images { source: Source::World { .. }, .. }) {
        return Err(Error::Invalid(format!(
            "contrasting pictures are drawn from the synthetic world's scenes: train on --data world without --shards, not {}",
            if opts.shards.is_some() { "token shards".to_string() } else { opts.data.clone() }
        )));
    }
    let skipped = skipped_count(&source, &feed);
    // from token shards (or with `through_dvae`) the reranker sees pictures as the dVAE draws
    // them, as it will when it ranks samples
    let dvae = match (&feed, recipe.through_dvae) {
        (Feed::Tokens(_), _) | (Feed::Images { .. }, true) => {
            let mut d = DvaeModel::new(&cfg, opts.device);
            load_varstore(&mut d.vs, &opts.dir.join(DVAE_FILE))?;
            d.vs.freeze();
            Some(d)
        }
        (Feed::Images { .. }, false) => None,
    };
    // (on the CPU the dVAE takes the batch a few pictures at a time itself)
    let round_trip = |x: Tensor| match &dvae {
        Some(d) => tch::no_grad(|| d.net.decode(&d.net.encode(&x))),
        None => x,
    };
    let mut run = Run::begin(opts, "reranker", feed, start)?;
    let g = cfg.grid_size() as i64;
    while let Some(batch) = run.next_batch(opts)? {
        let step = run.step;
        let x = match &dvae {
            Some(d) if !batch.tokens.is_empty() => {
                let t = tokens_tensor(&batch, cfg.image_len(), opts.device).view([-1, g, g]);
                tch::no_grad(|| d.net.decode(&t))
            }
            _ => round_trip(from_rgb8(&batch.images, size, opts.device)?),
        };
        // judged scenes, drawn from the step so that a resumed run draws the same, after the
        // batch's own rows
        let judged_batch = judged.as_ref().map(|set| {
            let mut rng = SeedRng::new(opts.seed ^ 0x7D6E_D000 ^ (step as u64).wrapping_mul(0x9E37_79B9));
            set.batch(recipe.judged_batch, recipe.judged_negatives, &mut rng)
        });
        let mut captions_all = batch.captions.clone();
        let x = match &judged_batch {
            Some(jb) => {
                captions_all.extend(jb.captions.iter().cloned());
                Tensor::cat(&[x, from_rgb8(&jb.pictures, size, opts.device)?], 0)
            }
            None => x,
        };
        let caps: Vec<Vec<i64>> =
            captions_all.iter().map(|c| tok.encode(c, cfg.text.text_len).map(|e| e.ids).unwrap_or_default()).collect();
        let (ids, valid) = model.net.batch_text(&caps, opts.device);
        let rate = warmup_cosine(lr, step, warmup, opts.steps);
        // k_img contrasting scenes per caption, drawn from the step so that a resumed run draws
        // the same
        let pictures = if k_img > 0 {
            let mut rng = crate::sample::SeedRng::new(opts.seed ^ 0x1A_6E55 ^ (step as u64).wrapping_mul(0x9E37_79B9));
            let pictures: Vec<Vec<u8>> = batch
                .scenes
                .iter()
                .flat_map(|sc| {
                    (0..k_img)
                        .map(|_| crate::world::contrast_scene_as(sc, &mut rng, recipe.contrast_kind))
                        .collect::<Vec<_>>()
                })
                .map(|sc| crate::world::render(&sc, size))
                .collect();
            let other = round_trip(from_rgb8(&pictures, size, opts.device)?);
            Some((other, Tensor::ones([caps.len() as i64, k_img as i64], (Kind::Bool, opts.device))))
        } else if let Some(jb) = &judged_batch {
            // the world's rows have no contrasting pictures; the judged rows their wrong samples
            let kj = recipe.judged_negatives;
            let mut real = vec![false; batch.captions.len() * kj];
            real.extend(&jb.real);
            let real = Tensor::from_slice(&real).view([caps.len() as i64, kj as i64]).to_device(opts.device);
            Some((from_rgb8(&jb.negatives, size, opts.device)?, real))
        } else {
            None
        };
        // k contrasting captions per picture, drawn from the step so that a resumed run draws
        // the same; a picture with fewer has the rest masked out (its own caption stands in for
        // them)
        let captions = if k > 0 {
            let mut rng = crate::sample::SeedRng::new(opts.seed ^ 0xC0_4E57 ^ (step as u64).wrapping_mul(0x9E37_79B9));
            let (mut others, mut real) = (Vec::with_capacity(caps.len() * k), Vec::with_capacity(caps.len() * k));
            for (c, own) in captions_all.iter().zip(&caps) {
                let picked = crate::world::pick_contrasts(c, k, &mut rng);
                for j in 0..k {
                    real.push(j < picked.len());
                    let ids =
                        picked.get(j).map(|p| tok.encode(p, cfg.text.text_len).map(|e| e.ids).unwrap_or_default());
                    others.push(ids.unwrap_or_else(|| own.clone()));
                }
            }
            let (other_ids, other_valid) = model.net.batch_text(&others, opts.device);
            Some((other_ids, other_valid, Tensor::from_slice(&real).view([-1, k as i64]).to_device(opts.device)))
        } else {
            None
        };
        let loss = model.net.loss_with_all_contrasts(
            &x,
            &ids,
            &valid,
            captions.as_ref().map(|(i, v, r)| (i, v, r)),
            pictures.as_ref().map(|(p, r)| (p, r)),
        );
        opt.zero_grad();
        loss.backward();
        let _ = opt.clip_grad_norm(1.0);
        opt.step(rate);
        ema.update(step);
        let step = run.advance(&loss);
        if step % opts.log_every == 0 || run.is_last() {
            // the judged rows are pictures of the batch too
            let per_s = run.rate(opts.batch + judged_batch.as_ref().map_or(0, |jb| jb.captions.len()));
            let record = serde_json::json!({
                "step": step, "loss": run.last_loss(), "lr": rate, "scale": model.net.scale().double_value(&[]),
                "images_per_s": per_s, "data_wait": run.data_wait(),
            });
            run.record(opts.steps, record, per_s, "images");
        }
        if step % opts.checkpoint_every == 0 || run.is_last() {
            checkpoint(opts, "reranker", step, &model.vs, &opt, &ema)?;
        }
    }
    Ok(run.finish(opts, skipped))
}

/// The batches of the transformer and the reranker: token shards when `opts.shards` names a
/// folder (checked against this model's dVAE), else pictures from the data.
fn feed_for(opts: &TrainOptions, cfg: &Config, source: &Source) -> Result<Feed> {
    match &opts.shards {
        Some(dir) => {
            let fingerprint = crate::shards::dvae_fingerprint(&opts.dir.join(DVAE_FILE), &cfg.dvae)?;
            let shards = TokenShards::open(dir, cfg.image_len(), cfg.dvae.vocab_size, &fingerprint)?;
            Ok(Feed::Tokens(Arc::new(shards)))
        }
        None => Ok(Feed::Images { source: source.clone(), size: cfg.dvae.image_size }),
    }
}

fn skipped_count(source: &Source, feed: &Feed) -> usize {
    match feed {
        Feed::Tokens(s) => s.skipped.len(),
        Feed::Images { .. } => source.skipped(),
    }
}

/// A token batch as a tensor [B, image_len] of codes.
fn tokens_tensor(batch: &Batch, image_len: usize, device: Device) -> Tensor {
    let ids: Vec<i64> = batch.tokens.iter().map(|&t| t as i64).collect();
    Tensor::from_slice(&ids).view([-1, image_len as i64]).to_device(device)
}

// ---------------------------------------------------------------------------------------
// Token shards

/// What encoding a training set into token shards did.
#[derive(Debug, Clone)]
pub struct ShardSummary {
    /// Examples in the folder's shards after this run.
    pub examples: usize,
    /// Examples encoded by this run (earlier shards that were whole are kept).
    pub encoded: usize,
    /// Examples rendered and encoded per second by this run.
    pub examples_per_s: f64,
    /// Fraction of the time the encoder waited for pictures.
    pub data_wait: f64,
}

/// The folder a model directory keeps its token shards in.
pub fn default_shard_dir(dir: &Path) -> PathBuf {
    dir.join("shards")
}

/// Encodes the first `examples` examples of the data with the directory's dVAE into token
/// shards of `per_shard` examples (`opts.shards`, or `DIR/shards`), `opts.batch` pictures per
/// encoder call (`per_shard` is rounded up to a multiple of it). Shards already there, whole and
/// made by this dVAE, are kept, so a killed run continues where it stopped. Past
/// `opts.deadline` it stops, and what it encoded becomes a shorter last shard. With
/// `opts.calibrate` it encodes `opts.steps` batches, writes nothing and reports the rate.
pub fn encode_shards(opts: &TrainOptions, examples: usize, per_shard: usize) -> Result<ShardSummary> {
    let cfg = crate::model::Model::load_config(&opts.dir)?;
    let dvae_path = opts.dir.join(DVAE_FILE);
    let mut dvae = DvaeModel::new(&cfg, opts.device);
    load_varstore(&mut dvae.vs, &dvae_path)?;
    dvae.vs.freeze();
    let fingerprint = crate::shards::dvae_fingerprint(&dvae_path, &cfg.dvae)?;
    let out = opts.shards.clone().unwrap_or_else(|| default_shard_dir(&opts.dir));
    let b = opts.batch.max(1);
    let steps_per_shard = per_shard.max(1).div_ceil(b);
    let per_shard = steps_per_shard * b;
    // whole batches; the last shard may be shorter than the others
    let mut examples = examples.max(1).div_ceil(b) * b;
    let n_shards = examples.div_ceil(per_shard);
    let total_steps = if opts.calibrate { opts.steps } else { examples / b };
    let planned = examples;
    let header = |i: usize| crate::shards::ShardHeader {
        count: per_shard.min(planned - i * per_shard),
        image_len: cfg.image_len(),
        vocab: cfg.dvae.vocab_size,
        dvae: fingerprint.codes.clone(),
        first: (i * per_shard) as u64,
    };
    // shards already whole and of this dVAE stay (also those that record the hash of its whole
    // file, as shards did before they recorded its encoder's); encoding restarts at the first
    // that is not
    let ours = |h: &crate::shards::ShardHeader, i: usize| {
        let mut want = header(i);
        want.dvae.clone_from(&h.dvae);
        fingerprint.accepts(&h.dvae) && *h == want
    };
    let mut first_shard = 0;
    while !opts.calibrate && first_shard < n_shards {
        let p = crate::shards::shard_path(&out, first_shard);
        match std::fs::read(&p).ok().and_then(|b| crate::shards::decode_shard(&b).ok()) {
            Some(s) if ours(&s.header, first_shard) => first_shard += 1,
            _ => break,
        }
    }
    if !opts.calibrate {
        std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
        // shards past the planned set (from a larger earlier run) would be read as data
        for i in n_shards.. {
            let p = crate::shards::shard_path(&out, i);
            if !p.exists() {
                break;
            }
            std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
        }
    }
    let source = Source::open(&opts.data)?.for_captions("transformer (its token shards)")?;
    let size = cfg.dvae.image_size;
    let first_step = first_shard * steps_per_shard;
    let feed = Feed::Images { source, size };
    let loader = spawn_loader(feed, b, opts.seed, first_step, total_steps, opts.loader_workers());
    let t0 = Instant::now();
    let (mut wait, mut encoded) = (0.0, 0usize);
    let mut warm: Option<(Instant, usize)> = None;
    let (mut tokens, mut captions): (Vec<u16>, Vec<String>) = (Vec::new(), Vec::new());
    let mut shard = first_shard;
    let mut loader = loader.enumerate();
    loop {
        let tw = Instant::now();
        let Some((k, batch)) = loader.next() else { break };
        wait += tw.elapsed().as_secs_f64();
        let x = from_rgb8(&batch.images, size, opts.device)?;
        let codes = tch::no_grad(|| dvae.net.encode(&x)).flatten(0, -1).to_device(Device::Cpu).to_kind(Kind::Int64);
        let codes = Vec::<i64>::try_from(&codes)?;
        tokens.extend(codes.iter().map(|&c| c as u16));
        captions.extend(batch.captions);
        encoded += b;
        if k == 0 {
            warm = Some((Instant::now(), encoded)); // the rate leaves out the first batch
        }
        let late = opts.deadline.is_some_and(|d| Instant::now() >= d);
        if opts.calibrate {
            if late {
                break;
            }
            continue;
        }
        // out of time: what is encoded becomes a shorter last shard
        let cut = late && captions.len() < header(shard).count;
        if cut || captions.len() == header(shard).count {
            let h = crate::shards::ShardHeader { count: captions.len(), ..header(shard) };
            crate::shards::write_shard(&crate::shards::shard_path(&out, shard), &h, &tokens, &captions)?;
            if cut {
                examples = shard * per_shard + captions.len();
                shard = n_shards;
                break;
            }
            tokens.clear();
            captions.clear();
            shard += 1;
            if !opts.quiet {
                let label = opts.stage.as_ref().map(|s| format!("[{}] ", s.label)).unwrap_or_default();
                eprint!(
                    "\r{label}shard {shard}/{n_shards} · {:.0} examples/s · waited for pictures {:.0}%   ",
                    encoded as f64 / t0.elapsed().as_secs_f64(),
                    100.0 * wait / t0.elapsed().as_secs_f64()
                );
                let _ = std::io::stderr().flush();
            }
        }
    }
    if !opts.calibrate && shard < n_shards {
        return Err(Error::Invalid(format!("no readable images in {}", opts.data)));
    }
    let seconds = t0.elapsed().as_secs_f64();
    let examples_per_s = match warm {
        Some((w, done)) if encoded > done => (encoded - done) as f64 / w.elapsed().as_secs_f64().max(1e-9),
        _ => encoded as f64 / seconds.max(1e-9),
    };
    Ok(ShardSummary { examples, encoded, examples_per_s, data_wait: wait / seconds.max(1e-9) })
}
