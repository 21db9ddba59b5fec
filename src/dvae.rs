//! The discrete VAE that turns an image into a grid of tokens and back [P 2.1, appendix A].
//!
//! Encoder: 7×7 conv, `groups` groups of bottleneck residual blocks of widths n·2^g with a
//! 2× max-pool between groups, ReLU and a 1×1 conv to codebook logits. Decoder: a 1×1 conv
//! from the (relaxed) one-hot codes, groups of widths 8n … n with nearest 2× upsampling between
//! them, ReLU and a 1×1 conv to the 6 parameters of a logit-Laplace distribution per pixel.
//! Residual paths are scaled by 1/L² (L = number of blocks). Pixels live in (ε, 1 − ε).
//! Training uses the Gumbel-softmax relaxation and a KL term to the uniform prior; tokens for
//! the transformer are the argmax of the encoder logits.

use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::config::DvaeConfig;

fn conv(vs: nn::Path, i: usize, o: usize, k: usize) -> nn::Conv2D {
    let c = nn::ConvConfig { padding: (k / 2) as i64, ..Default::default() };
    nn::conv2d(vs, i as i64, o as i64, k as i64, c)
}

/// A same-padded, stride-1 convolution run in `compute` precision when it is given and differs
/// from the weights' (mixed precision: the f32 master weights are cast for the product, and
/// gradients flow back to them through the cast); otherwise the layer itself.
fn conv_c(c: &nn::Conv2D, x: &Tensor, compute: Option<Kind>) -> Tensor {
    match compute {
        Some(k) if k != c.ws.kind() => {
            let pad = c.ws.size().last().map_or(0, |&k| k / 2);
            let b = c.bs.as_ref().map(|b| b.to_kind(k));
            x.to_kind(k).conv2d(&c.ws.to_kind(k), b.as_ref(), [1, 1], [pad, pad], [1, 1], 1)
        }
        _ => c.forward(&x.to_kind(c.ws.kind())),
    }
}

/// Nearest-neighbour upsampling by 2 of `x` [B, C, H, W]: each value repeated over a 2×2 block,
/// as one broadcast copy (the same values as libtorch's `upsample_nearest2d`, whose general
/// CPU kernel computes a source index per element: 2.4–4× slower at the decoder's sizes).
pub fn upsample2(x: &Tensor) -> Tensor {
    let (b, c, h, w) = x.size4().unwrap_or((0, 0, 0, 0));
    if channels_last(x) {
        // the same copy in the tensor's own (channels-last) layout, which stays
        let n = x.permute([0, 2, 3, 1]);
        return n
            .reshape([b, h, 1, w, 1, c])
            .expand([b, h, 2, w, 2, c], false)
            .reshape([b, 2 * h, 2 * w, c])
            .permute([0, 3, 1, 2]);
    }
    x.reshape([b, c, h, 1, w, 1]).expand([b, c, h, 2, w, 2], false).reshape([b, c, 2 * h, 2 * w])
}

/// Whether `x` [B, C, H, W] is laid out channels last (contiguous as [B, H, W, C]).
fn channels_last(x: &Tensor) -> bool {
    x.dim() == 4 && x.permute([0, 2, 3, 1]).is_contiguous() && x.size()[1] > 1
}

