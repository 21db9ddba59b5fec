//! Attention for the one text-then-image stream [P 2.2, appendix B.1].
//!
//! The stream has `T + I` input positions: position 0 holds a start token, positions 1..=T
//! the caption, positions T+1.. the image tokens 0..I−2 in raster order (the output at position
//! p predicts stream token p). A position holding a text token sees the positions before it
//! (causal). A position holding image token j sees every text position and the image tokens
//! its layer's sparse pattern allows among 0..=j. Masks are boolean (`true` = may attend),
//! built once per kind and shape with tensor operations, and handed to libtorch's fused
//! scaled-dot-product attention; decode steps take one row of the mask.

use std::collections::HashMap;

use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::config::AttentionKind;
use crate::kernels::{self, PackedLinear};

/// The shape of the stream a mask is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamShape {
    pub text_len: usize,
    pub grid: usize,
    pub conv_kernel: usize,
}

impl StreamShape {
    pub fn image_len(&self) -> usize {
        self.grid * self.grid
    }
    pub fn seq_len(&self) -> usize {
        self.text_len + self.image_len()
    }
}

/// The `[L, L]` boolean mask of `kind` (rows: queries, columns: keys).
pub fn build_mask(kind: AttentionKind, s: StreamShape, device: Device) -> Tensor {
    let l = s.seq_len() as i64;
    let t = s.text_len as i64;
    let w = s.grid as i64;
    let pos = Tensor::arange(l, (Kind::Int64, device));
    let q = pos.view([l, 1]);
    let k = pos.view([1, l]);
    let causal = k.le_tensor(&q);
    let key_is_text = k.le(t);
    let q_img = q.gt(t);
    // Image index j = p − T − 1; clamped for text positions, which `q_img` masks anyway.
    let jq = (&q - t - 1).clamp_min(0);
    let jk = (&k - t - 1).clamp_min(0);
    let (rq, cq) = (jq.floor_divide_scalar(w), jq.remainder(w));
    let (rk, ck) = (jk.floor_divide_scalar(w), jk.remainder(w));
    let pattern = match kind {
        AttentionKind::Full => Tensor::ones([l, l], (Kind::Bool, device)),
        AttentionKind::Row => (&jq - &jk).le(w),
        AttentionKind::Column => cq.eq_tensor(&ck),
        AttentionKind::Conv => {
            let r = (s.conv_kernel / 2) as i64;
            (&rq - &rk).abs().le(r).logical_and(&(&cq - &ck).abs().le(r))
        }
    };
    let image_part = q_img.logical_and(&pattern);
    causal.logical_and(&key_is_text.logical_or(&image_part))
}

/// A block of keys on the stream axis: positions `start + r·stride + c` for `r < rows` and
/// `c < cols` (a run of the stream, a column of the image grid, or a window of its rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyBlock {
    pub start: usize,
    pub rows: usize,
    pub stride: usize,
    pub cols: usize,
    /// The block is the caption's keys (the start token and the caption, positions 0..=T),
    /// which depend on the caption alone: rows of a batch that share a caption share them.
    pub caption: bool,
}

impl KeyBlock {
    fn run(start: usize, len: usize) -> Self {
        Self { start, rows: 1, stride: 1, cols: len, caption: false }
    }

    fn grid(start: usize, rows: usize, stride: usize, cols: usize) -> Self {
        Self { start, rows, stride, cols, caption: false }
    }

    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The stream positions of the block, in order.
    pub fn positions(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.rows).flat_map(move |r| (0..self.cols).map(move |c| self.start + r * self.stride + c))
    }

    /// The block's keys of `t` [B, H, L, D]: [B, H, len, D], a view unless the block spans
    /// several rows of several columns (a convolutional window, copied: a few dozen keys).
    fn of(&self, t: &Tensor) -> Tensor {
        let (s, n) = (self.start as i64, self.cols as i64);
        if self.rows == 1 {
            return t.narrow(2, s, n);
        }
        let span = ((self.rows - 1) * self.stride + self.cols) as i64;
        // [B, H, rows, D, cols] windows of the span, one per row
        let w = t.narrow(2, s, span).unfold(2, n, self.stride as i64);
        if self.cols == 1 { w.squeeze_dim(4) } else { w.transpose(3, 4).flatten(2, 3) }
    }
}

