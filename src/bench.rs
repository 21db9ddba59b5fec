//! `tessera bench`: sampling and training throughput of named configurations against the
//! machine's measured matrix-multiply peak. Every figure is the median of several timed runs
//! after a warm-up; models are randomly initialised (speed does not depend on the weights).

use std::time::Instant;

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::config::Config;
use crate::error::Result;
use crate::model::Model;
use crate::params;
use crate::sample::{SampleOptions, Sampler, batch_seeds};
use crate::transformer::DecodeMode;

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub device: Device,
    pub kind: Kind,
    pub threads: usize,
    pub runs: usize,
    pub configs: Vec<String>,
    pub sample_batch: usize,
    pub train_batch: usize,
    /// How the sampling figures' decode steps read the cache.
    pub decode: DecodeMode,
    /// Sample every row from its own caption (as `eval` does) instead of one caption for the
    /// batch (as `generate` and the app do).
    pub distinct_captions: bool,
    /// Round the random transformer weights to bf16 values, as a model stored in bf16 holds
    /// (the embedded default model): CPU f32 decode steps then read bf16 panels.
    pub bf16_weights: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConfigBench {
    pub params: u64,
    pub transformer_params: u64,
    pub sample_batch: usize,
    pub sample_tokens_per_s: f64,
    pub sample_with_decode_tokens_per_s: f64,
    pub sample_ms_per_step: f64,
    /// Bytes one decode step must read: the weights it multiplies by and, on average over
    /// the image, the KV cache.
    pub sample_bytes_per_step: f64,
    /// `sample_bytes_per_step` per step time, against the measured read bandwidth.
    pub sample_bandwidth_utilisation: f64,
    pub decode_ms_per_image: f64,
    /// ATen operations one decode step calls from Rust (a middle step; with static decoding,
    /// the step a CUDA graph captures, run eagerly).
    pub sample_ops_per_step: usize,
    /// Of those and what they call, the operations that do work (no views, no allocations):
    /// on a GPU about the kernels a step launches ([`crate::shim::working_ops`]).
    pub sample_kernels_per_step: usize,
    pub train_batch: usize,
    pub train_tokens_per_s: f64,
    pub train_ms_per_step: f64,
    pub train_gflops_per_step: f64,
    pub train_mfu: f64,
    /// Whether the training figures above used the fused optimiser kernels (AdamW, clipping
    /// and the average in a few launches); the `_unfused` figures run one operation per tensor.
    pub fused_optimizer: bool,
    /// Clipping, AdamW and the average alone.
    pub optimizer_ms_per_step: f64,
    pub train_ms_per_step_unfused: f64,
    pub optimizer_ms_per_step_unfused: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub device: String,
    /// Compute dtype: bf16 samples with bf16 weights and trains with f32 master weights and
    /// bf16 matrix products.
    pub dtype: String,
    pub threads: usize,
    pub runs: usize,
    /// How decode steps read the cache (`auto` resolved for the device).
    pub decode: String,
    /// Whether every sampled row had its own caption (else one caption for the batch).
    pub distinct_captions: bool,
    /// Whether the transformer's weights were rounded to bf16 values (as stored models'):
    /// CPU f32 decode steps read them as bf16.
    pub bf16_weights: bool,
    /// The instruction set of the CPU decode kernels ([`crate::kernels::isa`]; they run for
    /// f32 sampling on the CPU).
    pub cpu_kernels: String,
    /// What loading libtorch's CUDA libraries found ([`crate::shim::cuda_libraries`]).
    pub cuda_libraries: crate::shim::CudaLibraries,
    pub matmul_gflops: f64,
    /// Memory read bandwidth: a sum over a 256 MiB tensor.
    pub memory_read_gbps: f64,
    pub configs: std::collections::BTreeMap<String, ConfigBench>,
}

pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { 0.5 * (v[n / 2 - 1] + v[n / 2]) }
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Times `f` `runs` times after one warm-up call; returns the seconds of each run.
fn time_runs(device: Device, runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    f()?;
    sync(device);
    let mut out = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t0 = Instant::now();
        f()?;
        sync(device);
        out.push(t0.elapsed().as_secs_f64());
    }
    Ok(out)
}

/// The machine's matrix-multiply rate in GFLOP/s: median over runs of n×n products.
pub fn matmul_gflops(device: Device, kind: Kind, runs: usize) -> Result<f64> {
    let n = if device.is_cuda() { 8192 } else { 2048 };
    let a = Tensor::randn([n, n], (kind, device));
    let b = Tensor::randn([n, n], (kind, device));
    let reps = if device.is_cuda() { 20 } else { 3 };
    let times = time_runs(device, runs.max(3), || {
        for _ in 0..reps {
            let _ = a.matmul(&b);
        }
        Ok(())
    })?;
    let flops = 2.0 * (n as f64).powi(3) * reps as f64;
    Ok(flops / median(times) / 1e9)
}

