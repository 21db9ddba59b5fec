//! Judged samples: judged by the evaluator, resumed part by part,
//! read back into the scenes a reranker learns from; the reranker's loss with wrong samples
//! for some of its rows.

use std::path::Path;

use tch::{Device, Kind, Tensor};
use tessera::judged::{self, JudgedOptions, JudgedSet};
use tessera::{Config, Model, SampleOptions};

fn options(scenes: usize, per_scene: usize, batch: usize) -> JudgedOptions {
    JudgedOptions { scenes, per_scene, batch, seed: 5, sample: SampleOptions::default() }
}

#[test]
fn judged_samples_are_judged_by_the_evaluator_and_resume_part_by_part() {
    let _cpu = crate::common::heavy_cpu();
    let d = tempfile::tempdir().unwrap();
    let model = Model::load(&crate::common::saved_tiny_model(&d.path().join("m"), 3), Device::Cpu).unwrap();
    let size = model.config.dvae.image_size;
    let a = d.path().join("a");
    // 65 scenes: two parts
    let s = judged::draw(&model, &a, &options(65, 2, 16), |_, _| {}).unwrap();
    assert_eq!((s.parts, s.drawn, s.samples), (2, 2, 2 * 2 * judged::SCENES_PER_PART));
    // what a part holds (its metadata's order in the file is not fixed)
    let bytes = |dir: &Path, i| {
        let p = judged::read_part(&judged::part_path(dir, i)).unwrap();
        (p.captions, p.pictures, p.right)
    };
    let (first, second) = (bytes(&a, 0), bytes(&a, 1));
    // every verdict is the evaluator's on the stored picture of its scene
    let part = judged::read_part(&judged::part_path(&a, 1)).unwrap();
    assert_eq!(part.per_scene, 2);
    for (c, caption) in part.captions.iter().enumerate() {
        let scene = judged::scene(5, judged::SCENES_PER_PART + c);
        assert_eq!(&scene.caption, caption);
        for k in 0..2 {
            let i = 2 * c + k;
            assert_eq!(part.right[i], tessera::eval::score(&scene, &part.pictures[i], size));
        }
    }
    // the samples differ from scene to scene and within a scene
    assert!(part.pictures[0] != part.pictures[1] && part.pictures[0] != part.pictures[2]);
    // a killed run: the last part missing, the first cut short; each drawn again, the same
    std::fs::remove_file(judged::part_path(&a, 1)).unwrap();
    let again = judged::draw(&model, &a, &options(65, 2, 16), |_, _| {}).unwrap();
    assert_eq!((again.drawn, again.samples), (1, s.samples), "the whole first part is kept");
    assert!(bytes(&a, 1) == second);
    let cut = std::fs::read(judged::part_path(&a, 0)).unwrap();
    std::fs::write(judged::part_path(&a, 0), &cut[..cut.len() / 2]).unwrap();
    let e = judged::read_part(&judged::part_path(&a, 0)).unwrap_err().to_string();
    assert!(e.contains("part-00000"), "{e}");
    assert_eq!(judged::draw(&model, &a, &options(64, 2, 16), |_, _| {}).unwrap().drawn, 1);
    assert!(bytes(&a, 0) == first);
    // other settings are not mixed in: another seed draws the part again, other samples
    let other = JudgedOptions { seed: 6, ..options(64, 2, 16) };
    assert_eq!(judged::draw(&model, &a, &other, |_, _| {}).unwrap().drawn, 1);
    assert!(bytes(&a, 0) != first);
    // one sample per scene cannot compare anything
    assert!(judged::draw(&model, &a, &options(64, 1, 16), |_, _| {}).is_err());
}