/// `x` [B, C, H, W] laid out channels last: oneDNN's convolutions on the CPU run 1.1–14× faster
/// on it at the decoder's shapes than on the default layout.
fn to_channels_last(x: &Tensor) -> Tensor {
    x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

/// How many bytes the widest activation of one pass of [`Dvae::encode`] or [`Dvae::decode`]
/// may take on the CPU. Convolutions over a whole batch at once stream every activation
/// through memory; a few pictures at a time keep them in the caches. On a 2-core AMD EPYC of
/// this project (without AVX-512) the default model's decoder (1.5 MiB per picture at full
/// resolution) draws 16 pictures 1.8× and 64 pictures 2.6× as fast four at a time as in one
/// pass, and the encoder 64 pictures 1.6× (README, "Measured figures"); one picture at a time
/// is slower again.
pub const CPU_PASS_BYTES: usize = 6 << 20;

/// Runs `f` over the batch `x` in passes of at most `per_pass` rows on the CPU (whole on a
/// GPU, which wants large batches) and joins the results in order. Each row's result does not
/// depend on the others.
fn in_passes(x: &Tensor, per_pass: usize, f: impl Fn(&Tensor) -> Tensor) -> Tensor {
    let n = x.size().first().copied().unwrap_or(0);
    let per_pass = per_pass.max(1) as i64;
    if x.device() != Device::Cpu || n <= per_pass {
        return f(x);
    }
    Tensor::cat(&x.split(per_pass, 0).iter().map(&f).collect::<Vec<_>>(), 0)
}

/// Pictures per CPU pass for a network whose widest activation is `width` channels at the
/// full `image_size` in f32.
pub fn pictures_per_pass(width: usize, image_size: usize) -> usize {
    CPU_PASS_BYTES / (width * image_size * image_size * 4).max(1)
}

/// The reconstruction term of the dVAE's objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Recon {
    /// The paper's logit-Laplace likelihood with a learned scale per pixel value [P A.3].
    #[default]
    #[serde(rename = "laplace")]
    LogitLaplace,
    /// Squared error of the mean, as a Gaussian likelihood of fixed σ = [`MSE_SIGMA`] (pixels
    /// in [0, 1]): an option beside the paper's. The logit-Laplace term weighs each pixel by its
    /// learned 1/b, so pixels already drawn well (flat areas, tiny b) dominate the gradient and
    /// edges, small shapes and letters are learned last; squared error weighs the largest
    /// errors most.
    #[serde(rename = "mse")]
    Mse,
    /// Absolute error of the mean, as a Laplace likelihood of fixed scale [`MSE_SIGMA`] in
    /// pixel space: where a code leaves an edge's place uncertain, the squared error is least
    /// at the average of the possible pictures (a blur), the absolute error at their median (a
    /// sharp edge in the likeliest place). An option for fine-tuning a decoder on hard codes.
    #[serde(rename = "l1")]
    L1,
}

/// σ of [`Recon::Mse`]: the squared error counts 1 / (2σ²) = 50 per pixel value.
pub const MSE_SIGMA: f64 = 0.1;

impl std::str::FromStr for Recon {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "laplace" | "logit-laplace" => Ok(Recon::LogitLaplace),
            "mse" => Ok(Recon::Mse),
            "l1" => Ok(Recon::L1),
            other => Err(format!("unknown reconstruction loss {other:?} (laplace, mse or l1)")),
        }
    }
}

impl std::fmt::Display for Recon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Recon::LogitLaplace => "laplace",
            Recon::Mse => "mse",
            Recon::L1 => "l1",
        })
    }
}

/// One bottleneck residual block: identity (or 1×1 conv) + gain · path.
#[derive(Debug)]
struct ResBlock {
    id_path: Option<nn::Conv2D>,
    res_path: Vec<nn::Conv2D>,
    post_gain: f64,
}

impl ResBlock {
    /// `kernels` are the four kernel sizes of the path: (3,3,3,1) in the encoder,
    /// (1,3,3,3) in the decoder.
    fn new(vs: nn::Path, n_in: usize, n_out: usize, kernels: [usize; 4], n_layers: usize) -> Self {
        let hid = (n_out / 4).max(1);
        let id_path = (n_in != n_out).then(|| conv(&vs / "id", n_in, n_out, 1));
        let dims = [(n_in, hid), (hid, hid), (hid, hid), (hid, n_out)];
        let res = &vs / "res";
        let res_path = dims.iter().zip(kernels).enumerate().map(|(i, (&(a, b), k))| conv(&res / i, a, b, k)).collect();
        Self { id_path, res_path, post_gain: 1.0 / (n_layers * n_layers) as f64 }
    }
}

impl ResBlock {
    fn forward_c(&self, x: &Tensor, compute: Option<Kind>) -> Tensor {
        let id = match &self.id_path {
            Some(c) => conv_c(c, x, compute),
            None => x.shallow_clone(),
        };
        let mut h = x.shallow_clone();
        for c in &self.res_path {
            h = conv_c(c, &h.relu(), compute);
        }
        id + h * self.post_gain
    }
}

#[derive(Debug)]
struct Encoder {
    input: nn::Conv2D,
    groups: Vec<Vec<ResBlock>>,
    output: nn::Conv2D,
}

