//! The data pipeline and `train all`: the parallel loader against one worker, token shards
//! against encoding on the fly, corrupt and stale shards, and a whole model trained in a budget
//! of seconds, killed with SIGKILL in every stage and resumed.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tch::Device;
use tessera::Config;
use tessera::data::Source;
use tessera::pipeline::Plan;
use tessera::shards::{DvaeFingerprint, TokenShards, dvae_fingerprint, shard_path};
use tessera::train::{self, DvaeRecipe, Feed, RerankerRecipe, TrainOptions, make_batch, spawn_loader};

fn tiny_dir(dir: &Path) {
    train::init_dir(dir, &Config::tiny()).unwrap();
    train::train_tokenizer(dir, "world", 500).unwrap();
}

fn options(dir: &Path, steps: usize) -> TrainOptions {
    let mut o = TrainOptions::new(dir);
    o.data = "world:5".into();
    o.steps = steps;
    o.batch = 4;
    o.sample_every = 0;
    o.quiet = true;
    o.checkpoint_every = steps;
    o
}

#[test]
fn the_parallel_loader_yields_the_batches_of_one_worker() {
    let feed = Feed::Images { source: Source::open("world:11").unwrap(), size: 16 };
    let one: Vec<_> = spawn_loader(feed.clone(), 5, 3, 0, 12, 1).collect();
    assert_eq!(one.len(), 12);
    for workers in [2, 3, 7] {
        let many: Vec<_> = spawn_loader(feed.clone(), 5, 3, 0, 12, workers).collect();
        assert!(one == many, "{workers} workers gave other batches than one");
    }
    // a resumed stream starts exactly where the uninterrupted one was
    let tail: Vec<_> = spawn_loader(feed.clone(), 5, 3, 7, 12, 4).collect();
    assert!(tail[..] == one[7..], "resuming at step 7 changed the stream");
    // another world is another stream
    let other = Feed::Images { source: Source::open("world:12").unwrap(), size: 16 };
    assert!(make_batch(&other, 5, 3, 0) != make_batch(&feed, 5, 3, 0));
}