#[test]
fn a_judged_bank_is_ranked_as_counted_scene_by_scene() {
    let d = tempfile::tempdir().unwrap();
    let model = Model::load(&crate::common::saved_tiny_model(&d.path().join("m"), 3), Device::Cpu).unwrap();
    let size = model.config.dvae.image_size;
    // two parts of world scenes (part 0 of seed 6, part 1 of seed 5; 12 scenes each), two
    // samples a scene, every pattern of verdicts, the pictures all different
    let bank = d.path().join("bank");
    std::fs::create_dir_all(&bank).unwrap();
    let patterns = [[true, false], [false, true], [true, true], [false, false]];
    for (i, seed) in [(0usize, 6u64), (1, 5)] {
        let captions: Vec<String> =
            (0..12).map(|c| judged::scene(seed, i * judged::SCENES_PER_PART + c).caption).collect();
        let pictures: Vec<u8> = (0..24).flat_map(|k| flat((40 * i + 3 * k) as u8, size)).collect();
        let right: Vec<bool> = (0..12).flat_map(|c| patterns[(c + i) % 4]).collect();
        let settings = [("seed".to_string(), seed.to_string())];
        judged::write_part(&judged::part_path(&bank, i), &captions, &pictures, &right, None, &settings, size).unwrap();
    }
    let r = judged::rank(&model, &bank, false, |_, _| {}).unwrap();
    // the same counted here: the pick, and each (right, wrong) pair, from the reranker's scores
    let mut want: std::collections::BTreeMap<String, (usize, usize, usize, f64)> = Default::default();
    for (i, seed) in [(0, 6), (1, 5)] {
        let part = judged::read_part(&judged::part_path(&bank, i)).unwrap();
        for (c, caption) in part.captions.iter().enumerate() {
            let (pics, right) = (&part.pictures[2 * c..2 * c + 2], &part.right[2 * c..2 * c + 2]);
            let s = model.rerank(caption, pics).unwrap().unwrap();
            let best = if s[1] >= s[0] { 1 } else { 0 }; // a tie picks the later, as `rank` does
            // the right sample's score against the wrong one's: above 1, level ½, below 0
            let order = |r: f32, w: f32| {
                if r > w {
                    1.0
                } else if r == w {
                    0.5
                } else {
                    0.0
                }
            };
            let (pairs, ordered) = match (right[0], right[1]) {
                (true, false) => (1, order(s[0], s[1])),
                (false, true) => (1, order(s[1], s[0])),
                _ => (0, 0.0),
            };
            let key = judged::scene(seed, i * judged::SCENES_PER_PART + c).capability.name().to_string();
            let w = want.entry(key).or_default();
            *w = (w.0 + 1, w.1 + usize::from(right[best]), w.2 + pairs, w.3 + ordered);
        }
    }
    let got: std::collections::BTreeMap<String, (usize, usize, usize, f64)> =
        r.cells.iter().map(|(k, c)| (k.clone(), (c.scenes, c.top1_right, c.pairs, c.pairs_ordered))).collect();
    assert_eq!(got, want);
    assert!(!want.contains_key("unknown") && want.len() >= 3, "{want:?}");
    assert_eq!((r.parts, r.skipped, r.all.scenes, r.all.samples, r.all.pairs), (2, 0, 24, 48, 12));
    assert_eq!((r.all.any_right, r.all.samples_right), (18, 24));
    // a part under another index is ranked as scenes of unknown capability; a damaged one is
    // named and left out
    std::fs::copy(judged::part_path(&bank, 1), judged::part_path(&bank, 7)).unwrap();
    std::fs::write(judged::part_path(&bank, 8), b"not a part").unwrap();
    let r = judged::rank(&model, &bank, false, |_, _| {}).unwrap();
    assert_eq!((r.parts, r.skipped, r.cells["unknown"].scenes, r.all.scenes), (3, 1, 12, 36));
    // a model without a reranker has nothing to rank with
    let mut bare = model;
    bare.reranker = None;
    assert!(judged::rank(&bare, &bank, false, |_, _| {}).unwrap_err().to_string().contains("no reranker"));
}

/// A picture whose every byte is `v`.
fn flat(v: u8, size: usize) -> Vec<u8> {
    vec![v; size * size * 3]
}

/// Writes a part of three scenes of three samples whose verdicts are given (pictures: their
/// sample's index, 10·scene + sample).
fn write_three_scenes(dir: &Path, i: usize, right: [[bool; 3]; 3], size: usize) {
    let captions: Vec<String> = ["a red circle", "a blue square", "two green stars"].map(String::from).to_vec();
    let pictures: Vec<u8> = (0..3).flat_map(|c| (0..3).flat_map(move |k| flat(10 * c + k, size))).collect();
    let right: Vec<bool> = right.iter().flatten().copied().collect();
    judged::write_part(&judged::part_path(dir, i), &captions, &pictures, &right, None, &[], size).unwrap();
}

