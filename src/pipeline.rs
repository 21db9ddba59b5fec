//! `tessera train all`: a whole model in a time budget. Tokenizer, dVAE, token shards,
//! transformer, reranker and the evaluation report run one after the other; each timed stage
//! gets a fixed share of the budget, measures its own speed on a few throwaway steps, and turns
//! its share into a number of steps (so its schedules are those of a run of that length); time
//! the earlier stages left unused is added to the next trainer's share (dVAE, transformer,
//! reranker). The plan and each stage's outcome are kept in `train-all.json`, written
//! atomically after every decision, so `--resume` after a kill continues the stage that was
//! running from its last checkpoint with the same plan.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tch::Device;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::io::write_atomic;
use crate::train::{self, DvaeRecipe, StageProgress, TrainOptions, TransformerRecipe};

pub const PLAN_FILE: &str = "train-all.json";

/// Shares of the budget, in stage order; the 8% left over is the tokenizer's (a second or two),
/// loading and the checkpoints that close each stage.
pub const SPLIT: &[(&str, f64)] =
    &[("dvae", 0.47), ("shards", 0.06), ("transformer", 0.28), ("reranker", 0.07), ("eval", 0.04)];

/// Largest weight file written in f32; larger ones are stored in bf16 so that every file of a
/// model directory stays small enough to travel.
pub const MAX_F32_FILE: u64 = 16 << 20;

/// The smallest budget accepted: every stage needs a few seconds to start at all.
pub const MIN_BUDGET_S: f64 = 20.0;

/// Fraction of a stage's share planned as work; the rest absorbs checkpoints, start-up and the
/// noise of a shared machine.
const PLAN_FILL: f64 = 0.8;

/// What `train all` is asked to do.
#[derive(Debug, Clone)]
pub struct AllOptions {
    pub dir: PathBuf,
    /// Configuration of a new directory.
    pub preset: Option<String>,
    /// `KEY=VALUE` changes to the preset ([`Config::with_settings`]).
    pub settings: Vec<String>,
    pub data: String,
    /// The dVAE stage's pictures when they differ from `data` (`world-dense`, which the other
    /// stages refuse); `None`: [`dvae_data_for`]'s choice.
    pub dvae_data: Option<String>,
    pub budget_s: f64,
    pub device: Device,
    pub seed: u64,
    pub resume: bool,
    pub workers: usize,
    pub dvae_batch: usize,
    pub transformer_batch: usize,
    pub reranker_batch: usize,
    /// Pictures per dVAE call when encoding shards.
    pub shard_batch: usize,
    /// Most captions per capability the closing evaluation scores (fewer when its share of the
    /// budget is short); 0 skips it.
    pub eval_captions: usize,
    pub eval_samples: usize,
    pub quiet: bool,
    /// The dVAE recipe's choices.
    pub dvae: DvaeVariant,
    /// Compute dtype of the dVAE's and the transformer's training (`Some(BFloat16)`: bf16
    /// matrix products and convolutions with f32 master weights, losses and hard codes);
    /// `None`: f32. [`AllOptions::new`] picks bf16 where the device computes it natively
    /// ([`crate::native_bf16`]). The reranker trains in f32.
    pub compute: Option<tch::Kind>,
    /// Use this directory's trained dVAE (an imported OpenAI dVAE, say) instead of training
    /// one: the dVAE stage is skipped and its share goes to the transformer.
    pub dvae_from: Option<PathBuf>,
    /// Continue from this model directory: its tokenizer is taken as it is (no tokenizer is
    /// trained) and the transformer and reranker start from its weights instead of random ones
    /// (with `--dvae-from` the same directory, a model trained further on the device at hand).
    pub init_from: Option<PathBuf>,
}

/// The choices of the dVAE recipe a run is planned with (kept in the plan, so a resumed run
/// keeps them). The default is the paper's objective.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DvaeVariant {
    /// Largest KL weight β (the paper: 6.6).
    #[serde(default = "paper_beta")]
    pub beta: f64,
    /// Weight of the codebook-usage term (0: none).
    #[serde(default)]
    pub usage_weight: f64,
    /// Final share of the steps trained with straight-through hard codes (0: none).
    #[serde(default)]
    pub hard_tail: f64,
    /// The reconstruction term (the paper's logit-Laplace unless told).
    #[serde(default)]
    pub recon: crate::dvae::Recon,
    /// With `hard_tail`: the straight-through steps give the decoder the encoder's argmax
    /// codes, as sampling does ([`crate::dvae::Dvae::set_argmax_codes`]). With `hard_tail` 1
    /// this is the fourteenth session's recipe (`TRAINING.md`): argmax codes from the first
    /// step, the softmax the gradient flows through at τ 1.
    #[serde(default)]
    pub argmax_codes: bool,
}