#[test]
fn shards_hold_the_tokens_of_encoding_on_the_fly_and_corrupt_ones_are_skipped() {
    let _cpu = crate::common::heavy_cpu();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    tiny_dir(dir);
    train::train_dvae(&options(dir, 3), &DvaeRecipe::default()).unwrap();
    let mut o = options(dir, 1);
    o.workers = 3;
    let s = train::encode_shards(&o, 40, 16).unwrap();
    assert_eq!((s.examples, s.encoded), (40, 40)); // shards of 16, 16 and 8
    let cfg = tessera::Model::load_config(dir).unwrap();
    let fp = dvae_fingerprint(&dir.join("dvae.safetensors"), &cfg.dvae).unwrap();
    let shard_dir = train::default_shard_dir(dir);
    let shards = TokenShards::open(&shard_dir, cfg.image_len(), cfg.dvae.vocab_size, &fp).unwrap();
    assert_eq!(shards.len(), 40);

    // the same examples encoded now, one by one
    let mut dvae = tessera::model::DvaeModel::new(&cfg, Device::Cpu);
    tessera::io::load_varstore(&mut dvae.vs, &dir.join("dvae.safetensors")).unwrap();
    let feed = Feed::Images { source: Source::open("world:5").unwrap(), size: cfg.dvae.image_size };
    for step in 0..10 {
        let b = make_batch(&feed, 4, o.seed, step).unwrap();
        let x = tessera::model::from_rgb8(&b.images, cfg.dvae.image_size, Device::Cpu).unwrap();
        let codes = Vec::<i64>::try_from(tch::no_grad(|| dvae.net.encode(&x)).flatten(0, -1)).unwrap();
        for k in 0..4 {
            let (tokens, caption) = shards.get(step * 4 + k);
            let want: Vec<u16> =
                codes[k * cfg.image_len()..(k + 1) * cfg.image_len()].iter().map(|&c| c as u16).collect();
            assert_eq!(tokens, &want[..], "example {}", step * 4 + k);
            assert_eq!(caption, b.captions[k]);
        }
    }

    // a second run keeps whole shards and re-encodes nothing
    let again = train::encode_shards(&o, 40, 16).unwrap();
    assert_eq!(again.encoded, 0);

    // one flipped byte: that shard is named and skipped, the others are used
    let bad = shard_path(&shard_dir, 1);
    let mut bytes = std::fs::read(&bad).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&bad, &bytes).unwrap();
    let read = TokenShards::open(&shard_dir, cfg.image_len(), cfg.dvae.vocab_size, &fp).unwrap();
    assert_eq!(read.len(), 24);
    assert_eq!(read.skipped.len(), 1);
    assert_eq!(read.skipped[0].0, bad);
    assert!(read.skipped[0].1.contains("checksum"), "{}", read.skipped[0].1);
    assert_eq!(read.get(16), shards.get(32), "the shard after the corrupt one moved");
    // a truncated one too
    std::fs::write(&bad, &bytes[..bytes.len() / 3]).unwrap();
    assert_eq!(TokenShards::open(&shard_dir, cfg.image_len(), cfg.dvae.vocab_size, &fp).unwrap().len(), 24);
    // encoding again repairs it
    assert_eq!(train::encode_shards(&o, 40, 16).unwrap().encoded, 24, "re-encodes the broken shard and the rest");
    assert_eq!(TokenShards::open(&shard_dir, cfg.image_len(), cfg.dvae.vocab_size, &fp).unwrap().len(), 40);

    // shards of another dVAE are refused as a whole
    let other = DvaeFingerprint { codes: "enc-0000000000000000".into(), file: "0000000000000000".into() };
    let err = TokenShards::open(&shard_dir, cfg.image_len(), cfg.dvae.vocab_size, &other).unwrap_err();
    assert!(err.to_string().contains("another dVAE"), "{err}");

    // the transformer and the reranker train from the shards
    let mut t = options(dir, 4);
    t.shards = Some(shard_dir.clone());
    let s = train::train_transformer(&t, &Default::default()).unwrap();
    assert_eq!(s.step, 4);
    assert!(s.last_loss.is_finite());
    let s = train::train_reranker(&t, &RerankerRecipe { warmup: 1, ..Default::default() }).unwrap();
    assert!(s.last_loss.is_finite());
    assert!(tessera::Model::load(dir, Device::Cpu).unwrap().reranker.is_some());
}

/// Adds `by` to every weight of the dVAE in `dir` whose name starts with `prefix`, in place.
fn nudge_dvae(dir: &Path, prefix: &str, by: f64) {
    let cfg = tessera::Model::load_config(dir).unwrap();
    let path = dir.join("dvae.safetensors");
    let mut dvae = tessera::model::DvaeModel::new(&cfg, Device::Cpu);
    tessera::io::load_varstore(&mut dvae.vs, &path).unwrap();
    tch::no_grad(|| {
        for (name, mut t) in dvae.vs.variables() {
            if name.starts_with(prefix) {
                let _ = t.g_add_scalar_(by);
            }
        }
    });
    tessera::io::save_varstore(&dvae.vs, &path).unwrap();
}

