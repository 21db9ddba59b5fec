//! Training from the command line and exact resumption after a stop or a kill -9.

use std::path::Path;
use std::process::Command;

use tch::Device;
use tessera::Config;
use tessera::train::{self, DvaeRecipe, RerankerRecipe, TrainOptions, TransformerRecipe};

fn options(dir: &Path, steps: usize, stop_after: Option<usize>, resume: bool) -> TrainOptions {
    let mut o = TrainOptions::new(dir);
    o.data = "world:3".into();
    o.steps = steps;
    o.batch = 4;
    o.checkpoint_every = 3;
    o.sample_every = 0;
    o.log_every = 1;
    o.seed = 9;
    o.device = Device::Cpu;
    o.resume = resume;
    o.stop_after = stop_after;
    o.quiet = true;
    o
}

fn new_dir(dir: &Path) {
    train::init_dir(dir, &Config::tiny()).unwrap();
    train::train_tokenizer(dir, "world", 500).unwrap();
}

/// A new temporary directory holding a tiny model's config and tokenizer.
fn tiny_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    new_dir(d.path());
    d
}

fn bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// Tessera's command line in a process of its own: libtorch's random generator is global, so
/// runs compared for exact equality must not share a process with other tests.
fn tessera(args: &[&str], dir: &Path) -> std::process::Output {
    let o = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .args(["--data", "world:3", "--batch", "4", "--checkpoint-every", "3", "--sample-every", "0"])
        .args(["--log-every", "1", "--seed", "9", "--threads", "1", "--device", "cpu", "--dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    o
}

fn sorted_state(path: &Path) -> Vec<(String, tch::Tensor)> {
    let (mut t, _) = tessera::io::read_safetensors(path).unwrap();
    t.sort_by(|x, y| x.0.cmp(&y.0));
    t
}

/// Asserts that the weights in `got` are those of `source`, tensor by tensor (within 1e-6);
/// returns `source`'s.
fn assert_kept(source: &Path, got: &Path) -> Vec<(String, tch::Tensor)> {
    let (want, got) = (sorted_state(source), sorted_state(got));
    assert_eq!(want.len(), got.len());
    for ((n, x), (m, y)) in want.iter().zip(&got) {
        assert_eq!(n, m);
        let d = (x - y).abs().max().double_value(&[]);
        assert!(d < 1e-6, "{n} moved by {d} from the weights it started from");
    }
    want
}

#[test]
fn stopped_then_resumed_training_equals_an_uninterrupted_run() {
    let _cpu = crate::common::heavy_cpu();
    let (a, b) = (tiny_dir(), tiny_dir());
    tessera(&["train", "dvae", "--steps", "9"], a.path());
    tessera(&["train", "dvae", "--steps", "9", "--stop-after", "6"], b.path());
    tessera(&["train", "dvae", "--steps", "9", "--resume"], b.path());
    assert!(bytes(&a.path().join("dvae.safetensors")) == bytes(&b.path().join("dvae.safetensors")), "dVAE differs");
    let (sa, sb) = (
        sorted_state(&a.path().join("dvae.state.safetensors")),
        sorted_state(&b.path().join("dvae.state.safetensors")),
    );
    assert_eq!(sa.len(), sb.len());
    for ((na, ta), (nb, tb)) in sa.iter().zip(&sb) {
        assert!(na == nb && ta.equal(tb), "training state {na} differs after resuming");
    }

    let t = ["train", "transformer", "--steps", "8", "--warmup", "2"];
    tessera(&t, a.path());
    tessera(&[&t[..], &["--stop-after", "3"]].concat(), b.path());
    tessera(&[&t[..], &["--resume"]].concat(), b.path());
    let name = "transformer.safetensors";
    assert!(bytes(&a.path().join(name)) == bytes(&b.path().join(name)), "transformer differs after resuming");
    // the reranker with contrasting captions (drawn per step) resumes exactly too
    let r = ["train", "reranker", "--steps", "6", "--warmup", "2", "--contrasts", "3"];
    tessera(&r, a.path());
    tessera(&[&r[..], &["--stop-after", "3"]].concat(), b.path());
    tessera(&[&r[..], &["--resume"]].concat(), b.path());
    let name = "reranker.safetensors";
    assert!(bytes(&a.path().join(name)) == bytes(&b.path().join(name)), "reranker differs after resuming");
    // and so does one with both kinds of contrast, its pictures (and contrasting pictures,
    // scenes drawn and rendered per step) shown through the dVAE
    let (c, d, e) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let dvae = a.path().join("dvae.safetensors");
    for dir in [c.path(), d.path(), e.path()] {
        new_dir(dir);
    }
    let r = ["train", "reranker", "--steps", "6", "--warmup", "2", "--contrast-images", "2", "--contrasts", "3"];
    let through = [&r[..], &["--through-dvae"]].concat();
    // no dVAE to show the pictures through yet: a clear error
    let o = Command::new(env!("CARGO_BIN_EXE_tessera")).args(&through).arg("--dir").arg(c.path()).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("train the dVAE first"), "{err}");
    for dir in [c.path(), d.path(), e.path()] {
        std::fs::copy(&dvae, dir.join("dvae.safetensors")).unwrap();
    }
    tessera(&through, c.path());
    tessera(&[&through[..], &["--stop-after", "3"]].concat(), d.path());
    tessera(&[&through[..], &["--resume"]].concat(), d.path());
    assert!(bytes(&c.path().join(name)) == bytes(&d.path().join(name)), "reranker (pictures) differs after resuming");
    tessera(&r, e.path());
    let (with, without) = (bytes(&c.path().join(name)), bytes(&e.path().join(name)));
    assert!(with != without, "showing the pictures through the dVAE changed nothing");
    assert!(without != bytes(&a.path().join(name)), "contrasting pictures changed nothing");
    // near-miss contrasts draw other pictures; without contrasting pictures they are refused
    let f = tempfile::tempdir().unwrap();
    new_dir(f.path());
    tessera(&[&r[..], &["--near-contrasts"]].concat(), f.path());
    assert!(bytes(&f.path().join(name)) != without, "near-miss contrasts changed nothing");
    let o = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["train", "reranker", "--steps", "2", "--near-contrasts", "--device", "cpu", "--dir"])
        .arg(f.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--contrast-images"), "{err}");
    // pictures of files have no scenes to contrast
    let files = c.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    image::RgbImage::from_pixel(16, 16, image::Rgb([200, 10, 10])).save(files.join("a.png")).unwrap();
    std::fs::write(files.join("a.txt"), "a red square").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["train", "reranker", "--steps", "2", "--batch", "2", "--contrast-images", "1", "--device", "cpu"])
        .args(["--data", &files.to_string_lossy()])
        .arg("--dir")
        .arg(c.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--data world"), "{err}");
    // the trained directory is a complete model
    let m = tessera::Model::load(a.path(), Device::Cpu).unwrap();
    let s = m.generate("a red circle", 1, 0, None, &Default::default(), |_| true).unwrap();
    assert_eq!(s[0].rgb.len(), 16 * 16 * 3);
    // the resumed log has one line per step
    let log = std::fs::read_to_string(b.path().join("transformer.log.jsonl")).unwrap();
    let steps: Vec<u64> =
        log.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=8).collect::<Vec<_>>());
}

fn train_cmd(dir: &Path, steps: usize, resume: bool) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tessera"));
    c.args(["train", "dvae", "--data", "world:5", "--batch", "4", "--checkpoint-every", "2", "--sample-every", "0"])
        .args(["--threads", "1", "--device", "cpu", "--steps", &steps.to_string(), "--dir"])
        .arg(dir);
    if resume {
        c.arg("--resume");
    }
    c
}

#[test]
fn training_resumes_exactly_after_kill_9() {
    let _cpu = crate::common::heavy_cpu();
    let (a, b) = (tiny_dir(), tiny_dir());
    let steps = 40;
    assert!(train_cmd(a.path(), steps, false).output().unwrap().status.success());
    // start the same run, kill it hard once it has checkpointed, then resume it
    let mut child = train_cmd(b.path(), steps, false).stderr(std::process::Stdio::null()).spawn().unwrap();
    let state = b.path().join("dvae.state.safetensors");
    let t0 = std::time::Instant::now();
    while !state.exists() && t0.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(150));
    child.kill().unwrap(); // SIGKILL
    let _ = child.wait();
    assert!(state.exists(), "no checkpoint was written before the kill");
    let o = train_cmd(b.path(), steps, true).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        bytes(&a.path().join("dvae.safetensors")) == bytes(&b.path().join("dvae.safetensors")),
        "{} differs after resuming",
        &a.path().join("dvae.safetensors").display()
    );
}