/// Memory read bandwidth in GB/s: median over runs of summing a 256 MiB tensor.
pub fn read_gbps(device: Device, runs: usize) -> Result<f64> {
    let t = Tensor::ones([64 << 20], (Kind::Float, device));
    let times = time_runs(device, runs.max(3), || {
        let _ = t.sum(Kind::Float);
        Ok(())
    })?;
    Ok((t.numel() * 4) as f64 / median(times) / 1e9)
}

/// Bytes a decode step reads at batch `b`: the block weights and the image head in `kind`,
/// plus the keys and values the step reads in `mode` (on `device`), averaged over the image
/// positions: the whole cache for static steps, every key written for masked growing ones, the
/// pattern's keys in sparse layers for growing ones, the caption's once for the batch when its
/// rows share one (`shared_caption`).
fn decode_bytes(cfg: &Config, opts: &BenchOptions, shared_caption: bool) -> f64 {
    let (b, kind, mode, device) = (opts.sample_batch, opts.kind, opts.decode, opts.device);
    use crate::attention::{StreamShape, decode_blocks, padded_len};
    let counts = params::count(cfg);
    let part = |name: &str| counts.transformer_parts.iter().find(|p| p.0 == name).map(|p| p.1).unwrap_or(0);
    let t = &cfg.transformer;
    let d = t.d_model as u64;
    let weights = part("attention") + part("mlp") + part("norms") + (d + 1) * cfg.dvae.vocab_size as u64;
    let shape = StreamShape { text_len: cfg.text.text_len, grid: cfg.grid_size(), conv_kernel: t.conv_kernel };
    // the positions of decode steps: image tokens 0..I−1 fed at T+1..
    let steps = (cfg.image_len() - 1).max(1);
    let positions = || (0..steps).map(|j| cfg.text.text_len + 1 + j);
    // keys read a step, summed over the layers and averaged over the steps: by every row, and
    // once for the batch
    let (mut per_row, mut per_batch) = (0usize, 0usize);
    for kind in t.layer_kinds() {
        match mode.on(device) {
            DecodeMode::Static => per_row += steps * padded_len(shape.seq_len()),
            DecodeMode::GrowingMasked => per_row += positions().map(|p| p + 1).sum::<usize>(),
            _ => {
                for block in positions().flat_map(|p| decode_blocks(kind, shape, p)) {
                    if block.caption && shared_caption {
                        per_batch += block.len();
                    } else {
                        per_row += block.len();
                    }
                }
            }
        }
    }
    let keys = (b * per_row + per_batch) as f64 / steps as f64;
    let kv = (2 * t.inner_dim()) as f64 * keys;
    // bf16-valued weights are read as bf16 by the CPU's f32 steps
    let weight_kind = if opts.bf16_weights && crate::kernels::applies(device, kind) { Kind::BFloat16 } else { kind };
    weights as f64 * weight_kind.elt_size_in_bytes() as f64 + kv * kind.elt_size_in_bytes() as f64
}