#[test]
fn a_dvae_with_a_retrained_decoder_keeps_its_shards_and_token_files() {
    let _cpu = crate::common::heavy_cpu();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    tiny_dir(dir);
    train::train_dvae(&options(dir, 2), &DvaeRecipe::default()).unwrap();
    let o = options(dir, 1);
    assert_eq!(train::encode_shards(&o, 16, 8).unwrap().encoded, 16);
    let cfg = tessera::Model::load_config(dir).unwrap();
    let shard_dir = train::default_shard_dir(dir);
    let open = |fp: &DvaeFingerprint| TokenShards::open(&shard_dir, cfg.image_len(), cfg.dvae.vocab_size, fp);
    let before = dvae_fingerprint(&dir.join("dvae.safetensors"), &cfg.dvae).unwrap();
    assert!(before.codes.starts_with("enc-") && before.codes != before.file, "{before:?}");
    let shards = open(&before).unwrap();
    let codec = tessera::codes::DvaeOnly::load(dir, Device::Cpu).unwrap();
    let (first, _) = shards.get(0);
    let picture =
        make_batch(&Feed::Images { source: Source::open("world:5").unwrap(), size: cfg.dvae.image_size }, 1, 0, 0)
            .unwrap()
            .images
            .remove(0);
    let tokens = codec.encode_rgb(&picture).unwrap();
    let drawn = codec.decode(&tokens).unwrap();

    // the decoder retrained: the file changes, its codes do not
    nudge_dvae(dir, "decoder.", 0.05);
    let after = dvae_fingerprint(&dir.join("dvae.safetensors"), &cfg.dvae).unwrap();
    assert_ne!(after.file, before.file);
    assert_eq!(after.codes, before.codes);
    assert_eq!(open(&after).unwrap().get(0).0, first, "the shards stay this dVAE's");
    assert_eq!(train::encode_shards(&o, 16, 8).unwrap().encoded, 0, "nothing to encode again");
    let codec = tessera::codes::DvaeOnly::load(dir, Device::Cpu).unwrap();
    assert_eq!(codec.encode_rgb(&picture).unwrap().tokens, tokens.tokens, "the same codes");
    let redrawn = codec.decode(&tokens).unwrap();
    assert_ne!(redrawn, drawn, "the token file is drawn by the new decoder");

    // a shard that records the whole file's hash (as shards did before) is still this dVAE's
    let path = shard_path(&shard_dir, 1);
    let mut old = tessera::shards::decode_shard(&std::fs::read(&path).unwrap()).unwrap();
    old.header.dvae.clone_from(&after.file);
    tessera::shards::write_shard(&path, &old.header, &old.tokens, &old.captions).unwrap();
    assert_eq!(open(&after).unwrap().len(), 16);
    assert_eq!(train::encode_shards(&o, 16, 8).unwrap().encoded, 0);

    // the same weights read with another ε map pixels elsewhere before encoding: other codes,
    // so the shards and the token file are refused
    let mut eps_cfg = cfg.clone();
    eps_cfg.dvae.eps = 0.2;
    let other_eps = dvae_fingerprint(&dir.join("dvae.safetensors"), &eps_cfg.dvae).unwrap();
    assert!(other_eps.codes != after.codes && other_eps.file != after.file, "{other_eps:?}");
    assert!(open(&other_eps).unwrap_err().to_string().contains("another dVAE"));
    let config_json = std::fs::read(dir.join("config.json")).unwrap();
    tessera::io::write_atomic(&dir.join("config.json"), &serde_json::to_vec_pretty(&eps_cfg).unwrap()).unwrap();
    let codec = tessera::codes::DvaeOnly::load(dir, Device::Cpu).unwrap();
    assert!(codec.decode(&tokens).unwrap_err().to_string().contains("another dVAE"));
    tessera::io::write_atomic(&dir.join("config.json"), &config_json).unwrap();

    // the encoder retrained: other codes, so the shards and the token file are refused
    nudge_dvae(dir, "encoder.", 0.05);
    let moved = dvae_fingerprint(&dir.join("dvae.safetensors"), &cfg.dvae).unwrap();
    assert_ne!(moved.codes, before.codes);
    assert!(open(&moved).unwrap_err().to_string().contains("another dVAE"));
    let codec = tessera::codes::DvaeOnly::load(dir, Device::Cpu).unwrap();
    assert!(codec.decode(&tokens).unwrap_err().to_string().contains("another dVAE"));
    assert_eq!(train::encode_shards(&o, 16, 8).unwrap().encoded, 16, "encoded again");
    assert_eq!(open(&moved).unwrap().len(), 16);
}

fn tessera() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
}

const BUDGET: &str = "30s";
/// The dVAE stage's own pictures in the runs of [`train_all`].
const DVAE_DATA: &str = "world-dense:2";

