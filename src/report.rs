//! `tessera eval`: how well a model draws what it is asked, measured on captions of the
//! synthetic world with the evaluator, for seen and held-out colour–shape combinations, with
//! and without reranking, plus the dVAE's reconstruction quality and the sampling speed.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::dvae::Dvae;
use crate::error::{Error, Result};
use crate::eval::score;
use crate::io::write_atomic;
use crate::model::{Model, from_rgb8, to_rgb8};
use crate::sample::SampleOptions;
use crate::world::{self, Capability, Split};

#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Captions per capability and split.
    pub captions: usize,
    /// Samples per caption (reranked to pick the top one).
    pub samples: usize,
    pub seed: u64,
    pub sample: SampleOptions,
}

#[derive(Debug, Clone, Serialize)]
pub struct Accuracy {
    /// Mean over all samples: the chance that one sample is right.
    pub single: f64,
    /// The reranker's top sample of each caption (equal to `single`'s first sample without a
    /// reranker).
    pub rerank_top1: f64,
    /// Captions scored.
    pub n: usize,
    /// Of the pairs of one caption's samples where one is right and the other wrong, the share
    /// the reranker scores the right one higher (ties count half): how well it ranks, free of
    /// the top-1's dependence on how many samples happen to be right. None without a reranker
    /// or without such a pair.
    pub rerank_pairs: Option<f64>,
    /// How many such pairs there were.
    pub pairs: usize,
}

/// Over the pairs (right sample, wrong sample) of one caption: how many the scores order right
/// (ties count half), and how many pairs there are.
pub fn ordered_pairs(scores: &[f32], right: &[bool]) -> (f64, usize) {
    let (mut good, mut n) = (0.0, 0);
    for (i, &si) in scores.iter().enumerate() {
        for (j, &sj) in scores.iter().enumerate() {
            if right.get(i) == Some(&true) && right.get(j) == Some(&false) {
                n += 1;
                good += if si > sj {
                    1.0
                } else if si == sj {
                    0.5
                } else {
                    0.0
                };
            }
        }
    }
    (good, n)
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub accuracy: BTreeMap<String, Accuracy>,
    pub held_out: BTreeMap<String, Accuracy>,
    pub dvae_psnr_db: f64,
    /// Per capability (seen captions): the share of ground-truth renders still scored right
    /// after a dVAE round trip (encode, decode) — the most any transformer could reach
    /// through this dVAE.
    pub dvae_roundtrip: BTreeMap<String, f64>,
    /// Distinct codes the encoder uses on 512 held-out images.
    pub dvae_codes_used: usize,
    pub seconds_per_image: f64,
    pub device: String,
    pub samples_per_caption: usize,
    /// Captions per capability and split.
    pub captions: usize,
    pub reranker: bool,
}

/// Capabilities whose scenes use held-out colour–shape pairs.
const HELD_OUT: &[Capability] =
    &[Capability::SingleObject, Capability::TwoObjectsPosition, Capability::Count, Capability::Transform];

/// Renders `scenes` and passes them through the dVAE (encode to hard codes, decode): the
/// renders and their reconstructions, as tensors [N, 3, H, W] in [0, 1].
fn round_trip(dvae: &Dvae, device: Device, scenes: &[world::Scene]) -> Result<(Tensor, Tensor)> {
    let size = dvae.config().image_size;
    let imgs: Vec<Vec<u8>> = scenes.iter().map(|s| world::render(s, size)).collect();
    let mut xs = Vec::new();
    let mut recs = Vec::new();
    // in slices, so a large check never holds every activation at once
    for chunk in imgs.chunks(128) {
        let x = from_rgb8(chunk, size, device)?;
        recs.push(tch::no_grad(|| dvae.decode(&dvae.encode(&x))));
        xs.push(x);
    }
    Ok((Tensor::cat(&xs, 0), Tensor::cat(&recs, 0)))
}