impl Encoder {
    fn new(vs: nn::Path, cfg: &DvaeConfig) -> Self {
        let n_layers = cfg.total_blocks();
        let input = conv(&vs / "input", 3, cfg.hidden, 7);
        let mut width = cfg.hidden;
        let groups = (0..cfg.groups)
            .map(|g| {
                let w = cfg.group_width(g);
                let blocks = (0..cfg.blocks_per_group)
                    .map(|b| {
                        let n_in = if b == 0 { width } else { w };
                        ResBlock::new(&vs / "groups" / g / b, n_in, w, [3, 3, 3, 1], n_layers)
                    })
                    .collect();
                width = w;
                blocks
            })
            .collect();
        let output = conv(&vs / "output", width, cfg.vocab_size, 1);
        Self { input, groups, output }
    }
}

impl Encoder {
    /// Codebook logits, in f32 whatever `compute` is.
    fn forward_c(&self, x: &Tensor, compute: Option<Kind>) -> Tensor {
        let mut h = conv_c(&self.input, x, compute);
        let last = self.groups.len() - 1;
        for (g, blocks) in self.groups.iter().enumerate() {
            for b in blocks {
                h = b.forward_c(&h, compute);
            }
            if g < last {
                h = h.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false);
            }
        }
        conv_c(&self.output, &h.relu(), compute).to_kind(Kind::Float)
    }
}

#[derive(Debug)]
struct Decoder {
    input: nn::Conv2D,
    groups: Vec<Vec<ResBlock>>,
    output: nn::Conv2D,
    vocab: usize,
}

impl Decoder {
    fn new(vs: nn::Path, cfg: &DvaeConfig) -> Self {
        let n_layers = cfg.dec_total_blocks();
        let input = conv(&vs / "input", cfg.vocab_size, cfg.n_init, 1);
        let mut width = cfg.n_init;
        let groups = (0..cfg.groups)
            .map(|g| {
                let w = cfg.dec_group_width(cfg.groups - 1 - g);
                let blocks = (0..cfg.dec_blocks_per_group())
                    .map(|b| {
                        let n_in = if b == 0 { width } else { w };
                        ResBlock::new(&vs / "groups" / g / b, n_in, w, [1, 3, 3, 3], n_layers)
                    })
                    .collect();
                width = w;
                blocks
            })
            .collect();
        let output = conv(&vs / "output", width, 6, 1);
        Self { input, groups, output, vocab: cfg.vocab_size }
    }

    /// The body after the input convolution; distribution parameters in f32.
    fn body(&self, mut h: Tensor, compute: Option<Kind>) -> Tensor {
        let last = self.groups.len() - 1;
        for (g, blocks) in self.groups.iter().enumerate() {
            for b in blocks {
                h = b.forward_c(&h, compute);
            }
            if g < last {
                h = upsample2(&h);
            }
        }
        conv_c(&self.output, &h.relu(), compute).to_kind(Kind::Float)
    }

    /// Hard codes [B, G, G] → distribution parameters: the 1×1 input conv of a one-hot is a
    /// column lookup, done as a gather instead of materialising the one-hot.
    fn forward_codes(&self, codes: &Tensor, compute: Option<Kind>) -> Tensor {
        let (b, gh, gw) = codes.size3().unwrap_or((0, 0, 0));
        let w = self.input.ws.view([-1, self.vocab as i64]);
        let mut h = w.index_select(1, &codes.flatten(0, -1)).view([-1, b, gh, gw]).permute([1, 0, 2, 3]);
        if let Some(bias) = &self.input.bs {
            h += bias.view([1, -1, 1, 1]);
        }
        // on the CPU the body runs channels last (the layout survives its convolutions, sums and
        // upsampling); the caller gets its usual layout back
        if h.device() == Device::Cpu {
            return self.body(to_channels_last(&h), compute).contiguous();
        }
        self.body(h.contiguous(), compute)
    }
}

/// Loss terms of one dVAE training step.
#[derive(Debug)]
pub struct DvaeLoss {
    /// Total to minimise: nll + β · kl · (grid cells) / (pixel values).
    pub loss: Tensor,
    /// Mean negative log-likelihood per pixel value (logit-Laplace).
    pub nll: Tensor,
    /// Mean KL to the uniform prior per grid position (nats).
    pub kl: Tensor,
    /// Mean squared error of the reconstruction in [0, 1].
    pub mse: Tensor,
    /// Codebook usage deficit: log V minus the entropy of the encoder's posterior averaged over
    /// the batch and the grid (0 when every code is used equally; log V when one code is used
    /// everywhere). Nats.
    pub usage: Tensor,
}

