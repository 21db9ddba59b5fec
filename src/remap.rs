//! Carrying a transformer over to a new dVAE's codes.
//!
//! A transformer knows its image tokens only through three tensors: the image token
//! embedding, and the rows and biases of the image head. When a model gets a new dVAE (a
//! better encoder), its codes mean other things and the transformer must relearn them; but
//! most of what each new code stands for is what some old codes stood for. Encoding the same
//! pictures with both dVAEs and counting, at each grid cell, which old code `i` each new
//! code `j` meets gives `P(i | j)` and `P(j | i)`; then
//! - the embedding of `j` is `Σ_i P(i|j) · emb_i` (the old inputs it replaces), and
//! - the head row of `j` is `Σ_i P(i|j) · (w_i, b_i + ln P(j|i))`: the old logit of what it
//!   stands for, split among the new codes that share that old code.
//!
//! A new code that never appears in the pictures keeps the mean embedding and a bias below
//! every other code's. The two codebooks may differ in size (a split codebook,
//! [`crate::dvae::split_codebook`]: each new code meets one old code, and the transformer's
//! predictions of the old codes carry over exactly). When the two dVAEs agree up to a renaming of their codes, the
//! transformer's predictions are carried over exactly (tested); when they differ, training
//! starts from far nearer than a transformer that sees every code as new.

use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::model::{DvaeModel, TransformerModel};

/// Pictures encoded by both dVAEs: 2,048 pictures of a 16×16 grid are half a million cells, a
/// thousand for each of 512 codes.
pub const REMAP_PICTURES: usize = 2048;

/// What a remapping found.
#[derive(Debug, Clone, PartialEq)]
pub struct CodeRemap {
    /// Grid cells counted (pictures × cells per picture).
    pub cells: usize,
    /// New codes met at least once (the others got the mean embedding and a low bias).
    pub seen: usize,
    pub vocab: usize,
    /// The share of cells where the new code's most frequent old code is the one there: 1 when
    /// the old codes can be read off the new ones.
    pub agreement: f64,
}

impl std::fmt::Display for CodeRemap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of {} new codes met in {} grid cells; a new code's most frequent old code is the one there in {:.1}% of cells",
            self.seen,
            self.vocab,
            self.cells,
            100.0 * self.agreement
        )
    }
}

/// The co-occurrence counts `[new vocab, old vocab]` of two code grids of the same pictures.
pub fn cooccurrence(new_codes: &Tensor, old_codes: &Tensor, new_vocab: i64, old_vocab: i64) -> Result<Tensor> {
    if new_codes.size() != old_codes.size() {
        return Err(Error::Invalid(format!(
            "the two dVAEs' code grids differ in shape ({:?} and {:?}): codes can be carried over only between dVAEs of the same grid",
            new_codes.size(),
            old_codes.size()
        )));
    }
    let pairs =
        new_codes.to_kind(Kind::Int64).flatten(0, -1) * old_vocab + old_codes.to_kind(Kind::Int64).flatten(0, -1);
    Ok(pairs.bincount::<Tensor>(None, new_vocab * old_vocab).view([new_vocab, old_vocab]).to_kind(Kind::Double))
}

/// The image embedding, head rows and head biases of the new codes (f64) from the old codes'
/// (`emb` [V_old, d], `head_w` [V_old, d], `head_b` [V_old]) and the co-occurrence `counts`
/// [V_new, V_old] (see the module's text).
pub fn carried_rows(counts: &Tensor, emb: &Tensor, head_w: &Tensor, head_b: &Tensor) -> (Tensor, Tensor, Tensor) {
    let to = |t: &Tensor| t.to_kind(Kind::Double);
    let counts = to(counts);
    let per_new = counts.sum_dim_intlist(1, true, Kind::Double); // [V_new, 1]
    let per_old = counts.sum_dim_intlist(0, true, Kind::Double); // [1, V_old]
    let old_given_new = &counts / per_new.clamp_min(f64::MIN_POSITIVE); // rows of met codes sum to 1
    let new_given_old = &counts / per_old.clamp_min(f64::MIN_POSITIVE);
    let met = per_new.gt(0.0); // [V_new, 1]
    let n_met = met.sum(Kind::Double);
    let mean_of_met = |rows: &Tensor| rows.sum_dim_intlist(0, true, Kind::Double) / &n_met;
    let new_emb = old_given_new.matmul(&to(emb));
    let new_emb = new_emb.where_self(&met, &mean_of_met(&new_emb));
    let new_w = old_given_new.matmul(&to(head_w));
    let new_w = new_w.where_self(&met, &mean_of_met(&new_w));
    // ln P(j|i) only where the pair was met (elsewhere P(i|j) = 0 weighs it out)
    let log_split = new_given_old.clamp_min(f64::MIN_POSITIVE).log();
    let new_b = (&old_given_new * (to(head_b).unsqueeze(0) + log_split)).sum_dim_intlist(1, false, Kind::Double);
    let met = met.squeeze_dim(1);
    let floor = new_b.masked_select(&met).min() - 10.0;
    let new_b = new_b.where_self(&met, &floor);
    (new_emb, new_w, new_b)
}