#[test]
fn unreadable_files_are_skipped_and_counted() {
    let data = tempfile::tempdir().unwrap();
    for i in 0..6 {
        let img = image::RgbImage::from_pixel(20, 24, image::Rgb([i * 40, 100, 200]));
        img.save(data.path().join(format!("{i}.png"))).unwrap();
        std::fs::write(data.path().join(format!("{i}.txt")), format!("a picture number {i}")).unwrap();
    }
    std::fs::write(data.path().join("bad.png"), b"not a png").unwrap();
    std::fs::write(data.path().join("bad.txt"), "a broken picture").unwrap();
    std::fs::write(data.path().join("nocaption.png"), b"x").unwrap();
    let src = tessera::data::Source::open(data.path().to_str().unwrap()).unwrap();
    assert_eq!(src.skipped(), 1); // the image without a caption
    let mut rng = tessera::sample::SeedRng::new(0);
    let readable = (0..7).filter(|&i| src.get(i, 16, &mut rng).is_some()).count();
    assert_eq!(readable, 6, "the corrupt PNG is the one left out");
    // training on it runs and reports the skipped file
    let dir = tempfile::tempdir().unwrap();
    new_dir(dir.path());
    let mut o = options(dir.path(), 3, None, false);
    o.data = data.path().to_string_lossy().into_owned();
    let s = train::train_dvae(&o, &DvaeRecipe::default()).unwrap();
    assert_eq!((s.step, s.skipped_files), (3, 1));
}

#[test]
fn webdataset_shards_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shard-000.tar");
    let mut builder = tar::Builder::new(std::fs::File::create(&path).unwrap());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        builder.append_data(&mut h, name, data).unwrap();
    };
    let mut png = Vec::new();
    image::RgbImage::from_pixel(30, 20, image::Rgb([10, 200, 30]))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    add("a.png", &png);
    add("a.txt", b"a green field");
    add("b.png", &png);
    add("b.txt", b"another green field");
    add("c.jpg", b"broken");
    add("c.txt", b"a broken picture");
    add("d.png", &png); // no caption
    builder.into_inner().unwrap();
    let src = tessera::data::Source::open(path.to_str().unwrap()).unwrap();
    assert_eq!(src.count(), Some(3));
    assert_eq!(src.skipped(), 1);
    let mut rng = tessera::sample::SeedRng::new(1);
    let ok: Vec<String> = (0..3).filter_map(|i| src.get(i, 8, &mut rng)).map(|e| e.caption).collect();
    assert_eq!(ok, ["a green field", "another green field"]);
}

/// A `rankings.json` row's share of right samples by `field` (`right` or `right_strict`), and
/// whether the sample of the highest reranker score (the last of equals) is right.
fn row_rates(row: &serde_json::Value, field: &str) -> (f64, f64) {
    let ok: Vec<bool> = serde_json::from_value(row[field].clone()).unwrap();
    let score: Vec<f32> = serde_json::from_value(row["reranker"].clone()).unwrap();
    assert_eq!(ok.len(), score.len(), "{row}");
    let best = (0..score.len()).fold(0, |b, i| if score[i] >= score[b] { i } else { b });
    (ok.iter().filter(|&&o| o).count() as f64 / ok.len() as f64, f64::from(u8::from(ok[best])))
}

