//! The reranker: a small CLIP-style contrastive model [P 2.6; Radford et al. 2021] that scores
//! how well an image matches a caption, used to keep the best K of N samples.
//!
//! Text: token and position embeddings, a few pre-norm transformer blocks, the mean over the
//! caption's tokens, a projection. Image: a strided convolutional stack whose final feature map
//! is flattened (not pooled, so where things are survives), a projection. Both embeddings are
//! normalised; the score is their cosine times a learned temperature.

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use crate::attention::{Attention, CacheUse, Mask};

/// Shape of the reranker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RerankerConfig {
    pub embed_dim: usize,
    pub text_width: usize,
    pub text_layers: usize,
    pub text_heads: usize,
    /// Channels of the first convolution; each of the four stride-2 stages doubles them up to 4×.
    pub image_width: usize,
    /// Residual blocks (two 3×3 convolutions at the stage's resolution) after each of the four
    /// stride-2 stages: more depth before each halving (tried in the twenty-first session: no
    /// better ordering of samples within 450 steps). 0 (the default, and every reranker before
    /// this setting): the plain strided stack. A new block's
    /// second convolution starts at zero, so a reranker grown from one with fewer blocks
    /// ([`grow_image_blocks`]) scores exactly as it did until it trains.
    pub image_blocks: usize,
}

impl Default for RerankerConfig {
    fn default() -> Self {
        Self { embed_dim: 128, text_width: 128, text_layers: 2, text_heads: 4, image_width: 32, image_blocks: 0 }
    }
}

#[derive(Debug)]
struct TextBlock {
    ln1: nn::LayerNorm,
    attn: Attention,
    ln2: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
}

/// The contrastive image–text model.
#[derive(Debug)]
pub struct Reranker {
    tok_emb: nn::Embedding,
    pos_emb: nn::Embedding,
    blocks: Vec<TextBlock>,
    ln: nn::LayerNorm,
    text_proj: nn::Linear,
    convs: Vec<nn::Conv2D>,
    /// `image_blocks` residual blocks (first, second convolution) per stage.
    image_blocks: Vec<Vec<(nn::Conv2D, nn::Conv2D)>>,
    image_proj: nn::Linear,
    logit_scale: Tensor,
    pad_id: i64,
    text_len: usize,
}

impl Reranker {
    /// `vocab`: caption vocabulary (one more id is used for padding); `image_size`: pixels.
    pub fn new(vs: nn::Path, cfg: &RerankerConfig, vocab: usize, text_len: usize, image_size: usize) -> Self {
        let w = cfg.text_width as i64;
        let blocks = (0..cfg.text_layers)
            .map(|i| {
                let p = &vs / "text" / "blocks" / i;
                TextBlock {
                    ln1: nn::layer_norm(&p / "ln1", vec![w], Default::default()),
                    attn: Attention::new(
                        &p / "attn",
                        cfg.text_width,
                        cfg.text_heads,
                        cfg.text_width / cfg.text_heads,
                        0.0,
                    ),
                    ln2: nn::layer_norm(&p / "ln2", vec![w], Default::default()),
                    fc1: nn::linear(&p / "fc1", w, 4 * w, Default::default()),
                    fc2: nn::linear(&p / "fc2", 4 * w, w, Default::default()),
                }
            })
            .collect();
        let iw = cfg.image_width as i64;
        let chans = [3, iw, 2 * iw, 4 * iw, 4 * iw];
        let conv_cfg = nn::ConvConfig { stride: 2, padding: 1, ..Default::default() };
        let convs =
            (0..4).map(|i| nn::conv2d(&vs / "image" / "convs" / i, chans[i], chans[i + 1], 3, conv_cfg)).collect();
        let same = nn::ConvConfig { stride: 1, padding: 1, ..Default::default() };
        let zero = nn::ConvConfig { ws_init: nn::Init::Const(0.0), bs_init: nn::Init::Const(0.0), ..same };
        let image_blocks = (0..4)
            .map(|i| {
                (0..cfg.image_blocks)
                    .map(|j| {
                        let p = &vs / "image" / "blocks" / i / j;
                        let c = chans[i + 1];
                        (nn::conv2d(&p / "conv1", c, c, 3, same), nn::conv2d(&p / "conv2", c, c, 3, zero))
                    })
                    .collect()
            })
            .collect();
        let side = (image_size / 16).max(1) as i64;
        let e = cfg.embed_dim as i64;
        Self {
            tok_emb: nn::embedding(&vs / "text" / "tok_emb", vocab as i64 + 1, w, Default::default()),
            pos_emb: nn::embedding(&vs / "text" / "pos_emb", text_len as i64, w, Default::default()),
            blocks,
            ln: nn::layer_norm(&vs / "text" / "ln", vec![w], Default::default()),
            text_proj: nn::linear(&vs / "text" / "proj", w, e, Default::default()),
            convs,
            image_blocks,
            image_proj: nn::linear(&vs / "image" / "proj", 4 * iw * side * side, e, Default::default()),
            logit_scale: vs.var("logit_scale", &[], nn::Init::Const((1.0f64 / 0.07).ln())),
            pad_id: vocab as i64,
            text_len,
        }
    }

