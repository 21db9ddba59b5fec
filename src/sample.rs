//! Sampling image tokens with a KV cache [P 2.6].
//!
//! The caption (and any given image prefix, for completion) is fed in one pass; then each
//! image token is drawn and fed back, one step per token. Temperature, top-k and top-p filter
//! the logits; classifier-free guidance runs the null caption beside each row and mixes the
//! two logits. Every sample draws its randomness from its own seeded generator, one uniform
//! number per token, so a sample depends on its seed only, not on the batch it ran in.
//! A [`Sampler`] is stepped by its owner, which can report progress or stop between steps.
//!
//! On CUDA, decode steps keep the image position in device tensors (the step reads no host
//! value), and after one eager step the whole step (draw, feed, decode) is captured once as a
//! CUDA graph and replayed: one launch per token instead of hundreds. `TESSERA_CUDA_GRAPHS=0`
//! keeps the eager steps. Both give the same tokens.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::shim::{CudaGraph, SideStream};
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

/// [`draw`] with the uniforms [B] or [B, 1] already on the logits' device (no host copy). On
/// the CPU in f32, one kernel pass per row ([`crate::kernels::draw_rows`]).
pub fn draw_with(logits: &Tensor, uniforms: &Tensor, greedy: bool) -> Tensor {
    if greedy {
        return logits.argmax(1, false);
    }
    if crate::kernels::applies(logits.device(), logits.kind())
        && uniforms.device() == logits.device()
        && let Ok(tokens) = crate::kernels::draw_rows(logits, uniforms)
    {
        return tokens;
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

/// Decode steps driven by positions held on the device (see the module notes).
#[derive(Debug)]
struct Counted {
    /// Image index of the token the next step draws, Int64 [1]; also the column of the
    /// uniforms it reads.
    j: Tensor,
    /// The captured step, replayed for every later one.
    graph: Option<CudaGraph>,
    /// Capture the step once it has run eagerly (CUDA only).
    capture: bool,
    warmed: bool,
    /// The side stream every step of the run goes to (graphs are not captured on the default
    /// stream); dropped after the graph.
    _stream: Option<SideStream>,
}

/// Whether samplers of `model` capture their decode steps as CUDA graphs: on CUDA, with static
/// decode steps, in a build with graph support, unless `TESSERA_CUDA_GRAPHS=0`.
pub fn cuda_graphs_enabled(model: &Transformer) -> bool {
    let off = std::env::var("TESSERA_CUDA_GRAPHS").is_ok_and(|v| v == "0");
    model.device().is_cuda() && model.static_decode() && crate::shim::cuda_graphs_available() && !off
}

/// A stepwise sampler over a batch of captions.
#[derive(Debug)]
pub struct Sampler<'a> {
    model: &'a Transformer,
    cache: crate::attention::KvCache,
    opts: SampleOptions,
    /// Every uniform the run will draw, [B, I] f64 on the device: row b is the stream of
    /// sample b's seed, one per step, made once up front so that no step copies from the host;
    /// the token at image index j reads column j (the columns of a given prefix are unused).
    uniforms: Tensor,
    tokens: Tensor,
    logits: Option<Tensor>,
    pos: usize,
    prefix: usize,
    guided: bool,
    counted: Option<Counted>,
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
        let graphs = cuda_graphs_enabled(model);
        // the whole run on a side stream, from its first allocation
        let stream = match graphs.then(|| SideStream::enter(model.device())) {
            Some(Ok(s)) => Some(s),
            Some(Err(e)) => {
                eprintln!("tessera: {e}; decoding goes on without CUDA graphs");
                None
            }
            None => None,
        };
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
        let mut u = Vec::with_capacity(b * image_len);
        for &s in seeds {
            let mut r = SeedRng::new(s);
            u.extend(std::iter::repeat_n(0.0, p));
            u.extend((p..image_len).map(|_| r.next_f64()));
        }
        let uniforms = Tensor::from_slice(&u).view([b as i64, image_len as i64]).to_device(dev);
        let mut s = Self {
            model,
            cache,
            opts: opts.clone(),
            uniforms,
            tokens,
            logits,
            pos: p,
            prefix: p,
            guided,
            counted: None,
        };
        if stream.is_some() {
            s = s.with_device_positions();
            if let Some(c) = &mut s.counted {
                c.capture = true;
                c._stream = stream;
            }
        }
        Ok(s)
    }

    /// Drives the decode steps with positions held on the device, as CUDA graphs need (on a
    /// CPU: the same steps run eagerly, for tests). Call before the first step.
    pub fn with_device_positions(mut self) -> Self {
        let dev = self.model.device();
        let at = |v: usize| Tensor::from_slice(&[v as i64]).to_device(dev);
        if self.pos == self.prefix && self.counted.is_none() {
            self.counted = Some(Counted { j: at(self.pos), graph: None, capture: false, warmed: false, _stream: None });
        }
        self
    }

    /// Runs the device-held steps eagerly, never capturing them (on CUDA, on the side stream
    /// the run began on): to look at the work a capture would hold.
    pub fn without_capture(mut self) -> Self {
        if let Some(c) = &mut self.counted {
            c.capture = false;
        }
        self
    }

    /// Whether decode steps replay a captured CUDA graph (after the first step).
    pub fn uses_cuda_graph(&self) -> bool {
        self.counted.as_ref().is_some_and(|c| c.graph.is_some())
    }

    /// Guidance mixing of the logits: rows 0..B conditional, B..2B unconditional.
    fn mix(&self, logits: &Tensor) -> Tensor {
        if !self.guided {
            return logits.shallow_clone();
        }
        let b = self.tokens.size()[0];
        let c = logits.narrow(0, 0, b).to_kind(Kind::Float);
        let u = logits.narrow(0, b, b).to_kind(Kind::Float);
        &u + (c - &u) * self.opts.guidance
    }

    /// Draws the token at the device-held position and writes it; returns it [B].
    fn counted_draw(&mut self) -> Tensor {
        let (Some(c), Some(logits)) = (&self.counted, &self.logits) else {
            return Tensor::zeros([0], (Kind::Int64, self.tokens.device()));
        };
        let b = self.tokens.size()[0];
        let u = self.uniforms.index_select(1, &c.j);
        let greedy = self.opts.temperature == 0.0;
        let tok = draw_with(&filter_logits(&self.mix(logits), &self.opts), &u, greedy);
        let _ = self.tokens.index_copy_(1, &c.j, &tok.view([b, 1]));
        tok
    }

    /// One whole step at the device-held position: draw, write, feed the token back, the next
    /// logits into the logits buffer, the image index advanced. The work a CUDA graph captures.
    fn counted_body(&mut self) {
        let tok = self.counted_draw();
        let (Some(c), Some(logits)) = (&self.counted, &self.logits) else {
            return;
        };
        let feed = if self.guided { Tensor::cat(&[&tok, &tok], 0) } else { tok };
        let next = self.model.decode_step_at(&mut self.cache, &feed, &c.j);
        logits.shallow_clone().copy_(&next);
        let _ = c.j.shallow_clone().g_add_scalar_(1);
    }

    /// [`Sampler::step`] with device-held positions: eager, captured, or replayed.
    fn counted_step(&mut self) -> Option<Tensor> {
        self.logits.as_ref()?;
        let image_len = self.tokens.size()[1] as usize;
        let j = self.pos;
        if j + 1 == image_len {
            // the last token: drawn, nothing to feed
            let _ = tch::no_grad(|| self.counted_draw());
            self.logits = None;
            self.pos += 1;
            self.cache.set_len(self.model.config().seq_len());
        } else {
            tch::no_grad(|| self.counted_advance());
            self.pos += 1;
        }
        Some(self.tokens.narrow(1, j as i64, 1).squeeze_dim(1))
    }

    fn counted_advance(&mut self) {
        let (capture, warmed, replay) = match &self.counted {
            Some(c) => (c.capture, c.warmed, c.graph.is_some()),
            None => return,
        };
        if replay {
            if let Some(Err(e)) = self.counted.as_ref().and_then(|c| c.graph.as_ref()).map(|g| g.replay()) {
                panic!("{e}");
            }
            return;
        }
        if capture && warmed {
            // capture runs nothing: the captured step is then replayed for this position
            match CudaGraph::capture(|| self.counted_body()) {
                Ok((g, ())) => {
                    if let Err(e) = g.replay() {
                        panic!("{e}");
                    }
                    if let Some(c) = &mut self.counted {
                        c.graph = Some(g);
                    }
                    return;
                }
                Err(e) => {
                    eprintln!("tessera: {e}; decoding goes on without CUDA graphs");
                    if let Some(c) = &mut self.counted {
                        c.capture = false;
                    }
                }
            }
        }
        self.counted_body();
        if let Some(c) = &mut self.counted {
            c.warmed = true;
        }
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
        if self.counted.is_some() {
            return self.counted_step();
        }
        let logits = self.logits.take()?;
        let b = self.tokens.size()[0];
        let logits = self.mix(&logits);
        let greedy = self.opts.temperature == 0.0;
        let u = self.uniforms.narrow(1, self.pos as i64, 1);
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