#[test]
fn a_judged_set_keeps_the_scenes_with_a_right_and_a_wrong_sample_and_draws_true_negatives() {
    let d = tempfile::tempdir().unwrap();
    let size = 8;
    // scene 0: right, wrong, wrong; scene 1: all right (left out); scene 2: wrong, right, wrong
    write_three_scenes(d.path(), 0, [[true, false, false], [true, true, true], [false, true, false]], size);
    // a damaged part is skipped, never half used
    write_three_scenes(d.path(), 1, [[true, false, true]; 3], size);
    let p1 = judged::part_path(d.path(), 1);
    let b = std::fs::read(&p1).unwrap();
    std::fs::write(&p1, &b[..b.len() - 100]).unwrap();
    let set = JudgedSet::load(d.path(), size).unwrap();
    assert_eq!((set.scenes.len(), set.read), (2, 3));
    let value = |i: usize| set.pictures[i][0];
    assert_eq!(set.scenes[0].caption, "a red circle");
    assert_eq!(set.scenes[0].right.iter().map(|&i| value(i)).collect::<Vec<_>>(), [0]);
    assert_eq!(set.scenes[0].wrong.iter().map(|&i| value(i)).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(set.scenes[1].caption, "two green stars");
    assert_eq!(set.scenes[1].right.iter().map(|&i| value(i)).collect::<Vec<_>>(), [21]);
    assert_eq!(set.scenes[1].wrong.iter().map(|&i| value(i)).collect::<Vec<_>>(), [20, 22]);
    // three negatives asked: both wrong samples, distinct, and a third marked not real
    let mut rng = tessera::sample::SeedRng::new(1);
    let batch = set.batch(40, 3, &mut rng);
    assert_eq!((batch.captions.len(), batch.pictures.len(), batch.negatives.len()), (40, 40, 120));
    for (b, caption) in batch.captions.iter().enumerate() {
        let (own, wrong): (u8, [u8; 2]) = if caption == "a red circle" { (0, [1, 2]) } else { (21, [20, 22]) };
        assert_eq!(batch.pictures[b][0], own);
        let negs: Vec<u8> = (0..2).map(|j| batch.negatives[3 * b + j][0]).collect();
        assert!(negs.contains(&wrong[0]) && negs.contains(&wrong[1]), "{negs:?}");
        assert_eq!(&batch.real[3 * b..3 * b + 3], [true, true, false]);
    }
    assert!(batch.captions.iter().any(|c| c == "a red circle") && batch.captions.iter().any(|c| c != "a red circle"));
    // nothing to learn from is an error
    let e = tempfile::tempdir().unwrap();
    write_three_scenes(e.path(), 0, [[true; 3]; 3], size);
    assert!(JudgedSet::load(e.path(), size).unwrap_err().to_string().contains("no scene"));
}

#[test]
fn contrasting_pictures_for_the_last_rows_alone_give_the_loss_computed_by_hand() {
    let cfg = Config::tiny();
    let m = tessera::model::RerankerModel::new(&cfg, Device::Cpu);
    let size = cfg.dvae.image_size as i64;
    let images = Tensor::rand([4, 3, size, size], (Kind::Float, Device::Cpu));
    let negatives = Tensor::rand([4, 3, size, size], (Kind::Float, Device::Cpu));
    let captions: Vec<Vec<i64>> = (0..4).map(|c| vec![5 + c, 9, 40 + 2 * c]).collect();
    let (ids, valid) = m.net.batch_text(&captions, Device::Cpu);
    // two negatives each for rows 2 and 3; row 3's second is not real
    let real = Tensor::from_slice(&[false, false, false, false, true, true, true, false]).view([4, 2]);
    let got = tch::no_grad(|| m.net.loss_with_all_contrasts(&images, &ids, &valid, None, Some((&negatives, &real))))
        .double_value(&[]);
    let (img, txt, neg, s) = tch::no_grad(|| {
        (m.net.encode_image(&images), m.net.encode_text(&ids, &valid), m.net.encode_image(&negatives), m.net.scale())
    });
    let s = s.double_value(&[]);
    let dot = |a: &Tensor, i: i64, b: &Tensor, j: i64| s * (a.get(i) * b.get(j)).sum(Kind::Float).double_value(&[]);
    let ce = |row: &[f64], target: usize| {
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln() - row[target]
    };
    let (mut image_side, mut text_side) = (0.0, 0.0);
    for b in 0..4 {
        image_side += ce(&(0..4).map(|c| dot(&img, b, &txt, c)).collect::<Vec<_>>(), b as usize);
        let mut row: Vec<f64> = (0..4).map(|i| dot(&img, i, &txt, b)).collect();
        match b {
            2 => row.extend([dot(&txt, 2, &neg, 0), dot(&txt, 2, &neg, 1)]),
            3 => row.push(dot(&txt, 3, &neg, 2)),
            _ => {}
        }
        text_side += ce(&row, b as usize);
    }
    let want = (image_side / 4.0 + text_side / 4.0) / 2.0;
    assert!((got - want).abs() < 1e-4, "loss {got} against {want} by hand");
}

#[test]
fn a_reranker_learns_from_judged_samples_and_resumes_exactly() {
    let _cpu = crate::common::heavy_cpu();
    let judged_dir = tempfile::tempdir().unwrap();
    let size = Config::tiny().dvae.image_size;
    for i in 0..2 {
        write_three_scenes(
            judged_dir.path(),
            i,
            [[true, false, false], [false, true, true], [false, false, false]],
            size,
        );
    }
    let run = |steps: &str, extra: &[&str], dir: &Path| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"));
        cmd.args(["train", "reranker", "--steps", steps, "--batch", "4", "--checkpoint-every", "2", "--sample-every"])
            .args(["0", "--log-every", "1", "--seed", "9", "--threads", "1", "--device", "cpu", "--data", "world:3"])
            .args([
                "--contrasts",
                "2",
                "--judged-batch",
                "3",
                "--judged-negatives",
                "2",
                "--lr",
                "3e-3",
                "--warmup",
                "1",
            ]);
        if !extra.contains(&"--no-judged") {
            cmd.arg("--judged").arg(judged_dir.path());
        }
        let o = cmd.args(extra.iter().filter(|&&x| x != "--no-judged")).arg("--dir").arg(dir).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let (a, b, c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for d in [&a, &b, &c] {
        tessera::train::init_dir(d.path(), &Config::tiny()).unwrap();
        tessera::train::train_tokenizer(d.path(), "world", 500).unwrap();
    }
    let said = run("4", &[], a.path());
    assert!(said.contains("4 of 6 scenes"), "{said}");
    // `--dtype auto` names what the reranker computes in: f32, whatever the device offers
    assert!(said.contains("training in f32") && !said.contains("bf16"), "{said}");
    run("4", &["--stop-after", "2"], b.path());
    run("4", &["--resume"], b.path());
    let weights = |d: &Path| std::fs::read(d.join("reranker.safetensors")).unwrap();
    assert!(weights(a.path()) == weights(b.path()), "a resumed run differs");
    // the judged rows take part: the same run without them ends elsewhere
    run("4", &["--no-judged"], c.path());
    assert!(weights(a.path()) != weights(c.path()), "the judged samples changed nothing");
    // judged samples with contrasting pictures of the world are refused
    let mut o = tessera::train::TrainOptions::new(a.path());
    o.data = "world:3".into();
    let recipe = tessera::train::RerankerRecipe {
        judged: Some(judged_dir.path().to_path_buf()),
        contrast_images: 2,
        ..Default::default()
    };
    let e = tessera::train::train_reranker(&o, &recipe).unwrap_err().to_string();
    assert!(e.contains("--judged"), "{e}");
    // `eval --judged` ranks the bank with the trained reranker: every scene, every pair (the
    // model loads whole: a dVAE and a transformer beside it)
    let parts = tempfile::tempdir().unwrap();
    crate::common::saved_tiny_model(parts.path(), 1);
    for f in ["dvae.safetensors", "transformer.safetensors"] {
        std::fs::copy(parts.path().join(f), a.path().join(f)).unwrap();
    }
    let out = a.path().join("ranked");
    let said = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["eval", "--threads", "1", "--device", "cpu", "--model"])
        .arg(a.path())
        .arg("--judged")
        .arg(judged_dir.path())
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(said.status.success(), "{}", String::from_utf8_lossy(&said.stderr));
    let ranked: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("judged.json")).unwrap()).unwrap();
    let all = &ranked["all"];
    assert_eq!(
        (all["scenes"].as_u64(), all["pairs"].as_u64(), all["any_right"].as_f64()),
        (Some(6), Some(8), Some(4.0 / 6.0))
    );
    assert_eq!(ranked["cells"]["unknown"]["scenes"].as_u64(), Some(6), "{ranked}");
    // a recipe reads its bank once (`--time` plans with throwaway steps, then trains): run
    // again after the bank is gone, it trains on what it read; a fresh recipe finds nothing
    let recipe = tessera::train::RerankerRecipe {
        judged: Some(judged_dir.path().to_path_buf()),
        judged_batch: 3,
        judged_negatives: 2,
        warmup: 1,
        ..Default::default()
    };
    o.steps = 1;
    o.batch = 4;
    o.sample_every = 0;
    o.workers = 1;
    o.quiet = true;
    tessera::train::train_reranker(&o, &recipe).unwrap();
    let read = recipe.judged_loaded.get().map(|(_, _, set)| (set.scenes.len(), set.read));
    assert_eq!(read, Some((4, 6)));
    let moved = judged_dir.path().with_extension("moved");
    std::fs::rename(judged_dir.path(), &moved).unwrap();
    let again = tessera::train::train_reranker(&o, &recipe);
    let fresh = tessera::train::RerankerRecipe { judged_loaded: Default::default(), ..recipe.clone() };
    let e = tessera::train::train_reranker(&o, &fresh).map(|_| ()).unwrap_err().to_string();
    std::fs::rename(&moved, judged_dir.path()).unwrap();
    again.unwrap();
    assert!(e.contains(&judged_dir.path().display().to_string()), "{e}");
}