/// The held-out images of the PSNR figure.
fn psnr_scenes(n: usize, seed: u64) -> Vec<world::Scene> {
    (0..n as u64).map(|i| world::sample(seed ^ 0xD7AE, i, Split::HeldOut)).collect()
}

/// The scenes of capability `cap` that the evaluation scores (`captions` of them), drawn from
/// seeds the training stream does not use.
fn eval_scenes(cap: Capability, captions: usize, seed: u64, split: Split) -> Vec<world::Scene> {
    (0..captions).map(|c| world::generate(cap, seed.wrapping_add(1_000_003 * (c as u64 + 1)), split)).collect()
}

/// dVAE reconstruction PSNR (dB) of hard codes on `n` held-out world images.
pub fn dvae_psnr(dvae: &Dvae, device: Device, n: usize, seed: u64) -> Result<f64> {
    let (x, rec) = round_trip(dvae, device, &psnr_scenes(n, seed))?;
    let mse = (rec - &x).square().mean(Kind::Float).double_value(&[]);
    Ok(-10.0 * mse.max(1e-12).log10())
}

/// Distinct codes the encoder uses on `n` held-out world images (a codebook that collapsed
/// to a few codes cannot tell near colours apart).
pub fn dvae_codes_used(dvae: &Dvae, device: Device, n: usize, seed: u64) -> Result<usize> {
    let size = dvae.config().image_size;
    let imgs: Vec<Vec<u8>> = psnr_scenes(n, seed).iter().map(|s| world::render(s, size)).collect();
    let mut seen = vec![false; dvae.config().vocab_size];
    for chunk in imgs.chunks(128) {
        let x = from_rgb8(chunk, size, device)?;
        let codes = tch::no_grad(|| dvae.encode(&x)).flatten(0, -1).to_device(Device::Cpu);
        for c in Vec::<i64>::try_from(&codes)? {
            if let Some(s) = seen.get_mut(c as usize) {
                *s = true;
            }
        }
    }
    Ok(seen.iter().filter(|&&s| s).count())
}

/// How many of `scenes`' ground-truth renders the evaluator still accepts after a dVAE round
/// trip; also the first scene's render and its reconstruction, for the grid.
fn roundtrip_accuracy(dvae: &Dvae, device: Device, scenes: &[world::Scene]) -> Result<(f64, Vec<Vec<u8>>)> {
    let size = dvae.config().image_size;
    let (x, rec) = round_trip(dvae, device, scenes)?;
    let rec = to_rgb8(&rec)?;
    let ok = scenes.iter().zip(&rec).filter(|(s, r)| score(s, r, size)).count();
    let first = match rec.into_iter().next() {
        Some(r) => vec![to_rgb8(&x.narrow(0, 0, 1))?.remove(0), r],
        None => Vec::new(),
    };
    Ok((ok as f64 / scenes.len().max(1) as f64, first))
}

/// What a dVAE keeps, measured the one way both `tessera eval` and the dVAE trainer's log use.
#[derive(Debug, Clone, Serialize)]
pub struct DvaeCheck {
    /// Hard-code PSNR (dB) on 64 held-out images.
    pub psnr_db: f64,
    /// Distinct codes the encoder uses on 512 held-out images.
    pub codes_used: usize,
    /// Per capability: the share of ground-truth renders the evaluator accepts after an
    /// encode–decode round trip.
    pub roundtrip: BTreeMap<String, f64>,
}

/// Hard-code PSNR and round trips on `captions` scenes per capability (the scenes `tessera
/// eval --captions N --seed S` scores).
pub fn dvae_check(dvae: &Dvae, device: Device, captions: usize, seed: u64) -> Result<DvaeCheck> {
    let mut roundtrip = BTreeMap::new();
    for &cap in Capability::ALL {
        let (acc, _) = roundtrip_accuracy(dvae, device, &eval_scenes(cap, captions, seed, Split::Train))?;
        roundtrip.insert(cap.name().to_string(), acc);
    }
    Ok(DvaeCheck {
        psnr_db: dvae_psnr(dvae, device, 64, seed)?,
        codes_used: dvae_codes_used(dvae, device, 512, seed)?,
        roundtrip,
    })
}