fn paper_beta() -> f64 {
    6.6
}

impl Default for DvaeVariant {
    fn default() -> Self {
        Self {
            beta: paper_beta(),
            usage_weight: 0.0,
            hard_tail: 0.0,
            recon: crate::dvae::Recon::default(),
            argmax_codes: false,
        }
    }
}

impl AllOptions {
    /// Defaults sized for the device: larger batches on a GPU.
    pub fn new(dir: &Path, budget_s: f64, device: Device) -> Self {
        let gpu = device.is_cuda();
        Self {
            dir: dir.to_path_buf(),
            preset: None,
            settings: Vec::new(),
            data: "world".into(),
            dvae_data: None,
            budget_s,
            device,
            seed: 0,
            resume: false,
            workers: 0,
            // On a CPU a dVAE learns more per picture in small batches (more updates for the
            // same pictures: 17,920 pictures at batch 8 / 16 / 32 reached 25.7 / 25.1 / 23.9 dB,
            // TRAINING.md, fourteenth session) and trains faster per picture (19 against 14
            // pictures/s at batch 32 on 2 cores); a GPU needs large batches to be busy.
            dvae_batch: if gpu { 128 } else { 8 },
            transformer_batch: if gpu { 256 } else { 32 },
            reranker_batch: if gpu { 256 } else { 64 },
            shard_batch: if gpu { 512 } else { 64 },
            eval_captions: 20,
            eval_samples: 16,
            quiet: false,
            dvae: DvaeVariant::default(),
            compute: crate::native_bf16(device).then_some(tch::Kind::BFloat16),
            dvae_from: None,
            init_from: None,
        }
    }
}

/// One stage of the plan.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stage {
    pub name: String,
    /// Seconds of the budget this stage may use.
    pub planned_s: f64,
    /// Steps (trainers), examples (shards) or captions (eval), once measured and decided.
    pub amount: Option<usize>,
    pub batch: usize,
    /// Measured examples per second when the amount was decided.
    pub measured_rate: Option<f64>,
    pub done: bool,
    /// Seconds it took (all invocations together).
    pub seconds: f64,
    /// A one-line outcome (final loss, PSNR, accuracy…).
    pub result: Option<serde_json::Value>,
    /// Seconds the earlier stages left unused, added to this trainer stage's share when its
    /// amount was decided (a stage plans 80% of its share as work and may finish early).
    #[serde(default)]
    pub carried_s: f64,
}

/// `train-all.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub budget_s: f64,
    pub device: String,
    pub seed: u64,
    pub data: String,
    /// The dVAE stage's data, when not `data` ([`dvae_data_for`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dvae_data: Option<String>,
    pub stages: Vec<Stage>,
    /// Seconds spent over all invocations.
    pub spent_s: f64,
    /// The dVAE recipe the run was planned with.
    #[serde(flatten)]
    pub dvae: DvaeVariant,
    /// The model directory the tokenizer, transformer and reranker start from (`--init-from`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<PathBuf>,
    /// The dVAE's and transformer's compute dtype, `bf16` or `f32` (absent from plans written
    /// before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
}

impl Plan {
    fn new(o: &AllOptions) -> Self {
        let batch = |n: &str| match n {
            "dvae" => o.dvae_batch,
            "transformer" => o.transformer_batch,
            "reranker" => o.reranker_batch,
            "shards" => o.shard_batch,
            _ => o.eval_samples,
        };
        let mut stages = vec![Stage {
            name: "tokenizer".into(),
            done: o.init_from.is_some(),
            result: o.init_from.as_ref().map(|d| serde_json::json!({"given": d.display().to_string()})),
            ..Default::default()
        }];
        // with a given dVAE, its share goes to the transformer
        let given = o.dvae_from.is_some();
        let share = |n: &str, f: f64| match n {
            "dvae" if given => 0.0,
            "transformer" if given => f + SPLIT[0].1,
            _ => f,
        };
        stages.extend(SPLIT.iter().map(|&(n, f)| {
            Stage {
                name: n.into(),
                planned_s: share(n, f) * o.budget_s,
                batch: batch(n),
                done: given && n == "dvae",
                result: (given && n == "dvae")
                    .then(|| serde_json::json!({"given": o.dvae_from.as_ref().map(|p| p.display().to_string())})),
                ..Default::default()
            }
        }));
        Self {
            budget_s: o.budget_s,
            device: format!("{:?}", o.device).to_lowercase(),
            seed: o.seed,
            data: o.data.clone(),
            dvae_data: None,
            stages,
            spent_s: 0.0,
            dvae: o.dvae,
            init_from: o.init_from.clone(),
            dtype: Some(crate::compute_name(o.compute).into()),
        }
    }

