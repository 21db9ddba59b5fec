//! The decoder-only transformer over one stream of caption then image tokens [P 2.2, B.1–B.2].
//!
//! Caption slots that hold no token take the learned padding token of their position (id
//! `text_vocab + position`); the stream begins with a start token. Image tokens get a row and a
//! column embedding. Pre-norm blocks with sparse attention by layer (see `attention`), a text
//! head over caption tokens and padding tokens, and an image head over the codebook. The loss is
//! cross-entropy normalised per modality and weighted (1/8 text, 7/8 image in the paper).

use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::attention::{
    Attention, CacheUse, DecodePanels, KvCache, Mask, MaskSet, StreamShape, dense, product, product_add,
};
use crate::config::{AttentionKind, Config};
use crate::kernels::{self, PackedLinear};

/// How decode steps read the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeMode {
    /// Static on CUDA, growing on the CPU.
    Auto,
    /// The same shapes every step: attention over the whole cache, masked.
    Static,
    /// Over the keys written so far; a sparse layer reads only the keys its pattern allows.
    Growing,
    /// Over the keys written so far, every one of them read and the pattern masked (the CPU's
    /// way before sparse steps; kept to measure against).
    GrowingMasked,
}

impl DecodeMode {
    pub const NAMES: &'static str = "auto, static, growing or growing-masked";

    pub fn parse(name: &str) -> crate::error::Result<Self> {
        match name {
            "auto" => Ok(Self::Auto),
            "static" => Ok(Self::Static),
            "growing" => Ok(Self::Growing),
            "growing-masked" => Ok(Self::GrowingMasked),
            other => Err(crate::error::Error::Invalid(format!("unknown decode mode {other:?} ({})", Self::NAMES))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Static => "static",
            Self::Growing => "growing",
            Self::GrowingMasked => "growing-masked",
        }
    }

    /// The mode `Auto` stands for on `device`.
    pub fn on(self, device: Device) -> Self {
        match self {
            Self::Auto if device.is_cuda() => Self::Static,
            Self::Auto => Self::Growing,
            m => m,
        }
    }
}

#[derive(Debug)]
struct Block {
    ln1: nn::LayerNorm,
    attn: Attention,
    ln2: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    kind: AttentionKind,
}

impl Block {
    fn new(vs: nn::Path, cfg: &Config, kind: AttentionKind) -> Self {
        let t = &cfg.transformer;
        let d = t.d_model as i64;
        let hidden = (t.d_model * t.mlp_ratio) as i64;
        Self {
            ln1: nn::layer_norm(&vs / "ln1", vec![d], Default::default()),
            attn: Attention::new(&vs / "attn", t.d_model, t.n_heads, t.head_dim, t.dropout),
            ln2: nn::layer_norm(&vs / "ln2", vec![d], Default::default()),
            fc1: nn::linear(&vs / "fc1", d, hidden, Default::default()),
            fc2: nn::linear(&vs / "fc2", hidden, d, Default::default()),
            kind,
        }
    }
}

/// Loss of one training batch.
#[derive(Debug)]
pub struct TransformerLoss {
    pub loss: Tensor,
    pub text: Tensor,
    pub image: Tensor,
}

#[derive(Debug)]
pub struct Transformer {
    text_emb: nn::Embedding,
    text_pos: nn::Embedding,
    image_emb: nn::Embedding,
    row_emb: nn::Embedding,
    col_emb: nn::Embedding,
    blocks: Vec<Block>,
    ln_f: nn::LayerNorm,
    text_head: nn::Linear,
    image_head: nn::Linear,
    masks: MaskSet,
    cfg: Config,
    dropout: f64,
    /// Precision of the matrix products when it differs from the weights' (mixed precision).
    compute: Option<Kind>,
    /// How decode steps read the cache ([`DecodeMode::on`] the device: never `Auto`). Static
    /// steps attend over the whole preallocated cache with a mask (every step has the same
    /// shapes, so fused kernels plan once), the default on CUDA; growing ones over the keys
    /// written so far, sparse layers reading only the keys their pattern allows.
    decode: DecodeMode,
}

impl Transformer {
    pub fn new(vs: nn::Path, cfg: &Config) -> Self {
        let t = &cfg.transformer;
        let d = t.d_model as i64;
        let tl = cfg.text.text_len as i64;
        let tv = cfg.text.vocab_size as i64;
        let g = cfg.grid_size() as i64;
        let emb = |name: &str, n: i64| {
            let c = nn::EmbeddingConfig { ws_init: nn::Init::Randn { mean: 0.0, stdev: 0.02 }, ..Default::default() };
            nn::embedding(&vs / name, n, d, c)
        };
        let kinds = t.layer_kinds();
        let blocks = kinds.iter().enumerate().map(|(i, &k)| Block::new(&vs / "blocks" / i, cfg, k)).collect();
        let shape = StreamShape { text_len: cfg.text.text_len, grid: cfg.grid_size(), conv_kernel: t.conv_kernel };
        Self {
            // caption tokens, one padding token per position, and the start token
            text_emb: emb("text_emb", tv + tl + 1),
            text_pos: emb("text_pos", tl + 1),
            image_emb: emb("image_emb", cfg.dvae.vocab_size as i64),
            row_emb: emb("row_emb", g),
            col_emb: emb("col_emb", g),
            blocks,
            ln_f: nn::layer_norm(&vs / "ln_f", vec![d], Default::default()),
            text_head: nn::linear(&vs / "text_head", d, tv + tl, Default::default()),
            image_head: nn::linear(&vs / "image_head", d, cfg.dvae.vocab_size as i64, Default::default()),
            masks: MaskSet::new(&kinds, shape, vs.device()),
            cfg: cfg.clone(),
            dropout: t.dropout,
            compute: None,
            decode: DecodeMode::Auto.on(vs.device()),
        }
    }