/// Runs the evaluation; writes `report.json`, `report.md` and `grid.png` into `out`.
pub fn evaluate(model: &Model, opts: &EvalOptions, out: &Path, mut log: impl FnMut(&str)) -> Result<Report> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let size = model.config.dvae.image_size;
    let mut accuracy = BTreeMap::new();
    let mut held_out = BTreeMap::new();
    let mut dvae_roundtrip = BTreeMap::new();
    let mut grid_rows: Vec<(String, Vec<Vec<u8>>)> = Vec::new();
    let (mut images, mut sampling) = (0usize, 0.0f64);
    for (split, caps) in [(Split::Train, Capability::ALL), (Split::HeldOut, HELD_OUT)] {
        for &cap in caps {
            let (mut single, mut top, mut n) = (0.0, 0.0, 0);
            let (mut ordered, mut pairs) = (0.0, 0usize);
            // evaluation scenes use seeds the training stream does not (it draws from `sample`)
            let scenes = eval_scenes(cap, opts.captions, opts.seed, split);
            if split == Split::Train {
                let (acc, row) = roundtrip_accuracy(&model.dvae.net, model.device, &scenes)?;
                dvae_roundtrip.insert(cap.name().to_string(), acc);
                if opts.samples == 0 && !scenes.is_empty() {
                    grid_rows.push((scenes[0].caption.clone(), row));
                }
            }
            if opts.samples == 0 {
                continue; // the dVAE alone
            }
            for (c, scene) in scenes.iter().enumerate() {
                let t0 = Instant::now();
                let samples =
                    model.generate(&scene.caption, opts.samples, opts.seed + c as u64, None, &opts.sample, |_| true)?;
                images += samples.len();
                let rgb: Vec<Vec<u8>> = samples.iter().map(|s| s.rgb.clone()).collect();
                let scores = model.rerank(&scene.caption, &rgb)?;
                let best = match &scores {
                    Some(scores) => {
                        scores.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|p| p.0).unwrap_or(0)
                    }
                    None => 0,
                };
                sampling += t0.elapsed().as_secs_f64();
                let oks: Vec<bool> = samples.iter().map(|s| score(scene, &s.rgb, size)).collect();
                if let Some(scores) = &scores {
                    let (g, p) = ordered_pairs(scores, &oks);
                    ordered += g;
                    pairs += p;
                }
                single += oks.iter().filter(|&&o| o).count() as f64 / oks.len() as f64;
                top += oks[best] as u8 as f64;
                n += 1;
                if c == 0 && split == Split::Train {
                    let mut row = vec![world::render(scene, size), rgb[best].clone()];
                    row.extend(rgb.iter().take(6).cloned());
                    grid_rows.push((scene.caption.clone(), row));
                }
            }
            let rerank_pairs = (pairs > 0).then(|| ordered / pairs as f64);
            let acc = Accuracy { single: single / n as f64, rerank_top1: top / n as f64, n, rerank_pairs, pairs };
            log(&format!("{:?} {}: single {:.2}, top-1 {:.2}", split, cap.name(), acc.single, acc.rerank_top1));
            match split {
                Split::Train => accuracy.insert(cap.name().to_string(), acc),
                Split::HeldOut => held_out.insert(cap.name().to_string(), acc),
            };
        }
    }
    // sampling and reranking time only; none without samples (null in the JSON)
    let seconds_per_image = if images == 0 { f64::NAN } else { sampling / images as f64 };
    let report = Report {
        accuracy,
        held_out,
        dvae_psnr_db: dvae_psnr(&model.dvae.net, model.device, 64, opts.seed)?,
        dvae_roundtrip,
        dvae_codes_used: dvae_codes_used(&model.dvae.net, model.device, 512, opts.seed)?,
        seconds_per_image,
        device: format!("{:?}", model.device).to_lowercase(),
        samples_per_caption: opts.samples,
        captions: opts.captions,
        reranker: model.reranker.is_some(),
    };
    let json = serde_json::to_string_pretty(&report).map_err(|e| Error::Invalid(e.to_string()))?;
    write_atomic(&out.join("report.json"), json.as_bytes())?;
    write_atomic(&out.join("report.md"), markdown(&report, &grid_rows).as_bytes())?;
    save_rows(&out.join("grid.png"), &grid_rows, size)?;
    Ok(report)
}

