//! Saving and loading model directories, and clear errors for bad ones.

use std::path::Path;

use tch::Device;
use tessera::model::{DVAE_FILE, TRANSFORMER_FILE};
use tessera::{Error, Model};

use crate::common::{random_batch, tiny_model};

fn saved_tiny(dir: &Path) -> Model {
    let model = tiny_model(None, 21);
    model.save(dir).unwrap();
    model
}

#[test]
fn saved_then_loaded_model_gives_identical_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let a = saved_tiny(dir.path());
    let b = Model::load(dir.path(), Device::Cpu).unwrap();
    assert_eq!(a.config, b.config);
    let (text, image) = random_batch(&a, 2, 3);
    let (ta, ia) = tch::no_grad(|| a.transformer.net.forward(&text, &image, false));
    let (tb, ib) = tch::no_grad(|| b.transformer.net.forward(&text, &image, false));
    assert!(ta.equal(&tb) && ia.equal(&ib), "transformer outputs differ after a round trip");
    let g = a.config.grid_size() as i64;
    let codes = image.view([-1, g, g]);
    assert!(a.dvae.net.decode(&codes).equal(&b.dvae.net.decode(&codes)), "dVAE outputs differ");
    let p = "A Small Red Circle";
    assert_eq!(a.encode_prompt(p).unwrap(), b.encode_prompt(p).unwrap());
    let opts = tessera::SampleOptions::default();
    let sa = a.generate(p, 2, 5, None, &opts, |_| true).unwrap();
    let sb = b.generate(p, 2, 5, None, &opts, |_| true).unwrap();
    assert_eq!(sa[1].tokens, sb[1].tokens);
    assert_eq!(sa[1].rgb, sb[1].rgb);
}

fn load_err(dir: &Path) -> String {
    match Model::load(dir, Device::Cpu) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn corrupt_or_truncated_weights_are_named() {
    let dir = tempfile::tempdir().unwrap();
    saved_tiny(dir.path());
    let path = dir.path().join(TRANSFORMER_FILE);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let msg = load_err(dir.path());
    assert!(msg.contains(TRANSFORMER_FILE) && msg.contains("corrupt or truncated"), "{msg}");
    std::fs::write(&path, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}").unwrap();
    let msg = load_err(dir.path());
    assert!(msg.contains("corrupt or truncated"), "{msg}");
    std::fs::remove_file(&path).unwrap();
    let msg = load_err(dir.path());
    assert!(msg.contains(TRANSFORMER_FILE), "{msg}");
}

#[test]
fn weights_that_do_not_match_the_config_are_named() {
    let dir = tempfile::tempdir().unwrap();
    saved_tiny(dir.path());
    let cfg_path = dir.path().join("config.json");
    let mut cfg = Model::load_config(dir.path()).unwrap();
    cfg.transformer.d_model = 48;
    std::fs::write(&cfg_path, serde_json::to_string(&cfg).unwrap()).unwrap();
    let msg = load_err(dir.path());
    assert!(msg.contains("do not match the config") && msg.contains("shape"), "{msg}");

    cfg.transformer.d_model = 32;
    cfg.transformer.n_layers = 5;
    cfg.dvae.blocks_per_group = 1;
    std::fs::write(&cfg_path, serde_json::to_string(&cfg).unwrap()).unwrap();
    let msg = load_err(dir.path());
    assert!(msg.contains("missing tensor blocks.4"), "{msg}");

    std::fs::write(&cfg_path, "{ \"transformer\": { \"n_layers\": \"many\" } }").unwrap();
    let msg = load_err(dir.path());
    assert!(msg.contains("config.json") && msg.contains("not a valid config"), "{msg}");
}

#[test]
fn dvae_file_from_another_model_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    saved_tiny(dir.path());
    // a dVAE of another width in the place of this one
    let mut other = tessera::Config::tiny();
    other.dvae.hidden = 12;
    let m = tessera::model::DvaeModel::new(&other, Device::Cpu);
    tessera::io::save_varstore(&m.vs, &dir.path().join(DVAE_FILE)).unwrap();
    let msg = load_err(dir.path());
    assert!(msg.contains(DVAE_FILE) && msg.contains("shape"), "{msg}");
    assert!(matches!(Model::load(dir.path(), Device::Cpu), Err(Error::Checkpoint { .. })));
}

#[test]
fn atomic_write_replaces_whole_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f.json");
    tessera::io::write_atomic(&p, b"first").unwrap();
    tessera::io::write_atomic(&p, b"second").unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), b"second");
    let leftovers = std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(leftovers, 1, "temporary files were left behind");
    let missing = dir.path().join("no/such/dir/f.json");
    assert!(tessera::io::write_atomic(&missing, b"x").is_err());
}

#[test]
fn weights_stored_in_bf16_load_at_half_the_size_with_close_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let a = saved_tiny(dir.path());
    let f32_len = std::fs::metadata(dir.path().join(TRANSFORMER_FILE)).unwrap().len();
    let vars: Vec<(String, tch::Tensor)> = a.transformer.vs.variables().into_iter().collect();
    let bytes = tessera::io::tensors_to_safetensors_as(&vars, None, tch::Kind::BFloat16).unwrap();
    std::fs::write(dir.path().join(TRANSFORMER_FILE), &bytes).unwrap();
    assert!((bytes.len() as u64) < f32_len * 6 / 10, "bf16 file {} vs f32 {f32_len} bytes", bytes.len());
    let b = Model::load(dir.path(), Device::Cpu).unwrap();
    // every weight is its f32 value rounded to bf16: relative error ≤ 2^-8
    for (name, t) in b.transformer.vs.variables() {
        let want = a.transformer.vs.variables()[&name].shallow_clone();
        let err = (&t - &want).abs().max().double_value(&[]);
        let scale = want.abs().max().double_value(&[]);
        assert!(err <= scale / 256.0 + 1e-12, "{name}: error {err} at scale {scale}");
    }
    let (text, image) = random_batch(&a, 2, 3);
    let (_, ia) = tch::no_grad(|| a.transformer.net.forward(&text, &image, false));
    let (_, ib) = tch::no_grad(|| b.transformer.net.forward(&text, &image, false));
    let rel = (&ia - &ib).abs().max().double_value(&[]) / ia.abs().max().double_value(&[]);
    assert!(rel < 0.02, "image logits moved by {rel} of their scale");
    assert!(!ia.equal(&ib), "the bf16 file was not read as bf16");
}
