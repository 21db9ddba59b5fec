//! OpenAI's published dVAE is Tessera's dVAE: the reference package (PyPI `DALL-E` 0.1) builds
//! its Encoder and Decoder with seeded random weights and pickles them as the published files
//! are; `tools/import-openai-dvae` converts them; Tessera's encoder logits, codes and decoded
//! pixels on the same random images match the reference's. Conversion refuses bad input and
//! writes nothing; a model started around a converted dVAE trains, samples and completes images.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use tch::{Device, Kind, Tensor};
use tessera::codes::DvaeOnly;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// PYTHONPATH with torch and the reference package (installed once into the cache).
fn pythonpath() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| {
        let o = Command::new(repo().join("tools/reference.sh")).output().expect("tools/reference.sh runs");
        assert!(o.status.success(), "tools/reference.sh failed: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    })
}

fn python(args: &[&str]) -> Output {
    Command::new("python3")
        .arg(repo().join("tools/openai_dvae.py"))
        .args(args)
        .env("PYTHONPATH", pythonpath())
        .output()
        .expect("python3 runs")
}

/// The reference's pickles and outputs for a dVAE shape, in `dir`.
fn make_reference(dir: &Path, shape: &[&str]) {
    let mut args = vec!["make-reference", dir.to_str().unwrap()];
    args.extend_from_slice(shape);
    let o = python(&args);
    assert!(o.status.success(), "make-reference: {}", String::from_utf8_lossy(&o.stderr));
}

fn import(enc: &Path, dec: &Path, out: &Path, extra: &[&str]) -> Output {
    pythonpath(); // installed before the tool is timed or its messages read
    Command::new(repo().join("tools/import-openai-dvae")).arg(enc).arg(dec).arg(out).args(extra).output().unwrap()
}

fn tessera() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
}