fn train_all(dir: &Path, resume: bool) -> Command {
    let mut c = tessera();
    c.args(["train", "all", "--preset", "tiny", "--data", "world:2", "--budget", BUDGET, "--device", "cpu"])
        .args(["--dvae-data", DVAE_DATA])
        .args(["--threads", "1", "--workers", "2", "--eval-captions", "2", "--eval-samples", "2", "--dir"])
        .arg(dir);
    if resume {
        c.arg("--resume");
    }
    c.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
    c
}

/// Runs `train all` (resuming) and kills it with SIGKILL once `stage` has begun its work;
/// returns whether it was caught in that stage (a stage can finish between two looks).
fn kill_during(dir: &Path, stage: &str) -> bool {
    let mut child = train_all(dir, true).spawn().unwrap();
    let t0 = Instant::now();
    let caught = loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("train all ended ({status}) before it could be killed in {stage}");
        }
        if let Ok(plan) = Plan::load(dir) {
            let st = plan.stages.iter().find(|s| s.name == stage).unwrap();
            if st.done {
                break false;
            }
            if st.amount.is_some() {
                std::thread::sleep(Duration::from_millis(150));
                break true;
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "stage {stage} never started");
        std::thread::sleep(Duration::from_millis(20));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    caught
}

/// The dVAE stage's data: `--dvae-data` as given, else the world's usual scenes drawn dense
/// (same seed and split), else the run's own data.
#[test]
fn train_all_gives_the_dvae_the_world_drawn_dense() {
    use tessera::pipeline::dvae_data_for;
    let pick = |data: &str, given: Option<&str>| dvae_data_for(data, given).unwrap();
    assert_eq!(pick("world", None).as_deref(), Some("world-dense:0"));
    assert_eq!(pick("world:3", None).as_deref(), Some("world-dense:3"));
    assert_eq!(pick("world:3@text=2", None).as_deref(), Some("world-dense:3@text=2"));
    assert_eq!(pick("world-held-out:2", None).as_deref(), Some("world-held-out-dense:2"));
    assert_eq!(pick("world-balanced:1", None), None);
    assert_eq!(pick("world:3", Some("world-balanced:4")).as_deref(), Some("world-balanced:4"));
    let photos = tempfile::tempdir().unwrap();
    assert_eq!(pick(&photos.path().display().to_string(), None), None);
    // what they name is the stream a dVAE would train on
    assert!(tessera::data::Source::open("world-held-out-dense:2").is_ok());
    assert!(dvae_data_for("world", Some("world-sparse")).is_err());
}