    fn save(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self).map_err(|e| Error::Invalid(e.to_string()))?;
        write_atomic(&dir.join(PLAN_FILE), json.as_bytes())
    }

    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(PLAN_FILE);
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        serde_json::from_slice(&bytes).map_err(|e| Error::checkpoint(&path, format!("unreadable plan: {e}")))
    }
}

/// Parses a budget: `90s`, `8m`, `1h`, `1m30s` or plain seconds.
pub fn parse_budget(s: &str) -> Result<f64> {
    let bad = || Error::Invalid(format!("cannot read the budget {s:?}: write it as 90s, 8m, 1h or 1m30s"));
    let t = s.trim();
    if let Ok(v) = t.parse::<f64>() {
        return if v.is_finite() && v > 0.0 { Ok(v) } else { Err(bad()) };
    }
    let (mut total, mut num) = (0.0, String::new());
    for c in t.chars() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let unit = match c {
            'h' => 3600.0,
            'm' => 60.0,
            's' => 1.0,
            _ => return Err(bad()),
        };
        let v: f64 = num.parse().map_err(|_| bad())?;
        total += v * unit;
        num.clear();
    }
    if !num.is_empty() || total <= 0.0 || !total.is_finite() {
        return Err(bad());
    }
    Ok(total)
}

/// Share of a stage's time its speed measurement may take at most.
const CALIBRATION_SHARE: f64 = 0.3;

/// Plans a single trainer's run to fill `seconds` (`train dvae|transformer|reranker --time`):
/// a few throwaway steps measure the speed, and the steps that fit what is left become the
/// run's length, so its schedules are those of a run of that length. Returns the steps; the
/// caller also sets the deadline (a slower machine then stops the run early, checkpointing).
pub fn fit_steps(
    opts: &TrainOptions,
    seconds: f64,
    run: impl FnOnce(&TrainOptions) -> Result<train::TrainSummary>,
) -> Result<usize> {
    Ok(calibrate(opts, Instant::now(), seconds, run)?.0)
}

/// Throwaway steps to measure a trainer's speed (at most [`CALIBRATION_SHARE`] of `seconds`,
/// counted from `t0`), then the steps of `opts.batch` that fit what is left of `seconds`, and
/// the measured examples per second.
fn calibrate(
    opts: &TrainOptions,
    t0: Instant,
    seconds: f64,
    run: impl FnOnce(&TrainOptions) -> Result<train::TrainSummary>,
) -> Result<(usize, f64)> {
    let mut c = opts.clone();
    (c.steps, c.calibrate, c.resume) = (CALIBRATION_STEPS, true, false);
    c.deadline = Some(t0 + Duration::from_secs_f64(CALIBRATION_SHARE * seconds));
    let rate = run(&c)?.steady_examples_per_s;
    let left = seconds - t0.elapsed().as_secs_f64();
    Ok((steps_for(left, rate, opts.batch), rate))
}

/// Throwaway steps a trainer's speed is measured on.
const CALIBRATION_STEPS: usize = 12;

fn stage_opts(o: &AllOptions, progress: &StageProgress, batch: usize) -> TrainOptions {
    let mut t = TrainOptions::new(&o.dir);
    t.data = o.data.clone();
    t.batch = batch;
    t.seed = o.seed;
    t.device = o.device;
    t.workers = o.workers;
    t.quiet = o.quiet;
    t.stage = Some(progress.clone());
    t.sample_every = 0;
    t
}

/// Steps that fill `seconds` at `rate` examples/s and `batch` examples a step (at least 1).
fn steps_for(seconds: f64, rate: f64, batch: usize) -> usize {
    ((seconds.max(0.0) * PLAN_FILL * rate / batch.max(1) as f64).floor() as usize).max(1)
}