/// The discrete VAE.
#[derive(Debug)]
pub struct Dvae {
    encoder: Encoder,
    decoder: Decoder,
    cfg: DvaeConfig,
    compute: Option<Kind>,
    recon: Recon,
    argmax_codes: bool,
}

impl Dvae {
    pub fn new(vs: nn::Path, cfg: &DvaeConfig) -> Self {
        Self {
            encoder: Encoder::new(&vs / "encoder", cfg),
            decoder: Decoder::new(&vs / "decoder", cfg),
            cfg: cfg.clone(),
            compute: None,
            recon: Recon::default(),
            argmax_codes: false,
        }
    }

    /// The shapes this dVAE was built with.
    pub fn cfg(&self) -> &DvaeConfig {
        &self.cfg
    }

    /// With `true`, the straight-through losses (`hard`) give the decoder the one-hot of the
    /// encoder's own argmax code, exactly the code [`Dvae::encode`] gives at inference, with no
    /// Gumbel noise (gradients through the softmax of the logits at temperature τ); with
    /// `false` (the default) the one-hot of a Gumbel sample. For training further a dVAE whose
    /// decoder was fine-tuned on its argmax codes.
    pub fn set_argmax_codes(&mut self, on: bool) {
        self.argmax_codes = on;
    }

    /// Chooses the reconstruction term of the training losses (the paper's by default).
    pub fn set_recon(&mut self, recon: Recon) {
        self.recon = recon;
    }

    /// Runs the convolutions in `kind` (bf16: mixed-precision training with f32 master
    /// weights); logits, distribution parameters and losses stay f32. `None`: the weights' dtype.
    pub fn set_compute_kind(&mut self, kind: Option<Kind>) {
        self.compute = kind;
    }

    pub fn config(&self) -> &DvaeConfig {
        &self.cfg
    }

    /// [0, 1] → (ε, 1 − ε).
    pub fn map_pixels(&self, x: &Tensor) -> Tensor {
        let e = self.cfg.eps;
        x * (1.0 - 2.0 * e) + e
    }

    /// (ε, 1 − ε) → [0, 1].
    pub fn unmap_pixels(&self, x: &Tensor) -> Tensor {
        let e = self.cfg.eps;
        ((x - e) / (1.0 - 2.0 * e)).clamp(0.0, 1.0)
    }

    /// Codebook logits [B, V, G, G] for images [B, 3, H, W] in [0, 1], in the compute kind's
    /// precision (for the relaxation in training; hard codes come from [`Dvae::encode`]).
    pub fn encoder_logits(&self, images: &Tensor) -> Tensor {
        self.encoder.forward_c(&self.map_pixels(images), self.compute)
    }

    /// Image tokens [B, G, G] (argmax of the encoder logits, no noise), computed in the
    /// weights' dtype whatever the compute kind: the codes are discrete choices and many are
    /// near ties (with bf16 convolutions, 12% of the default model's codes change), so every
    /// path — sampling, token shards, the decoder's fine-tune — gets the very same ones.
    /// On the CPU the batch runs a few pictures at a time ([`CPU_PASS_BYTES`]).
    pub fn encode(&self, images: &Tensor) -> Tensor {
        let per_pass = pictures_per_pass(self.cfg.group_width(0), self.cfg.image_size);
        in_passes(images, per_pass, |x| self.hard_codes(&self.map_pixels(x)))
    }

    /// [`Dvae::encode`] of pixels already mapped by [`Dvae::map_pixels`].
    fn hard_codes(&self, x: &Tensor) -> Tensor {
        self.encoder.forward_c(x, None).argmax(1, false)
    }

    /// Images [B, 3, H, W] in [0, 1] from tokens [B, G, G]. On the CPU the batch runs a few
    /// pictures at a time ([`CPU_PASS_BYTES`]).
    pub fn decode(&self, codes: &Tensor) -> Tensor {
        let per_pass = pictures_per_pass(self.cfg.dec_group_width(0), self.cfg.image_size);
        in_passes(codes, per_pass, |c| {
            let stats = self.decoder.forward_codes(c, self.compute);
            self.unmap_pixels(&stats.narrow(1, 0, 3).sigmoid())
        })
    }

