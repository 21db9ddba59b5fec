//! Model configuration: one plain struct per component, serialised as `config.json` beside the
//! weights. Presets reproduce the paper's shapes (`dalle_12b`, SPEC §1) and the small
//! configurations the project trains and benchmarks on a CPU. Derived sizes are methods, never
//! stored twice.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Which image-to-image pattern a transformer layer uses (paper, appendix B.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionKind {
    /// Every image token sees every earlier image token.
    Full,
    /// Each image token sees itself and the previous `W` image tokens in raster order.
    Row,
    /// Each image token sees the earlier image tokens of its own column.
    Column,
    /// Each image token sees the causal part of an `k × k` window centred on it.
    Conv,
}

/// How the per-layer attention kinds are chosen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionPattern {
    /// Full attention in every layer.
    Full,
    /// The paper's rule: layer i (1-based) < n uses column attention when (i − 2) mod 4 = 0 and
    /// row attention otherwise; the last layer uses convolutional attention.
    Paper,
    /// An explicit list, one entry per layer.
    Layers(Vec<AttentionKind>),
}

/// The text side: BPE vocabulary and caption length [P 2.2].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TextConfig {
    /// BPE vocabulary size (the tokenizer may use fewer).
    pub vocab_size: usize,
    /// Caption positions; each has its own learned padding token.
    pub text_len: usize,
    /// BPE dropout probability used while training.
    pub bpe_dropout: f32,
}

impl Default for TextConfig {
    fn default() -> Self {
        Self { vocab_size: 16_384, text_len: 256, bpe_dropout: 0.1 }
    }
}

/// The discrete VAE [P 2.1, appendix A].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DvaeConfig {
    /// Side of the square RGB input in pixels.
    pub image_size: usize,
    /// Codebook size (number of image tokens).
    pub vocab_size: usize,
    /// Base width n: groups have widths n, 2n, 4n, 8n.
    pub hidden: usize,
    /// Channels after the decoder's first 1×1 convolution.
    pub n_init: usize,
    /// Number of groups; the grid is `image_size / 2^(groups − 1)`.
    pub groups: usize,
    /// Residual blocks per group.
    pub blocks_per_group: usize,
    /// Pixel mapping margin ε: x' = (1 − 2ε)x + ε.
    pub eps: f64,
    /// The decoder's base width when it differs from the encoder's (`hidden`): a decoder grown
    /// after training (`train dvae --decoder-only --decoder-hidden`) keeps the encoder, and so
    /// every image's codes, as they were.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decoder_hidden: Option<usize>,
    /// The decoder's residual blocks per group when they differ from the encoder's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decoder_blocks_per_group: Option<usize>,
}

impl Default for DvaeConfig {
    fn default() -> Self {
        Self {
            image_size: 256,
            vocab_size: 8192,
            hidden: 256,
            n_init: 128,
            groups: 4,
            blocks_per_group: 2,
            eps: 0.1,
            decoder_hidden: None,
            decoder_blocks_per_group: None,
        }
    }
}

impl DvaeConfig {
    pub fn downsample(&self) -> usize {
        // a config may ask for any number of groups: a shift past the word is "too many"
        1usize.checked_shl(self.groups.saturating_sub(1) as u32).unwrap_or(usize::MAX)
    }
    pub fn grid_size(&self) -> usize {
        self.image_size / self.downsample()
    }
    pub fn total_blocks(&self) -> usize {
        self.groups * self.blocks_per_group
    }
    /// Width of group `g` (0-based): n·2^g.
    pub fn group_width(&self, g: usize) -> usize {
        self.hidden << g
    }
    /// The decoder's base width (the encoder's unless the decoder was grown).
    pub fn dec_hidden(&self) -> usize {
        self.decoder_hidden.unwrap_or(self.hidden)
    }
    /// The decoder's blocks per group (the encoder's unless the decoder was grown).
    pub fn dec_blocks_per_group(&self) -> usize {
        self.decoder_blocks_per_group.unwrap_or(self.blocks_per_group)
    }
    pub fn dec_total_blocks(&self) -> usize {
        self.groups * self.dec_blocks_per_group()
    }
    /// This dVAE with a decoder of base width `hidden` and `blocks` per group (the fields stay
    /// unset where they equal the encoder's, so an ungrown config reads as before).
    pub fn with_decoder(&self, hidden: usize, blocks: usize) -> Self {
        Self {
            decoder_hidden: (hidden != self.hidden).then_some(hidden),
            decoder_blocks_per_group: (blocks != self.blocks_per_group).then_some(blocks),
            ..self.clone()
        }
    }
    /// Width of the decoder's group working at the resolution of encoder group `g`.
    pub fn dec_group_width(&self, g: usize) -> usize {
        self.dec_hidden() << g
    }
}