/// The dVAE stage's data: `given` (`--dvae-data`), else for the world's usual scenes the same
/// world drawn dense (`world:3` → `world-dense:3`: the dVAE keeps far more of the shapes from
/// the same pictures, TRAINING.md, nineteenth session), else `None`: the run's `data`.
pub fn dvae_data_for(data: &str, given: Option<&str>) -> Result<Option<String>> {
    use crate::data::Source;
    use crate::world::{Pictures, Split};
    if let Some(d) = given {
        if d.starts_with("world") {
            Source::open(d)?;
        }
        return Ok(Some(d.to_string()));
    }
    if !data.starts_with("world") {
        return Ok(None);
    }
    Ok(match Source::open(data)? {
        Source::World { seed, split, pictures: Pictures::Usual, mix } => {
            let held = if split == Split::HeldOut { "-held-out" } else { "" };
            Some(format!("world{held}-dense:{seed}{}", mix.spec_suffix()))
        }
        _ => None,
    })
}

/// Refuses a data spec that suits the dVAE alone (one spec feeds every stage of `train all`), before
/// any work. Only the world's specs are opened here: a folder would be read twice.
pub fn check_data(data: &str) -> Result<()> {
    if data.starts_with("world") {
        crate::data::Source::open(data).and_then(|s| s.for_captions("whole model")).map_err(|e| match e {
            Error::Invalid(m) => Error::Invalid(format!("{m} (--dvae-data gives the dVAE stage its own)")),
            e => e,
        })?;
    }
    Ok(())
}

/// Runs (or continues) a whole training run; returns the final plan.
pub fn train_all(o: &AllOptions) -> Result<Plan> {
    check_data(&o.data)?;
    let dvae_data = match &o.dvae_from {
        Some(_) => None,
        None => dvae_data_for(&o.data, o.dvae_data.as_deref())?,
    };
    if o.budget_s.is_nan() || o.budget_s < MIN_BUDGET_S {
        let split: Vec<String> = SPLIT.iter().map(|(n, f)| format!("{n} {:.0}%", 100.0 * f)).collect();
        return Err(Error::Invalid(format!(
            "a budget of {:.0}s is too small: train all needs at least {MIN_BUDGET_S:.0}s (split {})",
            o.budget_s,
            split.join(", ")
        )));
    }
    if [o.dvae_batch, o.transformer_batch, o.reranker_batch, o.shard_batch].contains(&0) {
        return Err(Error::Invalid("batch sizes must be at least 1".into()));
    }
    let plan_path = o.dir.join(PLAN_FILE);
    let mut plan = if plan_path.exists() {
        if !o.resume {
            return Err(Error::Invalid(format!(
                "{} already holds a train-all run: add --resume to continue it, or use a new directory",
                o.dir.display()
            )));
        }
        let p = Plan::load(&o.dir)?;
        if p.dvae != o.dvae {
            let d = p.dvae;
            return Err(Error::Invalid(format!(
                "the run in {} was planned with --beta {} --usage-weight {} --hard-tail {} --recon {}{}: resume it with the same recipe",
                o.dir.display(),
                d.beta,
                d.usage_weight,
                d.hard_tail,
                d.recon,
                if d.argmax_codes { " --argmax-codes" } else { "" }
            )));
        }
        // without --dvae-data a resumed run keeps the plan's
        if o.dvae_data.is_some() && p.dvae_data != o.dvae_data {
            return Err(Error::Invalid(format!(
                "the run in {} was planned with the dVAE's data {}: resume it with the same dVAE data",
                o.dir.display(),
                p.dvae_data.as_deref().unwrap_or(&p.data)
            )));
        }
        if let Some(d) = p.dtype.as_deref().filter(|&d| d != crate::compute_name(o.compute)) {
            return Err(Error::Invalid(format!(
                "the run in {} was planned with --dtype {d}: resume it with the same dtype",
                o.dir.display()
            )));
        }
        if (p.budget_s - o.budget_s).abs() > 1e-6 {
            return Err(Error::Invalid(format!(
                "the run in {} was planned for a budget of {:.0}s, not {:.0}s: resume it with the same budget",
                o.dir.display(),
                p.budget_s,
                o.budget_s
            )));
        }
        p
    } else {
        if o.dvae_from.is_none() && o.dir.join(crate::model::DVAE_FILE).exists() {
            return Err(Error::Invalid(format!(
                "{} already has a dVAE, and train all would train its own over it: pass --dvae-from {} to keep it, or use a new directory",
                o.dir.display(),
                o.dir.display()
            )));
        }
        let cfg = match (&o.preset, &o.init_from) {
            (Some(p), _) => Config::preset(p)?.with_settings(&o.settings)?,
            (None, _) if o.dir.join(crate::model::CONFIG_FILE).exists() => crate::model::Model::load_config(&o.dir)?,
            (None, Some(from)) => crate::model::Model::load_config(from)?,
            (None, None) => {
                return Err(Error::Invalid(format!(
                    "{} has no config.json: give --preset to start a new model",
                    o.dir.display()
                )));
            }
        };
        cfg.validate()?;
        match &o.dvae_from {
            Some(donor) => {
                crate::codes::init_with_dvae(&o.dir, &cfg, donor)?;
            }
            None => train::init_dir(&o.dir, &cfg)?,
        }
        if let Some(from) = &o.init_from {
            take_tokenizer(from, &o.dir, &cfg)?;
        }
        let mut p = Plan::new(o);
        p.dvae_data = dvae_data;
        p.save(&o.dir)?;
        p
    };
    let started = Instant::now();
    let spent_before = plan.spent_s;
    let progress = |label: String| StageProgress { label, started, spent_before, budget: o.budget_s };
    let total = plan.stages.len();
    if !o.quiet {
        let split: Vec<String> =
            plan.stages[1..].iter().map(|s| format!("{} {}", s.name, crate::train::fmt_secs(s.planned_s))).collect();
        eprintln!(
            "train all: {} in {} on {} — {}",
            o.dir.display(),
            crate::train::fmt_secs(o.budget_s),
            plan.device,
            split.join(", ")
        );
    }
    for i in 0..total {
        if plan.stages[i].done {
            continue;
        }
        let t0 = Instant::now();
        let name = plan.stages[i].name.clone();
        let label = format!("{}/{} {name}", i + 1, total);
        let p = progress(label.clone());
        let result = match run_stage(o, &mut plan, i, &p) {
            Ok(r) => r,
            // the model is complete before the report: a failed evaluation is reported, and the
            // run still ends with its model
            Err(e) if name == "eval" => {
                eprintln!("\nwarning: the evaluation failed: {e}");
                serde_json::json!({"error": e.to_string()})
            }
            Err(e) => return Err(e),
        };
        let st = &mut plan.stages[i];
        st.seconds += t0.elapsed().as_secs_f64();
        st.done = true;
        st.result = Some(result.clone());
        let st = st.clone();
        plan.spent_s = spent_before + started.elapsed().as_secs_f64();
        plan.save(&o.dir)?;
        if !o.quiet {
            eprintln!(
                "\r[{label}] done in {} (planned {}): {result} · run {} of {}",
                crate::train::fmt_secs(st.seconds),
                crate::train::fmt_secs(st.planned_s),
                crate::train::fmt_secs(plan.spent_s),
                crate::train::fmt_secs(o.budget_s)
            );
        }
    }
    Ok(plan)
}