/// The keys a decode step at stream position `pos` may read under `kind`, as blocks: exactly
/// the `true` entries of row `pos` of [`build_mask`], each once. A sparse layer's step then reads
/// the caption and its pattern's few image keys instead of every key written (row attention: the
/// last `grid + 1` image tokens; column: one per row; convolutional: a window).
pub fn decode_blocks(kind: AttentionKind, s: StreamShape, pos: usize) -> Vec<KeyBlock> {
    let t = s.text_len;
    if pos <= t || kind == AttentionKind::Full {
        return vec![KeyBlock::run(0, pos + 1)];
    }
    let w = s.grid;
    let j = pos - t - 1;
    let (r, c) = (j / w, j % w);
    let text = KeyBlock { caption: true, ..KeyBlock::run(0, t + 1) };
    let img = t + 1;
    match kind {
        AttentionKind::Full => unreachable!("handled above"),
        AttentionKind::Row => {
            let lo = j.saturating_sub(w);
            vec![text, KeyBlock::run(img + lo, j - lo + 1)]
        }
        AttentionKind::Column => vec![text, KeyBlock::grid(img + c, r + 1, w, 1)],
        AttentionKind::Conv => {
            let k = s.conv_kernel / 2;
            let (r0, c0, c1) = (r.saturating_sub(k), c.saturating_sub(k), (c + k).min(w - 1));
            let mut blocks = vec![text];
            if r > r0 {
                blocks.push(KeyBlock::grid(img + r0 * w + c0, r - r0, w, c1 - c0 + 1));
            }
            blocks.push(KeyBlock::run(img + r * w + c0, c - c0 + 1));
            blocks
        }
    }
}

/// Attention of one query per row, `q` [B, H, 1, D], over the keys and values [B, H, L, D]
/// that `blocks` pick: the scores of every block in one softmax, the values summed block by
/// block. Nothing is masked: the blocks hold only keys the query may read. Rows of a group in
/// `groups` (first row, count) share a caption: its keys are read once, from the group's first
/// row, for all of them.
fn attend_blocks(q: &Tensor, k: &Tensor, v: &Tensor, blocks: &[KeyBlock], groups: &[(i64, i64)]) -> Tensor {
    let scale = 1.0 / (q.size()[3] as f64).sqrt();
    let shared = |b: &KeyBlock| b.caption && !groups.is_empty();
    let scores: Vec<Tensor> = blocks
        .iter()
        .map(|b| if shared(b) { by_group(q, k, b, groups, true) } else { q.matmul(&b.of(k).transpose(2, 3)) })
        .collect();
    let p = (Tensor::cat(&scores, 3) * scale).softmax(3, Kind::Float).to_kind(q.kind());
    let mut out: Option<Tensor> = None;
    let mut at = 0i64;
    for b in blocks {
        let n = b.len() as i64;
        let pb = p.narrow(3, at, n);
        let part = if shared(b) { by_group(&pb, v, b, groups, false) } else { pb.matmul(&b.of(v)) };
        out = Some(match out {
            None => part,
            Some(o) => o + part,
        });
        at += n;
    }
    out.unwrap_or_else(|| q.zeros_like())
}