    /// Caption ids (each at most `text_len`) as a padded batch [B, T] and its validity mask.
    pub fn batch_text(&self, captions: &[Vec<i64>], device: tch::Device) -> (Tensor, Tensor) {
        let mut ids = Vec::with_capacity(captions.len() * self.text_len);
        for c in captions {
            for i in 0..self.text_len {
                ids.push(c.get(i).copied().unwrap_or(self.pad_id));
            }
        }
        let ids = Tensor::from_slice(&ids).view([captions.len() as i64, self.text_len as i64]).to_device(device);
        let valid = ids.ne(self.pad_id);
        (ids, valid)
    }

    /// Normalised text embeddings [B, E].
    pub fn encode_text(&self, ids: &Tensor, valid: &Tensor) -> Tensor {
        let t = self.text_len as i64;
        let pos = Tensor::arange(t, (Kind::Int64, ids.device()));
        let mut x = self.tok_emb.forward(ids) + self.pos_emb.forward(&pos).unsqueeze(0);
        // every token sees every real token of its caption
        let b = ids.size()[0];
        let mask = Mask::Explicit(valid.view([b, 1, 1, t]));
        for blk in &self.blocks {
            x = blk.attn.forward(&blk.ln1.forward(&x), &mask, None, 0, false, None, CacheUse::Written, Some(&x));
            x = &x + blk.fc2.forward(&blk.fc1.forward(&blk.ln2.forward(&x)).gelu("none"));
        }
        let x = self.ln.forward(&x);
        let m = valid.to_kind(Kind::Float).unsqueeze(-1);
        let pooled =
            (x * &m).sum_dim_intlist(1, false, Kind::Float) / m.sum_dim_intlist(1, false, Kind::Float).clamp_min(1.0);
        let e = self.text_proj.forward(&pooled);
        &e / e.norm_scalaropt_dim(2, [-1], true).clamp_min(1e-6)
    }

    /// Normalised image embeddings [B, E] of images [B, 3, H, W] in [0, 1].
    pub fn encode_image(&self, images: &Tensor) -> Tensor {
        let mut h = images * 2.0 - 1.0;
        for (c, blocks) in self.convs.iter().zip(&self.image_blocks) {
            h = c.forward(&h).relu();
            for (c1, c2) in blocks {
                h = (&h + c2.forward(&c1.forward(&h).relu())).relu();
            }
        }
        let e = self.image_proj.forward(&h.flatten(1, -1));
        &e / e.norm_scalaropt_dim(2, [-1], true).clamp_min(1e-6)
    }