    /// The reconstruction term of `x` (mapped pixels) under decoder statistics `stats`
    /// [B, 6, H, W], mean per pixel value (the logit-Laplace negative log-likelihood, or the
    /// fixed-σ Gaussian one of [`Recon::Mse`]), and the squared error of the mean.
    fn reconstruction(&self, images: &Tensor, x: &Tensor, stats: &Tensor) -> (Tensor, Tensor) {
        let mu = stats.narrow(1, 0, 3);
        if self.recon != Recon::LogitLaplace {
            // the error in [0, 1] pixels, unclamped (a clamped mean would stop learning where
            // it overshoots)
            let err = (mu.sigmoid() - x) / (1.0 - 2.0 * self.cfg.eps);
            let term = if self.recon == Recon::Mse {
                err.square().mean(Kind::Float) / (2.0 * MSE_SIGMA * MSE_SIGMA)
            } else {
                err.abs().mean(Kind::Float) / MSE_SIGMA
            };
            let recon = self.unmap_pixels(&mu.sigmoid());
            let mse = (recon.detach() - images).square().mean(Kind::Float);
            return (term, mse);
        }
        let ln_b = stats.narrow(1, 3, 3);
        let logit_x = (x / (-x + 1.0)).log();
        // −ln f(x | μ, b) = |logit x − μ| / b + ln(2b) + ln(x(1 − x))
        let nll = ((&logit_x - &mu).abs() * (-&ln_b).exp() + &ln_b + std::f64::consts::LN_2 + (x * (-x + 1.0)).log())
            .mean(Kind::Float);
        let recon = self.unmap_pixels(&mu.sigmoid());
        let mse = (recon.detach() - images).square().mean(Kind::Float);
        (nll, mse)
    }

    /// Losses for fine-tuning the decoder alone on the encoder's hard codes (argmax, computed
    /// without gradients): the tokens a transformer was trained on stay exactly the same, and
    /// the decoder learns to draw from the codes it is actually given at sampling time rather
    /// than from the relaxed mixtures of training. `kl` is zero.
    pub fn decoder_loss(&self, images: &Tensor) -> DvaeLoss {
        let x = self.map_pixels(images);
        let codes = tch::no_grad(|| self.hard_codes(&x));
        let stats = self.decoder.forward_codes(&codes, self.compute);
        let (nll, mse) = self.reconstruction(images, &x, &stats);
        let zero = Tensor::zeros([], (Kind::Float, images.device()));
        DvaeLoss { loss: nll.shallow_clone(), nll, kl: zero.shallow_clone(), mse, usage: zero }
    }

    /// Stops gradients to the encoder's parameters (for [`Dvae::decoder_loss`]): optimizers
    /// and averages built afterwards leave them exactly as loaded.
    pub fn freeze_encoder(vs: &nn::VarStore) {
        for (name, t) in vs.variables() {
            if name.starts_with("encoder.") {
                let _ = t.set_requires_grad(false);
            }
        }
    }

    /// Stops gradients to the encoder's convolutions before its codebook logits: only the
    /// logit layer (which code each cell's features choose) and the decoder train, the
    /// features stay as loaded (for training a split codebook, [`split_codebook`]).
    pub fn freeze_encoder_trunk(vs: &nn::VarStore) {
        for (name, t) in vs.variables() {
            if name.starts_with("encoder.") && !name.starts_with("encoder.output.") {
                let _ = t.set_requires_grad(false);
            }
        }
    }

    /// One training step's losses with Gumbel-softmax temperature `tau` and KL weight `beta`
    /// (the paper's objective).
    pub fn loss(&self, images: &Tensor, tau: f64, beta: f64) -> DvaeLoss {
        self.loss_with_usage(images, tau, beta, 0.0)
    }

    /// [`Dvae::loss`] plus `usage_weight` × the codebook usage deficit ([`DvaeLoss::usage`]):
    /// an option beside the paper's recipe that keeps the codebook from collapsing onto a few
    /// codes (the per-position KL to the uniform prior does not prevent that).
    pub fn loss_with_usage(&self, images: &Tensor, tau: f64, beta: f64, usage_weight: f64) -> DvaeLoss {
        self.loss_variant(images, tau, beta, usage_weight, false)
    }

    /// [`Dvae::loss_with_usage`], and with `hard` the straight-through estimator: the decoder
    /// is given the one-hot of the sampled code (what it meets at inference) while gradients
    /// flow through the relaxed sample, an option for the end of the τ schedule.
    pub fn loss_variant(&self, images: &Tensor, tau: f64, beta: f64, usage_weight: f64, hard: bool) -> DvaeLoss {
        self.loss_with_noise(images, None, tau, beta, usage_weight, hard)
    }