    /// Sets how decode steps read the cache (`Auto`: static on CUDA, growing on the CPU).
    pub fn set_decode_mode(&mut self, mode: DecodeMode) {
        self.decode = mode.on(self.device());
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Runs the matrix products in `kind` (e.g. bf16) while the weights stay as they are:
    /// mixed-precision training with f32 master weights. `None` computes in the weights' dtype.
    pub fn set_compute_kind(&mut self, kind: Option<Kind>) {
        self.compute = kind;
    }

    pub fn device(&self) -> Device {
        self.text_head.ws.device()
    }

    /// Id of the start token in the text embedding.
    fn bos_id(&self) -> i64 {
        (self.cfg.text.vocab_size + self.cfg.text.text_len) as i64
    }

    /// Caption ids [B, T] with each empty slot replaced by its position's padding token.
    pub fn pad_text(&self, captions: &[Vec<i64>]) -> Tensor {
        let tl = self.cfg.text.text_len;
        let tv = self.cfg.text.vocab_size as i64;
        let mut flat = Vec::with_capacity(captions.len() * tl);
        for c in captions {
            for i in 0..tl {
                flat.push(c.get(i).copied().unwrap_or(tv + i as i64));
            }
        }
        Tensor::from_slice(&flat).view([captions.len() as i64, tl as i64]).to_device(self.device())
    }

    /// The null caption (all padding) for `batch` rows: the unconditional input of
    /// classifier-free guidance.
    pub fn null_text(&self, batch: usize) -> Tensor {
        self.pad_text(&vec![Vec::new(); batch])
    }

    /// Embeddings of stream positions `start..start+n`, given the caption [B, T] and the image
    /// tokens [B, ≥ n_image] that those positions hold.
    fn embed(&self, text: &Tensor, image: Option<&Tensor>, start: usize, n: usize) -> Tensor {
        let tl = self.cfg.text.text_len;
        let dev = self.device();
        let b = text.size()[0];
        let end = start + n;
        let mut parts = Vec::new();
        let text_end = end.min(tl + 1);
        if start < text_end {
            // stream position p ≤ T holds the start token (p = 0) or caption token p − 1
            let bos = Tensor::full([b, 1], self.bos_id(), (Kind::Int64, dev));
            let ids = Tensor::cat(&[bos, text.shallow_clone()], 1).narrow(1, start as i64, (text_end - start) as i64);
            let pos = Tensor::arange_start(start as i64, text_end as i64, (Kind::Int64, dev));
            parts.push(self.text_emb.forward(&ids) + self.text_pos.forward(&pos).unsqueeze(0));
        }
        if end > tl + 1 {
            let j0 = start.max(tl + 1) - tl - 1;
            let j1 = end - tl - 1;
            if let Some(ids) = image.map(|i| i.narrow(1, j0 as i64, (j1 - j0) as i64)) {
                parts.push(self.embed_image(&ids, j0));
            }
        }
        if parts.len() == 1 {
            parts.pop().unwrap_or_else(|| Tensor::zeros([0], (Kind::Float, dev)))
        } else {
            Tensor::cat(&parts, 1)
        }
    }

    /// Embeddings of image tokens `ids` [B, n] standing at grid indices `j0..j0+n`: token plus
    /// row and column embeddings.
    fn embed_image(&self, ids: &Tensor, j0: usize) -> Tensor {
        let n = ids.size()[1];
        if n == 1 {
            // a decode step: the position's two embedding rows picked on the host (the same
            // values and sums as the lookups below, in a third of the calls)
            let g = self.cfg.grid_size() as i64;
            let pos = self.row_emb.ws.get(j0 as i64 / g) + self.col_emb.ws.get(j0 as i64 % g);
            return self.image_emb.forward(ids) + pos;
        }
        self.embed_image_at(ids, &Tensor::arange_start(j0 as i64, j0 as i64 + n, (Kind::Int64, self.device())))
    }

    /// [`Transformer::embed_image`] at the grid indices held in the Int64 tensor `j` [n].
    fn embed_image_at(&self, ids: &Tensor, j: &Tensor) -> Tensor {
        let g = self.cfg.grid_size() as i64;
        let pos = self.row_emb.forward(&j.floor_divide_scalar(g)) + self.col_emb.forward(&j.remainder(g));
        self.image_emb.forward(ids) + pos.unsqueeze(0)
    }

    /// Runs the blocks over positions `start..start+n` (embedded in `x`), or over the one
    /// image token whose index `at` holds on the device (an Int64 tensor [1]; `start` is then
    /// unused).
    // The residual sums stay out of place: autograd needs the block inputs unchanged.
    #[allow(clippy::assign_op_pattern)]
    fn run(
        &self,
        mut x: Tensor,
        start: usize,
        mut cache: Option<&mut KvCache>,
        train: bool,
        at: Option<&Tensor>,
    ) -> Tensor {
        let n = x.size()[1] as usize;
        if train && self.dropout > 0.0 {
            x = x.dropout(self.dropout, true);
        }
        let keys = match at {
            Some(j) => CacheUse::WholeAt(j, self.cfg.text.text_len + 1),
            None if self.decode == DecodeMode::Static && n == 1 && cache.is_some() => CacheUse::Whole,
            None => CacheUse::Written,
        };
        let sparse = self.decode == DecodeMode::Growing && cache.is_some();
        // a decode step with packed weights (CPU, f32; every layer's or none): its layer norms by
        // the kernel, the residual sums in the products' epilogues, GELU in fc1's
        let step = n == 1 && cache.as_deref().is_some_and(|c| c.panels().is_some());
        // one mask per attention kind, shared by the layers of that kind (a decode step selects
        // each row once, not once per layer)
        let mut masks: Vec<(AttentionKind, Mask)> = Vec::with_capacity(3);
        // at a device-held image index, every kind's row with one selection
        let rows = match keys {
            CacheUse::WholeAt(j, _) => self.masks.static_rows_at(j, self.cache_kind()),
            _ => None,
        };
        for (i, blk) in self.blocks.iter().enumerate() {
            let m = match masks.iter().position(|(k, _)| *k == blk.kind) {
                Some(m) => m,
                None => {
                    let mask = match keys {
                        CacheUse::WholeAt(j, _) => rows
                            .as_ref()
                            .and_then(|r| self.masks.kind_row(r, blk.kind))
                            .unwrap_or_else(|| self.masks.static_row_at(blk.kind, j, self.cache_kind())),
                        CacheUse::Whole => self.masks.static_row(blk.kind, start, self.cache_kind()),
                        CacheUse::Written if n == 1 && sparse && blk.kind != AttentionKind::Full => {
                            self.masks.blocks(blk.kind, start)
                        }
                        CacheUse::Written => self.masks.window(blk.kind, start, n),
                    };
                    masks.push((blk.kind, mask));
                    masks.len() - 1
                }
            };
            let c = cache.as_deref_mut().map(|c| (c, i));
            let l1 = norm(&blk.ln1, &x, step);
            x = blk.attn.forward(&l1, &masks[m].1, c, start, train, self.compute, keys, Some(&x));
            let p = cache.as_deref().filter(|_| step).and_then(|c| c.layer_panels(i));
            let l2 = norm(&blk.ln2, &x, step);
            let h = p
                .and_then(|l| l[2].forward_gelu(&l2).ok())
                .unwrap_or_else(|| dense(&blk.fc1, &l2, self.compute).gelu("none"));
            x = if train && self.dropout > 0.0 {
                x + product(&blk.fc2, None, &h, self.compute).dropout(self.dropout, true)
            } else {
                product_add(&blk.fc2, p.map(|l| &l[3]), &h, Some(&x), self.compute)
            };
        }
        if let (Some(c), None) = (cache, at) {
            c.advance(n);
        }
        norm(&self.ln_f, &x, step)
    }

    /// Full forward pass: text [B, T] (padded) and image [B, I] tokens → text logits
    /// [B, T, text_vocab + T] and image logits [B, I, image_vocab].
    pub fn forward(&self, text: &Tensor, image: &Tensor, train: bool) -> (Tensor, Tensor) {
        let tl = self.cfg.text.text_len;
        let l = self.cfg.seq_len();
        let x = self.embed(text, Some(image), 0, l);
        let h = self.run(x, 0, None, train, None);
        let text_logits = dense(&self.text_head, &h.narrow(1, 0, tl as i64), self.compute);
        let image_logits = dense(&self.image_head, &h.narrow(1, tl as i64, self.cfg.image_len() as i64), self.compute);
        (text_logits, image_logits)
    }

    /// The training loss for captions [B, T] (padded) and image tokens [B, I].
    /// While training, each caption is replaced by the null caption with probability
    /// `cond_drop_prob`, which teaches the unconditional model that classifier-free guidance
    /// needs.
    pub fn loss(&self, text: &Tensor, image: &Tensor, train: bool) -> TransformerLoss {
        let p = self.cfg.transformer.cond_drop_prob;
        let dropped;
        let text = if train && p > 0.0 {
            let b = text.size()[0];
            let drop = Tensor::rand([b, 1], (Kind::Float, text.device())).lt(p);
            dropped = text.where_self(&drop.logical_not(), &self.null_text(b as usize));
            &dropped
        } else {
            text
        };
        let (tlog, ilog) = self.forward(text, image, train);
        let text_loss = tlog.flatten(0, 1).cross_entropy_for_logits(&text.flatten(0, 1));
        let image_loss = ilog.flatten(0, 1).cross_entropy_for_logits(&image.flatten(0, 1));
        let w = self.cfg.transformer.text_loss_weight;
        TransformerLoss { loss: &text_loss * w + &image_loss * (1.0 - w), text: text_loss, image: image_loss }
    }

    /// The dtype of the cache and of the attention in sampling: the compute precision, or the
    /// weights'.
    pub fn cache_kind(&self) -> Kind {
        self.compute.unwrap_or(self.text_head.ws.kind())
    }

    /// A cache for `batch` rows in the weights' dtype, as long as static-shape steps read
    /// ([`MaskSet::cache_len`]: the stream padded to an aligned length).
    /// On the CPU with f32 weights, the cache also holds the weights packed for decode steps
    /// ([`DecodePanels`]).
    pub fn new_cache(&self, batch: usize) -> KvCache {
        let t = &self.cfg.transformer;
        let mut cache = KvCache::new(
            self.blocks.len(),
            batch,
            t.n_heads,
            self.masks.cache_len(),
            t.head_dim,
            self.cache_kind(),
            self.device(),
        );
        // every image position's row plus column embedding, summed once for the run
        let table = tch::no_grad(|| (self.row_emb.ws.unsqueeze(1) + self.col_emb.ws.unsqueeze(0)).flatten(0, 1));
        cache.set_image_positions(table);
        if self.compute.is_none() && kernels::applies(self.device(), self.cache_kind()) {
            // without panels (a weight the kernels refuse), steps use libtorch's products
            cache.set_panels(tch::no_grad(|| self.panels()).ok());
        }
        cache
    }

    /// Every weight a decode step multiplies by, packed for the CPU's panel products.
    pub fn panels(&self) -> crate::error::Result<DecodePanels> {
        let pack = |l: &nn::Linear| PackedLinear::new(&l.ws, l.bs.as_ref());
        let layers = self
            .blocks
            .iter()
            .map(|b| Ok([pack(&b.attn.qkv)?, pack(&b.attn.out)?, pack(&b.fc1)?, pack(&b.fc2)?]))
            .collect::<crate::error::Result<Vec<_>>>()?;
        Ok(DecodePanels { layers, image_head: pack(&self.image_head)? })
    }

    /// The image logits of the last hidden states `h` [B, d]: by the packed head in a cache that
    /// holds one.
    fn image_logits(&self, cache: &KvCache, h: &Tensor) -> Tensor {
        product(&self.image_head, cache.panels().map(|p| &p.image_head), h, self.compute)
    }

    /// Feeds the caption and the first `image.size(1)` image tokens into an empty cache;
    /// returns the image logits [B, V] for the next image token.
    pub fn prefill(&self, cache: &mut KvCache, text: &Tensor, image: Option<&Tensor>) -> Tensor {
        let n_img = image.map(|i| i.size()[1] as usize).unwrap_or(0);
        let n = self.cfg.text.text_len + 1 + n_img;
        cache.clear();
        if self.decode == DecodeMode::Growing {
            cache.set_captions(text);
        }
        let x = self.embed(text, image, 0, n);
        let h = self.run(x, 0, Some(cache), false, None);
        self.image_logits(cache, &h.narrow(1, n as i64 - 1, 1).squeeze_dim(1))
    }

    /// Feeds image token `j` ([B]) at its stream position; returns the logits for token j+1.
    pub fn decode_step(&self, cache: &mut KvCache, token: &Tensor, j: usize) -> Tensor {
        let start = self.cfg.text.text_len + 1 + j;
        debug_assert_eq!(cache.len(), start);
        let ids = token.view([-1, 1]);
        let x = match cache.image_positions() {
            Some(t) => self.image_emb.forward(&ids) + t.get(j as i64),
            None => self.embed_image(&ids, j),
        };
        let h = self.run(x, start, Some(cache), false, None);
        self.image_logits(cache, &h.squeeze_dim(1))
    }

    /// [`Transformer::decode_step`] with the image index `j` held in an Int64 tensor [1] on the
    /// device: the step reads no host value, so a CUDA graph captured once replays it at every
    /// position. Attention runs over the whole cache (static shapes) whatever
    /// [`Transformer::set_decode_mode`] says; the cache's host-side length is not advanced.
    pub fn decode_step_at(&self, cache: &mut KvCache, token: &Tensor, j: &Tensor) -> Tensor {
        let ids = token.view([-1, 1]);
        let x = match cache.image_positions() {
            Some(t) => self.image_emb.forward(&ids) + t.index_select(0, j).unsqueeze(0),
            None => self.embed_image_at(&ids, j),
        };
        let h = self.run(x, 0, Some(cache), false, Some(j));
        self.image_logits(cache, &h.squeeze_dim(1))
    }

    /// Whether decode steps attend over the whole cache (see [`Transformer::set_decode_mode`]).
    pub fn static_decode(&self) -> bool {
        self.decode == DecodeMode::Static
    }
}

/// Layer norm `ln` of `x`: by the kernel on a decode step with packed weights (`step`: CPU,
/// f32, a few rows), else (or when the kernel refuses) by libtorch.
fn norm(ln: &nn::LayerNorm, x: &Tensor, step: bool) -> Tensor {
    if step
        && let (Some(w), Some(b)) = (&ln.ws, &ln.bs)
        && let Ok(y) = kernels::layer_norm(x, w, b, nn::LayerNormConfig::default().eps)
    {
        return y;
    }
    ln.forward(x)
}

/// The number of blocks a transformer's weight file holds (from its tensor names), or `None`
/// when the names are not a transformer's.
pub fn layers_of<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<usize> {
    let mut layers = None;
    for name in names {
        if let Some(rest) = name.strip_prefix("blocks.") {
            let i = rest.split('.').next().and_then(|i| i.parse::<usize>().ok())?;
            layers = Some(layers.unwrap_or(0).max(i + 1));
        }
    }
    layers
}

/// Copies a transformer with fewer layers (`from`, `from_cfg`) into `to` (`to_cfg`: the same but
/// for `n_layers` and the attention pattern): its first n − 1 blocks stay where they are, its
/// last block becomes `to`'s last, and the blocks inserted before it start as the identity
/// (their attention output and second MLP projection zero; the rest keeps its initialisation),
/// so `to` gives exactly `from`'s logits until it trains. The blocks kept must keep their
/// attention kinds (the paper's pattern does: its first layers and its last, convolutional,
/// one are the same at any depth).
pub fn grow_layers(
    from: &nn::VarStore,
    from_cfg: &crate::config::TransformerConfig,
    to: &nn::VarStore,
    to_cfg: &crate::config::TransformerConfig,
) -> Result<(), String> {
    use crate::config::TransformerConfig;
    let (n0, n1) = (from_cfg.n_layers, to_cfg.n_layers);
    let same_but_depth = |c: &TransformerConfig| TransformerConfig {
        n_layers: 0,
        attention: crate::config::AttentionPattern::Full,
        ..c.clone()
    };
    if same_but_depth(from_cfg) != same_but_depth(to_cfg) {
        return Err("growing a transformer's depth keeps its width, heads and everything else as they are".into());
    }
    if n1 < n0 || n0 == 0 {
        return Err(format!("a transformer can grow, not shrink: it has {n0} layers, asked for {n1}"));
    }
    let (k0, k1) = (from_cfg.layer_kinds(), to_cfg.layer_kinds());
    if k0[..n0 - 1] != k1[..n0 - 1] || k0[n0 - 1] != k1[n1 - 1] {
        return Err(format!(
            "the layers kept must keep their attention: {k0:?} cannot become the first and last layers of {k1:?}"
        ));
    }
    let old = from.variables();
    tch::no_grad(|| {
        for (name, var) in to.variables() {
            let source = match name.strip_prefix("blocks.").and_then(|r| r.split_once('.')) {
                None => Some(name.clone()),
                Some((i, rest)) => {
                    let i: usize = i.parse().map_err(|_| format!("{name}: not a block's tensor"))?;
                    match i {
                        i if i + 1 < n0 => Some(name.clone()),
                        i if i + 1 == n1 => Some(format!("blocks.{}.{rest}", n0 - 1)),
                        _ => {
                            if matches!(rest, "attn.out.weight" | "attn.out.bias" | "fc2.weight" | "fc2.bias") {
                                let _ = var.shallow_clone().zero_();
                            }
                            None
                        }
                    }
                }
            };
            if let Some(source) = source {
                let o = old.get(&source).ok_or_else(|| format!("{source} is missing from the smaller transformer"))?;
                var.shallow_clone().f_copy_(o).map_err(|e| format!("{name} from {source}: {e}"))?;
            }
        }
        Ok(())
    })
}