/// What the block kernels take of a decode step's key blocks: the caption's key count (the
/// first block, when it is the caption's), the other blocks' positions, and for each of the
/// `b` rows the row whose caption keys it reads (the first of its caption group).
fn kernel_keys(blocks: &[KeyBlock], groups: &[(i64, i64)], b: i64) -> (usize, Vec<i64>, Vec<i64>) {
    let mut n_caption = 0;
    let mut positions: Vec<i64> = Vec::new();
    for (i, blk) in blocks.iter().enumerate() {
        if i == 0 && blk.caption && blk.start == 0 && blk.rows == 1 {
            n_caption = blk.cols;
        } else {
            positions.extend(blk.positions().map(|p| p as i64));
        }
    }
    let mut src: Vec<i64> = (0..b).collect();
    for &(first, count) in groups {
        for r in first..(first + count).min(b) {
            src[r as usize] = first;
        }
    }
    (n_caption, positions, src)
}

/// A layer's product: by the packed weight `packed` when given (a CPU decode step), else
/// [`dense`] (also when the packed product refuses the input).
pub fn product(l: &nn::Linear, packed: Option<&PackedLinear>, x: &Tensor, compute: Option<Kind>) -> Tensor {
    packed.and_then(|p| p.forward(x).ok()).unwrap_or_else(|| dense(l, x, compute))
}

/// [`product`] plus `residual` when given, added last (as `residual + h` adds it): in the
/// packed product's epilogue, so the sum is the same bits either way.
pub fn product_add(
    l: &nn::Linear,
    packed: Option<&PackedLinear>,
    x: &Tensor,
    residual: Option<&Tensor>,
    compute: Option<Kind>,
) -> Tensor {
    match residual {
        None => product(l, packed, x, compute),
        Some(r) => packed.and_then(|p| p.forward_add(x, r).ok()).unwrap_or_else(|| r + dense(l, x, compute)),
    }
}

/// For each group of rows that share a caption, `x` [B, H, 1, ·] times the block of the
/// group's first row of `t` [B, H, L, D]: one product per head for the whole group instead of
/// one per row. `keys`: `x` is queries and the result scores (`x·Kᵀ`); else `x` is weights
/// and the result values (`x·V`).
fn by_group(x: &Tensor, t: &Tensor, b: &KeyBlock, groups: &[(i64, i64)], keys: bool) -> Tensor {
    let parts: Vec<Tensor> = groups
        .iter()
        .map(|&(first, n)| {
            // [H, n, ·] rows of the group against [H, len, D] keys of its first row
            let xg = x.narrow(0, first, n).squeeze_dim(2).transpose(0, 1);
            let tg = b.of(&t.narrow(0, first, 1)).squeeze_dim(0);
            let y = if keys { xg.matmul(&tg.transpose(1, 2)) } else { xg.matmul(&tg) };
            y.transpose(0, 1).unsqueeze(2)
        })
        .collect();
    Tensor::cat(&parts, 0)
}

/// A static-shape decode step attends over the whole cache, whose length is the stream's
/// rounded up to a multiple of this: the fused attention kernels want the mask's last dimension
/// aligned to it and otherwise copy the mask into a padded one at every call.
pub const KEY_ALIGN: usize = 16;

/// The cache length of a stream of `seq_len` positions for static-shape decode steps.
pub fn padded_len(seq_len: usize) -> usize {
    seq_len.div_ceil(KEY_ALIGN) * KEY_ALIGN
}

/// Masks for every kind a model uses, built once for a stream shape and device.
#[derive(Debug)]
pub struct MaskSet {
    shape: StreamShape,
    device: Device,
    masks: HashMap<AttentionKind, Tensor>,
    /// Plain causal attention as an explicit mask, for static-shape decode steps.
    causal: Tensor,
    /// The kinds the model uses, each once, in the order of its layers: the order of the
    /// kinds in [`MaskSet::additive`]'s rows.
    kinds: Vec<AttentionKind>,
    /// Per dtype (f32, bf16), the masks of static-shape decode steps as the additive bias the
    /// fused kernels take, every kind's row of a query side by side ([L, kinds · cache_len]:
    /// 0 where a query may attend, −∞ elsewhere and on the padding keys). A step hands a row
    /// over as it is, with no conversion from boolean and no padding inside the attention
    /// call, and selects the rows of all kinds with one call. Empty when
    /// `TESSERA_STATIC_MASKS=bool` asks for boolean rows over an unpadded cache (to measure
    /// the difference).
    additive: Vec<(Kind, Tensor)>,
}

