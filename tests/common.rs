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

/// A tiny model with a reranker, randomly initialised from `seed`, saved in `dir`.
pub fn saved_tiny_model(dir: &std::path::Path, seed: i64) -> std::path::PathBuf {
    let cfg = Config::tiny();
    let mut m = Model::random_init(&cfg, Device::Cpu, seed).expect("tiny model");
    m.reranker = Some(tessera::model::RerankerModel::new(&cfg, Device::Cpu));
    m.save(dir).expect("save");
    dir.to_path_buf()
}

/// Generation parameters of a sample drawn with `seed` for `prompt`.
pub fn sample_params(prompt: &str, seed: u64) -> tessera::store::SampleParams {
    tessera::store::SampleParams {
        prompt: prompt.into(),
        seed,
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        guidance: 1.0,
        n: 4,
        keep: 2,
        model: "test".into(),
        score: Some(0.5),
        kept_tokens: 0,
    }
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

static CPU: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// Held by tests that load the CPU for many seconds: they may run together, but not beside a
/// test that holds [`exclusive_cpu`].
pub fn heavy_cpu() -> std::sync::RwLockReadGuard<'static, ()> {
    CPU.read().unwrap_or_else(|e| e.into_inner())
}

/// Held by a test whose subject is time (a run that must keep to its budget): no heavy test
/// runs beside it on these two cores.
pub fn exclusive_cpu() -> std::sync::RwLockWriteGuard<'static, ()> {
    CPU.write().unwrap_or_else(|e| e.into_inner())
}