/// The decoder-only transformer [P 2.2, appendix B].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TransformerConfig {
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub head_dim: usize,
    /// Hidden width of the MLP as a multiple of `d_model`.
    pub mlp_ratio: usize,
    pub attention: AttentionPattern,
    /// Side of the causal window of convolutional attention.
    pub conv_kernel: usize,
    /// Loss weight of the text tokens; the image tokens get 1 − this.
    pub text_loss_weight: f64,
    /// Probability of replacing a caption by the null caption while training
    /// (classifier-free guidance).
    pub cond_drop_prob: f64,
    pub dropout: f64,
}

impl Default for TransformerConfig {
    fn default() -> Self {
        Self {
            d_model: 3968,
            n_layers: 64,
            n_heads: 62,
            head_dim: 64,
            mlp_ratio: 4,
            attention: AttentionPattern::Paper,
            conv_kernel: 11,
            text_loss_weight: 1.0 / 8.0,
            cond_drop_prob: 0.0,
            dropout: 0.0,
        }
    }
}

impl TransformerConfig {
    pub fn inner_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// The attention kind of every layer.
    pub fn layer_kinds(&self) -> Vec<AttentionKind> {
        match &self.attention {
            AttentionPattern::Full => vec![AttentionKind::Full; self.n_layers],
            AttentionPattern::Layers(v) => v.clone(),
            AttentionPattern::Paper => (1..=self.n_layers)
                .map(|i| {
                    if i == self.n_layers {
                        AttentionKind::Conv
                    } else if (i as i64 - 2).rem_euclid(4) == 0 {
                        AttentionKind::Column
                    } else {
                        AttentionKind::Row
                    }
                })
                .collect(),
        }
    }
}

/// A whole model: text, dVAE and transformer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Preset or model name, for display.
    pub name: String,
    pub text: TextConfig,
    pub dvae: DvaeConfig,
    pub transformer: TransformerConfig,
    pub reranker: crate::clip::RerankerConfig,
    /// How this model's images are drawn unless told otherwise (`generate`, `eval` and the
    /// app start from it): chosen by evaluating the trained model; absent, plain sampling
    /// (temperature 1, no filtering, no guidance).
    #[serde(skip_serializing_if = "is_plain_sampling")]
    pub sampling: crate::sample::SampleOptions,
}

fn is_plain_sampling(s: &crate::sample::SampleOptions) -> bool {
    *s == crate::sample::SampleOptions::default()
}

impl Default for Config {
    fn default() -> Self {
        Self::dalle_12b()
    }
}

/// The most parameters a configuration may ask for (the paper's model has 12.3 billion).
pub const MAX_PARAMS: u64 = 100_000_000_000;

/// Names accepted by [`Config::preset`].
pub const PRESETS: &[&str] = &["tiny", "S", "P", "L", "dalle_12b", "default", "gpu-default"];

impl Config {
    /// The paper's model: 64 layers, 62 heads of 64, 256 text + 1,024 image tokens.
    pub fn dalle_12b() -> Self {
        Self {
            name: "dalle_12b".into(),
            text: TextConfig::default(),
            dvae: DvaeConfig::default(),
            transformer: TransformerConfig::default(),
            reranker: Default::default(),
            sampling: Default::default(),
        }
    }

    /// Benchmark configuration S: 64×64 → 8×8 grid, small full-attention transformer.
    pub fn s() -> Self {
        Self {
            name: "S".into(),
            text: TextConfig { vocab_size: 4096, text_len: 32, bpe_dropout: 0.1 },
            dvae: DvaeConfig { image_size: 64, vocab_size: 1024, hidden: 64, n_init: 64, ..DvaeConfig::default() },
            transformer: TransformerConfig {
                d_model: 256,
                n_layers: 6,
                n_heads: 8,
                head_dim: 32,
                attention: AttentionPattern::Full,
                ..TransformerConfig::default()
            },
            reranker: Default::default(),
            sampling: Default::default(),
        }
    }

