//! Parameter counts computed from a config alone, without allocating a weight, so that the
//! paper's 12-billion-parameter configuration can be checked and described on any machine.
//! A test holds these formulas to the counts of real `VarStore`s.

use serde::Serialize;

use crate::config::Config;

/// Named parameter counts, in a stable order.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ParamCount {
    pub total: u64,
    pub transformer: u64,
    pub dvae: u64,
    /// Transformer parts: embeddings, attention, mlp, norms, heads.
    pub transformer_parts: Vec<(String, u64)>,
    /// dVAE parts: encoder, decoder.
    pub dvae_parts: Vec<(String, u64)>,
}

fn conv(i: u64, o: u64, k: u64) -> u64 {
    i * o * k * k + o
}

fn linear(i: u64, o: u64) -> u64 {
    i * o + o
}

fn res_block(n_in: u64, n_out: u64, kernels: [u64; 4]) -> u64 {
    let hid = (n_out / 4).max(1);
    let id = if n_in != n_out { conv(n_in, n_out, 1) } else { 0 };
    let dims = [(n_in, hid), (hid, hid), (hid, hid), (hid, n_out)];
    id + dims.iter().zip(kernels).map(|(&(a, b), k)| conv(a, b, k)).sum::<u64>()
}

fn dvae_groups(blocks_per_group: usize, first_in: u64, widths: &[u64], kernels: [u64; 4]) -> u64 {
    let mut width = first_in;
    let mut total = 0;
    for &w in widths {
        for b in 0..blocks_per_group {
            total += res_block(if b == 0 { width } else { w }, w, kernels);
        }
        width = w;
    }
    total
}

/// Counts every parameter the config describes.
pub fn count(cfg: &Config) -> ParamCount {
    let t = &cfg.transformer;
    let d = t.d_model as u64;
    let inner = t.inner_dim() as u64;
    let hidden = (t.d_model * t.mlp_ratio) as u64;
    let tl = cfg.text.text_len as u64;
    let tv = cfg.text.vocab_size as u64;
    let vi = cfg.dvae.vocab_size as u64;
    let g = cfg.grid_size() as u64;
    let layers = t.n_layers as u64;

    let embeddings = (tv + tl + 1) * d + (tl + 1) * d + vi * d + 2 * g * d;
    let attention = layers * (linear(d, 3 * inner) + linear(inner, d));
    let mlp = layers * (linear(d, hidden) + linear(hidden, d));
    let norms = (2 * layers + 1) * 2 * d;
    let heads = linear(d, tv + tl) + linear(d, vi);
    let transformer = embeddings + attention + mlp + norms + heads;

    let dv = &cfg.dvae;
    let n = dv.hidden as u64;
    let widths: Vec<u64> = (0..dv.groups).map(|i| dv.group_width(i) as u64).collect();
    let last = *widths.last().unwrap_or(&n);
    let encoder = conv(3, n, 7) + dvae_groups(dv.blocks_per_group, n, &widths, [3, 3, 3, 1]) + conv(last, vi, 1);
    let rev: Vec<u64> = (0..dv.groups).rev().map(|i| dv.dec_group_width(i) as u64).collect();
    let dn = dv.dec_hidden() as u64;
    let decoder = conv(vi, dv.n_init as u64, 1)
        + dvae_groups(dv.dec_blocks_per_group(), dv.n_init as u64, &rev, [1, 3, 3, 3])
        + conv(dn, 6, 1);
    let dvae = encoder + decoder;

    ParamCount {
        total: transformer + dvae,
        transformer,
        dvae,
        transformer_parts: vec![
            ("embeddings".into(), embeddings),
            ("attention".into(), attention),
            ("mlp".into(), mlp),
            ("norms".into(), norms),
            ("heads".into(), heads),
        ],
        dvae_parts: vec![("encoder".into(), encoder), ("decoder".into(), decoder)],
    }
}

/// Parameters of the reranker ([`crate::clip::Reranker`]), counted from the config.
pub fn reranker_count(cfg: &Config) -> u64 {
    let r = &cfg.reranker;
    let (w, e, iw) = (r.text_width as u64, r.embed_dim as u64, r.image_width as u64);
    let block = 2 * 2 * w + linear(w, 3 * w) + linear(w, w) + linear(w, 4 * w) + linear(4 * w, w);
    let text = (cfg.text.vocab_size as u64 + 1) * w
        + cfg.text.text_len as u64 * w
        + r.text_layers as u64 * block
        + 2 * w
        + linear(w, e);
    let chans = [3, iw, 2 * iw, 4 * iw, 4 * iw];
    let convs: u64 = (0..4).map(|i| chans[i] * chans[i + 1] * 9 + chans[i + 1]).sum();
    let side = (cfg.dvae.image_size as u64 / 16).max(1);
    text + convs + linear(4 * iw * side * side, e) + 1
}

/// Forward FLOPs per sequence of the transformer, counting every matrix product
/// (2 per multiply-add) and dense attention scores over the whole stream.
pub fn transformer_forward_flops(cfg: &Config) -> f64 {
    let t = &cfg.transformer;
    let (d, inner) = (t.d_model as f64, t.inner_dim() as f64);
    let hidden = (t.d_model * t.mlp_ratio) as f64;
    let l = cfg.seq_len() as f64;
    let tl = cfg.text.text_len as f64;
    let per_token = 2.0 * (d * 3.0 * inner + inner * d + 2.0 * d * hidden);
    let attn = 2.0 * 2.0 * l * l * inner;
    let heads =
        2.0 * d * (tl * (cfg.text.vocab_size as f64 + tl) + cfg.image_len() as f64 * cfg.dvae.vocab_size as f64);
    t.n_layers as f64 * (per_token * l + attn) + heads
}