impl MaskSet {
    pub fn new(kinds: &[AttentionKind], shape: StreamShape, device: Device) -> Self {
        let mut masks = HashMap::new();
        let mut distinct = Vec::new();
        for &k in kinds {
            if !distinct.contains(&k) {
                distinct.push(k);
            }
            if k != AttentionKind::Full {
                masks.entry(k).or_insert_with(|| build_mask(k, shape, device));
            }
        }
        let mut set = Self {
            shape,
            device,
            masks,
            causal: build_mask(AttentionKind::Full, shape, device),
            kinds: distinct,
            additive: Vec::new(),
        };
        if std::env::var("TESSERA_STATIC_MASKS").is_ok_and(|v| v == "bool") || set.kinds.is_empty() {
            return set;
        }
        let lp = padded_len(shape.seq_len());
        let allowed: Vec<Tensor> = set.kinds.iter().map(|&kind| set.with_mask(kind, |m| hide_padding(m, lp))).collect();
        let allowed = Tensor::cat(&allowed, 1);
        for dtype in [Kind::Float, Kind::BFloat16] {
            let bias =
                Tensor::zeros(allowed.size(), (dtype, device)).masked_fill(&allowed.logical_not(), f64::NEG_INFINITY);
            set.additive.push((dtype, bias));
        }
        set
    }

    /// The cache length static-shape decode steps read: the stream's, padded to [`KEY_ALIGN`]
    /// (unpadded with `TESSERA_STATIC_MASKS=bool`).
    pub fn cache_len(&self) -> usize {
        if self.additive.is_empty() { self.shape.seq_len() } else { padded_len(self.shape.seq_len()) }
    }

    /// The whole `[L, L]` mask of `kind` handed to `f` (plain causal attention for `Full`).
    fn with_mask<R>(&self, kind: AttentionKind, f: impl FnOnce(&Tensor) -> R) -> R {
        match (kind, self.masks.get(&kind)) {
            (AttentionKind::Full, _) => f(&self.causal),
            (_, Some(m)) => f(m),
            (_, None) => f(&build_mask(kind, self.shape, self.device)),
        }
    }

    /// The additive bias table of `dtype`, if one was built.
    fn bias_table(&self, dtype: Kind) -> Option<&Tensor> {
        self.additive.iter().find(|(d, _)| *d == dtype).map(|(_, t)| t)
    }

    /// `kind`'s row of rows from [`MaskSet::static_rows_at`] (or of any rows of a bias table:
    /// every kind's side by side).
    pub fn kind_row(&self, rows: &Tensor, kind: AttentionKind) -> Option<Mask> {
        let i = self.kinds.iter().position(|&k| k == kind)?;
        let lc = self.cache_len() as i64;
        Some(Mask::Explicit(rows.view([-1, self.kinds.len() as i64, lc]).select(1, i as i64)))
    }

    /// The mask of a static-shape decode step: query `pos` over every key of the cache
    /// (`[1, cache_len]`), for attention computed in `dtype`. Keys past `pos` are masked, so the
    /// cache positions not yet written (and the padding) are never read, and every step has the
    /// same shapes whatever `pos` is. An additive bias in `dtype` when one was built for it,
    /// else boolean.
    pub fn static_row(&self, kind: AttentionKind, pos: usize, dtype: Kind) -> Mask {
        if let Some(m) = self.bias_table(dtype).and_then(|t| self.kind_row(&t.narrow(0, pos as i64, 1), kind)) {
            return m;
        }
        self.with_bool_table(kind, |m| Mask::Explicit(m.narrow(0, pos as i64, 1)))
    }