    /// [`Dvae::loss_variant`] with the Gumbel noise's uniforms given ([B, V, G, G], as the
    /// encoder's logits) instead of drawn: the same noise gives the same relaxed sample.
    pub fn loss_with_noise(
        &self,
        images: &Tensor,
        uniform: Option<&Tensor>,
        tau: f64,
        beta: f64,
        usage_weight: f64,
        hard: bool,
    ) -> DvaeLoss {
        let x = self.map_pixels(images);
        let logits = self.encoder.forward_c(&x, self.compute);
        let z = if hard && self.argmax_codes {
            // the codes of `encode` (chosen in the weights' dtype), without noise
            let codes = match self.compute {
                None => logits.argmax(1, true),
                Some(_) => tch::no_grad(|| self.hard_codes(&x)).unsqueeze(1),
            };
            let soft = (&logits / tau).softmax(1, Kind::Float);
            let one_hot = soft.zeros_like().scatter_value(1, &codes, 1.0);
            &one_hot - soft.detach() + &soft
        } else {
            let u = uniform.map_or_else(|| logits.rand_like(), |u| u.shallow_clone()).clamp(1e-10, 1.0 - 1e-7);
            let gumbel = -(-u.log()).log();
            let z = ((&logits + gumbel) / tau).softmax(1, Kind::Float);
            if hard {
                let one_hot = z.zeros_like().scatter_value(1, &z.argmax(1, true), 1.0);
                &one_hot - z.detach() + &z
            } else {
                z
            }
        };
        let stats = self.decoder.body(conv_c(&self.decoder.input, &z, self.compute), self.compute);
        let (nll, mse) = self.reconstruction(images, &x, &stats);
        let log_q = logits.log_softmax(1, Kind::Float);
        let kl = (log_q.exp() * (&log_q + (self.cfg.vocab_size as f64).ln()))
            .sum_dim_intlist(1, false, Kind::Float)
            .mean(Kind::Float);
        let (_, _, gh, gw) = logits.size4().unwrap_or((1, 1, 1, 1));
        let (_, c, h, w) = images.size4().unwrap_or((1, 3, 1, 1));
        let kl_weight = beta * (gh * gw) as f64 / (c * h * w) as f64;
        let v = self.cfg.vocab_size as f64;
        let mean_q = log_q.exp().mean_dim([0i64, 2, 3].as_slice(), false, Kind::Float);
        let usage = (mean_q.clamp_min(1e-12).log() * &mean_q).sum(Kind::Float) + v.ln();
        let mut loss = &nll + &kl * kl_weight;
        if usage_weight != 0.0 {
            loss += &usage * usage_weight;
        }
        DvaeLoss { loss, nll, kl, mse, usage }
    }
}

/// The decoder's base width and blocks per group in a dVAE weight file (read from the shapes
/// of `decoder.output.weight` and the names of group 0's blocks), or `None` when the file holds
/// no decoder.
pub fn decoder_dims(st: &safetensors::SafeTensors) -> Option<(usize, usize)> {
    let hidden = *st.tensor("decoder.output.weight").ok()?.shape().get(1)?;
    let blocks = st
        .names()
        .iter()
        .filter_map(|n| n.strip_prefix("decoder.groups.0.")?.split('.').next()?.parse::<usize>().ok())
        .max()?
        + 1;
    Some((hidden, blocks))
}