    /// Benchmark configuration P: the paper's sequence shapes with a small transformer.
    pub fn p() -> Self {
        Self {
            name: "P".into(),
            text: TextConfig::default(),
            dvae: DvaeConfig { hidden: 64, n_init: 64, ..DvaeConfig::default() },
            transformer: TransformerConfig {
                d_model: 256,
                n_layers: 4,
                n_heads: 4,
                head_dim: 64,
                ..TransformerConfig::default()
            },
            reranker: Default::default(),
            sampling: Default::default(),
        }
    }

    /// Benchmark configuration L: P's sequence shapes with a ≥ 100 M-parameter transformer
    /// (d 1,024 × 8 layers), the size at which a GPU's training throughput is worth quoting.
    pub fn l() -> Self {
        Self {
            name: "L".into(),
            transformer: TransformerConfig {
                d_model: 1024,
                n_layers: 8,
                n_heads: 16,
                head_dim: 64,
                ..TransformerConfig::default()
            },
            ..Self::p()
        }
    }

    /// A configuration small enough for unit tests: 16×16 images, 4×4 grid.
    pub fn tiny() -> Self {
        Self {
            name: "tiny".into(),
            text: TextConfig { vocab_size: 300, text_len: 8, bpe_dropout: 0.0 },
            dvae: DvaeConfig {
                image_size: 16,
                vocab_size: 32,
                hidden: 8,
                n_init: 8,
                groups: 3,
                blocks_per_group: 1,
                eps: 0.1,
                ..DvaeConfig::default()
            },
            transformer: TransformerConfig {
                d_model: 32,
                n_layers: 4,
                n_heads: 2,
                head_dim: 16,
                conv_kernel: 3,
                ..TransformerConfig::default()
            },
            reranker: Default::default(),
            sampling: Default::default(),
        }
    }

    /// The embedded default model: 64×64 images as a 16×16 grid, a small transformer with the
    /// paper's attention pattern, sized to train and sample on a 2-core CPU.
    pub fn default_model() -> Self {
        Self {
            name: "default".into(),
            text: TextConfig { vocab_size: 512, text_len: 32, bpe_dropout: 0.1 },
            dvae: DvaeConfig {
                image_size: 64,
                vocab_size: 512,
                hidden: 64,
                n_init: 128,
                groups: 3,
                blocks_per_group: 1,
                eps: 0.1,
                ..DvaeConfig::default()
            },
            transformer: TransformerConfig {
                d_model: 256,
                n_layers: 4,
                n_heads: 8,
                head_dim: 32,
                conv_kernel: 7,
                cond_drop_prob: 0.1,
                ..TransformerConfig::default()
            },
            reranker: Default::default(),
            sampling: Default::default(),
        }
    }