fn markdown(r: &Report, rows: &[(String, Vec<Vec<u8>>)]) -> String {
    let mut s = String::from("# Evaluation\n\n");
    s += &format!(
        "{} samples per caption, reranker: {}. dVAE PSNR on held-out images: {:.2} dB; {} codes used on 512 images.",
        r.samples_per_caption, r.reranker, r.dvae_psnr_db, r.dvae_codes_used
    );
    if r.seconds_per_image.is_finite() {
        s += &format!(" {:.3} s per image (sampling and reranking) on {}.", r.seconds_per_image, r.device);
    }
    s += "\n\n";
    s += "| capability | single (seen) | top-1 of N (seen) | single (held out) | top-1 of N (held out) | ground truth through the dVAE | reranker orders right, seen / held out | captions |\n";
    s += "| --- | --- | --- | --- | --- | --- | --- | --- |\n";
    for (k, roundtrip) in &r.dvae_roundtrip {
        let (a, h) = (r.accuracy.get(k), r.held_out.get(k));
        let f = |v: Option<f64>| v.map(|x| format!("{:.0}%", 100.0 * x)).unwrap_or_else(|| "–".into());
        let pairs = |v: Option<&Accuracy>| match v.and_then(|v| v.rerank_pairs.map(|p| (p, v.pairs))) {
            Some((p, n)) => format!("{:.0}% of {n}", 100.0 * p),
            None => "–".into(),
        };
        s += &format!(
            "| {k} | {} | {} | {} | {} | {} | {} / {} | {} |\n",
            f(a.map(|a| a.single)),
            f(a.map(|a| a.rerank_top1)),
            f(h.map(|h| h.single)),
            f(h.map(|h| h.rerank_top1)),
            f(Some(*roundtrip)),
            pairs(a),
            pairs(h),
            r.captions
        );
    }
    s += "\n\"Reranker orders right\": of the pairs of one caption's samples where one is right and the other wrong, the share the reranker scores the right one higher (50% is chance), and the number of such pairs.\n";
    s += if r.samples_per_caption == 0 {
        "\n`grid.png`: one row per capability: the ground-truth render and its dVAE reconstruction. Captions:\n\n"
    } else {
        "\n`grid.png`: one row per capability: the ground-truth render, the reranker's pick, then samples. Captions:\n\n"
    };
    for (c, _) in rows {
        s += &format!("- {c}\n");
    }
    s
}

fn save_rows(path: &Path, rows: &[(String, Vec<Vec<u8>>)], size: usize) -> Result<()> {
    let cols = rows.iter().map(|r| r.1.len()).max().unwrap_or(1);
    let mut grid = image::RgbImage::from_pixel(
        (cols * size) as u32,
        (rows.len().max(1) * size) as u32,
        image::Rgb([255, 255, 255]),
    );
    for (r, (_, imgs)) in rows.iter().enumerate() {
        for (c, img) in imgs.iter().enumerate() {
            for y in 0..size {
                for x in 0..size {
                    let p = (y * size + x) * 3;
                    grid.put_pixel(
                        (c * size + x) as u32,
                        (r * size + y) as u32,
                        image::Rgb([img[p], img[p + 1], img[p + 2]]),
                    );
                }
            }
        }
    }
    let mut bytes = Vec::new();
    grid.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
        .map_err(|e| Error::Image { path: path.to_path_buf(), msg: e.to_string() })?;
    write_atomic(path, &bytes)
}
