use tch::{Device, Kind, Tensor};
use tessera::{AttentionKind, AttentionPattern, Config, Model};

/// The tiny preset with every layer using `kind` (or the paper's rule when `None`).
pub fn tiny_with(kind: Option<AttentionKind>) -> Config {
    let mut cfg = Config::tiny();
    if let Some(k) = kind {
        cfg.transformer.attention = AttentionPattern::Layers(vec![k; cfg.transformer.n_layers]);
    }
    cfg
}

pub fn tiny_model(kind: Option<AttentionKind>, seed: i64) -> Model {
    Model::random_init(&tiny_with(kind), Device::Cpu, seed).expect("tiny model")
}

/// Random captions [B, T] (some slots padded) and image tokens [B, I].
pub fn random_batch(model: &Model, b: usize, seed: i64) -> (Tensor, Tensor) {
    tch::manual_seed(seed);
    let cfg = &model.config;
    let tv = 200i64; // below the tokenizer's vocabulary
    let caps: Vec<Vec<i64>> = (0..b)
        .map(|i| {
            let len = 1 + (i * 3) % cfg.text.text_len;
            Vec::<i64>::try_from(Tensor::randint(tv, [len as i64], (Kind::Int64, Device::Cpu))).unwrap()
        })
        .collect();
    let text = model.transformer.net.pad_text(&caps);
    let image =
        Tensor::randint(cfg.dvae.vocab_size as i64, [b as i64, cfg.image_len() as i64], (Kind::Int64, Device::Cpu));
    (text, image)
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}