#[test]
fn reranker_learns_and_eval_writes_a_report() {
    let _cpu = crate::common::heavy_cpu();
    let dir = tempfile::tempdir().unwrap();
    new_dir(dir.path());
    let mut o = options(dir.path(), 40, None, false);
    o.batch = 16;
    o.checkpoint_every = 20;
    let s = train::train_reranker(&o, &RerankerRecipe { lr: 2e-3, warmup: 5, ..Default::default() }).unwrap();
    let log = std::fs::read_to_string(dir.path().join("reranker.log.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    assert!(s.last_loss < first["loss"].as_f64().unwrap() - 0.3, "reranker loss {} → {}", first["loss"], s.last_loss);
    // a complete directory evaluates end to end
    train::train_dvae(&options(dir.path(), 2, None, false), &DvaeRecipe::default()).unwrap();
    train::train_transformer(&options(dir.path(), 2, None, false), &TransformerRecipe::default()).unwrap();
    let m = tessera::Model::load(dir.path(), Device::Cpu).unwrap();
    assert!(m.reranker.is_some());
    let out = dir.path().join("eval");
    let kept = dir.path().join("kept/samples.safetensors");
    let opts = tessera::report::EvalOptions {
        captions: 1,
        samples: 2,
        seed: 0,
        sample: Default::default(),
        samples_file: Some(kept.clone()),
        only: Vec::new(),
    };
    let r = tessera::report::evaluate(&m, &opts, &out, |_| {}).unwrap();
    assert!(!r.samples_reused && kept.exists());
    assert_eq!(r.accuracy.len(), 6);
    assert_eq!(r.held_out.len(), 4);
    assert!(r.dvae_psnr_db.is_finite());
    assert_eq!(r.dvae_roundtrip.len(), 6);
    assert!(r.dvae_roundtrip.values().all(|v| (0.0..=1.0).contains(v)));
    for a in r.accuracy.values().chain(r.held_out.values()) {
        // two samples per caption: at most one right-over-wrong pair per caption
        assert!(a.pairs <= a.n && a.rerank_pairs.is_some() == (a.pairs > 0), "{a:?}");
        assert!(a.rerank_pairs.is_none_or(|p| (0.0..=1.0).contains(&p)));
    }
    for f in ["report.json", "report.md", "grid.png"] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    // rankings.json: each caption's verdicts and scores, from which the report's figures
    // follow (per sample, and the top-1 of the highest score)
    let rankings: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(out.join("rankings.json")).unwrap()).unwrap();
    assert_eq!(rankings.len(), 10);
    for (split, accs) in [("seen", &r.accuracy), ("held_out", &r.held_out)] {
        for (cap, a) in accs {
            let rows: Vec<_> = rankings.iter().filter(|x| x["key"] == format!("{split}/{cap}")).collect();
            assert_eq!(rows.len(), a.n);
            let (mut right, mut top, mut right_strict, mut top_strict) = (0.0, 0.0, 0.0, 0.0);
            for x in &rows {
                let (r, t) = row_rates(x, "right");
                let (rs, ts) = row_rates(x, "right_strict");
                right += r;
                top += t;
                right_strict += rs;
                top_strict += ts;
            }
            assert!((right / a.n as f64 - a.single).abs() < 1e-9 && (top / a.n as f64 - a.rerank_top1).abs() < 1e-9);
            // the strict reading likewise, from the same rows
            let n = a.n as f64;
            assert!((right_strict / n - a.single_strict).abs() < 1e-9, "{a:?}");
            assert!((top_strict / n - a.rerank_top1_strict).abs() < 1e-9, "{a:?}");
        }
    }
    // the held-out cells' control: the seen captions that name a colour of the held-out pairs
    // for an object (a background named is not an object's)
    let colours: Vec<&str> = tessera::world::held_out_colours().iter().map(|c| c.name()).collect();
    assert_eq!(r.seen_held_out_colours.keys().collect::<Vec<_>>(), r.held_out.keys().collect::<Vec<_>>());
    for (cap, c) in &r.seen_held_out_colours {
        let (mut n, mut right, mut top) = (0, 0.0, 0.0);
        for x in rankings.iter().filter(|x| x["key"] == format!("seen/{cap}")) {
            let caption = x["caption"].as_str().unwrap();
            let objects = caption.split(" on a ").next().unwrap();
            if !objects.split(' ').any(|w| colours.contains(&w.trim_end_matches(','))) {
                continue;
            }
            let (r, t) = row_rates(x, "right");
            n += 1;
            right += r;
            top += t;
        }
        let k = n.max(1) as f64;
        assert_eq!(c.n, n, "{cap}");
        assert!((c.single - right / k).abs() < 1e-9 && (c.rerank_top1 - top / k).abs() < 1e-9, "{cap}: {c:?}");
    }
    // one capability alone: the very captions, seeds and verdicts of its cells in the full
    // evaluation, read back from the full evaluation's samples file or drawn again
    let only = tessera::report::EvalOptions { only: vec![tessera::world::Capability::Transform], ..opts.clone() };
    let fresh = tessera::report::EvalOptions { samples_file: None, ..only.clone() };
    for (o, reused) in [(&only, true), (&fresh, false)] {
        let t = tessera::report::evaluate(&m, o, &dir.path().join("eval-only"), |_| {}).unwrap();
        assert_eq!(t.samples_reused, reused);
        assert_eq!(t.accuracy.keys().collect::<Vec<_>>(), ["transform"]);
        assert_eq!(t.held_out.keys().collect::<Vec<_>>(), ["transform"]);
        assert_eq!(t.dvae_roundtrip.keys().collect::<Vec<_>>(), ["transform"]);
        for (a, b) in
            [(&t.accuracy["transform"], &r.accuracy["transform"]), (&t.held_out["transform"], &r.held_out["transform"])]
        {
            assert_eq!((a.single, a.rerank_top1, a.n, a.pairs), (b.single, b.rerank_top1, b.n, b.pairs));
            assert_eq!((&a.misses, a.rerank_pairs), (&b.misses, b.rerank_pairs));
        }
        assert_eq!(t.dvae_roundtrip_held_out["transform"], r.dvae_roundtrip_held_out["transform"]);
    }
    // the narrowed run left the full evaluation's samples file whole
    assert!(tessera::report::evaluate(&m, &opts, &out, |_| {}).unwrap().samples_reused);
    // every wrong sample has a reason, and the picks' reasons are among them
    for a in r.accuracy.values().chain(r.held_out.values()) {
        let wrong = (2.0 * a.n as f64 * (1.0 - a.single)).round() as usize;
        assert_eq!(a.misses.values().sum::<usize>(), wrong, "{a:?}");
        assert_eq!(a.top1_misses.values().sum::<usize>(), a.n - (a.n as f64 * a.rerank_top1).round() as usize);
        assert!(a.top1_misses.iter().all(|(k, n)| a.misses.get(k).is_some_and(|m| m >= n)), "{a:?}");
        // a perfect reranker's top-1 bounds the real one's, and one sample's chance
        assert!(a.any_right >= a.rerank_top1 && a.any_right >= a.single, "{a:?}");
    }
    // the samples file: read back, the same report; another reranker on the same samples
    // (what depends on the samples alone: the reranker's scores may differ in the last bits
    // between runs, which could swap a near tie)
    let same = |a: &tessera::report::Report, b: &tessera::report::Report| {
        let strip = |r: &tessera::report::Report| {
            let mut v = serde_json::to_value(r).unwrap();
            let o = v.as_object_mut().unwrap();
            for k in ["seconds_per_image", "samples_reused"] {
                o.remove(k);
            }
            for split in ["accuracy", "held_out"] {
                for acc in o[split].as_object_mut().unwrap().values_mut() {
                    for k in ["rerank_top1", "rerank_top1_strict", "rerank_pairs", "top1_misses"] {
                        acc.as_object_mut().unwrap().remove(k);
                    }
                }
            }
            v
        };
        strip(a) == strip(b)
    };
    let again = tessera::report::evaluate(&m, &opts, &dir.path().join("eval2"), |_| {}).unwrap();
    assert!(again.samples_reused && again.seconds_per_image.is_nan());
    assert!(same(&r, &again), "{r:?}\n{again:?}");
    let mut other = tessera::Model::load(dir.path(), Device::Cpu).unwrap();
    let reranker = other.reranker.as_mut().unwrap();
    tch::no_grad(|| {
        for (_, mut v) in reranker.vs.variables() {
            let _ = v.g_add_(&(v.randn_like() * 0.5));
        }
    });
    let reranked = tessera::report::evaluate(&other, &opts, &dir.path().join("eval3"), |_| {}).unwrap();
    assert!(reranked.samples_reused);
    for (mine, theirs) in [(&r.accuracy, &reranked.accuracy), (&r.held_out, &reranked.held_out)] {
        for (k, a) in mine {
            let b = &theirs[k];
            assert_eq!((a.single, &a.misses, a.pairs), (b.single, &b.misses, b.pairs), "{k}");
        }
    }
    // another transformer draws again and replaces the file
    tch::no_grad(|| {
        for (_, mut v) in other.transformer.vs.variables() {
            let _ = v.g_add_(&(v.randn_like() * 0.5));
        }
    });
    let mut said = Vec::new();
    let redrawn =
        tessera::report::evaluate(&other, &opts, &dir.path().join("eval4"), |l| said.push(l.to_string())).unwrap();
    assert!(!redrawn.samples_reused, "{said:?}");
    assert!(said.iter().any(|l| l.contains("another transformer")), "{said:?}");
    assert!(tessera::report::evaluate(&other, &opts, &dir.path().join("eval5"), |_| {}).unwrap().samples_reused);
    // a damaged samples file (cut short by a full disk, say) is drawn again and replaced
    let full = std::fs::read(&kept).unwrap();
    std::fs::write(&kept, &full[..full.len() * 9 / 10]).unwrap();
    let mut said = Vec::new();
    let again =
        tessera::report::evaluate(&other, &opts, &dir.path().join("eval5"), |l| said.push(l.to_string())).unwrap();
    assert!(!again.samples_reused && said.iter().any(|l| l.contains("damaged")), "{said:?}");
    // rewritten whole (a pixel may differ by a level: threads may sum in another order)
    assert_eq!(std::fs::read(&kept).unwrap().len(), full.len());
    assert!(tessera::report::evaluate(&other, &opts, &dir.path().join("eval5"), |_| {}).unwrap().samples_reused);
    // a file that is not a samples file is refused and left as it is
    let weights = dir.path().join("transformer.safetensors");
    let before = std::fs::read(&weights).unwrap();
    let not_samples = tessera::report::EvalOptions { samples_file: Some(weights.clone()), ..opts.clone() };
    let e = tessera::report::evaluate(&m, &not_samples, &dir.path().join("eval6"), |_| {}).unwrap_err().to_string();
    assert!(e.contains("not a samples file"), "{e}");
    assert_eq!(std::fs::read(&weights).unwrap(), before);
    // the dVAE alone: no sampling, the same round trips of the same scenes
    let dvae_only = dir.path().join("eval-dvae");
    let d =
        tessera::report::evaluate(&m, &tessera::report::EvalOptions { samples: 0, ..opts.clone() }, &dvae_only, |_| {})
            .unwrap();
    assert!(d.accuracy.is_empty() && d.held_out.is_empty());
    assert_eq!(d.dvae_roundtrip, r.dvae_roundtrip);
    assert_eq!(d.dvae_psnr_db, r.dvae_psnr_db);
    let md = std::fs::read_to_string(dvae_only.join("report.md")).unwrap();
    assert_eq!(md.lines().filter(|l| l.starts_with("| ") && l.contains('%')).count(), 6, "{md}");
}

/// The dVAE of `dir` with its hard-code reconstruction of `images`: (tokens, mean squared error,
/// encoder tensors).
fn hard_reconstruction(dir: &Path, images: &tch::Tensor) -> (tch::Tensor, f64, Vec<(String, tch::Tensor)>) {
    let cfg = tessera::Model::load_config(dir).unwrap();
    let mut m = tessera::model::DvaeModel::new(&cfg, Device::Cpu);
    tessera::io::load_varstore(&mut m.vs, &dir.join("dvae.safetensors")).unwrap();
    let tokens = tch::no_grad(|| m.net.encode(images));
    let rec = tch::no_grad(|| m.net.decode(&tokens));
    let mse = (rec - images).square().mean(tch::Kind::Float).double_value(&[]);
    let encoder =
        sorted_state(&dir.join("dvae.safetensors")).into_iter().filter(|(n, _)| n.starts_with("encoder.")).collect();
    (tokens, mse, encoder)
}

/// 16 pictures of the world (seed 77) at `size` pixels, [16, 3, size, size] in [0, 1].
fn world_pictures(size: usize) -> tch::Tensor {
    let source = tessera::data::Source::open("world:77").unwrap();
    let images: Vec<Vec<u8>> =
        (0..16).map(|i| source.get(i, size, &mut tessera::sample::SeedRng::new(i)).unwrap().rgb).collect();
    tessera::model::from_rgb8(&images, size, Device::Cpu).unwrap()
}

#[test]
fn decoder_fine_tuning_keeps_every_token_and_sharpens_hard_codes() {
    let _cpu = crate::common::heavy_cpu();
    let dir = tempfile::tempdir().unwrap();
    new_dir(dir.path());
    let mut o = options(dir.path(), 40, None, false);
    o.checkpoint_every = 20;
    let schedule = tessera::dvae::DvaeSchedule { lr_start: 3e-3, lr_end: 3e-4, lr_steps: 40, ..Default::default() };
    let decoder_only = DvaeRecipe { schedule: schedule.clone(), decoder_only: true, ..Default::default() };
    // nothing to fine-tune yet: a clear error, nothing written
    let err = train::train_dvae(&o, &decoder_only).unwrap_err().to_string();
    assert!(err.contains("train the dVAE first"), "{err}");
    assert!(!dir.path().join("dvae.safetensors").exists());
    train::train_dvae(&o, &DvaeRecipe { schedule, ..Default::default() }).unwrap();

    let cfg = tessera::Model::load_config(dir.path()).unwrap();
    let x = world_pictures(cfg.dvae.image_size);
    let (tokens0, mse0, encoder0) = hard_reconstruction(dir.path(), &x);

    // the fine-tune gets enough steps that its gain stands clear of float differences between
    // machines (40 steps of 4 gave 0.75× here and 0.81× on another CPU)
    o.steps = 160;
    o.batch = 8;
    o.checkpoint_every = 80;
    // stored in bf16: the trained decoder is, the frozen encoder stays f32 as loaded
    o.weights_bf16 = true;
    let f32_size = bytes(&dir.path().join("dvae.safetensors")).len();
    let decoder_only = DvaeRecipe {
        schedule: tessera::dvae::DvaeSchedule { lr_steps: 160, ..decoder_only.schedule.clone() },
        ..decoder_only
    };
    let s = train::train_dvae(&o, &decoder_only).unwrap();
    assert_eq!(s.step, 160);
    assert!(dir.path().join("dvae-decoder.state.safetensors").exists());
    assert!(dir.path().join("dvae-decoder.log.jsonl").exists());
    let (tokens1, mse1, encoder1) = hard_reconstruction(dir.path(), &x);
    assert!(tokens0.equal(&tokens1), "fine-tuning the decoder changed image tokens");
    assert_eq!(encoder0.len(), encoder1.len());
    for ((n, a), (_, b)) in encoder0.iter().zip(&encoder1) {
        assert!(a.equal(b), "encoder tensor {n} changed");
    }
    assert!(mse1 < 0.8 * mse0, "hard-code reconstruction error {mse0} → {mse1}");
    let size = bytes(&dir.path().join("dvae.safetensors")).len();
    assert!(size < f32_size * 4 / 5, "the decoder was not stored in bf16 ({f32_size} → {size} bytes)");
}

#[test]
fn training_dtype_auto_is_bf16_where_the_cpu_computes_it_natively() {
    // three runs from the same start, in processes of their own: auto's weights are bf16's on a
    // CPU with bf16 instructions and f32's elsewhere, and the two differ (so the test tells)
    let _cpu = crate::common::heavy_cpu();
    let trained = |dtype: &str| {
        let dir = tempfile::tempdir().unwrap();
        new_dir(dir.path());
        tessera(&["train", "dvae", "--steps", "3", "--dtype", dtype], dir.path());
        bytes(&dir.path().join("dvae.safetensors"))
    };
    let (auto, single, half) = (trained("auto"), trained("f32"), trained("bf16"));
    assert!(single != half, "bf16 training gave f32's weights");
    let native = tessera::native_bf16(tch::Device::Cpu);
    assert!(
        auto == if native { half } else { single },
        "auto did not pick {} here",
        if native { "bf16" } else { "f32" }
    );
    assert!(tessera::parse_train_dtype("f16", tch::Device::Cpu).is_err());
}

/// The decoder of `dir`'s dVAE as another configuration describes it, grown from the file's
/// weights; its hard-code reconstruction of `tokens`.
fn grown_reconstruction(
    trained: &tessera::model::DvaeModel,
    cfg: &Config,
    grown_dvae: &tessera::config::DvaeConfig,
    tokens: &tch::Tensor,
) -> tch::Tensor {
    let mut big = cfg.clone();
    big.dvae = grown_dvae.clone();
    let grown = tessera::model::DvaeModel::new(&big, Device::Cpu);
    tessera::dvae::grow_decoder(&trained.vs, &cfg.dvae, &grown.vs, &big.dvae).unwrap();
    let numel: i64 = grown.vs.variables().values().map(|t| t.numel() as i64).sum();
    assert_eq!(numel as u64, tessera::params::count(&big).dvae, "parameter count of {grown_dvae:?}");
    tch::no_grad(|| grown.net.decode(tokens))
}

#[test]
fn a_grown_decoder_draws_what_the_trained_one_drew_and_trains_on_from_there() {
    let _cpu = crate::common::heavy_cpu();
    let dir = tempfile::tempdir().unwrap();
    new_dir(dir.path());
    let mut o = options(dir.path(), 12, None, false);
    o.checkpoint_every = 12;
    train::train_dvae(&o, &DvaeRecipe::default()).unwrap();
    let cfg = tessera::Model::load_config(dir.path()).unwrap();
    let x = world_pictures(cfg.dvae.image_size);
    let (tokens0, mse0, encoder0) = hard_reconstruction(dir.path(), &x);
    let mut trained = tessera::model::DvaeModel::new(&cfg, Device::Cpu);
    tessera::io::load_varstore(&mut trained.vs, &dir.path().join("dvae.safetensors")).unwrap();
    let rec0 = tch::no_grad(|| trained.net.decode(&tokens0));

    // wider, deeper, both: the same pictures from the same codes (up to float summation order)
    let h = cfg.dvae.hidden;
    for (hidden, blocks) in [(Some(2 * h), None), (None, Some(3)), (Some(3 * h), Some(2))] {
        let want = tessera::config::DvaeConfig {
            decoder_hidden: hidden,
            decoder_blocks_per_group: blocks,
            ..cfg.dvae.clone()
        };
        let rec = grown_reconstruction(&trained, &cfg, &want, &tokens0);
        let diff = crate::common::max_abs_diff(&rec, &rec0);
        assert!(diff < 1e-5, "{hidden:?} {blocks:?}: grown decoder differs by {diff}");
    }
    // a decoder cannot shrink, nor grow into one whose first identity path changes kind
    let smaller = tessera::config::DvaeConfig { decoder_hidden: Some(h / 2), ..cfg.dvae.clone() };
    let mut small_cfg = cfg.clone();
    small_cfg.dvae = smaller.clone();
    let small = tessera::model::DvaeModel::new(&small_cfg, Device::Cpu);
    let err = tessera::dvae::grow_decoder(&trained.vs, &cfg.dvae, &small.vs, &smaller).unwrap_err();
    assert!(err.contains("not shrink"), "{err}");

    // through the trainer: config.json records the size, every token stays, training goes on
    let grow = DvaeRecipe {
        decoder_only: true,
        decoder_hidden: Some(2 * h),
        decoder_blocks: Some(2),
        schedule: tessera::dvae::DvaeSchedule { lr_start: 1e-3, lr_end: 1e-4, lr_steps: 40, ..Default::default() },
        ..Default::default()
    };
    let err = train::train_dvae(&o, &DvaeRecipe { decoder_only: false, ..grow.clone() }).unwrap_err().to_string();
    assert!(err.contains("need --decoder-only"), "{err}");
    let err =
        train::train_dvae(&o, &DvaeRecipe { decoder_hidden: Some(h / 2), ..grow.clone() }).unwrap_err().to_string();
    assert!(err.contains("not shrink"), "{err}");
    assert_eq!(tessera::Model::load_config(dir.path()).unwrap(), cfg, "a refused run changed config.json");

    // a run killed after writing config.json and before its first checkpoint is the state
    // another directory starts from: the next run, without the flags, grows the file's decoder
    let killed = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json", "dvae.safetensors"] {
        std::fs::copy(dir.path().join(f), killed.path().join(f)).unwrap();
    }
    o.steps = 40;
    o.checkpoint_every = 20;
    o.batch = 8;
    let s = train::train_dvae(&o, &grow).unwrap();
    assert_eq!(s.step, 40);
    let grown_cfg = tessera::Model::load_config(dir.path()).unwrap();
    assert_eq!(grown_cfg.dvae.decoder_hidden, Some(2 * h));
    assert_eq!(grown_cfg.dvae.decoder_blocks_per_group, Some(2));
    let (tokens1, mse1, encoder1) = hard_reconstruction(dir.path(), &x);
    assert!(tokens0.equal(&tokens1), "growing the decoder changed image tokens");
    for ((n, a), (_, b)) in encoder0.iter().zip(&encoder1) {
        assert!(a.equal(b), "encoder tensor {n} changed");
    }
    assert!(mse1 < 0.9 * mse0, "hard-code reconstruction error {mse0} → {mse1}");

    let json = serde_json::to_string_pretty(&grown_cfg).unwrap();
    std::fs::write(killed.path().join("config.json"), json).unwrap();
    // the next run, without the flags, grows the file's decoder: at learning rate 0 the weights
    // it writes are the grown ones, which draw what the trained decoder drew
    let mut k = options(killed.path(), 1, None, false);
    k.checkpoint_every = 1;
    let frozen = tessera::dvae::DvaeSchedule { lr_start: 0.0, lr_end: 0.0, lr_steps: 1, ..Default::default() };
    let rerun = DvaeRecipe { decoder_hidden: None, decoder_blocks: None, schedule: frozen, ..grow.clone() };
    train::train_dvae(&k, &rerun).unwrap();
    let mut regrown = tessera::model::DvaeModel::new(&grown_cfg, Device::Cpu);
    tessera::io::load_varstore(&mut regrown.vs, &killed.path().join("dvae.safetensors")).unwrap();
    let diff = crate::common::max_abs_diff(&tch::no_grad(|| regrown.net.decode(&tokens0)), &rec0);
    assert!(diff < 1e-5, "the decoder grown on the next run draws differently by {diff}");
    // resuming with another size is refused; with the same, or no flags, it goes on
    o.resume = true;
    let err = train::train_dvae(&o, &DvaeRecipe { decoder_blocks: Some(3), ..grow.clone() }).unwrap_err().to_string();
    assert!(err.contains("run being resumed"), "{err}");
    o.steps = 44;
    train::train_dvae(&o, &grow).unwrap();
    assert_eq!(tessera::Model::load_config(dir.path()).unwrap(), grown_cfg);
}