fn bench_config(cfg: &Config, opts: &BenchOptions, peak_gflops: f64, gbps: f64) -> Result<ConfigBench> {
    let dev = opts.device;
    let mut model = Model::random_init(cfg, dev, 0)?;
    if opts.bf16_weights {
        tch::no_grad(|| {
            for mut v in model.transformer.vs.trainable_variables() {
                let r = v.to_kind(Kind::BFloat16).to_kind(v.kind());
                v.copy_(&r);
            }
        });
    }
    model.set_dtype(opts.kind)?;
    model.transformer.net.set_decode_mode(opts.decode);
    let counts = params::count(cfg);
    let net = &model.transformer.net;
    let b = opts.sample_batch;
    let image_len = cfg.image_len();
    let tl = cfg.text.text_len;

    // Sampling: captions of random tokens filling the text length, all image tokens drawn;
    // one caption for the batch, as `generate` and the app sample a prompt, or one per row, as
    // `eval` draws its captions
    let rows = if opts.distinct_captions { b } else { 1 };
    let text = Tensor::randint(cfg.text.vocab_size as i64, [rows as i64, tl as i64], (Kind::Int64, dev))
        .expand([b as i64, tl as i64], false)
        .contiguous();
    let sopts = SampleOptions::default();
    let mut sample_times = Vec::new();
    let mut decode_times = Vec::new();
    let mut run = |record: bool| -> Result<()> {
        let t0 = Instant::now();
        let tokens = tch::no_grad(|| Sampler::new(net, &text, None, &batch_seeds(1, b), &sopts)?.run(|_| true))?;
        sync(dev);
        let t1 = Instant::now();
        let g = cfg.grid_size() as i64;
        let imgs = tch::no_grad(|| model.dvae.net.decode(&tokens.view([-1, g, g])));
        let _ = imgs.to_device(Device::Cpu);
        let t2 = Instant::now();
        if record {
            sample_times.push((t1 - t0).as_secs_f64());
            decode_times.push((t2 - t1).as_secs_f64());
        }
        Ok(())
    };
    run(false)?;
    for _ in 0..opts.runs {
        run(true)?;
    }
    let (sample_ops_per_step, sample_kernels_per_step) = step_ops(net, &text, b)?;
    let t_sample = median(sample_times.clone());
    let t_both = median(sample_times.iter().zip(&decode_times).map(|(a, b)| a + b).collect());
    let tokens = (b * image_len) as f64;

    // Training: forward, backward, clipping and an AdamW update on random tokens, with f32
    // master weights; a bf16 dtype runs the matrix products in bf16 (mixed precision).
    model.set_dtype(Kind::Float)?;
    model.transformer.net.set_compute_kind((opts.kind != Kind::Float).then_some(opts.kind));
    let net = &model.transformer.net;
    let tb = opts.train_batch;
    let mut opt = crate::optim::AdamW::new(&model.transformer.vs, 0.9, 0.96, 1e-8, 4.5e-2);
    let mut ema = crate::optim::Ema::new(&model.transformer.vs, 0.999);
    let fused_available = opt.fused;
    let ttext = Tensor::randint(cfg.text.vocab_size as i64, [tb as i64, tl as i64], (Kind::Int64, dev));
    let timg = Tensor::randint(cfg.dvae.vocab_size as i64, [tb as i64, image_len as i64], (Kind::Int64, dev));
    // as the trainers step: clipping, AdamW and the average; fused kernels, then per tensor
    let update = |opt: &mut crate::optim::AdamW, ema: &mut crate::optim::Ema| {
        let _ = opt.clip_grad_norm(4.0);
        opt.step(1e-4);
        ema.update(opt.step);
    };
    let mut train_step = |fused: bool| {
        opt.fused = fused && fused_available;
        ema.fused = opt.fused;
        let o = &mut opt;
        let e = &mut ema;
        let times = time_runs(dev, opts.runs, || {
            let loss = net.loss(&ttext, &timg, true);
            o.zero_grad();
            loss.loss.backward();
            update(o, e);
            Ok(())
        })?;
        // the optimiser alone, on the gradients of the last step
        let optim = time_runs(dev, opts.runs, || {
            update(o, e);
            Ok(())
        })?;
        Ok::<_, crate::error::Error>((median(times), median(optim)))
    };
    // a training batch of 0 leaves the training figures out (0): sampling alone
    let (t_train, t_optim, t_unfused, t_optim_unfused) = if tb == 0 {
        (f64::INFINITY, 0.0, 0.0, 0.0)
    } else {
        let (t_train, t_optim) = train_step(true)?;
        let (t_unfused, t_optim_unfused) = train_step(false)?;
        (t_train, t_optim, t_unfused, t_optim_unfused)
    };
    let step_flops = 3.0 * params::transformer_forward_flops(cfg) * tb as f64;
    let bytes = decode_bytes(cfg, opts, !opts.distinct_captions && b > 1);
    Ok(ConfigBench {
        params: counts.total,
        transformer_params: counts.transformer,
        sample_batch: b,
        sample_tokens_per_s: tokens / t_sample,
        sample_with_decode_tokens_per_s: tokens / t_both,
        sample_ms_per_step: 1e3 * t_sample / image_len as f64,
        sample_bytes_per_step: bytes,
        sample_bandwidth_utilisation: bytes / (t_sample / image_len as f64) / (gbps * 1e9),
        decode_ms_per_image: 1e3 * median(decode_times) / b as f64,
        sample_ops_per_step,
        sample_kernels_per_step,
        train_batch: tb,
        train_tokens_per_s: (tb * cfg.seq_len()) as f64 / t_train,
        train_ms_per_step: if tb == 0 { 0.0 } else { 1e3 * t_train },
        train_gflops_per_step: step_flops / 1e9,
        train_mfu: step_flops / t_train / (peak_gflops * 1e9),
        fused_optimizer: fused_available,
        optimizer_ms_per_step: 1e3 * t_optim,
        train_ms_per_step_unfused: 1e3 * t_unfused,
        optimizer_ms_per_step_unfused: 1e3 * t_optim_unfused,
    })
}