/// Copies the tokenizer of `from` into `dir` (a model continued with `--init-from`): the
/// transformer's text embeddings only mean something with the tokenizer they were trained on.
fn take_tokenizer(from: &Path, dir: &Path, cfg: &Config) -> Result<()> {
    let donor = from.join(crate::model::TOKENIZER_FILE);
    let tok = crate::text::TextTokenizer::load(&donor)?;
    if tok.vocab_size() != cfg.text.vocab_size {
        return Err(Error::Invalid(format!(
            "the tokenizer of {} has {} tokens and this model's text vocabulary {}: --init-from needs the same text shape",
            from.display(),
            tok.vocab_size(),
            cfg.text.vocab_size
        )));
    }
    let bytes = std::fs::read(&donor).map_err(|e| Error::io(&donor, e))?;
    write_atomic(&dir.join(crate::model::TOKENIZER_FILE), &bytes)
}

/// The weights file of `name` in the plan's `--init-from` directory, where there is one and its
/// component has this model's shapes, and what the run starts it from (`None`: not asked to).
fn init_weights(plan: &Plan, name: &str, cfg: &Config) -> Result<(Option<PathBuf>, Option<String>)> {
    let Some(dir) = &plan.init_from else { return Ok((None, None)) };
    let path = dir.join(name);
    if !path.exists() {
        return Ok((None, Some(format!("{} does not exist: trained from scratch", path.display()))));
    }
    let from = crate::model::Model::load_config(dir)?;
    let text = (from.text.vocab_size, from.text.text_len) == (cfg.text.vocab_size, cfg.text.text_len);
    let fits = if name == crate::model::TRANSFORMER_FILE {
        // a transformer of another codebook size is carried over to this dVAE's codes
        // (`train transformer --codes-from`), which needs the dVAE it learnt them from
        let codes = from.dvae.vocab_size == cfg.dvae.vocab_size
            || (from.dvae.image_size == cfg.dvae.image_size && dir.join(crate::model::DVAE_FILE).exists());
        text && from.transformer == cfg.transformer && from.grid_size() == cfg.grid_size() && codes
    } else {
        text && from.reranker == cfg.reranker && from.dvae.image_size == cfg.dvae.image_size
    };
    let shown = path.display().to_string();
    Ok(if fits {
        (Some(path), Some(shown))
    } else {
        (None, Some(format!("{shown} has other shapes: trained from scratch")))
    })
}