    /// The learned inverse temperature, capped at 100 as in CLIP.
    pub fn scale(&self) -> Tensor {
        self.logit_scale.exp().clamp_max(100.0)
    }

    /// Symmetric contrastive loss of a batch of matching images and captions.
    pub fn loss(&self, images: &Tensor, ids: &Tensor, valid: &Tensor) -> Tensor {
        self.paired_loss(&self.encode_image(images), &self.encode_text(ids, valid), None, None)
    }

    /// The symmetric loss of embedded pairs, with further logits [B, K] on either side:
    /// `image_extra` (each image against more captions), `text_extra` (each caption against
    /// more images).
    fn paired_loss(
        &self,
        img: &Tensor,
        txt: &Tensor,
        image_extra: Option<Tensor>,
        text_extra: Option<Tensor>,
    ) -> Tensor {
        let logits = img.matmul(&txt.tr()) * self.scale();
        let target = Tensor::arange(logits.size()[0], (Kind::Int64, logits.device()));
        let widen = |l: Tensor, e: Option<Tensor>| match e {
            Some(e) => Tensor::cat(&[&l, &e], 1),
            None => l,
        };
        let image_side = widen(logits.shallow_clone(), image_extra);
        let text_side = widen(logits.tr(), text_extra);
        (image_side.cross_entropy_for_logits(&target) + text_side.cross_entropy_for_logits(&target)) / 2.0
    }

    /// Logits [B, k] of each embedded `own` row against its `k` hard negatives (`other`
    /// [M·k, D] for the last M ≤ B rows, row b's at (b − B + M)·k.., embedded only when k > 0:
    /// the first B − M rows have none); `real` [B, k] false where a row is missing, left out.
    fn hard_logits(&self, own: &Tensor, other: impl FnOnce() -> Tensor, real: &Tensor) -> Option<Tensor> {
        let (b, k) = (own.size()[0], real.size().get(1).copied().unwrap_or(0));
        if k == 0 {
            return None;
        }
        let other = other();
        let m = other.size()[0] / k;
        let own = own.narrow(0, b - m, m);
        let hard = (own.unsqueeze(1) * other.view([m, k, -1])).sum_dim_intlist(-1, false, Kind::Float) * self.scale();
        let hard = if m < b {
            Tensor::cat(&[Tensor::full([b - m, k], f64::NEG_INFINITY, (Kind::Float, hard.device())), hard], 0)
        } else {
            hard
        };
        Some(hard.masked_fill(&real.logical_not(), f64::NEG_INFINITY))
    }

    /// CLIP's loss of the pairs (`images`, captions `ids`) with hard negatives of both kinds:
    /// `captions` = (ids [B·k, T], valid, real [B, k]), `k` contrasting captions per image
    /// (image b's at rows b·k..(b+1)·k; false in `real` where a picture had fewer, left out),
    /// that each image must score below its own caption; `pictures` = (images [M·k', 3, H, W],
    /// real [B, k']), `k'` contrasting pictures per caption for the last M ≤ B captions (the
    /// first B − M have none; their rows of `real` are false) that each caption must score
    /// below its own picture. With neither (or k = k' = 0) it is [`Self::loss`].
    pub fn loss_with_all_contrasts(
        &self,
        images: &Tensor,
        ids: &Tensor,
        valid: &Tensor,
        captions: Option<(&Tensor, &Tensor, &Tensor)>,
        pictures: Option<(&Tensor, &Tensor)>,
    ) -> Tensor {
        let img = self.encode_image(images);
        let txt = self.encode_text(ids, valid);
        let image_extra = captions.and_then(|(c, v, real)| self.hard_logits(&img, || self.encode_text(c, v), real));
        let text_extra = pictures.and_then(|(p, real)| self.hard_logits(&txt, || self.encode_image(p), real));
        self.paired_loss(&img, &txt, image_extra, text_extra)
    }

