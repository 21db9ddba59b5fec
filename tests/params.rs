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

#[test]
fn settings_change_a_preset_and_reject_what_it_does_not_have() {
    let base = Config::preset("default").unwrap();
    let cfg = base
        .with_settings(&["dvae.vocab_size=2048".into(), "name=wide".into(), "text.bpe_dropout=0.05".into()])
        .unwrap();
    assert_eq!(cfg.dvae.vocab_size, 2048);
    assert_eq!(cfg.name, "wide");
    assert!((cfg.text.bpe_dropout - 0.05).abs() < 1e-7);
    // everything else is the preset's
    let mut back = cfg.clone();
    back.dvae.vocab_size = base.dvae.vocab_size;
    back.name = base.name.clone();
    back.text.bpe_dropout = base.text.bpe_dropout;
    assert_eq!(back, base);
    // the larger codebook is in the weights the formula counts
    assert!(params::count(&cfg).dvae > params::count(&base).dvae);
    // a section the preset leaves out (plain sampling) is set key by key, its other keys default
    let warm = base.with_settings(&["sampling.temperature=0.9".into()]).unwrap();
    assert_eq!(warm.sampling.temperature, 0.9);
    assert_eq!(warm.sampling.top_k, tessera::SampleOptions::default().top_k);
    // an optional setting set and then cleared
    let grown = base.with_settings(&["dvae.decoder_hidden=96".into()]).unwrap();
    assert_eq!(grown.dvae.decoder_hidden, Some(96));
    let cleared = grown.with_settings(&["dvae.decoder_hidden=null".into()]).unwrap();
    assert_eq!(cleared, base);
    for bad in [
        "dvae.vocab_sise=2048",
        "dvae.vocab_size",
        "dvae.vocab_size=many",
        "nosuch.x=1",
        "dvae.image_size=65",
        "sampling.temprature=0.9",
        "dvae.hidden.x=1",
        "dvae.nosuch=null",
        "dvae.hidden=null",
    ] {
        let e = base.with_settings(&[bad.to_string()]).unwrap_err().to_string();
        let key = bad.split('=').next().unwrap_or(bad);
        assert!(e.contains(key) || e.contains("image_size 65"), "{bad}: {e}");
    }
}
