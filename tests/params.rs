//! Parameter counts computed from the config against real weights.

use tch::Device;
use tessera::model::{DvaeModel, TransformerModel};
use tessera::{Config, params};

fn real(cfg: &Config) -> (u64, u64) {
    let count = |vs: &tch::nn::VarStore| vs.variables().values().map(|t| t.numel() as u64).sum::<u64>();
    let d = DvaeModel::new(cfg, Device::Cpu);
    let t = TransformerModel::new(cfg, Device::Cpu);
    (count(&t.vs), count(&d.vs))
}

#[test]
fn formula_matches_allocated_weights() {
    for cfg in [Config::tiny(), Config::s(), Config::p()] {
        let c = params::count(&cfg);
        let (t, d) = real(&cfg);
        assert_eq!(c.transformer, t, "{}: transformer", cfg.name);
        assert_eq!(c.dvae, d, "{}: dvae", cfg.name);
        assert_eq!(c.total, t + d);
        assert_eq!(c.transformer_parts.iter().map(|p| p.1).sum::<u64>(), t);
    }
}

#[test]
fn reranker_formula_matches_allocated_weights() {
    for cfg in [Config::tiny(), Config::s(), Config::p(), Config::default_model()] {
        let r = tessera::model::RerankerModel::new(&cfg, Device::Cpu);
        let real = r.vs.variables().values().map(|t| t.numel() as u64).sum::<u64>();
        assert_eq!(params::reranker_count(&cfg), real, "{}: reranker", cfg.name);
    }
}

#[test]
fn paper_preset_has_twelve_billion_parameters() {
    let cfg = Config::dalle_12b();
    assert_eq!((cfg.transformer.n_layers, cfg.transformer.n_heads, cfg.transformer.head_dim), (64, 62, 64));
    assert_eq!((cfg.text.text_len, cfg.image_len(), cfg.grid_size()), (256, 1024, 32));
    let c = params::count(&cfg);
    let rel = (c.transformer as f64 - 12e9).abs() / 12e9;
    assert!(rel < 0.05, "transformer has {} parameters", c.transformer);
}