/// Grows the trained decoder of `from` (configured by `from_cfg`) into the wider and/or deeper
/// decoder of `to` (`to_cfg`, the same encoder) so that it draws the same images from the same
/// codes, and copies the encoder unchanged. Every convolution keeps its trained weights for the
/// trained channels, reads nothing from the new input channels there (zeros), and starts its new
/// output channels from `to`'s fresh initialisation; new blocks start as the identity (their last
/// convolution zero); the trained blocks' residual branches are rescaled for the new depth's
/// gain 1/n². Training then uses the added capacity from where the trained decoder stood.
pub fn grow_decoder(
    from: &nn::VarStore,
    from_cfg: &DvaeConfig,
    to: &nn::VarStore,
    to_cfg: &DvaeConfig,
) -> Result<(), String> {
    let encoder_of = |c: &DvaeConfig| (c.image_size, c.vocab_size, c.hidden, c.n_init, c.groups, c.blocks_per_group);
    if encoder_of(from_cfg) != encoder_of(to_cfg) || from_cfg.eps != to_cfg.eps {
        return Err("growing a decoder keeps everything else of the dVAE as it is".into());
    }
    let (h0, b0) = (from_cfg.dec_hidden(), from_cfg.dec_blocks_per_group());
    let (h1, b1) = (to_cfg.dec_hidden(), to_cfg.dec_blocks_per_group());
    if h1 < h0 || b1 < b0 {
        return Err(format!(
            "a decoder can grow, not shrink: it has width {h0} and {b0} blocks per group, asked for {h1} and {b1}"
        ));
    }
    // the first block's identity path is a convolution exactly when its widths differ
    let has_id = |c: &DvaeConfig| c.n_init != c.dec_group_width(c.groups - 1);
    if has_id(from_cfg) != has_id(to_cfg) {
        return Err(format!(
            "decoder width {h1} would turn the first block's identity path into a different kind (n_init {})",
            to_cfg.n_init
        ));
    }
    let gain_ratio = (to_cfg.dec_total_blocks() as f64 / from_cfg.dec_total_blocks() as f64).powi(2);
    let (old, new) = (from.variables(), to.variables());
    tch::no_grad(|| {
        for (name, var) in &new {
            let mut var = var.shallow_clone();
            let is_last_res = name.contains(".res.3.");
            match old.get(name) {
                Some(t) if name.starts_with("encoder.") => {
                    var.copy_(t);
                }
                Some(t) => {
                    let (dims_old, dims_new) = (t.size(), var.size());
                    if dims_old.len() != dims_new.len() || dims_old.iter().zip(&dims_new).any(|(a, b)| a > b) {
                        return Err(format!("{name}: shape {dims_old:?} does not fit into {dims_new:?}"));
                    }
                    let scale = if is_last_res { gain_ratio } else { 1.0 };
                    let o = dims_old[0];
                    let mut rows = var.narrow(0, 0, o);
                    if dims_old.len() > 1 {
                        let i = dims_old[1];
                        let _ = rows.narrow(1, i, dims_new[1] - i).zero_();
                        rows = rows.narrow(1, 0, i);
                    }
                    rows.copy_(&(t * scale));
                }
                None if name.starts_with("encoder.") => return Err(format!("{name} is missing from the trained dVAE")),
                None if is_last_res => {
                    let _ = var.zero_();
                }
                None => {}
            }
        }
        if let Some(name) = old.keys().find(|n| !new.contains_key(*n)) {
            return Err(format!("{name} has no place in the grown decoder"));
        }
        Ok(())
    })
}

/// The codebook size of a dVAE weight file (the rows of `encoder.output.bias`), or `None` when
/// the file holds no encoder.
pub fn codebook_size(st: &safetensors::SafeTensors) -> Option<usize> {
    st.tensor("encoder.output.bias").ok()?.shape().first().copied()
}

/// Relative size of the perturbation that tells a split code's copies apart
/// ([`split_codebook`]): small beside the logits' gaps between different old codes, so that
/// the old code chosen almost never changes.
pub const SPLIT_NOISE: f64 = 1e-2;