    /// [`MaskSet::static_row`] of the image token whose index the Int64 tensor `j` [1] holds
    /// on the device (stream position `text_len + 1 + j`): the same row, chosen on the device,
    /// so a captured CUDA graph replays it for whatever index the tensor holds then.
    pub fn static_row_at(&self, kind: AttentionKind, j: &Tensor, dtype: Kind) -> Mask {
        if let Some(m) = self.static_rows_at(j, dtype).and_then(|rows| self.kind_row(&rows, kind)) {
            return m;
        }
        self.with_bool_table(kind, |m| Mask::Explicit(self.image_rows(m).index_select(0, j)))
    }

    /// The rows of every kind at the image index `j` (as [`MaskSet::static_row_at`]) with one
    /// selection, for [`MaskSet::kind_row`]; `None` where `dtype` has no bias table.
    pub fn static_rows_at(&self, j: &Tensor, dtype: Kind) -> Option<Tensor> {
        self.bias_table(dtype).map(|t| self.image_rows(t).index_select(0, j))
    }

    /// The rows of a table for the image tokens' queries (stream positions from `text_len + 1`).
    fn image_rows(&self, table: &Tensor) -> Tensor {
        let first = self.shape.text_len as i64 + 1;
        table.narrow(0, first, table.size()[0] - first)
    }

    /// The boolean [L, cache_len] mask of `kind`, padded with hidden keys to the cache.
    fn with_bool_table<R>(&self, kind: AttentionKind, f: impl FnOnce(&Tensor) -> R) -> R {
        let lc = self.cache_len();
        self.with_mask(kind, |m| if lc == self.shape.seq_len() { f(m) } else { f(&hide_padding(m, lc)) })
    }

    /// The keys of a decode step at stream position `pos` under `kind`, as blocks (see
    /// [`decode_blocks`]).
    pub fn blocks(&self, kind: AttentionKind, pos: usize) -> Mask {
        Mask::Blocks(decode_blocks(kind, self.shape, pos))
    }

    /// The mask for queries `start..start+n` over keys `0..start+n`. Full attention is plain
    /// causal attention, which the fused kernels do without a mask (and a single trailing
    /// query needs none at all).
    pub fn window(&self, kind: AttentionKind, start: usize, n: usize) -> Mask {
        match kind {
            AttentionKind::Full if n == 1 => Mask::None,
            AttentionKind::Full if start == 0 => Mask::Causal,
            AttentionKind::Full => Mask::Explicit(causal_window(start, n, self.device)),
            _ => self.with_mask(kind, |m| {
                Mask::Explicit(m.narrow(0, start as i64, n as i64).narrow(1, 0, (start + n) as i64))
            }),
        }
    }
}

/// A boolean mask [L, L] widened to `keys` columns, the new ones (cache padding) hidden.
fn hide_padding(m: &Tensor, keys: usize) -> Tensor {
    let (l, k) = (m.size()[0], m.size()[1]);
    Tensor::cat(&[m.shallow_clone(), Tensor::zeros([l, keys as i64 - k], (Kind::Bool, m.device()))], 1)
}

fn causal_window(start: usize, n: usize, device: Device) -> Tensor {
    let q = Tensor::arange_start(start as i64, (start + n) as i64, (Kind::Int64, device));
    let k = Tensor::arange((start + n) as i64, (Kind::Int64, device));
    k.view([1, -1]).le_tensor(&q.view([-1, 1]))
}

/// What restricts the keys of an attention call.
#[derive(Debug)]
pub enum Mask {
    /// Every key is allowed.
    None,
    /// Queries and keys are the same positions from 0: plain causal attention.
    Causal,
    /// One query reading only these keys (a sparse layer's decode step, see
    /// [`decode_blocks`]).
    Blocks(Vec<KeyBlock>),
    /// A mask [queries, keys]: boolean (`true` = may attend) or an additive bias in the
    /// attention's dtype (0 = may attend, −∞ = may not).
    Explicit(Tensor),
}