    /// The contrastive loss with `k` contrasting pictures per caption (`contrast_images`
    /// [B·k, 3, H, W], caption b's at rows b·k..(b+1)·k: scenes that differ from b's in one
    /// detail the caption names; `real` [B, k]: false where a row is missing, left out): each
    /// caption must pick its image among the batch's and its own contrasts, each image its
    /// caption among the batch's. `k` = 0 is [`Self::loss`].
    pub fn loss_with_image_contrasts(
        &self,
        images: &Tensor,
        ids: &Tensor,
        valid: &Tensor,
        contrast_images: &Tensor,
        real: &Tensor,
    ) -> Tensor {
        self.loss_with_all_contrasts(images, ids, valid, None, Some((contrast_images, real)))
    }

    /// The contrastive loss with `k` contrasting captions per image (`contrast_ids` [B·k, T],
    /// image b's at rows b·k..(b+1)·k; `real` [B, k]: false where a picture had fewer than k, so
    /// that row is left out): each image must pick its caption among the batch's and its own
    /// contrasts, each caption its image among the batch's. `k` = 0 is [`Self::loss`].
    pub fn loss_with_contrasts(
        &self,
        images: &Tensor,
        ids: &Tensor,
        valid: &Tensor,
        contrast_ids: &Tensor,
        contrast_valid: &Tensor,
        real: &Tensor,
    ) -> Tensor {
        self.loss_with_all_contrasts(images, ids, valid, Some((contrast_ids, contrast_valid, real)), None)
    }

    /// Scores of images [N, 3, H, W] against one caption: cosine similarity × temperature.
    pub fn score(&self, images: &Tensor, caption: &[i64]) -> Tensor {
        let (ids, valid) = self.batch_text(&[caption.to_vec()], images.device());
        let txt = self.encode_text(&ids, &valid);
        self.encode_image(images).matmul(&txt.tr()).squeeze_dim(1) * self.scale()
    }
}

/// How many residual blocks per image stage a reranker's weight names hold (0 for the plain
/// strided stack), or `None` when they are not a reranker's.
pub fn image_blocks_of<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<usize> {
    let mut is_reranker = false;
    let mut blocks = 0;
    for n in names {
        is_reranker |= n.starts_with("image.convs.");
        if let Some(rest) = n.strip_prefix("image.blocks.") {
            let j = rest.split('.').nth(1).and_then(|j| j.parse::<usize>().ok())?;
            blocks = blocks.max(j + 1);
        }
    }
    is_reranker.then_some(blocks)
}

/// Copies a reranker with fewer image blocks per stage (`from`, `from_cfg`) into `to` (`to_cfg`):
/// every tensor they share by name, copied; the added blocks keep their initialisation, whose
/// second convolution is zero, so `to` scores every picture and caption as `from` does.
pub fn grow_image_blocks(
    from: &nn::VarStore,
    from_cfg: &RerankerConfig,
    to: &nn::VarStore,
    to_cfg: &RerankerConfig,
) -> Result<(), String> {
    if (RerankerConfig { image_blocks: to_cfg.image_blocks, ..from_cfg.clone() }) != *to_cfg {
        return Err("growing a reranker's image stages keeps everything else of it as it is".into());
    }
    if to_cfg.image_blocks < from_cfg.image_blocks {
        return Err(format!(
            "a reranker's image stages can grow, not shrink: it has {} blocks per stage, asked for {}",
            from_cfg.image_blocks, to_cfg.image_blocks
        ));
    }
    let (old, new) = (from.variables(), to.variables());
    tch::no_grad(|| {
        for (name, var) in &new {
            match old.get(name) {
                Some(o) => {
                    let mut var = var.shallow_clone();
                    var.f_copy_(o).map_err(|e| format!("{name}: {e}"))?;
                }
                None if name.starts_with("image.blocks.") => {}
                None => return Err(format!("{name} is missing from the smaller reranker")),
            }
        }
        Ok(())
    })
}