#[test]
fn a_banks_codes_become_token_shards_beside_the_worlds_and_decode_again_for_another_decoder() {
    let _cpu = crate::common::heavy_cpu();
    let d = tempfile::tempdir().unwrap();
    let m = crate::common::saved_tiny_model(&d.path().join("m"), 4);
    let model = Model::load(&m, Device::Cpu).unwrap();
    let (size, image_len) = (model.config.dvae.image_size, model.config.image_len());
    let drawn = d.path().join("drawn");
    judged::draw(&model, &drawn, &options(64, 2, 32), |_, _| {}).unwrap();
    let part = judged::read_part(&judged::part_path(&drawn, 0)).unwrap();
    // a part keeps the codes its pictures decode: decoded again here, the same pictures
    let codes = part.codes.clone().expect("a new part keeps its codes");
    assert_eq!((codes.len(), codes[0].len()), (128, image_len));
    let t = Tensor::from_slice(&codes.concat().iter().map(|&c| i64::from(c)).collect::<Vec<_>>())
        .view([128, image_len as i64]);
    assert!(model.decode(&t).unwrap() == part.pictures);
    // a bank of that part's samples with known verdicts (one scene in three has no right
    // sample, the others one or two), a part without codes and a part of another dVAE's codes
    let bank = d.path().join("bank");
    std::fs::create_dir_all(&bank).unwrap();
    let right: Vec<bool> = (0..128).map(|i| (i / 2) % 3 != 0 && (i % 2 == 0 || (i / 2) % 3 == 2)).collect();
    let mark = model.dvae_codes_mark().unwrap();
    let pictures = part.pictures.concat();
    let flat_codes = codes.concat();
    let ours = [("dvae".to_string(), mark.clone()), ("seed".to_string(), "5".to_string())];
    judged::write_part(&judged::part_path(&bank, 0), &part.captions, &pictures, &right, Some(&flat_codes), &ours, size)
        .unwrap();
    judged::write_part(&judged::part_path(&bank, 1), &part.captions, &pictures, &right, None, &ours, size).unwrap();
    let theirs = [("dvae".to_string(), format!("{mark}-other")), ("seed".to_string(), "5".to_string())];
    judged::write_part(
        &judged::part_path(&bank, 2),
        &part.captions,
        &pictures,
        &right,
        Some(&flat_codes),
        &theirs,
        size,
    )
    .unwrap();
    // the world's shards of this model beside them
    let out = m.join("shards");
    let mut o = tessera::train::TrainOptions::new(&m);
    o.data = "world:1".into();
    o.batch = 8;
    tessera::train::encode_shards(&o, 16, 8).unwrap();
    let file_mark = tessera::shards::dvae_fingerprint(&m.join("dvae.safetensors"), &model.config.dvae).unwrap();
    let r = judged::write_right_shards(&model, &file_mark.codes, &bank, &out, 20).unwrap();
    let n_right = right.iter().filter(|&&r| r).count();
    assert_eq!((r.samples, r.right, r.files, r.skipped.len()), (128, n_right, n_right.div_ceil(20), 2));
    // read as one training set with the world's: the world's 16 first, then exactly the right
    // samples' codes, each with its scene's caption, in order
    let set = tessera::shards::TokenShards::open(&out, image_len, model.config.dvae.vocab_size, &file_mark).unwrap();
    assert_eq!(set.len(), 16 + n_right);
    let want: Vec<(Vec<u16>, String)> =
        (0..128).filter(|&i| right[i]).map(|i| (codes[i].clone(), part.captions[i / 2].clone())).collect();
    let got: Vec<(Vec<u16>, String)> =
        (16..set.len()).map(|i| (set.get(i).0.to_vec(), set.get(i).1.to_string())).collect();
    assert!(got == want);
    // written again through the command line, in larger shards: the earlier files replaced
    let said = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["train", "shards", "--dir"])
        .arg(&m)
        .arg("--from-judged")
        .arg(&bank)
        .args(["--per-shard", "1000"])
        .output()
        .unwrap();
    assert!(said.status.success(), "{}", String::from_utf8_lossy(&said.stderr));
    let err = String::from_utf8_lossy(&said.stderr);
    assert!(err.contains(&format!("{n_right} right samples of 128 in 1 shards")), "{err}");
    assert!(err.contains("part-00001") && err.contains("part-00002"), "the parts left out are named: {err}");
    let judged_files = std::fs::read_dir(&out)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with(judged::RIGHT_SHARD_PREFIX))
        .count();
    assert_eq!(judged_files, 1);
    let again = tessera::shards::TokenShards::open(&out, image_len, model.config.dvae.vocab_size, &file_mark).unwrap();
    assert_eq!(again.tokens, set.tokens);
    // ranked as stored, every part counts with its verdicts; decoded again and judged again,
    // only the part of this dVAE's codes counts, with the evaluator's verdicts on its decoded
    // pictures (the drawn part's), not the verdicts written
    let stored = judged::rank(&model, &bank, false, |_, _| {}).unwrap();
    assert_eq!((stored.parts, stored.all.samples, stored.all.samples_right), (3, 384, 3 * n_right));
    let again = judged::rank(&model, &bank, true, |_, _| {}).unwrap();
    let evaluator = part.right.iter().filter(|&&r| r).count();
    assert_eq!((again.parts, again.skipped, again.all.samples, again.all.samples_right), (1, 2, 128, evaluator));
    assert!(evaluator != n_right);
    // the drawn part decoded again by its own model: the very same ranking
    let json = |r: &judged::Ranking| serde_json::to_string(r).unwrap();
    assert_eq!(
        json(&judged::rank(&model, &drawn, true, |_, _| {}).unwrap()),
        json(&judged::rank(&model, &drawn, false, |_, _| {}).unwrap())
    );
    // a model of other codes cannot decode them
    let other = Model::load(&crate::common::saved_tiny_model(&d.path().join("o"), 9), Device::Cpu).unwrap();
    let e = judged::rank(&other, &bank, true, |_, _| {}).unwrap_err().to_string();
    assert!(e.contains("no part whose codes this model's dVAE decodes"), "{e}");
    // a bank with nothing usable is refused, naming it
    std::fs::remove_file(judged::part_path(&bank, 0)).unwrap();
    let e = judged::write_right_shards(&model, &file_mark.codes, &bank, &out, 20).unwrap_err().to_string();
    assert!(e.contains("no right sample") && e.contains("bank"), "{e}");
}