/// Whether the dVAE of `dir` makes other codes than the one `from` has, where `from`'s can be
/// carried over (a dVAE file of the same picture size): the transformer `from` trained learnt
/// the codes of its own dVAE.
fn codes_changed(from: &Path, dir: &Path, cfg: &Config) -> Result<bool> {
    let (old, new) = (from.join(crate::model::DVAE_FILE), dir.join(crate::model::DVAE_FILE));
    if !old.exists() {
        return Ok(false);
    }
    let from_cfg = crate::model::Model::load_config(from)?;
    if from_cfg.dvae.image_size != cfg.dvae.image_size {
        return Ok(false);
    }
    // a dVAE with the same encoder (and ε) gives the same codes, whatever its decoder
    let codes = |p: &Path, c: &Config| crate::shards::dvae_fingerprint(p, &c.dvae).map(|f| f.codes);
    Ok(codes(&old, &from_cfg)? != codes(&new, cfg)?)
}

/// Decides a stage's amount once (saved in the plan before any work), so a resumed stage keeps
/// the schedules it started with.
fn decide(o: &AllOptions, plan: &mut Plan, i: usize, measure: impl FnOnce() -> Result<(usize, f64)>) -> Result<usize> {
    if let Some(a) = plan.stages[i].amount {
        return Ok(a);
    }
    let (amount, rate) = measure()?;
    plan.stages[i].amount = Some(amount);
    plan.stages[i].measured_rate = Some(rate);
    plan.save(&o.dir)?;
    Ok(amount)
}