#[test]
fn the_dvae_log_scores_hard_codes_exactly_as_eval_does() {
    let dir = tempfile::tempdir().unwrap();
    new_dir(dir.path());
    let mut o = options(dir.path(), 6, None, false);
    o.checkpoint_every = 6;
    train::train_dvae(&o, &DvaeRecipe { usage_weight: 0.5, ..Default::default() }).unwrap();
    let log = std::fs::read_to_string(dir.path().join("dvae.log.jsonl")).unwrap();
    let check: serde_json::Value = log
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str(l).ok())
        .find(|v: &serde_json::Value| v.get("hard_psnr_db").is_some())
        .unwrap();
    let step_record: serde_json::Value = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .find(|v: &serde_json::Value| v.get("usage_deficit").is_some())
        .unwrap();
    assert!(step_record["usage_deficit"].as_f64().unwrap() >= 0.0);
    // a dVAE with a transformer and reranker is a model `eval` loads
    train::train_transformer(&options(dir.path(), 1, None, false), &TransformerRecipe::default()).unwrap();
    let m = tessera::Model::load(dir.path(), Device::Cpu).unwrap();
    let opts = tessera::report::EvalOptions {
        captions: 20,
        samples: 0,
        seed: 9,
        sample: Default::default(),
        samples_file: None,
        only: Vec::new(),
    };
    let r = tessera::report::evaluate(&m, &opts, &dir.path().join("eval"), |_| {}).unwrap();
    assert_eq!(check["hard_psnr_db"].as_f64().unwrap(), r.dvae_psnr_db);
    assert_eq!(check["codes_used"].as_u64().unwrap() as usize, r.dvae_codes_used);
    for (cap, v) in &r.dvae_roundtrip {
        assert_eq!(check["roundtrip"][cap].as_f64().unwrap(), *v, "{cap}");
    }
    // single objects by what the caption asks for, against round trips scored one at a time here
    use tessera::world::{Capability, Split};
    let size = m.config.dvae.image_size;
    let scenes = tessera::report::eval_scenes(Capability::SingleObject, 20, 9, Split::Train);
    let mut want = std::collections::BTreeMap::<String, (usize, usize)>::new();
    let mut why = std::collections::BTreeMap::<String, usize>::new();
    for s in &scenes {
        let x = tessera::model::from_rgb8(&[tessera::world::render(s, size)], size, Device::Cpu).unwrap();
        let back = tch::no_grad(|| m.dvae.net.decode(&m.dvae.net.encode(&x)));
        let verdict = tessera::eval::judge(s, &tessera::model::to_rgb8(&back).unwrap()[0], size);
        if let Err(miss) = verdict {
            *why.entry(miss.name().to_string()).or_default() += 1;
        }
        let ok = verdict.is_ok() as usize;
        let o = &s.objects[0];
        for key in [
            format!("background {}", s.background.name()),
            format!("size {}", o.size.name()),
            format!("shape {}", o.shape.name()),
        ] {
            let e = want.entry(key).or_default();
            e.0 += ok;
            e.1 += 1;
        }
    }
    assert_eq!(r.dvae_single_object, want);
    // why they fail, counted the same way; and every capability's misses add up to its failures
    assert_eq!(r.dvae_roundtrip_misses["single_object"], why);
    for (cap, acc) in &r.dvae_roundtrip {
        let failed: usize = r.dvae_roundtrip_misses[cap].values().sum();
        assert_eq!(failed, 20 - (acc * 20.0).round() as usize, "{cap}");
    }
    for group in ["background ", "size ", "shape "] {
        let (ok, n) =
            want.iter().filter(|(k, _)| k.starts_with(group)).fold((0, 0), |(a, b), (_, &(ok, n))| (a + ok, b + n));
        assert_eq!(n, 20, "{group}: every scene once");
        assert_eq!(ok as f64 / 20.0, r.dvae_roundtrip["single_object"], "{group}: the passes of the round trip");
    }
}