fn run_ok(c: &mut Command) -> Output {
    let o = c.output().unwrap();
    assert!(o.status.success(), "{c:?}: {}", String::from_utf8_lossy(&o.stderr));
    o
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

/// Converts the reference of `shape` and compares Tessera's outputs with it.
fn assert_same_network(shape: &[&str], image_size: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let (reference, converted) = (tmp.path().join("ref"), tmp.path().join("conv"));
    make_reference(&reference, shape);
    let o = import(
        &reference.join("encoder.pkl"),
        &reference.join("decoder.pkl"),
        &converted,
        &["--image-size", image_size],
    );
    assert!(o.status.success(), "import: {}", String::from_utf8_lossy(&o.stderr));
    let d = DvaeOnly::load(&converted, Device::Cpu).unwrap();
    let r: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(reference.join("reference.safetensors")).unwrap().into_iter().collect();
    let images = &r["images"];
    let logits = tch::no_grad(|| d.model.net.encoder_logits(images));
    let dl = max_diff(&logits, &r["logits"]);
    assert!(dl < 1e-4, "encoder logits differ by {dl}");
    let codes = logits.argmax(1, false);
    let ref_codes = r["codes"].to_kind(Kind::Int64);
    let same = codes.eq_tensor(&ref_codes).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
    assert_eq!(same, 1.0, "argmax codes agree on {:.4} of positions", same);
    let rec = tch::no_grad(|| d.model.net.decode(&ref_codes));
    let dr = max_diff(&rec, &r["reconstruction"]);
    assert!(dr < 1e-4, "decoded pixels differ by {dr}");
    eprintln!(
        "reference {:?}: encoder logits differ by at most {dl:.1e}, pixels by {dr:.1e}, codes agree everywhere",
        shape
    );
    // and the pixels really depend on the weights (a network of zeros would match nothing)
    assert!(r["reconstruction"].std(true).double_value(&[]) > 1e-3);
}

#[test]
fn a_small_converted_dvae_gives_the_references_logits_codes_and_pixels() {
    let _cpu = crate::common::heavy_cpu();
    assert_same_network(
        &["--n-hid", "64", "--blocks", "1", "--vocab", "512", "--n-init", "32", "--image-size", "64", "--images", "3"],
        "64",
    );
}

#[test]
fn the_papers_shape_converts_exactly() {
    let _cpu = crate::common::heavy_cpu();
    // 256 px, 32×32 codes of 8,192, width 256, 4 groups of 2 blocks, n_init 128
    assert_same_network(&["--images", "1", "--seed", "3"], "256");
}

#[test]
fn bad_files_are_refused_with_a_clear_error_and_nothing_is_written() {
    let _cpu = crate::common::heavy_cpu();
    let tmp = tempfile::tempdir().unwrap();
    let reference = tmp.path().join("ref");
    make_reference(
        &reference,
        &["--n-hid", "64", "--blocks", "1", "--vocab", "512", "--n-init", "32", "--image-size", "32", "--images", "1"],
    );
    let other = tmp.path().join("other");
    make_reference(
        &other,
        &["--n-hid", "64", "--blocks", "2", "--vocab", "512", "--n-init", "32", "--image-size", "32", "--images", "1"],
    );
    let (enc, dec) = (reference.join("encoder.pkl"), reference.join("decoder.pkl"));
    let text = tmp.path().join("notes.pkl");
    std::fs::write(&text, "these are notes, not weights\n").unwrap();
    let bytes = std::fs::read(&enc).unwrap();
    let truncated = tmp.path().join("truncated.pkl");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    // a pickle that would run a command when loaded without restrictions
    let marker = tmp.path().join("ran");
    let evil = tmp.path().join("evil.pkl");
    let script = format!(
        "import os, torch\nclass E:\n    def __reduce__(self):\n        return (os.system, ('touch {}',))\ntorch.save(E(), '{}')\n",
        marker.display(),
        evil.display()
    );
    let o = Command::new("python3").args(["-c", &script]).env("PYTHONPATH", pythonpath()).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cases: Vec<(PathBuf, PathBuf, &str)> = vec![
        (text.clone(), dec.clone(), "not a readable PyTorch pickle"),
        (truncated.clone(), dec.clone(), "not a readable PyTorch pickle"),
        (dec.clone(), enc.clone(), "given as the encoder"),
        (enc.clone(), enc.clone(), "given as the decoder"),
        (evil.clone(), dec.clone(), "refused"),
        (enc.clone(), other.join("decoder.pkl"), "do not belong together"),
        (tmp.path().join("missing.pkl"), dec.clone(), "no such file"),
    ];
    for (i, (e, d, want)) in cases.iter().enumerate() {
        let out = tmp.path().join(format!("out-{i}"));
        let o = import(e, d, &out, &[]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "case {i} was accepted");
        assert!(err.contains(want), "case {i}: expected {want:?} in {err}");
        assert!(!err.contains("Traceback"), "case {i} ended in a traceback: {err}");
        assert!(!out.exists(), "case {i} wrote {}", out.display());
    }
    assert!(!marker.exists(), "loading the malicious pickle ran its command");
    // an image size the grid cannot divide
    let o = import(&enc, &dec, &tmp.path().join("odd"), &["--image-size", "100"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a multiple"));
    assert!(!tmp.path().join("odd").exists());
}

/// A model directory around a converted random-weight dVAE of the paper's layout at 256 px
/// (narrower, for speed), with its tokenizer and a few transformer steps on 256 px pictures.
pub fn imported_model(tmp: &Path) -> PathBuf {
    let reference = tmp.join("ref");
    make_reference(
        &reference,
        &["--n-hid", "64", "--blocks", "1", "--vocab", "512", "--n-init", "32", "--image-size", "64", "--images", "1"],
    );
    let conv = tmp.join("openai-dvae");
    let o = import(&reference.join("encoder.pkl"), &reference.join("decoder.pkl"), &conv, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let photos = tmp.join("photos");
    run_ok(tessera().args(["world", "export", "--n", "6", "--size", "256", "--out"]).arg(&photos));
    let model = tmp.join("model");
    run_ok(tessera().args(["init", "--preset", "tiny", "--dir"]).arg(&model).arg("--dvae-from").arg(&conv));
    for (what, steps) in [("tokenizer", None), ("transformer", Some("3")), ("reranker", Some("2"))] {
        let mut c = tessera();
        c.args(["train", what, "--dir"]).arg(&model).arg("--data").arg(&photos);
        if let Some(s) = steps {
            c.args(["--steps", s, "--batch", "2", "--threads", "2"]);
        }
        run_ok(&mut c);
    }
    model
}

#[test]
fn a_model_around_an_imported_dvae_trains_samples_and_completes_an_image() {
    let _cpu = crate::common::heavy_cpu();
    let tmp = tempfile::tempdir().unwrap();
    let model = imported_model(tmp.path());
    let cfg = tessera::Model::load_config(&model).unwrap();
    assert_eq!((cfg.dvae.image_size, cfg.dvae.grid_size(), cfg.dvae.vocab_size), (256, 32, 512));
    // the dVAE was copied unchanged
    assert_eq!(
        std::fs::read(model.join("dvae.safetensors")).unwrap(),
        std::fs::read(tmp.path().join("openai-dvae/dvae.safetensors")).unwrap()
    );
    // the same init again is harmless; an init around another dVAE is refused
    run_ok(
        tessera()
            .args(["init", "--preset", "tiny", "--dir"])
            .arg(&model)
            .arg("--dvae-from")
            .arg(tmp.path().join("openai-dvae")),
    );
    let o = tessera()
        .args(["init", "--preset", "tiny", "--dir"])
        .arg(&model)
        .arg("--dvae-from")
        .arg(repo().join("assets/models/default"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already holds another dVAE"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // train all on a directory that already has a dVAE keeps it only when asked to
    let o =
        tessera().args(["train", "all", "--budget", "20s", "--device", "cpu", "--dir"]).arg(&model).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("--dvae-from"), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read(model.join("dvae.safetensors")).unwrap(),
        std::fs::read(tmp.path().join("openai-dvae/dvae.safetensors")).unwrap()
    );
    // complete a photograph from its top 24 of 32 token rows
    let photo = tmp.path().join("photos/000000.png");
    let out = tmp.path().join("out");
    run_ok(
        tessera()
            .args([
                "generate",
                "--prompt",
                "a red circle",
                "-n",
                "2",
                "--seed",
                "1",
                "--device",
                "cpu",
                "--keep-rows",
                "24",
            ])
            .arg("--prefix-image")
            .arg(&photo)
            .arg("--model")
            .arg(&model)
            .arg("--out")
            .arg(&out),
    );
    // the dVAE alone: the round trip of the same photograph
    let rt = tmp.path().join("rt.png");
    let o = run_ok(tessera().args(["dvae", "roundtrip"]).arg(&photo).arg("--model").arg(&model).arg("--out").arg(&rt));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(report["psnr_db"].as_f64().unwrap().is_finite());
    let rt = image::open(&rt).unwrap().to_rgb8();
    assert_eq!(rt.dimensions(), (256, 256));
    // the kept rows decode as in the round trip: the top 12 token rows (96 px) see only kept
    // codes through the decoder's receptive field
    let mut samples: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().path()).collect();
    samples.sort();
    assert_eq!(samples.len(), 2);
    for s in &samples {
        let img = image::open(s).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (256, 256));
        let top = |i: &image::RgbImage| i.as_raw()[..96 * 256 * 3].to_vec();
        let p = tessera::codes::psnr(&top(&img), &top(&rt));
        assert!(p > 40.0, "{}: kept rows differ from the round trip (PSNR {p:.1} dB)", s.display());
    }
    // token files: encode then decode gives the round trip's pixels
    let tokens = tmp.path().join("t.json");
    run_ok(tessera().args(["dvae", "encode"]).arg(&photo).arg("--model").arg(&model).arg("--out").arg(&tokens));
    let back = tmp.path().join("back.png");
    run_ok(tessera().args(["dvae", "decode"]).arg(&tokens).arg("--model").arg(&model).arg("--out").arg(&back));
    assert_eq!(image::open(&back).unwrap().to_rgb8(), rt);
    // tokens of another dVAE are refused
    let o = tessera()
        .args(["dvae", "decode"])
        .arg(&tokens)
        .arg("--model")
        .arg(repo().join("assets/models/default"))
        .arg("--out")
        .arg(tmp.path().join("x.png"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("grid"), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!tmp.path().join("x.png").exists());
    let mut t: serde_json::Value = serde_json::from_slice(&std::fs::read(&tokens).unwrap()).unwrap();
    t["dvae"] = "0123456789abcdef".into();
    std::fs::write(&tokens, t.to_string()).unwrap();
    let o = tessera()
        .args(["dvae", "decode"])
        .arg(&tokens)
        .arg("--model")
        .arg(&model)
        .arg("--out")
        .arg(&back)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("another dVAE"), "{}", String::from_utf8_lossy(&o.stderr));
}