fn run_stage(o: &AllOptions, plan: &mut Plan, i: usize, p: &StageProgress) -> Result<serde_json::Value> {
    if matches!(plan.stages[i].name.as_str(), "dvae" | "transformer" | "reranker") && plan.stages[i].amount.is_none() {
        // what the run is ahead of its plan goes to the next trainer; saved with the amount
        let earlier: f64 = plan.stages[..i].iter().map(|s| s.planned_s).sum();
        plan.stages[i].carried_s = (earlier - p.elapsed()).max(0.0);
    }
    let st = plan.stages[i].clone();
    let share = st.planned_s + st.carried_s;
    match st.name.as_str() {
        "tokenizer" => {
            let tok = train::train_tokenizer(&o.dir, &o.data, 20_000)?;
            Ok(serde_json::json!({"tokens": tok.vocab_size()}))
        }
        "dvae" => {
            let t0 = Instant::now();
            let dvae_data = plan.dvae_data.clone();
            let base = || {
                let mut t = stage_opts(o, p, st.batch);
                t.compute = o.compute;
                if let Some(d) = &dvae_data {
                    t.data = d.clone();
                }
                t
            };
            let steps = decide(o, plan, i, || {
                calibrate(&base(), t0, share, |c| train::train_dvae(c, &dvae_recipe(c.steps, o.dvae)))
            })?;
            let mut t = base();
            t.steps = steps;
            t.resume = true;
            t.checkpoint_every = (steps / 6).max(1);
            t.sample_every = t.checkpoint_every;
            t.deadline = Some(stage_deadline(plan, i, t0, p));
            let cfg = crate::model::Model::load_config(&o.dir)?;
            t.weights_bf16 = 4 * crate::params::count(&cfg).dvae > MAX_F32_FILE;
            let s = train::train_dvae(&t, &dvae_recipe(steps, o.dvae))?;
            let check = last_dvae_check(&o.dir);
            Ok(serde_json::json!({
                "steps": s.step, "loss": s.last_loss, "images_per_s": s.examples_per_s, "data_wait": s.data_wait,
                "dtype": crate::compute_name(t.compute),
                "hard_psnr_db": check.as_ref().and_then(|c| c.get("hard_psnr_db").cloned()),
                "roundtrip": check.as_ref().and_then(|c| c.get("roundtrip").cloned()),
            }))
        }
        "shards" => {
            let t0 = Instant::now();
            let per_shard = 8192; // rounded up to whole batches by `encode_shards`
            let examples = decide(o, plan, i, || {
                let mut c = stage_opts(o, p, st.batch);
                (c.steps, c.calibrate) = (6, true);
                c.deadline = Some(t0 + Duration::from_secs_f64(CALIBRATION_SHARE * st.planned_s));
                let s = train::encode_shards(&c, 0, per_shard)?;
                let left = st.planned_s - t0.elapsed().as_secs_f64();
                let n = (left.max(0.0) * PLAN_FILL * s.examples_per_s) as usize;
                Ok((n.clamp(st.batch, 4_000_000), s.examples_per_s))
            })?;
            let mut t = stage_opts(o, p, st.batch);
            t.deadline = Some(stage_deadline(plan, i, t0, p));
            let s = train::encode_shards(&t, examples, per_shard)?;
            Ok(serde_json::json!({
                "examples": s.examples, "encoded": s.encoded, "examples_per_s": s.examples_per_s, "data_wait": s.data_wait,
            }))
        }
        "transformer" | "reranker" => {
            let t0 = Instant::now();
            let transformer = st.name == "transformer";
            let cfg = crate::model::Model::load_config(&o.dir)?;
            let file = if transformer { crate::model::TRANSFORMER_FILE } else { crate::model::RERANKER_FILE };
            // a component of other shapes (another preset) starts afresh, and the run says so
            let (init_from, init) = init_weights(plan, file, &cfg)?;
            if let (None, Some(why), false) = (&init_from, &init, o.quiet) {
                eprintln!("\rtrain all: {why}");
            }
            // a transformer continued on a retrained dVAE starts from its old codes carried over
            let codes_from = match (&plan.init_from, &init_from) {
                (Some(dir), Some(_)) if transformer => codes_changed(dir, &o.dir, &cfg)?.then(|| dir.clone()),
                _ => None,
            };
            let run = |t: &TrainOptions| -> Result<train::TrainSummary> {
                let warmup = (t.steps / 20).max(1);
                // the throwaway steps that measure the speed start from random weights: loading
                // and carrying codes over (pictures encoded by both dVAEs) is done once, for the
                // run that counts
                let (init_from, codes_from) =
                    if t.calibrate { (None, None) } else { (init_from.clone(), codes_from.clone()) };
                if transformer {
                    train::train_transformer(
                        t,
                        &TransformerRecipe { lr: 1e-3, warmup, init_from, codes_from, ..Default::default() },
                    )
                } else {
                    train::train_reranker(t, &train::RerankerRecipe { warmup, init_from, ..Default::default() })
                }
            };
            let base = |o: &AllOptions| {
                let mut t = stage_opts(o, p, st.batch);
                t.shards = Some(train::default_shard_dir(&o.dir));
                if transformer {
                    t.compute = o.compute;
                }
                t.weights_bf16 = true;
                t
            };
            let steps = decide(o, plan, i, || calibrate(&base(o), t0, share, run))?;
            let mut t = base(o);
            t.steps = steps;
            t.resume = true;
            t.checkpoint_every = (steps / 6).max(1);
            t.deadline = Some(stage_deadline(plan, i, t0, p));
            let s = run(&t)?;
            Ok(serde_json::json!({
                "steps": s.step, "loss": s.last_loss, "examples_per_s": s.examples_per_s, "data_wait": s.data_wait,
                "skipped_shards": s.skipped_files, "dtype": crate::compute_name(t.compute), "init": init,
            }))
        }
        "eval" => {
            if o.eval_captions == 0 {
                return Ok(serde_json::json!({"skipped": true}));
            }
            let model = crate::model::Model::load(&o.dir, o.device)?;
            let sample = crate::sample::SampleOptions::default();
            let t0 = Instant::now();
            let deadline = stage_deadline(plan, i, t0, p);
            let captions = decide(o, plan, i, || {
                // one caption's worth of work: sample, rerank
                let t = Instant::now();
                let s = model.generate("a red circle", o.eval_samples, 0, None, &sample, |_| true)?;
                let rgb: Vec<Vec<u8>> = s.iter().map(|s| s.rgb.clone()).collect();
                model.rerank("a red circle", &rgb)?;
                let per_caption = t.elapsed().as_secs_f64();
                let left = deadline.saturating_duration_since(Instant::now()).as_secs_f64();
                let cells = 10.0; // six capabilities seen, four held out
                let n = (left.max(0.0) * PLAN_FILL / (cells * per_caption)) as usize;
                Ok((n.clamp(1, o.eval_captions), 1.0 / per_caption))
            })?;
            let opts = crate::report::EvalOptions {
                captions,
                samples: o.eval_samples,
                seed: o.seed,
                sample,
                samples_file: None,
                only: Vec::new(),
            };
            let r = crate::report::evaluate(&model, &opts, &o.dir.join("eval"), |_| {})?;
            let top: serde_json::Map<String, serde_json::Value> =
                r.accuracy.iter().map(|(k, a)| (k.clone(), a.rerank_top1.into())).collect();
            Ok(serde_json::json!({"captions": captions, "top1": top, "dvae_psnr_db": r.dvae_psnr_db}))
        }
        other => Err(Error::Invalid(format!("unknown stage {other:?} in {PLAN_FILE}"))),
    }
}