/// Keys and values of every layer for a batch, preallocated to the whole stream.
#[derive(Debug)]
pub struct KvCache {
    /// Per layer, keys and values together, [2, B, H, L, D]: a step writes both with one copy.
    kv: Vec<Tensor>,
    len: usize,
    /// Runs of rows (first row, count) that share a caption, covering the batch, when some run
    /// has more than one row; else empty. Sparse decode steps read such a run's caption keys
    /// once.
    caption_groups: Vec<(i64, i64)>,
    /// The weights packed for CPU decode steps, when the model's are f32 on the CPU.
    panels: Option<DecodePanels>,
    /// Row plus column embedding of every image position [grid², d], summed once for a
    /// sampling run: a decode step adds one row of it to its token's embedding.
    image_positions: Option<Tensor>,
}

/// A transformer's weights packed for CPU decode steps ([`PackedLinear`]), held by a sampling
/// run's cache (packed when the cache is made: the weights cannot change during the run).
#[derive(Debug)]
pub struct DecodePanels {
    /// Per layer: the attention's qkv and output products, the MLP's first and second.
    pub layers: Vec<[PackedLinear; 4]>,
    pub image_head: PackedLinear,
}

impl KvCache {
    pub fn new(
        layers: usize,
        batch: usize,
        heads: usize,
        max_len: usize,
        head_dim: usize,
        kind: Kind,
        device: Device,
    ) -> Self {
        let shape = [2, batch as i64, heads as i64, max_len as i64, head_dim as i64];
        Self {
            kv: (0..layers).map(|_| Tensor::zeros(shape, (kind, device))).collect(),
            len: 0,
            caption_groups: Vec::new(),
            panels: None,
            image_positions: None,
        }
    }

    /// The summed row and column embeddings of the image positions, when the model set them.
    pub fn image_positions(&self) -> Option<&Tensor> {
        self.image_positions.as_ref()
    }

    pub(crate) fn set_image_positions(&mut self, table: Tensor) {
        self.image_positions = Some(table);
    }

    /// The packed weights decode steps multiply by, if any.
    pub fn panels(&self) -> Option<&DecodePanels> {
        self.panels.as_ref()
    }

    /// Layer `layer`'s packed weights: qkv, output, MLP first and second.
    pub fn layer_panels(&self, layer: usize) -> Option<&[PackedLinear; 4]> {
        self.panels.as_ref().and_then(|p| p.layers.get(layer))
    }

    pub(crate) fn set_panels(&mut self, panels: Option<DecodePanels>) {
        self.panels = panels;
    }

    /// Number of positions already stored.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every stored position (the buffers are kept).
    pub fn clear(&mut self) {
        self.len = 0;
        self.caption_groups.clear();
    }

    /// Runs of rows (first row, count) whose caption keys sparse decode steps read once (empty:
    /// every row reads its own).
    pub fn caption_groups(&self) -> &[(i64, i64)] {
        &self.caption_groups
    }