#[test]
fn train_all_refuses_a_budget_too_small_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let o = tessera()
        .args(["train", "all", "--preset", "tiny", "--budget", "5s", "--device", "cpu", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("too small") && err.contains("at least"), "{err}");
    assert!(!dir.exists(), "a refused run wrote {}", dir.display());
    let o =
        tessera().args(["train", "all", "--preset", "tiny", "--budget", "soon", "--dir"]).arg(&dir).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot read the budget"));
    // pictures for a dVAE alone cannot feed every stage: refused, pointing at --dvae-data
    let o = tessera()
        .args(["train", "all", "--preset", "tiny", "--budget", "30s", "--data", "world-dense", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("world-dense") && err.contains("--dvae-data"), "{err}");
    // and nothing is said about training before the refusal (`--dtype auto` names its choice)
    assert!(!err.contains("training in"), "{err}");
    assert!(!dir.exists(), "a refused run wrote {}", dir.display());
}

/// `train all --hard-tail 1 --argmax-codes`: the dVAE trains straight-through on its argmax
/// codes from the first step, τ held at 1 (the fourteenth session's recipe); `--argmax-codes`
/// without a straight-through share is refused before any work.
#[test]
fn train_all_can_train_the_dvae_on_argmax_codes_from_the_first_step() {
    use tessera::pipeline::{DvaeVariant, dvae_recipe};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    tiny_dir(&dir);
    let steps = 6;
    let mut o = options(&dir, steps);
    o.log_every = 1;
    let v = DvaeVariant { hard_tail: 1.0, argmax_codes: true, ..Default::default() };
    let recipe = dvae_recipe(steps, v);
    assert_eq!((recipe.hard_from, recipe.argmax_codes), (Some(0), true));
    train::train_dvae(&o, &recipe).unwrap();
    let log = std::fs::read_to_string(dir.join("dvae.log.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v.get("tau").is_some())
        .collect();
    assert_eq!(lines.len(), steps, "{log}");
    for l in &lines {
        assert_eq!(l["straight_through"].as_bool(), Some(true), "{l}");
        assert_eq!(l["tau"].as_f64(), Some(1.0), "{l}");
    }
    // a tail of straight-through steps keeps the relaxation's τ schedule before it
    let tail = dvae_recipe(100, DvaeVariant { hard_tail: 0.3, argmax_codes: true, ..Default::default() });
    assert_eq!((tail.hard_from, tail.argmax_codes), (Some(70), true));
    assert!(tail.schedule.tau_end < 1.0);
    assert!(!dvae_recipe(100, DvaeVariant::default()).argmax_codes);

    let fresh = tmp.path().join("refused");
    let o = tessera()
        .args(["train", "all", "--preset", "tiny", "--budget", "30s", "--device", "cpu", "--argmax-codes", "--dir"])
        .arg(&fresh)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("give --hard-tail"), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!fresh.exists(), "a refused run wrote {}", fresh.display());
}

#[test]
fn train_all_resumes_after_a_kill_in_every_stage_and_leaves_a_working_model() {
    let _cpu = crate::common::heavy_cpu();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    // the first run is killed in the dVAE stage; each resumed run is killed in the next stage
    let mut first = train_all(&dir, false).spawn().unwrap();
    let t0 = Instant::now();
    loop {
        if let Ok(plan) = Plan::load(&dir)
            && plan.stages.iter().any(|s| s.name == "dvae" && s.amount.is_some())
        {
            std::thread::sleep(Duration::from_millis(300));
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "the dVAE stage never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let mut caught = vec!["dvae"];
    for stage in ["shards", "transformer", "reranker", "eval"] {
        if kill_during(&dir, stage) {
            caught.push(stage);
        }
    }
    // the dVAE, transformer and reranker stages each run for seconds: they are always caught
    for s in ["dvae", "transformer", "reranker"] {
        assert!(caught.contains(&s), "never killed in {s}: {caught:?}");
    }
    let o = train_all(&dir, true).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let plan = Plan::load(&dir).unwrap();
    assert!(plan.stages.iter().all(|s| s.done), "{plan:?}");
    for f in ["dvae.safetensors", "transformer.safetensors", "reranker.safetensors", "eval/report.json"] {
        assert!(dir.join(f).exists(), "{f} missing");
    }
    // the stages' trainers resumed rather than restarting: their logs hold each step once
    let log = std::fs::read_to_string(dir.join("transformer.log.jsonl")).unwrap();
    let steps: Vec<u64> =
        log.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["step"].as_u64()).collect();
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "transformer log steps repeat: {steps:?}");
    // resuming with another budget is refused
    let o = tessera()
        .args(["train", "all", "--budget", "2m", "--dvae-data", DVAE_DATA, "--resume", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("same budget"));
    // and so is resuming with other dVAE data than the plan's (without --dvae-data, the plan's)
    assert_eq!(plan.dvae_data.as_deref(), Some(DVAE_DATA));
    let o = tessera()
        .args(["train", "all", "--budget", BUDGET, "--dvae-data", "world:2", "--resume", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("same dVAE data") && err.contains(DVAE_DATA), "{err}");
    // and so is resuming with another dVAE recipe
    let o = tessera()
        .args(["train", "all", "--budget", BUDGET, "--dvae-data", DVAE_DATA, "--hard-tail", "0.3", "--resume", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("same recipe") && err.contains("--hard-tail 0"), "{err}");
    // and with another compute dtype than the one it was planned with
    let other = if plan.dtype.as_deref() == Some("bf16") { "f32" } else { "bf16" };
    let o = tessera()
        .args(["train", "all", "--budget", BUDGET, "--dvae-data", DVAE_DATA, "--dtype", other, "--resume", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("same dtype"), "{err}");
    // generate loads what it left
    let out = tmp.path().join("out");
    let o = tessera()
        .args(["generate", "--prompt", "a red circle", "-n", "2", "--keep", "1", "--seed", "1", "--device", "cpu"])
        .arg("--model")
        .arg(&dir)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
}

#[test]
fn mutated_truncated_or_lying_shards_are_errors_never_panics() {
    use tessera::shards::{ShardHeader, decode_shard, encode_shard, fnv1a};
    let h = ShardHeader { count: 3, image_len: 4, vocab: 50, dvae: "ab".into(), first: 0 };
    let tokens: Vec<u16> = (0..12).collect();
    let captions: Vec<String> = ["a red circle", "", "ünïcode ✓"].iter().map(|s| s.to_string()).collect();
    let good = encode_shard(&h, &tokens, &captions).unwrap();
    let back = decode_shard(&good).unwrap();
    assert_eq!((back.header, back.tokens, back.captions), (h.clone(), tokens.clone(), captions.clone()));
    // every truncation, and thousands of random byte flips
    for n in 0..good.len() {
        assert!(decode_shard(&good[..n]).is_err(), "a shard cut at {n} bytes was accepted");
    }
    let mut rng = tessera::sample::SeedRng::new(7);
    for _ in 0..3000 {
        let mut b = good.clone();
        for _ in 0..1 + rng.next_u64() % 4 {
            let i = (rng.next_u64() % b.len() as u64) as usize;
            b[i] ^= 1 << (rng.next_u64() % 8);
        }
        assert!(decode_shard(&b).is_err(), "a mutated shard was accepted");
    }
    // a header that lies, with a checksum that matches: refused before anything is allocated
    let resign = |mut body: Vec<u8>| {
        let h = fnv1a(&body);
        body.extend_from_slice(&h.to_le_bytes());
        body
    };
    for (count, image_len, vocab) in [(usize::MAX / 2, 0, 50), (1 << 40, 1, 50), (3, 4, 5)] {
        let json = serde_json::to_vec(&ShardHeader { count, image_len, vocab, ..h.clone() }).unwrap();
        let mut body = b"TSRTOK01".to_vec();
        body.extend_from_slice(&(json.len() as u32).to_le_bytes());
        body.extend_from_slice(&json);
        body.extend_from_slice(&good[8 + 4 + serde_json::to_vec(&h).unwrap().len()..good.len() - 8]);
        let err = decode_shard(&resign(body)).unwrap_err();
        assert!(!err.is_empty());
    }
}

/// `train all` for 20 s into `dir`, continuing `from` (`--init-from`), around the dVAE of
/// `dvae_from` (`--dvae-from`), or with one trained again.
fn continue_all(from: &Path, dir: &Path, dvae_from: Option<&Path>) -> std::process::Output {
    let mut c = tessera();
    c.args(["train", "all", "--data", "world:4", "--budget", "20s", "--device", "cpu", "--threads", "1"])
        .args(["--workers", "1", "--eval-captions", "0", "--init-from"])
        .arg(from)
        .arg("--dir")
        .arg(dir);
    if let Some(d) = dvae_from {
        c.arg("--dvae-from").arg(d);
    }
    c.output().unwrap()
}

/// What `train all` started stage `name` from (its result's `init`; empty when none).
fn stage_init(plan: &Plan, name: &str) -> String {
    let stage = plan.stages.iter().find(|s| s.name == name).unwrap();
    stage.result.as_ref().and_then(|r| r["init"].as_str()).unwrap_or_default().to_string()
}

#[test]
fn train_all_around_a_given_dvae_skips_its_stage_and_gives_its_share_to_the_transformer() {
    let _cpu = crate::common::heavy_cpu();
    let tmp = tempfile::tempdir().unwrap();
    let donor = tmp.path().join("donor");
    tessera::Model::random_init(&tessera::Config::tiny(), tch::Device::Cpu, 5).unwrap().save(&donor).unwrap();
    let dir = tmp.path().join("model");
    let o = tessera()
        .args(["train", "all", "--preset", "tiny", "--data", "world:3", "--budget", "20s", "--device", "cpu"])
        .args(["--threads", "1", "--workers", "1", "--eval-captions", "1", "--eval-samples", "2", "--dvae-from"])
        .arg(&donor)
        .arg("--dir")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read(dir.join("dvae.safetensors")).unwrap(),
        std::fs::read(donor.join("dvae.safetensors")).unwrap()
    );
    assert!(!dir.join("dvae.log.jsonl").exists(), "a dVAE was trained");
    let plan = Plan::load(&dir).unwrap();
    let stage = |n: &str| plan.stages.iter().find(|s| s.name == n).unwrap().clone();
    assert!(stage("dvae").done && stage("dvae").planned_s == 0.0);
    assert!((stage("transformer").planned_s - 0.75 * 20.0).abs() < 1e-9, "{plan:?}");
    assert!(plan.stages.iter().all(|s| s.done));
    assert!(dir.join("transformer.safetensors").exists() && dir.join("shards").is_dir());

    // that model continued (`--init-from` and `--dvae-from` it, no preset): its tokenizer and
    // configuration are taken as they are, and the transformer starts where it stopped
    let next = tmp.path().join("next");
    let o = continue_all(&dir, &next, Some(&dir));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let carry_message = "carried the image codes of";
    assert!(!String::from_utf8_lossy(&o.stderr).contains(carry_message), "the same dVAE: nothing to carry over");
    for f in ["tokenizer.json", "dvae.safetensors"] {
        assert_eq!(std::fs::read(next.join(f)).unwrap(), std::fs::read(dir.join(f)).unwrap(), "{f}");
    }
    assert_eq!(tessera::Model::load_config(&next).unwrap(), tessera::Model::load_config(&dir).unwrap());
    let plan = Plan::load(&next).unwrap();
    assert_eq!(plan.init_from.as_deref(), Some(dir.as_path()));
    let tokenizer = plan.stages.iter().find(|s| s.name == "tokenizer").unwrap();
    assert_eq!(tokenizer.seconds, 0.0, "a tokenizer was trained");
    let first_loss = |d: &Path| -> f64 {
        let log = std::fs::read_to_string(d.join("transformer.log.jsonl")).unwrap();
        let first = log.lines().next().expect("an empty transformer log");
        serde_json::from_str::<serde_json::Value>(first).unwrap()["image_loss"].as_f64().unwrap()
    };
    // the time the earlier stages left unused went to the next trainer: the reranker's share
    // grew by the earlier shares less the time they took (load and saves aside)
    let plan = Plan::load(&next).unwrap();
    let at = plan.stages.iter().position(|s| s.name == "reranker").unwrap();
    let earlier: f64 = plan.stages[..at].iter().map(|s| s.planned_s).sum();
    let took: f64 = plan.stages[..at].iter().map(|s| s.seconds).sum();
    let carried = plan.stages[at].carried_s;
    assert!(carried <= earlier && (carried - (earlier - took).max(0.0)).abs() < 1.0, "{plan:?}");
    let (fresh, continued) = (first_loss(&dir), first_loss(&next));
    assert!(continued < 0.8 * fresh, "the continued transformer starts at {continued}, a fresh one at {fresh}");

    // continued with its dVAE trained again (no --dvae-from): other codes, so the transformer
    // is carried over to them before it trains
    let third = tmp.path().join("third");
    let o = continue_all(&dir, &third, None);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert_ne!(
        std::fs::read(third.join("dvae.safetensors")).unwrap(),
        std::fs::read(dir.join("dvae.safetensors")).unwrap()
    );
    assert!(err.contains(carry_message), "a new dVAE's codes were not carried over: {err}");
}

/// `--init-from` a model whose dVAE has fewer codes than the given one (a split codebook,
/// `train dvae --codebook`): its transformer is carried over to the new codes, not dropped.
#[test]
fn train_all_carries_a_transformer_over_to_a_larger_codebook() {
    let _cpu = crate::common::heavy_cpu();
    let tmp = tempfile::tempdir().unwrap();
    let (donor, split) = (tmp.path().join("donor"), tmp.path().join("split"));
    let small = Config::tiny();
    tessera::Model::random_init(&small, Device::Cpu, 5).unwrap().save(&donor).unwrap();
    let mut large = small.clone();
    large.dvae.vocab_size *= 2;
    tessera::Model::random_init(&large, Device::Cpu, 6).unwrap().save(&split).unwrap();
    let dir = tmp.path().join("model");
    let o = continue_all(&donor, &dir, Some(&split));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("carried the image codes of"), "{stderr}");
    let plan = Plan::load(&dir).unwrap();
    assert_eq!(stage_init(&plan, "transformer"), donor.join("transformer.safetensors").display().to_string());
    let model = tessera::Model::load(&dir, Device::Cpu).unwrap();
    assert_eq!(model.config.dvae.vocab_size, large.dvae.vocab_size);
}

/// `--init-from` a model of other shapes (another preset): the components whose shapes match
/// start from its weights, the others from scratch, and the run says which.
#[test]
fn train_all_starts_a_component_of_other_shapes_afresh_and_says_so() {
    let _cpu = crate::common::heavy_cpu();
    let tmp = tempfile::tempdir().unwrap();
    let donor = tmp.path().join("donor");
    let mut cfg = Config::tiny();
    cfg.transformer.n_layers += 1;
    tessera::Model::random_init(&cfg, Device::Cpu, 5).unwrap().save(&donor).unwrap();
    train::train_reranker(&options(&donor, 1), &RerankerRecipe::default()).unwrap();
    let dir = tmp.path().join("model");
    let o = tessera()
        .args(["train", "all", "--preset", "tiny", "--data", "world:3", "--budget", "20s", "--device", "cpu"])
        .args(["--threads", "1", "--workers", "1", "--eval-captions", "0", "--dvae-from"])
        .arg(&donor)
        .arg("--init-from")
        .arg(&donor)
        .arg("--dir")
        .arg(&dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let transformer = donor.join("transformer.safetensors").display().to_string();
    assert!(stderr.contains(&format!("{transformer} has other shapes: trained from scratch")), "{stderr}");
    assert_eq!(tessera::Model::load_config(&dir).unwrap().transformer, Config::tiny().transformer);
    let plan = Plan::load(&dir).unwrap();
    let init = |n: &str| stage_init(&plan, n);
    assert_eq!(init("transformer"), format!("{transformer} has other shapes: trained from scratch"));
    assert_eq!(init("reranker"), donor.join("reranker.safetensors").display().to_string());
    assert_eq!(
        std::fs::read(dir.join("tokenizer.json")).unwrap(),
        std::fs::read(donor.join("tokenizer.json")).unwrap()
    );
}

#[test]
fn a_trainer_given_a_time_plans_its_steps_to_fit_it() {
    let _cpu = crate::common::heavy_cpu();
    let tmp = tempfile::tempdir().unwrap();
    let dir = crate::common::saved_tiny_model(&tmp.path().join("m"), 3);
    let run = |extra: &[&str]| {
        tessera()
            .args(["train", "reranker", "--data", "world:2", "--batch", "4", "--device", "cpu", "--threads", "1"])
            .args(["--workers", "1", "--sample-every", "0", "--log-every", "1", "--dir"])
            .arg(&dir)
            .args(extra)
            .output()
            .unwrap()
    };
    let o = run(&["--time", "6s"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    // "--time 6s: N steps of 4 fit (…)", then a run of at most N steps
    let planned: u64 = err
        .split("--time 6s: ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no plan printed: {err}"));
    let log = std::fs::read_to_string(dir.join("reranker.log.jsonl")).unwrap();
    let last = log.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["step"].as_u64()).max();
    assert!(planned >= 1 && last.is_some_and(|s| s >= 1 && s <= planned), "planned {planned}, ran to {last:?}");
    // a time that is no time, and a time with --resume, are refused with a clear message
    let e = run(&["--time", "0s"]);
    assert!(!e.status.success() && String::from_utf8_lossy(&e.stderr).contains("cannot read the budget"));
    let e = run(&["--time", "6s", "--resume"]);
    assert!(!e.status.success() && String::from_utf8_lossy(&e.stderr).contains("--resume"));
}