/// The co-occurrence counts of `new`'s codes against `old`'s on `images` ([B, 3, H, W] in
/// [0, 1]); counts of several batches add up.
pub fn count_codes(old: &DvaeModel, new: &DvaeModel, images: &Tensor) -> Result<Tensor> {
    let (old_codes, new_codes) = tch::no_grad(|| (old.net.encode(images), new.net.encode(images)));
    cooccurrence(&new_codes, &old_codes, new.net.cfg().vocab_size as i64, old.net.cfg().vocab_size as i64)
}

/// Gives `to` the weights of `from`, a transformer trained on the old dVAE's codes, with its
/// image embedding and image head rewritten for the new dVAE's codes from their co-occurrence
/// `counts` [V_new, V_old] ([`count_codes`]). `to` has `from`'s shapes except for its image
/// vocabulary, V_new; the two may be one model (the same codebook size).
pub fn remap_image_codes(from: &TransformerModel, to: &TransformerModel, counts: &Tensor) -> Result<CodeRemap> {
    const IMAGE_ROWS: [&str; 3] = ["image_emb.weight", "image_head.weight", "image_head.bias"];
    let (old_vars, new_vars) = (from.vs.variables(), to.vs.variables());
    let get = |vars: &std::collections::HashMap<String, Tensor>, name: &str| {
        vars.get(name)
            .map(Tensor::shallow_clone)
            .ok_or_else(|| Error::Invalid(format!("the transformer has no tensor {name}")))
    };
    let (emb, head_w, head_b) =
        (get(&old_vars, IMAGE_ROWS[0])?, get(&old_vars, IMAGE_ROWS[1])?, get(&old_vars, IMAGE_ROWS[2])?);
    let (vocab, to_vocab) = (emb.size()[0], get(&new_vars, IMAGE_ROWS[0])?.size()[0]);
    let (new_vocab, old_vocab) = (counts.size()[0], counts.size()[1]);
    if old_vocab != vocab || new_vocab != to_vocab {
        return Err(Error::Invalid(format!(
            "the transformer has {vocab} image tokens and is carried over to {to_vocab}, but the old dVAE has {old_vocab} codes and the new one {new_vocab}"
        )));
    }
    let cells = counts.sum(Kind::Double).double_value(&[]);
    let seen = counts.sum_dim_intlist(1, false, Kind::Double).gt(0.0).sum(Kind::Int64).int64_value(&[]);
    if seen == 0 {
        return Err(Error::Invalid("no pictures to carry the codes over with".into()));
    }
    let agreement = counts.amax([1].as_slice(), false).sum(Kind::Double).double_value(&[]) / cells;
    tch::no_grad(|| {
        let (new_emb, new_w, new_b) = carried_rows(&counts.to_device(emb.device()), &emb, &head_w, &head_b);
        let carried: std::collections::HashMap<&str, Tensor> =
            IMAGE_ROWS.into_iter().zip([new_emb, new_w, new_b]).collect();
        for (name, var) in &new_vars {
            let value = match carried.get(name.as_str()) {
                Some(v) => v.shallow_clone(),
                None => get(&old_vars, name)?,
            };
            if value.size() != var.size() {
                return Err(Error::Invalid(format!(
                    "{name}: the carried transformer's {:?} does not fit into {:?}",
                    value.size(),
                    var.size()
                )));
            }
            let mut v = var.shallow_clone();
            v.copy_(&value.to_kind(var.kind()));
        }
        Ok(())
    })?;
    Ok(CodeRemap { cells: cells as usize, seen: seen as usize, vocab: to_vocab as usize, agreement })
}