    /// Records which rows share a caption, from the captions [B, T] the cache is filled with:
    /// runs of equal consecutive rows (a batch of one prompt, and with guidance the null
    /// caption's rows, are one run each).
    pub(crate) fn set_captions(&mut self, text: &Tensor) {
        self.caption_groups.clear();
        let (b, t) = text.size2().unwrap_or((0, 0));
        let Ok(ids) = Vec::<i64>::try_from(text.to_device(Device::Cpu).to_kind(Kind::Int64).reshape([-1])) else {
            return;
        };
        let row = |i: i64| &ids[(i * t) as usize..((i + 1) * t) as usize];
        let mut groups: Vec<(i64, i64)> = Vec::new();
        for i in 0..b {
            match groups.last_mut() {
                Some((first, n)) if row(*first) == row(i) => *n += 1,
                _ => groups.push((i, 1)),
            }
        }
        if groups.iter().any(|&(_, n)| n > 1) {
            self.caption_groups = groups;
        }
    }

    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Sets the number of positions stored (steps that write at a device-held position do not
    /// count them on the host).
    pub(crate) fn set_len(&mut self, n: usize) {
        self.len = n;
    }
}

/// A linear layer run in `compute` precision when it is given and differs from the weights'
/// dtype (mixed precision: f32 master weights, bf16 products, gradients flowing back through the
/// casts).
pub fn dense(l: &nn::Linear, x: &Tensor, compute: Option<Kind>) -> Tensor {
    match compute {
        Some(k) if l.ws.kind() != k => x.to_kind(k).linear(&l.ws.to_kind(k), l.bs.as_ref().map(|b| b.to_kind(k))),
        _ if few_rows_on_cpu(x) => dense_few_rows(l, x),
        _ => l.forward(x),
    }
}

/// The most rows [`dense`] multiplies as `W·xᵀ` on a CPU.
pub const FEW_ROWS: i64 = 64;

/// Whether `x` holds 2 to [`FEW_ROWS`] rows on a CPU: a decode step's batch.
fn few_rows_on_cpu(x: &Tensor) -> bool {
    let rows = x.size().split_last().map(|(_, lead)| lead.iter().product::<i64>()).unwrap_or(0);
    (2..=FEW_ROWS).contains(&rows) && x.device() == Device::Cpu
}

/// `x·Wᵀ + b` for a few rows, computed as `(W·xᵀ + b)ᵀ`: the same product with the weight as
/// the long side. On a CPU, libtorch's `linear` for a handful of rows streams a cold weight at
/// 5–8 GB/s, this form at up to 22 GB/s (image head of 8,192 × 256 at 4 rows: 1.46 against
/// 0.36 ms, 2 threads); a decode step's matrix products are mostly such reads.
fn dense_few_rows(l: &nn::Linear, x: &Tensor) -> Tensor {
    let mut shape = x.size();
    let d_in = shape.last().copied().unwrap_or(0);
    let xt = x.reshape([-1, d_in]).tr();
    let y = match &l.bs {
        Some(b) => b.unsqueeze(1).addmm(&l.ws, &xt),
        None => l.ws.matmul(&xt),
    };
    if let Some(last) = shape.last_mut() {
        *last = l.ws.size()[0];
    }
    y.tr().contiguous().view(shape.as_slice())
}

/// Which keys an attention call with a cache reads, and where its keys and values go.
#[derive(Debug, Clone, Copy)]
pub enum CacheUse<'a> {
    /// Written at `start..start+n`; attention over the keys `0..start+n` written so far.
    Written,
    /// Written at `start..start+n`; attention over the whole preallocated cache (static
    /// shapes; the mask must hide the positions not yet written, as
    /// [`MaskSet::static_row`] does).
    Whole,
    /// One image token, whose index the Int64 tensor [1] holds on the device, written at stream
    /// position `first + index` (`first`: the stream position of image token 0); attention over
    /// the whole cache. No host value enters the step, so a CUDA graph of it replays at every
    /// position.
    WholeAt(&'a Tensor, usize),
}

/// Multi-head self-attention with a fused kernel.
#[derive(Debug)]
pub struct Attention {
    pub(crate) qkv: nn::Linear,
    pub(crate) out: nn::Linear,
    n_heads: i64,
    head_dim: i64,
    dropout: f64,
}

impl Attention {
    pub fn new(vs: nn::Path, d_model: usize, n_heads: usize, head_dim: usize, dropout: f64) -> Self {
        let inner = (n_heads * head_dim) as i64;
        Self {
            qkv: nn::linear(&vs / "qkv", d_model as i64, 3 * inner, Default::default()),
            out: nn::linear(&vs / "out", inner, d_model as i64, Default::default()),
            n_heads: n_heads as i64,
            head_dim: head_dim as i64,
            dropout,
        }
    }