    /// The next default model, to be trained on a GPU with `train all`: 64×64 images as a
    /// 16×16 grid of 2,048 codes, a dVAE of width 128 with two blocks per group (small shapes,
    /// letters and near colours need the capacity), and a 6-layer transformer with the paper's
    /// attention pattern, sized so that 16 samples reranked take a few seconds on a 2-core CPU
    /// and each weight file stays under 16 MiB in bf16.
    pub fn gpu_default() -> Self {
        Self {
            name: "gpu-default".into(),
            text: TextConfig { vocab_size: 512, text_len: 32, bpe_dropout: 0.1 },
            dvae: DvaeConfig {
                image_size: 64,
                vocab_size: 2048,
                hidden: 128,
                n_init: 128,
                groups: 3,
                blocks_per_group: 2,
                eps: 0.1,
                ..DvaeConfig::default()
            },
            transformer: TransformerConfig {
                d_model: 288,
                n_layers: 6,
                n_heads: 9,
                head_dim: 32,
                conv_kernel: 7,
                cond_drop_prob: 0.1,
                ..TransformerConfig::default()
            },
            reranker: Default::default(),
            sampling: Default::default(),
        }
    }

    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "default" => Ok(Self::default_model()),
            "gpu-default" | "gpu_default" => Ok(Self::gpu_default()),
            "tiny" => Ok(Self::tiny()),
            "S" | "s" => Ok(Self::s()),
            "P" | "p" => Ok(Self::p()),
            "L" | "l" => Ok(Self::l()),
            "dalle_12b" | "dalle-12b" => Ok(Self::dalle_12b()),
            other => Err(Error::Config(format!("unknown preset {other:?}; known presets: {}", PRESETS.join(", ")))),
        }
    }

    /// This configuration with `KEY=VALUE` settings applied, e.g. `dvae.vocab_size=2048`: a key
    /// is a dotted path of `config.json`, a value is JSON (a bare word is taken as a string).
    /// A key the configuration does not have, a value of the wrong type, or a result that does
    /// not validate is an error naming the setting.
    pub fn with_settings(&self, settings: &[String]) -> Result<Self> {
        /// The settings that may be `null` (absent: the default they stand for).
        const OPTIONAL_SETTINGS: &[&str] = &["dvae.decoder_hidden", "dvae.decoder_blocks_per_group"];
        use serde_json::Value;
        let bad = |s: &str, why: String| Error::Config(format!("--set {s}: {why}"));
        let mut root = serde_json::to_value(self).map_err(|e| Error::Config(e.to_string()))?;
        let mut wanted = Vec::new();
        for s in settings {
            let Some((key, raw)) = s.split_once('=') else {
                return Err(bad(s, "expected KEY=VALUE, e.g. dvae.vocab_size=2048".into()));
            };
            let value: Value = serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_string()));
            let path: Vec<&str> = key.trim().split('.').collect();
            let (last, parents) = path.split_last().ok_or_else(|| bad(s, "empty key".into()))?;
            let mut node = &mut root;
            for p in parents {
                // a section the preset leaves out (plain `sampling`) starts empty: its defaults
                // fill the rest, and a name the configuration does not know is caught below
                let Some(obj) = node.as_object_mut() else { return Err(bad(s, format!("no section {p:?}"))) };
                node = obj.entry(p.to_string()).or_insert_with(|| Value::Object(Default::default()));
                if !node.is_object() {
                    return Err(bad(s, format!("{p:?} is a setting, not a section")));
                }
            }
            let Some(obj) = node.as_object_mut() else { return Err(bad(s, "not a section".into())) };
            obj.insert(last.to_string(), value.clone());
            serde_json::from_value::<Config>(root.clone()).map_err(|e| bad(s, e.to_string()))?;
            wanted.push((s, path, value));
        }
        let cfg: Config = serde_json::from_value(root).map_err(|e| Error::Config(format!("--set: {e}")))?;
        // a key the configuration does not know is dropped by the round trip: say so
        let back = serde_json::to_value(&cfg).map_err(|e| Error::Config(e.to_string()))?;
        for (s, path, value) in wanted {
            let got = path.iter().try_fold(&back, |n, p| n.get(*p));
            let same = match (got, &value) {
                // f32 fields come back rounded
                (Some(Value::Number(a)), Value::Number(b)) => match (a.as_f64(), b.as_f64()) {
                    (Some(a), Some(b)) => (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                    _ => false,
                },
                (Some(g), v) => g == v,
                // an optional setting set to null is left out of the configuration
                (None, Value::Null) => OPTIONAL_SETTINGS.contains(&path.join(".").as_str()),
                (None, _) => false,
            };
            if !same {
                return Err(bad(s, "no such setting (see `tessera info --preset NAME --json`)".into()));
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Grid side of the image tokens.
    pub fn grid_size(&self) -> usize {
        self.dvae.grid_size()
    }
    /// Image tokens per image.
    pub fn image_len(&self) -> usize {
        self.grid_size() * self.grid_size()
    }
    /// Length of the model's input stream: text positions then image positions.
    pub fn seq_len(&self) -> usize {
        self.text.text_len + self.image_len()
    }

    /// Checks the internal consistency of the configuration.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        let d = &self.dvae;
        let t = &self.transformer;
        if d.groups == 0
            || d.blocks_per_group == 0
            || d.hidden == 0
            || d.vocab_size < 2
            || d.dec_hidden() == 0
            || d.dec_blocks_per_group() == 0
        {
            return bad("dvae: groups, blocks_per_group, hidden (and the decoder's) must be ≥ 1, vocab ≥ 2".into());
        }
        if d.image_size == 0 || !d.image_size.is_multiple_of(d.downsample()) {
            return bad(format!(
                "dvae: image_size {} is not a multiple of the downsampling factor {}",
                d.image_size,
                d.downsample()
            ));
        }
        if !(0.0..0.5).contains(&d.eps) {
            return bad(format!("dvae: eps {} must lie in [0, 0.5)", d.eps));
        }
        if self.text.text_len == 0 || self.text.vocab_size < 2 {
            return bad("text: text_len must be ≥ 1 and vocab_size ≥ 2".into());
        }
        if t.n_layers == 0 || t.n_heads == 0 || t.head_dim == 0 || t.d_model == 0 {
            return bad("transformer: layers, heads, head_dim and d_model must be ≥ 1".into());
        }
        if let AttentionPattern::Layers(v) = &t.attention
            && v.len() != t.n_layers
        {
            return bad(format!("transformer: {} attention kinds listed for {} layers", v.len(), t.n_layers));
        }
        if t.conv_kernel.is_multiple_of(2) {
            return bad(format!("transformer: conv_kernel {} must be odd", t.conv_kernel));
        }
        if !(0.0..=1.0).contains(&t.text_loss_weight) {
            return bad("transformer: text_loss_weight must lie in [0, 1]".into());
        }
        if !(0.0..=1.0).contains(&t.cond_drop_prob) || !(0.0..1.0).contains(&t.dropout) {
            return bad("transformer: cond_drop_prob must lie in [0, 1] and dropout in [0, 1)".into());
        }
        self.sampling.validate().map_err(|e| Error::Config(format!("sampling: {e}")))?;
        let r = &self.reranker;
        if r.embed_dim == 0 || r.text_width == 0 || r.image_width == 0 || r.text_heads == 0 {
            return bad("reranker: embed_dim, text_width, text_heads and image_width must be ≥ 1".into());
        }
        if !r.text_width.is_multiple_of(r.text_heads) {
            return bad(format!(
                "reranker: text_width {} is not a multiple of text_heads {}",
                r.text_width, r.text_heads
            ));
        }
        // Bounds far above any model that fits a machine, so that a damaged or hostile
        // config.json is an error here, never an attempt to allocate what it asks for.
        let limits: [(&str, usize, usize); 21] = [
            ("dvae.groups", d.groups, 8),
            ("dvae.blocks_per_group", d.blocks_per_group, 64),
            ("dvae.hidden", d.hidden, 1 << 14),
            ("dvae.decoder_blocks_per_group", d.dec_blocks_per_group(), 64),
            ("dvae.decoder_hidden", d.dec_hidden(), 1 << 14),
            ("dvae.n_init", d.n_init, 1 << 16),
            ("dvae.vocab_size", d.vocab_size, 1 << 20),
            ("dvae.image_size", d.image_size, 4096),
            ("text.text_len", self.text.text_len, 1 << 16),
            ("text.vocab_size", self.text.vocab_size, 1 << 20),
            ("transformer.n_layers", t.n_layers, 1024),
            ("transformer.n_heads", t.n_heads, 1024),
            ("transformer.head_dim", t.head_dim, 1024),
            ("transformer.d_model", t.d_model, 1 << 16),
            ("transformer.mlp_ratio", t.mlp_ratio, 64),
            ("transformer.conv_kernel", t.conv_kernel, 255),
            ("reranker.embed_dim", r.embed_dim, 1 << 16),
            ("reranker.text_width", r.text_width, 1 << 16),
            ("reranker.text_layers", r.text_layers, 256),
            ("reranker.image_width", r.image_width, 4096),
            ("reranker.image_blocks", r.image_blocks, 64),
        ];
        if let Some((name, v, max)) = limits.iter().find(|(_, v, max)| v > max) {
            return bad(format!("{name} = {v} is beyond the largest supported ({max})"));
        }
        if d.n_init == 0 || t.mlp_ratio == 0 {
            return bad("dvae.n_init and transformer.mlp_ratio must be ≥ 1".into());
        }
        if self.image_len() > 1 << 16 {
            return bad(format!("{} image tokens are beyond the largest supported grid (256×256)", self.image_len()));
        }
        let n = crate::params::count(self).total + crate::params::reranker_count(self);
        if n > MAX_PARAMS {
            return bad(format!("the configuration asks for {n} parameters, beyond the supported {MAX_PARAMS}"));
        }
        Ok(())
    }
}