/// The ATen operations of one middle decode step of a batch of `b` rows of `text`: those
/// called from Rust, and those that do work ([`crate::shim::working_ops`]). With static decode
/// steps, the step with positions on the device (what a CUDA graph captures) run eagerly.
pub fn step_ops(net: &crate::transformer::Transformer, text: &Tensor, b: usize) -> Result<(usize, usize)> {
    let mut sampler = Sampler::new(net, text, None, &batch_seeds(1, b), &SampleOptions::default())?;
    if net.static_decode() {
        sampler = sampler.with_device_positions().without_capture();
    }
    for _ in 0..2 {
        let _ = sampler.step();
    }
    let (_, calls) = crate::shim::record_ops(|| sampler.step())?;
    if calls.is_empty() {
        eprintln!("bench: a decode step recorded no operations (this libtorch runs no operation hooks)");
    }
    let top = calls.iter().filter(|c| c.depth == 0).count();
    Ok((top, crate::shim::working_ops(&calls).len()))
}

/// Runs the benchmark and returns its report.
pub fn run(opts: &BenchOptions, mut log: impl FnMut(&str)) -> Result<BenchReport> {
    if opts.device == Device::Cpu {
        tch::set_num_threads(opts.threads as i32);
    }
    log(&format!("measuring the matrix-multiply peak on {:?}", opts.device));
    let peak = matmul_gflops(opts.device, opts.kind, opts.runs)?;
    let gbps = read_gbps(opts.device, opts.runs)?;
    let mut configs = std::collections::BTreeMap::new();
    for name in &opts.configs {
        log(&format!("config {name}"));
        let cfg = Config::preset(name)?;
        configs.insert(cfg.name.clone(), bench_config(&cfg, opts, peak, gbps)?);
    }
    Ok(BenchReport {
        device: format!("{:?}", opts.device).to_lowercase(),
        dtype: format!("{:?}", opts.kind).to_lowercase(),
        threads: if opts.device == Device::Cpu { opts.threads } else { tch::get_num_threads() as usize },
        runs: opts.runs,
        decode: opts.decode.on(opts.device).name().into(),
        distinct_captions: opts.distinct_captions,
        bf16_weights: opts.bf16_weights,
        cpu_kernels: crate::kernels::isa().into(),
        cuda_libraries: crate::shim::cuda_libraries(),
        matmul_gflops: peak,
        memory_read_gbps: gbps,
        configs,
    })
}

/// The data loader alone, with no model: how many pictures a pool of `workers` renders per
/// second at `size` px (and per worker), and how many tokens per second it serves from the
/// token shards of `shards`, each measured for about `seconds`.
pub fn loader(
    size: usize,
    batch: usize,
    workers: &[usize],
    seconds: f64,
    shards: Option<&std::path::Path>,
) -> Result<serde_json::Value> {
    use crate::train::{Feed, spawn_loader};
    let time = |feed: &Feed, w: usize| -> (f64, usize) {
        let t0 = Instant::now();
        let mut n = 0;
        for b in spawn_loader(feed.clone(), batch, 0, 0, usize::MAX / 2, w) {
            n += b.captions.len();
            if t0.elapsed().as_secs_f64() >= seconds {
                break;
            }
        }
        (n as f64 / t0.elapsed().as_secs_f64(), n)
    };
    let mut render = Vec::new();
    let world = Feed::Images { source: crate::data::Source::open("world")?, size };
    for &w in workers {
        let (rate, _) = time(&world, w);
        render
            .push(serde_json::json!({"workers": w, "images_per_s": rate, "images_per_s_per_worker": rate / w as f64}));
    }
    let mut out = serde_json::json!({"image_size": size, "batch": batch, "world": render});
    if let Some(dir) = shards {
        let first = std::fs::read_dir(dir)
            .map_err(|e| crate::error::Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "tok"))
            .ok_or_else(|| crate::error::Error::Invalid(format!("{} holds no token shard", dir.display())))?;
        let bytes = std::fs::read(&first).map_err(|e| crate::error::Error::io(&first, e))?;
        let h = crate::shards::decode_shard(&bytes).map_err(|e| crate::error::Error::checkpoint(&first, e))?.header;
        // the loader's speed alone: whichever dVAE the first shard names
        let dvae = crate::shards::DvaeFingerprint { codes: h.dvae.clone(), file: h.dvae.clone() };
        let set = crate::shards::TokenShards::open(dir, h.image_len, h.vocab, &dvae)?;
        let examples = set.len();
        let feed = Feed::Tokens(std::sync::Arc::new(set));
        let (rate, _) = time(&feed, 1);
        out["shards"] = serde_json::json!({
            "examples": examples, "examples_per_s": rate, "image_tokens_per_s": rate * h.image_len as f64, "workers": 1,
        });
    }
    Ok(out)
}
