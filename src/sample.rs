//! Sampling image tokens with a KV cache [P 2.6].
//!
//! The caption (and any given image prefix, for completion) is fed in one pass; then each
//! image token is drawn and fed back, one step per token. Temperature, top-k and top-p filter
//! the logits; classifier-free guidance runs the null caption beside each row and mixes the
//! two logits. Every sample draws its randomness from its own seeded generator, one uniform
//! number per token, so a sample depends on its seed only, not on the batch it ran in.
//! A [`Sampler`] is stepped by its owner, which can report progress or stop between steps.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::transformer::Transformer;

/// How tokens are drawn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SampleOptions {
    /// Softmax temperature; 0 picks the most likely token.
    pub temperature: f64,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1 = off).
    pub top_p: f64,
    /// Classifier-free guidance scale (1 = off): logits = u + s·(c − u).
    pub guidance: f64,
}

impl Default for SampleOptions {
    fn default() -> Self {
        Self { temperature: 1.0, top_k: 0, top_p: 1.0, guidance: 1.0 }
    }
}

impl SampleOptions {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::Invalid(format!("temperature {} must be ≥ 0", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Invalid(format!("top-p {} must lie in (0, 1]", self.top_p)));
        }
        if !(self.guidance.is_finite() && self.guidance >= 0.0) {
            return Err(Error::Invalid(format!("guidance {} must be ≥ 0", self.guidance)));
        }
        Ok(())
    }
}

/// SplitMix64: a small, fast generator whose stream depends only on its seed.
#[derive(Debug, Clone)]
pub struct SeedRng(u64);

impl SeedRng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Applies temperature, top-k and top-p to logits [B, V]; removed tokens get −∞.
pub fn filter_logits(logits: &Tensor, opts: &SampleOptions) -> Tensor {
    let v = logits.size()[1];
    let mut l = logits.to_kind(Kind::Float);
    if opts.temperature > 0.0 && opts.temperature != 1.0 {
        l = l.divide_scalar(opts.temperature);
    }
    if opts.top_k > 0 && (opts.top_k as i64) < v {
        let (top, _) = l.topk(opts.top_k as i64, 1, true, true);
        let kth = top.narrow(1, opts.top_k as i64 - 1, 1);
        l = l.masked_fill(&l.lt_tensor(&kth), f64::NEG_INFINITY);
    }
    if opts.top_p < 1.0 {
        let (sorted, idx) = l.sort_stable(true, 1, true);
        let probs = sorted.softmax(1, Kind::Float);
        let before = probs.cumsum(1, Kind::Float) - &probs;
        let sorted = sorted.masked_fill(&before.ge(opts.top_p), f64::NEG_INFINITY);
        l = l.full_like(f64::NEG_INFINITY).scatter(1, &idx, &sorted);
    }
    l
}

/// Draws one token per row of filtered logits [B, V] by inverting the CDF at `uniforms[b]`;
/// with temperature 0, takes the argmax.
pub fn draw(logits: &Tensor, uniforms: &[f64], greedy: bool) -> Tensor {
    draw_with(logits, &Tensor::from_slice(uniforms).to_device(logits.device()), greedy)
}

/// [`draw`] with the uniforms [B] or [B, 1] already on the logits' device (no host copy).
pub fn draw_with(logits: &Tensor, uniforms: &Tensor, greedy: bool) -> Tensor {
    if greedy {
        return logits.argmax(1, false);
    }
    let v = logits.size()[1];
    let cdf = logits.softmax(1, Kind::Double).cumsum(1, Kind::Double);
    let total = cdf.narrow(1, v - 1, 1);
    let u = uniforms.view([-1, 1]) * total;
    u.searchsorted(&cdf, false, true, "right", None::<Tensor>).clamp_max(v - 1).squeeze_dim(1)
}

/// Progress of a sampling run, for callbacks.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Image tokens known (given prefix included).
    pub done: usize,
    /// Image tokens per image.
    pub total: usize,
    /// Tokens that were given rather than sampled.
    pub prefix: usize,
}

/// A stepwise sampler over a batch of captions.
#[derive(Debug)]
pub struct Sampler<'a> {
    model: &'a Transformer,
    cache: crate::attention::KvCache,
    opts: SampleOptions,
    /// Every uniform the run will draw, [B, steps] f64 on the device: row b is the stream of
    /// sample b's seed, one per step, made once up front so that no step copies from the host.
    uniforms: Tensor,
    tokens: Tensor,
    logits: Option<Tensor>,
    pos: usize,
    prefix: usize,
    guided: bool,
}