/// Splits each code of the trained dVAE `from` (codebook `from_cfg.vocab_size` = V) into
/// K = `to_cfg.vocab_size` / V codes of `to` (everything else of the same shapes), as the
/// splitting step of vector quantisers' codebook growth does: new code `c + V·k` (k < K) is
/// old code `c`. Every tensor is copied; the encoder's logit row and bias of old code `c` go
/// to all its copies, each copy after the first perturbed by Gaussian noise of
/// [`SPLIT_NOISE`] × the rows' RMS (drawn from `seed`), so that the features choosing `c` are
/// cut among its copies by random hyperplanes; the decoder's input column of `c` goes to all
/// its copies. So the grown dVAE draws the old images from the old pictures (whichever copy is
/// chosen, the decoder sees the old code), and training teaches the copies to keep what one
/// code could not: which copy, a detail of the cell. A transformer trained on the old codes
/// carries over exactly to the new ones at the start ([`crate::remap`]: each new code meets
/// one old code).
pub fn split_codebook(
    from: &nn::VarStore,
    from_cfg: &DvaeConfig,
    to: &nn::VarStore,
    to_cfg: &DvaeConfig,
    seed: u64,
) -> Result<(), String> {
    let (v0, v1) = (from_cfg.vocab_size, to_cfg.vocab_size);
    if (DvaeConfig { vocab_size: v1, ..from_cfg.clone() }) != *to_cfg {
        return Err("splitting the codebook keeps every other shape of the dVAE as it is".into());
    }
    if v0 == 0 || v1 <= v0 || v1 % v0 != 0 {
        return Err(format!("a codebook of {v0} codes splits into a whole multiple of it, not {v1}"));
    }
    let k = (v1 / v0) as i64;
    let (old, new) = (from.variables(), to.variables());
    if let Some(name) = old.keys().find(|n| !new.contains_key(*n)) {
        return Err(format!("{name} has no place in the split dVAE"));
    }
    tch::no_grad(|| {
        for (name, var) in &new {
            let t = old.get(name).ok_or_else(|| format!("{name} is missing from the trained dVAE"))?;
            let value = match name.as_str() {
                "encoder.output.weight" | "encoder.output.bias" => {
                    let times: Vec<i64> = std::iter::once(k).chain(std::iter::repeat_n(1, t.dim() - 1)).collect();
                    let copies = t.repeat(times);
                    if name.ends_with("weight") {
                        let rms = t.to_kind(Kind::Double).square().mean(Kind::Double).sqrt().double_value(&[]);
                        // the first copy is the old code exactly; the noise comes from the
                        // seed's own stream (torch's global generator is left as it was)
                        let first = t.numel();
                        let mut rng = crate::sample::SeedRng::new(seed);
                        let noise: Vec<f32> = (0..copies.numel())
                            .map(|i| if i < first { 0.0 } else { (SPLIT_NOISE * rms * gaussian(&mut rng)) as f32 })
                            .collect();
                        let noise = Tensor::from_slice(&noise).view(copies.size().as_slice()).to_device(t.device());
                        copies + noise.to_kind(t.kind())
                    } else {
                        copies
                    }
                }
                "decoder.input.weight" => t.repeat([1, k, 1, 1]),
                _ => t.shallow_clone(),
            };
            if value.size() != var.size() {
                return Err(format!("{name}: shape {:?} does not fit into {:?}", value.size(), var.size()));
            }
            let mut var = var.shallow_clone();
            var.copy_(&value);
        }
        Ok(())
    })
}

/// A standard normal draw from `rng` (Box–Muller).
fn gaussian(rng: &mut crate::sample::SeedRng) -> f64 {
    let u = 1.0 - rng.next_f64(); // in (0, 1]
    let v = rng.next_f64();
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}

/// Cosine interpolation from `start` (step 0) to `end` (step ≥ `total`).
pub fn cosine_anneal(start: f64, end: f64, step: usize, total: usize) -> f64 {
    let t = if total == 0 { 1.0 } else { (step as f64 / total as f64).min(1.0) };
    end + (start - end) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
}

/// The paper's dVAE schedules [P A.2] as functions of the update count.
#[derive(Debug, Clone, PartialEq)]
pub struct DvaeSchedule {
    pub beta_max: f64,
    pub beta_steps: usize,
    pub tau_start: f64,
    pub tau_end: f64,
    pub tau_steps: usize,
    pub lr_start: f64,
    pub lr_end: f64,
    pub lr_steps: usize,
}

impl Default for DvaeSchedule {
    fn default() -> Self {
        Self {
            beta_max: 6.6,
            beta_steps: 5_000,
            tau_start: 1.0,
            tau_end: 1.0 / 16.0,
            tau_steps: 150_000,
            lr_start: 1e-4,
            lr_end: 1.25e-6,
            lr_steps: 1_200_000,
        }
    }
}

impl DvaeSchedule {
    /// KL weight, increased from 0 to `beta_max`.
    pub fn beta(&self, step: usize) -> f64 {
        cosine_anneal(0.0, self.beta_max, step, self.beta_steps)
    }
    /// Gumbel-softmax temperature, decreased from `tau_start` to `tau_end`.
    pub fn tau(&self, step: usize) -> f64 {
        cosine_anneal(self.tau_start, self.tau_end, step, self.tau_steps)
    }
    /// Learning rate, decreased from `lr_start` to `lr_end`.
    pub fn lr(&self, step: usize) -> f64 {
        cosine_anneal(self.lr_start, self.lr_end, step, self.lr_steps)
    }
}