    /// `x`: [B, n, d] for positions `start..start+n`. With a cache, this layer's keys and
    /// values are written and read as `keys` says. With `residual` [B, n, d], returns it plus
    /// the attention's output (added in the output product's epilogue on a CPU decode step).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: &Tensor,
        mask: &Mask,
        cache: Option<(&mut KvCache, usize)>,
        start: usize,
        train: bool,
        compute: Option<Kind>,
        keys: CacheUse,
        residual: Option<&Tensor>,
    ) -> Tensor {
        let (b, n, _) = x.size3().unwrap_or((0, 0, 0));
        // a decode step's products by the packed weights, when the cache holds them
        let packed = cache.as_ref().filter(|_| n == 1).and_then(|(c, l)| c.layer_panels(*l));
        let qkv = product(&self.qkv, packed.map(|p| &p[0]), x, compute);
        let inner = self.n_heads * self.head_dim;
        // a sparse layer's CPU decode step: the keys written and attended in one kernel
        if n == 1
            && matches!(keys, CacheUse::Written)
            && kernels::applies(qkv.device(), qkv.kind())
            && let (Some((c, layer)), Mask::Blocks(blocks)) = (cache.as_ref(), mask)
        {
            let (n_caption, positions, src) = kernel_keys(blocks, &c.caption_groups, b);
            let step = kernels::block_attention_step(
                &qkv.reshape([b, 3 * inner]),
                &c.kv[*layer],
                start,
                &positions,
                n_caption,
                &src,
            );
            if let Ok(y) = step {
                let packed = c.layer_panels(*layer);
                return product_add(&self.out, packed.map(|p| &p[1]), &y.view([b, n, inner]), residual, compute);
            }
        }
        let qkv = qkv.view([b, n, 3, self.n_heads, self.head_dim]).permute([2, 0, 3, 1, 4]);
        let q = qkv.get(0);
        let (k, v, groups, cache) = match cache {
            Some((c, layer)) => {
                let end = (start as i64) + n;
                // keys and values, [2, B, H, n, D], written with one copy
                let new_kv = qkv.narrow(0, 1, 2);
                let kv = &mut c.kv[layer];
                if let CacheUse::WholeAt(j, first) = keys {
                    let (first, len) = (first as i64, kv.size()[3]);
                    let _ = kv.narrow(3, first, len - first).index_copy_(3, j, &new_kv);
                } else {
                    kv.narrow(3, start as i64, n).copy_(&new_kv);
                }
                let (k, v) = if let CacheUse::Written = keys {
                    (kv.get(0).narrow(2, 0, end), kv.get(1).narrow(2, 0, end))
                } else {
                    (kv.get(0), kv.get(1))
                };
                let c: &KvCache = c;
                (k, v, c.caption_groups.as_slice(), Some((c, layer)))
            }
            None => (qkv.get(1), qkv.get(2), &[][..], None),
        };
        let p = if train { self.dropout } else { 0.0 };
        let sdpa = |m: Option<&Tensor>, causal: bool| {
            Tensor::scaled_dot_product_attention(&q, &k, &v, m, p, causal, None, false)
        };
        let y = match mask {
            Mask::None => sdpa(None, false),
            Mask::Causal => sdpa(None, true),
            Mask::Explicit(m) => sdpa(Some(m), false),
            // (a CPU f32 step took the kernel above)
            Mask::Blocks(blocks) => attend_blocks(&q, &k, &v, blocks, groups),
        };
        let y = y.transpose(1, 2).reshape([b, n, self.n_heads * self.head_dim]);
        let packed = cache.filter(|_| n == 1).and_then(|(c, l)| c.layer_panels(l));
        product_add(&self.out, packed.map(|p| &p[1]), &y, residual, compute)
    }
}