#[test]
fn a_transformer_can_start_from_another_models_weights() {
    let _cpu = crate::common::heavy_cpu();
    let (a, b, c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for d in [a.path(), b.path(), c.path()] {
        new_dir(d);
        train::train_dvae(&options(d, 1, None, false), &DvaeRecipe::default()).unwrap();
    }
    // a: a transformer trained a few steps; b: one step from a's weights at a negligible rate
    let recipe = TransformerRecipe { lr: 3e-3, warmup: 1, ..Default::default() };
    train::train_transformer(&options(a.path(), 4, None, false), &recipe).unwrap();
    let source = a.path().join("transformer.safetensors");
    let tiny = TransformerRecipe { lr: 1e-12, warmup: 1, init_from: Some(source.clone()), ..Default::default() };
    train::train_transformer(&options(b.path(), 1, None, false), &tiny).unwrap();
    let want = assert_kept(&source, &b.path().join("transformer.safetensors"));
    // without --init-from the same step starts from a random initialisation
    let fresh = TransformerRecipe { init_from: None, ..tiny };
    train::train_transformer(&options(c.path(), 1, None, false), &fresh).unwrap();
    let other = sorted_state(&c.path().join("transformer.safetensors"));
    assert!(want.iter().zip(&other).any(|((_, x), (_, y))| (x - y).abs().max().double_value(&[]) > 1e-3));
    // a file of another shape is refused, naming it
    let wrong = a.path().join("dvae.safetensors");
    let bad = TransformerRecipe { init_from: Some(wrong.clone()), ..Default::default() };
    let e = train::train_transformer(&options(c.path(), 1, None, false), &bad).unwrap_err().to_string();
    assert!(e.contains("dvae.safetensors"), "{e}");
}

/// Two tiny model directories, a and b; a's reranker trained 4 steps at a rate that moves it
/// well away from its initialisation (its weight file, the third).
fn two_dirs_one_with_a_trained_reranker() -> (tempfile::TempDir, tempfile::TempDir, std::path::PathBuf) {
    let (a, b) = (tiny_dir(), tiny_dir());
    let mut o = options(a.path(), 4, None, false);
    o.batch = 8;
    train::train_reranker(&o, &RerankerRecipe { lr: 3e-3, warmup: 1, ..Default::default() }).unwrap();
    let source = a.path().join("reranker.safetensors");
    (a, b, source)
}

#[test]
fn a_reranker_can_start_from_another_models_weights() {
    let _cpu = crate::common::heavy_cpu();
    let (a, b, source) = two_dirs_one_with_a_trained_reranker();
    // one step at a negligible rate from a's weights keeps them
    let mut ob = options(b.path(), 1, None, false);
    ob.batch = 8;
    train::train_reranker(
        &ob,
        &RerankerRecipe { lr: 1e-12, warmup: 1, init_from: Some(source.clone()), ..Default::default() },
    )
    .unwrap();
    let want = assert_kept(&source, &b.path().join("reranker.safetensors"));
    // without it the same step starts from a random initialisation
    train::train_reranker(&ob, &RerankerRecipe { lr: 1e-12, warmup: 1, ..Default::default() }).unwrap();
    let other = sorted_state(&b.path().join("reranker.safetensors"));
    assert!(want.iter().zip(&other).any(|((_, x), (_, y))| (x - y).abs().max().double_value(&[]) > 1e-3));
    // a file of another shape is refused, naming it
    train::train_dvae(&options(a.path(), 1, None, false), &DvaeRecipe::default()).unwrap();
    let wrong = a.path().join("dvae.safetensors");
    let e = train::train_reranker(&ob, &RerankerRecipe { init_from: Some(wrong.clone()), ..Default::default() })
        .unwrap_err()
        .to_string();
    assert!(e.contains("dvae.safetensors"), "{e}");
}

/// The reranker in `dir` (its config and weights) scoring each of `images` against each of
/// `captions`: [images, captions].
fn reranker_scores(dir: &Path, images: &tch::Tensor, captions: &[Vec<i64>]) -> tch::Tensor {
    let cfg = tessera::Model::load_config(dir).unwrap();
    let mut m = tessera::model::RerankerModel::new(&cfg, Device::Cpu);
    tessera::io::load_varstore(&mut m.vs, &dir.join("reranker.safetensors")).unwrap();
    let (ids, valid) = m.net.batch_text(captions, Device::Cpu);
    tch::no_grad(|| m.net.encode_image(images).matmul(&m.net.encode_text(&ids, &valid).tr()) * m.net.scale())
}

#[test]
fn a_reranker_grown_deeper_scores_what_it_did_and_trains_its_new_blocks() {
    let _cpu = crate::common::heavy_cpu();
    let (a, b, source) = two_dirs_one_with_a_trained_reranker();
    let cfg = tessera::Model::load_config(a.path()).unwrap();
    assert_eq!(cfg.reranker.image_blocks, 0);
    let x = world_pictures(cfg.dvae.image_size);
    let captions: Vec<Vec<i64>> = (0..5).map(|i| vec![i + 1, 2 * i + 3, 7, i + 2]).collect();
    let before = reranker_scores(a.path(), &x, &captions);

    // b asks for two residual blocks per image stage: one step at rate 0 from a's file grows it,
    // and the grown reranker scores every picture against every caption as a's did
    let mut deeper = cfg.clone();
    deeper.reranker.image_blocks = 2;
    std::fs::write(b.path().join("config.json"), serde_json::to_string_pretty(&deeper).unwrap()).unwrap();
    let mut ob = options(b.path(), 1, None, false);
    ob.batch = 8;
    let grow = RerankerRecipe { lr: 0.0, warmup: 1, init_from: Some(source.clone()), ..Default::default() };
    train::train_reranker(&ob, &grow).unwrap();
    let grown = sorted_state(&b.path().join("reranker.safetensors"));
    assert_eq!(grown.iter().filter(|(n, _)| n.starts_with("image.blocks.")).count(), 4 * 2 * 2 * 2);
    let diff = crate::common::max_abs_diff(&reranker_scores(b.path(), &x, &captions), &before);
    assert!(diff < 1e-4, "the grown reranker scores differently by {diff}");

    // trained from there, its new blocks learn (their zero convolutions move) and the scores change
    let mut train_on = options(b.path(), 6, None, false);
    train_on.batch = 8;
    let go = RerankerRecipe { lr: 3e-3, warmup: 1, init_from: Some(source.clone()), ..Default::default() };
    train::train_reranker(&train_on, &go).unwrap();
    let trained = sorted_state(&b.path().join("reranker.safetensors"));
    let moved = trained
        .iter()
        .filter(|(n, _)| n.starts_with("image.blocks.") && n.contains("conv2.weight"))
        .map(|(_, t)| t.abs().max().double_value(&[]))
        .fold(0.0, f64::max);
    assert!(moved > 1e-4, "the new blocks' second convolutions stayed at zero ({moved})");
    let diff = crate::common::max_abs_diff(&reranker_scores(b.path(), &x, &captions), &before);
    assert!(diff > 1e-3, "training the grown reranker changed no score ({diff})");

    // the deeper file does not load into the plain config (named), and a reranker cannot shrink
    let mut plain = tessera::model::RerankerModel::new(&cfg, Device::Cpu);
    let e = tessera::io::load_varstore(&mut plain.vs, &b.path().join("reranker.safetensors")).unwrap_err().to_string();
    assert!(e.contains("reranker.safetensors") && e.contains("unexpected tensor image.blocks."), "{e}");
    let big = tessera::model::RerankerModel::new(&deeper, Device::Cpu);
    let e = tessera::clip::grow_image_blocks(&big.vs, &deeper.reranker, &plain.vs, &cfg.reranker).unwrap_err();
    assert!(e.contains("not shrink"), "{e}");
    let names: Vec<String> = grown.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(tessera::clip::image_blocks_of(names.iter().map(|n| n.as_str())), Some(2));
    assert_eq!(tessera::clip::image_blocks_of(["encoder.blocks.0.w"]), None);
}

#[test]
fn a_transformer_grown_deeper_gives_its_logits_and_trains_its_new_layers() {
    use tessera::config::{AttentionKind, AttentionPattern};
    let _cpu = crate::common::heavy_cpu();
    let (a, b) = (tiny_dir(), tiny_dir());
    train::train_dvae(&options(a.path(), 1, None, false), &DvaeRecipe::default()).unwrap();
    std::fs::copy(a.path().join("dvae.safetensors"), b.path().join("dvae.safetensors")).unwrap();
    // a: four trained layers (the paper's pattern: row, column, row, convolutional)
    train::train_transformer(
        &options(a.path(), 4, None, false),
        &TransformerRecipe { lr: 3e-3, warmup: 1, ..Default::default() },
    )
    .unwrap();
    let cfg = tessera::Model::load_config(a.path()).unwrap();
    assert_eq!(cfg.transformer.n_layers, 4);
    let source = a.path().join("transformer.safetensors");
    // b asks for six: one step at rate 0 from a's file grows it (two row layers before the last)
    let mut deeper = cfg.clone();
    deeper.transformer.n_layers = 6;
    std::fs::write(b.path().join("config.json"), serde_json::to_string_pretty(&deeper).unwrap()).unwrap();
    let grow = TransformerRecipe { lr: 0.0, warmup: 1, init_from: Some(source.clone()), ..Default::default() };
    train::train_transformer(&options(b.path(), 1, None, false), &grow).unwrap();

    let load = |c: &Config, d: &Path| {
        let mut t = tessera::model::TransformerModel::new(c, Device::Cpu);
        tessera::io::load_varstore(&mut t.vs, &d.join("transformer.safetensors")).unwrap();
        t
    };
    let text = tch::Tensor::randint(
        cfg.text.vocab_size as i64,
        [3, cfg.text.text_len as i64],
        (tch::Kind::Int64, Device::Cpu),
    );
    let image =
        tch::Tensor::randint(cfg.dvae.vocab_size as i64, [3, cfg.image_len() as i64], (tch::Kind::Int64, Device::Cpu));
    let logits = |t: &tessera::model::TransformerModel| tch::no_grad(|| t.net.forward(&text, &image, false));
    let (ta, tb) = (load(&cfg, a.path()), load(&deeper, b.path()));
    let ((xa, ia), (xb, ib)) = (logits(&ta), logits(&tb));
    let d_text = (xa - xb).abs().max().double_value(&[]);
    let d_image = (&ia - &ib).abs().max().double_value(&[]);
    assert!(d_text < 1e-4 && d_image < 1e-4, "the grown transformer's logits differ by {d_text} / {d_image}");
    // the layers kept are the same tensors: a's last block is b's last
    let (sa, sb) = (sorted_state(&source), sorted_state(&b.path().join("transformer.safetensors")));
    let find =
        |s: &[(String, tch::Tensor)], n: &str| s.iter().find(|(m, _)| m == n).map(|(_, t)| t.shallow_clone()).unwrap();
    assert!(find(&sa, "blocks.3.attn.qkv.weight").equal(&find(&sb, "blocks.5.attn.qkv.weight")));
    assert!(find(&sa, "blocks.1.fc1.weight").equal(&find(&sb, "blocks.1.fc1.weight")));
    for i in [3, 4] {
        assert_eq!(find(&sb, &format!("blocks.{i}.fc2.weight")).abs().max().double_value(&[]), 0.0);
    }

    // trained from there, the new layers learn and the logits change
    let go = TransformerRecipe { lr: 3e-3, warmup: 1, init_from: Some(source.clone()), ..Default::default() };
    train::train_transformer(&options(b.path(), 4, None, false), &go).unwrap();
    let sb = sorted_state(&b.path().join("transformer.safetensors"));
    let moved = find(&sb, "blocks.4.fc2.weight").abs().max().double_value(&[]);
    assert!(moved > 1e-4, "a new layer's second projection stayed at zero ({moved})");
    let d = (logits(&load(&deeper, b.path())).1 - &ia).abs().max().double_value(&[]);
    assert!(d > 1e-3, "training the grown transformer changed no logit ({d})");

    // refused, named: shrinking, another width, layers kept with another attention kind
    let (big, small) = (tessera::model::TransformerModel::new(&deeper, Device::Cpu), load(&cfg, a.path()));
    let e = tessera::transformer::grow_layers(&big.vs, &deeper.transformer, &small.vs, &cfg.transformer).unwrap_err();
    assert!(e.contains("not shrink"), "{e}");
    let mut wider = deeper.clone();
    wider.transformer.d_model = 64;
    let w = tessera::model::TransformerModel::new(&wider, Device::Cpu);
    let e = tessera::transformer::grow_layers(&small.vs, &cfg.transformer, &w.vs, &wider.transformer).unwrap_err();
    assert!(e.contains("width"), "{e}");
    let mut full = deeper.clone();
    full.transformer.attention = AttentionPattern::Layers(vec![AttentionKind::Full; 6]);
    let f = tessera::model::TransformerModel::new(&full, Device::Cpu);
    let e = tessera::transformer::grow_layers(&small.vs, &cfg.transformer, &f.vs, &full.transformer).unwrap_err();
    assert!(e.contains("keep their attention"), "{e}");
    let names: Vec<String> = sb.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(tessera::transformer::layers_of(names.iter().map(|n| n.as_str())), Some(6));
    assert_eq!(tessera::transformer::layers_of(["text_emb.weight"]), None);
}

/// Four steps of a tiny dVAE in `dir`, at a rate that moves its weights well away from their
/// initial values.
fn train_a_little_dvae(dir: &std::path::Path) {
    let mut trained = DvaeRecipe::default();
    trained.schedule.lr_start = 3e-3;
    train::train_dvae(&options(dir, 4, None, false), &trained).unwrap();
}

#[test]
fn a_whole_dvae_can_start_from_another_models_weights() {
    let _cpu = crate::common::heavy_cpu();
    let (a, b) = (tiny_dir(), tiny_dir());
    train_a_little_dvae(a.path());
    let source = a.path().join("dvae.safetensors");
    // one step at a negligible rate from a's weights keeps every one of them, the encoder's
    // and codebook's as well as the decoder's
    let mut tiny = DvaeRecipe { init_from: Some(source.clone()), ..Default::default() };
    (tiny.schedule.lr_start, tiny.schedule.lr_end) = (1e-12, 1e-12);
    train::train_dvae(&options(b.path(), 1, None, false), &tiny).unwrap();
    let want = assert_kept(&source, &b.path().join("dvae.safetensors"));
    assert!(want.iter().any(|(n, _)| n.starts_with("enc")) && want.iter().any(|(n, _)| n.starts_with("dec")));
    // without it the same step starts from a random initialisation
    let fresh = DvaeRecipe { init_from: None, ..tiny.clone() };
    train::train_dvae(&options(b.path(), 1, None, false), &fresh).unwrap();
    let other = sorted_state(&b.path().join("dvae.safetensors"));
    assert!(want.iter().zip(&other).any(|((_, x), (_, y))| (x - y).abs().max().double_value(&[]) > 1e-3));
    // a file of another shape is refused, naming it; with --decoder-only it is refused outright
    let wrong = a.path().join("reranker.safetensors");
    train::train_reranker(&options(a.path(), 1, None, false), &RerankerRecipe::default()).unwrap();
    let bad = DvaeRecipe { init_from: Some(wrong), ..Default::default() };
    let e = train::train_dvae(&options(b.path(), 1, None, false), &bad).unwrap_err().to_string();
    assert!(e.contains("reranker.safetensors"), "{e}");
    let both = DvaeRecipe { decoder_only: true, ..tiny };
    let e = train::train_dvae(&options(b.path(), 1, None, false), &both).unwrap_err().to_string();
    assert!(e.contains("--init-from and --decoder-only"), "{e}");
}

/// The transformer tensors that carry the image codes: embedding rows, head rows, head biases.
fn image_code_tensors(path: &Path) -> (tch::Tensor, tch::Tensor, tch::Tensor) {
    let t = sorted_state(path);
    let get = |name: &str| t.iter().find(|(n, _)| n == name).map(|(_, x)| x.shallow_clone()).unwrap();
    (get("image_emb.weight"), get("image_head.weight"), get("image_head.bias"))
}

#[test]
fn a_transformer_carried_over_to_a_dvae_with_renamed_codes_predicts_what_it_did() {
    let _cpu = crate::common::heavy_cpu();
    let (a, b, c) = (tiny_dir(), tiny_dir(), tiny_dir());
    train::train_dvae(&options(a.path(), 2, None, false), &DvaeRecipe::default()).unwrap();
    let recipe = TransformerRecipe { lr: 3e-3, warmup: 1, ..Default::default() };
    train::train_transformer(&options(a.path(), 4, None, false), &recipe).unwrap();
    let cfg = tessera::Model::load_config(a.path()).unwrap();
    let v = cfg.dvae.vocab_size as i64;
    // b's and c's dVAE is a's with its codes renamed: new code k is a's code perm[k]
    let perm = tch::Tensor::from_slice(&(0..v).map(|k| (k * 7 + 3) % v).collect::<Vec<i64>>());
    let old_dvae = a.path().join("dvae.safetensors");
    let mut renamed = tessera::model::DvaeModel::new(&cfg, Device::Cpu);
    tessera::io::load_varstore(&mut renamed.vs, &old_dvae).unwrap();
    let vars = renamed.vs.variables();
    tch::no_grad(|| {
        for (name, dim) in [("encoder.output.weight", 0), ("encoder.output.bias", 0), ("decoder.input.weight", 1)] {
            let mut x = vars[name].shallow_clone();
            let permuted = x.index_select(dim, &perm);
            x.copy_(&permuted);
        }
    });
    for d in [b.path(), c.path()] {
        tessera::io::save_varstore(&renamed.vs, &d.join("dvae.safetensors")).unwrap();
    }
    // one step at a negligible rate from a's transformer, carried over (b) or not (c)
    let source = a.path().join("transformer.safetensors");
    let tiny = TransformerRecipe { lr: 1e-12, warmup: 1, init_from: Some(source.clone()), ..Default::default() };
    let carried = TransformerRecipe { codes_from: Some(a.path().to_path_buf()), ..tiny.clone() };
    train::train_transformer(&options(b.path(), 1, None, false), &carried).unwrap();
    train::train_transformer(&options(c.path(), 1, None, false), &tiny).unwrap();

    let images = world_pictures(cfg.dvae.image_size);
    let (old_codes, _, _) = hard_reconstruction(a.path(), &images);
    let (new_codes, _, _) = hard_reconstruction(b.path(), &images);
    assert!(perm.index_select(0, &new_codes.flatten(0, -1)).equal(&old_codes.flatten(0, -1)), "the codes are renamed");
    let load = |d: &Path| {
        let mut t = tessera::model::TransformerModel::new(&cfg, Device::Cpu);
        tessera::io::load_varstore(&mut t.vs, &d.join("transformer.safetensors")).unwrap();
        t
    };
    let (ta, tb, tc) = (load(a.path()), load(b.path()), load(c.path()));
    let tok = tessera::text::TextTokenizer::load(&a.path().join("tokenizer.json")).unwrap();
    let caps: Vec<Vec<i64>> =
        (0..16).map(|i| tok.encode(&format!("a red circle {i}"), cfg.text.text_len).unwrap().ids).collect();
    let logits = |t: &tessera::model::TransformerModel, codes: &tch::Tensor| {
        tch::no_grad(|| t.net.forward(&t.net.pad_text(&caps), &codes.flatten(1, -1), false).1)
    };
    let (la, lb, lc) = (logits(&ta, &old_codes), logits(&tb, &new_codes), logits(&tc, &new_codes));
    // the codes the carry-over met keep a's bias (their split is whole); the others fall below
    let (_, _, bias_a) = image_code_tensors(&source);
    let (_, _, bias_b) = image_code_tensors(&b.path().join("transformer.safetensors"));
    let kept = (bias_a.index_select(0, &perm) - &bias_b).abs().lt(1e-5);
    let met: Vec<i64> = (0..v).filter(|&k| kept.int64_value(&[k]) == 1).collect();
    let unmet_max = (0..v).filter(|k| !met.contains(k)).map(|k| bias_b.double_value(&[k])).fold(f64::MIN, f64::max);
    let met_min = met.iter().map(|&k| bias_b.double_value(&[k])).fold(f64::MAX, f64::min);
    assert!(unmet_max < met_min, "codes never met ({unmet_max}) fall below every code met ({met_min})");
    let in_pictures: Vec<i64> =
        Vec::<i64>::try_from(new_codes.flatten(0, -1).unique_dim(0, true, false, false).0).unwrap();
    assert!(
        in_pictures.iter().all(|k| met.contains(k)),
        "every code of these pictures was met: {in_pictures:?} / {met:?}"
    );
    // at those codes, b on the renamed codes gives a's logits on a's codes; c does not
    let cols = tch::Tensor::from_slice(&in_pictures);
    let want = la.index_select(2, &perm.index_select(0, &cols));
    let d_b = (lb.index_select(2, &cols) - &want).abs().max().double_value(&[]);
    let d_c = (lc.index_select(2, &cols) - &want).abs().max().double_value(&[]);
    assert!(d_b < 1e-4, "carried over: the logits move by {d_b}");
    assert!(d_c > 1e-2, "not carried over, the logits should differ (by {d_c})");
    // --codes-from alone is refused before any work
    let lone = TransformerRecipe { init_from: None, ..carried };
    let e = train::train_transformer(&options(c.path(), 1, None, false), &lone).unwrap_err().to_string();
    assert!(e.contains("--init-from"), "{e}");
}

#[test]
fn a_split_code_shares_its_old_logit_and_merged_codes_average_theirs() {
    use tch::{Kind, Tensor};
    // old code 0 became new codes 0 and 1 (1 : 3), old 1 is new 2, old 2 and 3 merged into
    // new 3 (evenly), and new 4 was never met
    let counts = Tensor::from_slice(&[1., 0., 0., 0., 3., 0., 0., 0., 0., 5., 0., 0., 0., 0., 2., 2., 0., 0., 0., 0.])
        .view([5, 4]);
    tch::manual_seed(3);
    let f = (Kind::Double, Device::Cpu);
    let (emb, w, b) = (Tensor::randn([4, 6], f), Tensor::randn([4, 6], f), Tensor::randn([4], f));
    let (e2, w2, b2) = tessera::remap::carried_rows(&counts, &emb, &w, &b);
    let h = Tensor::randn([6, 8], f); // eight hidden states
    let (old, new) = (w.matmul(&h) + b.unsqueeze(1), w2.matmul(&h) + b2.unsqueeze(1));
    let row = |t: &Tensor, i: i64| t.get(i);
    let close = |x: Tensor, y: Tensor, what: &str| {
        let d = (x - y).abs().max().double_value(&[]);
        assert!(d < 1e-9, "{what}: off by {d}");
    };
    close(row(&new, 0), row(&old, 0) + 0.25f64.ln(), "split, a quarter");
    close(row(&new, 1), row(&old, 0) + 0.75f64.ln(), "split, three quarters");
    close(row(&new, 2), row(&old, 1), "renamed");
    close(row(&new, 3), (row(&old, 2) + row(&old, 3)) / 2.0, "merged");
    close(row(&e2, 0), row(&emb, 0), "a split code's embedding");
    close(row(&e2, 1), row(&emb, 0), "a split code's embedding");
    close(row(&e2, 2), row(&emb, 1), "a renamed code's embedding");
    close(row(&e2, 3), (row(&emb, 2) + row(&emb, 3)) / 2.0, "a merged code's embedding");
    close(row(&e2, 4), e2.narrow(0, 0, 4).mean_dim(0, false, Kind::Double), "a code never met: the mean");
    let met_min = b2.narrow(0, 0, 4).min().double_value(&[]);
    assert!(b2.double_value(&[4]) <= met_min - 10.0, "a code never met falls below the others");
}

#[test]
fn a_split_codebook_draws_what_it_drew_and_its_transformer_carries_over() {
    use tch::{Kind, Tensor};
    let _cpu = crate::common::heavy_cpu();
    let (a, b) = (tiny_dir(), tiny_dir());
    train_a_little_dvae(a.path());
    let recipe = TransformerRecipe { lr: 3e-3, warmup: 1, ..Default::default() };
    train::train_transformer(&options(a.path(), 4, None, false), &recipe).unwrap();
    let cfg = tessera::Model::load_config(a.path()).unwrap();
    let v = cfg.dvae.vocab_size as i64;
    // one step at a negligible rate from a's dVAE, each code split in three
    let source = a.path().join("dvae.safetensors");
    let mut split =
        DvaeRecipe { init_from: Some(source.clone()), codebook: Some(3 * v as usize), ..Default::default() };
    (split.schedule.lr_start, split.schedule.lr_end) = (1e-12, 1e-12);
    train::train_dvae(&options(b.path(), 1, None, false), &split).unwrap();
    let cfg_b = tessera::Model::load_config(b.path()).unwrap();
    assert_eq!(cfg_b.dvae.vocab_size, 3 * v as usize, "config.json records the new codebook");

    let images = world_pictures(cfg.dvae.image_size);
    let (old_codes, old_mse, _) = hard_reconstruction(a.path(), &images);
    let (new_codes, new_mse, _) = hard_reconstruction(b.path(), &images);
    let same = new_codes.remainder(v).eq_tensor(&old_codes).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
    assert!(same > 0.97, "a new code is its old code's copy in {same} of the cells");
    let copies = new_codes.ge(v).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
    assert!(copies > 0.2, "the copies after the first are chosen too ({copies} of the cells)");
    assert!((new_mse - old_mse).abs() < 0.1 * old_mse, "about the same pictures: {old_mse} and {new_mse}");
    // every copy of a code draws what the code drew
    let load_dvae = |d: &Path, c: &tessera::Config| {
        let mut m = tessera::model::DvaeModel::new(c, Device::Cpu);
        tessera::io::load_varstore(&mut m.vs, &d.join("dvae.safetensors")).unwrap();
        m
    };
    let (da, db) = (load_dvae(a.path(), &cfg), load_dvae(b.path(), &cfg_b));
    tch::manual_seed(5);
    let any_copy = &old_codes + Tensor::randint(3, old_codes.size(), (Kind::Int64, Device::Cpu)) * v;
    let d = tch::no_grad(|| (db.net.decode(&any_copy) - da.net.decode(&old_codes)).abs().max().double_value(&[]));
    assert!(d < 1e-4, "a copy draws its code's picture (off by {d})");

    // a's transformer carried over: given copies of a's codes, the new codes' probabilities,
    // summed over each old code's copies, are a's probabilities of the old codes
    let from = a.path().join("transformer.safetensors");
    let tiny = TransformerRecipe { lr: 1e-12, warmup: 1, init_from: Some(from.clone()), ..Default::default() };
    let carried = TransformerRecipe { codes_from: Some(a.path().to_path_buf()), ..tiny.clone() };
    train::train_transformer(&options(b.path(), 1, None, false), &carried).unwrap();
    let load = |d: &Path, c: &tessera::Config| {
        let mut t = tessera::model::TransformerModel::new(c, Device::Cpu);
        tessera::io::load_varstore(&mut t.vs, &d.join("transformer.safetensors")).unwrap();
        t
    };
    let (ta, tb) = (load(a.path(), &cfg), load(b.path(), &cfg_b));
    let tok = tessera::text::TextTokenizer::load(&a.path().join("tokenizer.json")).unwrap();
    let caps: Vec<Vec<i64>> =
        (0..16).map(|i| tok.encode(&format!("a red circle {i}"), cfg.text.text_len).unwrap().ids).collect();
    let probs = |t: &tessera::model::TransformerModel, codes: &Tensor| {
        tch::no_grad(|| t.net.forward(&t.net.pad_text(&caps), &codes.flatten(1, -1), false).1.softmax(-1, Kind::Float))
    };
    let pa = probs(&ta, &old_codes);
    let pb = probs(&tb, &any_copy);
    let (n, i, _) = pb.size3().unwrap();
    let pb_old = pb.view([n, i, 3, v]).sum_dim_intlist(2, false, Kind::Float);
    let diff = (&pb_old - &pa).abs();
    let (max, mean) = (diff.max().double_value(&[]), diff.mean(Kind::Float).double_value(&[]));
    // not exactly: the perturbation that tells copies apart moves a few near-tie cells of the
    // counted pictures to another old code, whose copies then mix two old codes' rows
    assert!(
        mean < 0.01 && max < 0.25,
        "carried over, the old codes' probabilities move by {mean} on average, {max} at most"
    );
    // without the carry-over the transformer of the old codebook does not fit
    let e = train::train_transformer(&options(b.path(), 1, None, false), &tiny).unwrap_err().to_string();
    assert!(e.contains("transformer.safetensors"), "{e}");
    // --codebook needs --init-from, and a whole multiple of the codebook
    let lone = DvaeRecipe { init_from: None, ..split.clone() };
    let e = train::train_dvae(&options(b.path(), 1, None, false), &lone).unwrap_err().to_string();
    assert!(e.contains("--init-from"), "{e}");
    let c = tiny_dir();
    let odd = DvaeRecipe { codebook: Some(3 * v as usize + 1), ..split };
    let e = train::train_dvae(&options(c.path(), 1, None, false), &odd).unwrap_err().to_string();
    assert!(e.contains("whole multiple"), "{e}");
}