/// When stage `i`, started (in this invocation) at `t0`, must stop: its share of the budget
/// (with what earlier stages left unused, for a trainer) less what earlier invocations already
/// spent in it — and no later than the run's schedule allows (the shares so far, with the slack
/// spread over them, of the budget less a reserve of 3% and at least 2 s), so that time an
/// earlier stage ran over (closing checkpoints on a loaded machine) comes out of the later
/// stages rather than out of the budget. At least a second either way.
fn stage_deadline(plan: &Plan, i: usize, t0: Instant, p: &StageProgress) -> Instant {
    let st = &plan.stages[i];
    let own = t0 + Duration::from_secs_f64((0.95 * (st.planned_s + st.carried_s) - st.seconds).max(0.0));
    let total: f64 = plan.stages.iter().map(|s| s.planned_s).sum();
    let upto: f64 = plan.stages[..=i].iter().map(|s| s.planned_s).sum();
    let usable = plan.budget_s - (0.03 * plan.budget_s).max(2.0);
    let allowed_end = usable * upto / total.max(1e-9);
    let by_run = Instant::now() + Duration::from_secs_f64((allowed_end - p.elapsed()).max(0.0));
    own.min(by_run).max(t0 + Duration::from_secs(1))
}

/// The dVAE recipe of a run of `steps` steps: the paper's objective and relaxation with its
/// schedules compressed to the run (τ 1 → 1/16 over 80% of it, β up to the paper's 6.6 over the
/// first 10% — with β = 1 the codebook collapsed to 11 of 2,048 codes in a GPU run — learning
/// rate 1e-3 → 1e-5), weights averaged over the last ~5% of the steps (a long average would mix
/// encoders trained at very different temperatures), and the variant's options: β, the
/// codebook-usage term and a straight-through tail.
pub fn dvae_recipe(steps: usize, v: DvaeVariant) -> DvaeRecipe {
    let mut schedule = crate::dvae::DvaeSchedule {
        beta_max: v.beta,
        beta_steps: (steps / 10).max(1),
        tau_start: 1.0,
        tau_end: 1.0 / 16.0,
        tau_steps: (steps * 4 / 5).max(1),
        lr_start: 1e-3,
        lr_end: 1e-5,
        lr_steps: steps,
    };
    let ema = (1.0 - 20.0 / steps.max(1) as f64).clamp(0.9, 0.999);
    let hard_from = (v.hard_tail > 0.0).then(|| ((1.0 - v.hard_tail.min(1.0)) * steps as f64).round() as usize);
    let argmax_codes = v.argmax_codes && hard_from.is_some();
    if argmax_codes && hard_from == Some(0) {
        // no step samples Gumbel codes: τ only sharpens the softmax the gradient flows through
        schedule.tau_end = 1.0;
    }
    DvaeRecipe {
        schedule,
        ema,
        usage_weight: v.usage_weight,
        hard_from,
        recon: v.recon,
        argmax_codes,
        ..Default::default()
    }
}

/// The last hard-code check the dVAE trainer logged.
fn last_dvae_check(dir: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("dvae.log.jsonl")).ok()?;
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v.get("hard_psnr_db").is_some())
}