impl<'a> Sampler<'a> {
    /// `text`: padded captions [B, T]; `prefix`: given image tokens [B, P] (P ≤ I) kept as
    /// they are; `seeds`: one per row.
    pub fn new(
        model: &'a Transformer,
        text: &Tensor,
        prefix: Option<&Tensor>,
        seeds: &[u64],
        opts: &SampleOptions,
    ) -> Result<Self> {
        opts.validate()?;
        let cfg = model.config();
        let b = text.size()[0] as usize;
        let image_len = cfg.image_len();
        if seeds.len() != b {
            return Err(Error::Invalid(format!("{} seeds for a batch of {b}", seeds.len())));
        }
        if text.size() != [b as i64, cfg.text.text_len as i64] {
            return Err(Error::Invalid(format!("caption tensor has shape {:?}", text.size())));
        }
        let dev = model.device();
        let tokens = Tensor::zeros([b as i64, image_len as i64], (Kind::Int64, dev));
        let p = match prefix {
            Some(pre) => {
                let s = pre.size();
                if s.len() != 2 || s[0] != b as i64 || s[1] as usize > image_len {
                    return Err(Error::Invalid(format!(
                        "prefix tokens of shape {s:?} do not fit a batch of {b} with {image_len} tokens"
                    )));
                }
                let vocab = cfg.dvae.vocab_size as i64;
                if s[1] > 0 {
                    let (lo, hi) = (pre.min().int64_value(&[]), pre.max().int64_value(&[]));
                    if lo < 0 || hi >= vocab {
                        return Err(Error::Invalid(format!("prefix tokens outside 0..{vocab}")));
                    }
                }
                tokens.narrow(1, 0, s[1]).copy_(pre);
                s[1] as usize
            }
            None => 0,
        };
        let guided = opts.guidance != 1.0;
        let rows = if guided { 2 * b } else { b };
        let mut cache = model.new_cache(rows);
        let logits = if p < image_len {
            let text_in =
                if guided { Tensor::cat(&[text.shallow_clone(), model.null_text(b)], 0) } else { text.shallow_clone() };
            let given = tokens.narrow(1, 0, p as i64);
            let given = if guided { Tensor::cat(&[&given, &given], 0) } else { given };
            Some(tch::no_grad(|| model.prefill(&mut cache, &text_in, (p > 0).then_some(&given))))
        } else {
            None
        };
        let steps = image_len - p;
        let mut u = Vec::with_capacity(b * steps);
        for &s in seeds {
            let mut r = SeedRng::new(s);
            u.extend((0..steps).map(|_| r.next_f64()));
        }
        let uniforms = Tensor::from_slice(&u).view([b as i64, steps as i64]).to_device(dev);
        Ok(Self { model, cache, opts: opts.clone(), uniforms, tokens, logits, pos: p, prefix: p, guided })
    }

    pub fn progress(&self) -> Progress {
        Progress { done: self.pos, total: self.tokens.size()[1] as usize, prefix: self.prefix }
    }

    pub fn is_done(&self) -> bool {
        self.logits.is_none()
    }

    /// Tokens known so far [B, I]; positions not yet sampled hold 0.
    pub fn tokens(&self) -> &Tensor {
        &self.tokens
    }

    /// Draws the next image token of every row; returns them [B], or `None` when done.
    pub fn step(&mut self) -> Option<Tensor> {
        let logits = self.logits.take()?;
        let b = self.tokens.size()[0];
        let logits = if self.guided {
            let c = logits.narrow(0, 0, b).to_kind(Kind::Float);
            let u = logits.narrow(0, b, b).to_kind(Kind::Float);
            &u + (c - &u) * self.opts.guidance
        } else {
            logits
        };
        let greedy = self.opts.temperature == 0.0;
        let u = self.uniforms.narrow(1, (self.pos - self.prefix) as i64, 1);
        let tok = tch::no_grad(|| draw_with(&filter_logits(&logits, &self.opts), &u, greedy));
        let j = self.pos;
        self.tokens.narrow(1, j as i64, 1).copy_(&tok.view([b, 1]));
        self.pos += 1;
        if self.pos < self.tokens.size()[1] as usize {
            let feed = if self.guided { Tensor::cat(&[&tok, &tok], 0) } else { tok.shallow_clone() };
            self.logits = Some(tch::no_grad(|| self.model.decode_step(&mut self.cache, &feed, j)));
        }
        Some(tok)
    }

    /// Runs to the end, calling `on_step` after each token; `on_step` returning `false`
    /// cancels (between steps) with [`Error::Cancelled`].
    pub fn run(mut self, mut on_step: impl FnMut(&Self) -> bool) -> Result<Tensor> {
        while self.step().is_some() {
            if !on_step(&self) {
                return Err(Error::Cancelled);
            }
        }
        Ok(self.tokens)
    }
}

/// Seeds for a batch that starts at `seed`: sample i uses `seed + i`, so a sample can be
/// reproduced alone from the seed shown beside it.
pub fn batch_seeds(seed: u64, n: usize) -> Vec<u64> {
    (0..n as u64).map(|i| seed.wrapping_add(i)).collect()
}
