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
use crate::eval::{Miss, SHAPE_MARGIN, judge, judge_at};
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
    /// Keep the samples in this file: when it holds the samples of the same captions, seed,
    /// sampling options, device, transformer, dVAE and tokenizer, they are read back instead of
    /// drawn (only the reranker runs again: a reranker compared on the very same samples, in a
    /// fraction of the time); otherwise they are drawn and the file is written.
    pub samples_file: Option<std::path::PathBuf>,
    /// Score only these capabilities (empty: all six). Their captions and seeds are those of a
    /// full evaluation, so a cell measured alone reads as it does in the full report.
    pub only: Vec<Capability>,
}

impl EvalOptions {
    /// The cells an evaluation scores: every capability on seen pairs, the four that use
    /// colour–shape pairs on held-out ones, narrowed to [`EvalOptions::only`].
    pub fn cells(&self) -> Vec<(Split, Capability)> {
        [(Split::Train, Capability::ALL), (Split::HeldOut, HELD_OUT)]
            .into_iter()
            .flat_map(|(split, caps)| caps.iter().map(move |&cap| (split, cap)))
            .filter(|(_, cap)| self.only.is_empty() || self.only.contains(cap))
            .collect()
    }
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
    /// The share of captions with at least one right sample: the top-1 a perfect reranker
    /// would reach on these samples.
    pub any_right: f64,
    /// Why the wrong samples are wrong (the evaluator's first failed check), counted over all
    /// samples.
    pub misses: BTreeMap<String, usize>,
    /// The same, over the reranker's picks.
    pub top1_misses: BTreeMap<String, usize>,
    /// `single` and `rerank_top1` read strictly: each shape by its best template alone
    /// (`eval::judge_within` at margin 0), for comparison with reports before the margin.
    pub single_strict: f64,
    pub rerank_top1_strict: f64,
}

/// Per sample and top-1 over a subset of a cell's captions.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Subset {
    pub single: f64,
    pub rerank_top1: f64,
    /// Captions in the subset.
    pub n: usize,
}

/// The share of a caption's samples that are right (0 for none).
fn share_right(right: &[bool]) -> f64 {
    right.iter().filter(|&&o| o).count() as f64 / right.len().max(1) as f64
}

/// The reranker's pick: the index of the highest score (the last of equals; 0 for none).
pub fn pick(scores: &[f32]) -> usize {
    scores.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|p| p.0).unwrap_or(0)
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
    /// Per capability with held-out cells: its seen captions whose objects take a colour of
    /// the held-out pairs (`world::held_out_colours`), the held-out cell's like-for-like
    /// control: held-out pairs are drawn in those colours only, so a gap between the held-out
    /// cell and all seen captions may be the colours' and not the pairs'.
    pub seen_held_out_colours: BTreeMap<String, Subset>,
    pub dvae_psnr_db: f64,
    /// Per capability (seen captions): the share of ground-truth renders still scored right
    /// after a dVAE round trip (encode, decode) — the most any transformer could reach
    /// through this dVAE.
    pub dvae_roundtrip: BTreeMap<String, f64>,
    /// The same on held-out captions (the capabilities that use colour–shape pairs): the
    /// ceiling the dVAE leaves the held-out cells.
    pub dvae_roundtrip_held_out: BTreeMap<String, f64>,
    /// The single-object round trips by what the caption asks for (`background black`,
    /// `size small`, `shape octagon`, …): (passed, scenes). Where the dVAE loses things.
    pub dvae_single_object: BTreeMap<String, (usize, usize)>,
    /// Per capability: why round trips fail (the evaluator's first failed check, counted), so
    /// a report says what a dVAE loses, not only how often.
    pub dvae_roundtrip_misses: BTreeMap<String, BTreeMap<String, usize>>,
    /// Distinct codes the encoder uses on 512 held-out images.
    pub dvae_codes_used: usize,
    pub seconds_per_image: f64,
    pub device: String,
    pub samples_per_caption: usize,
    /// How the samples were drawn.
    pub sampling: crate::sample::SampleOptions,
    /// Captions per capability and split.
    pub captions: usize,
    pub reranker: bool,
    /// The samples were read back from `EvalOptions::samples_file`, not drawn (then
    /// `seconds_per_image` is not measured: null).
    pub samples_reused: bool,
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
pub fn eval_scenes(cap: Capability, captions: usize, seed: u64, split: Split) -> Vec<world::Scene> {
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
/// Also each scene's verdict (`Err` with why it fails).
fn roundtrip_accuracy(dvae: &Dvae, device: Device, scenes: &[world::Scene]) -> Result<RoundTrips> {
    let size = dvae.config().image_size;
    let (x, rec) = round_trip(dvae, device, scenes)?;
    let rec = to_rgb8(&rec)?;
    let verdicts: Vec<std::result::Result<(), Miss>> =
        scenes.iter().zip(&rec).map(|(s, r)| judge(s, r, size)).collect();
    let ok = verdicts.iter().filter(|v| v.is_ok()).count();
    let first = match rec.into_iter().next() {
        Some(r) => vec![to_rgb8(&x.narrow(0, 0, 1))?.remove(0), r],
        None => Vec::new(),
    };
    Ok((ok as f64 / scenes.len().max(1) as f64, first, verdicts))
}

/// A round trip's accuracy, the first scene's render and reconstruction, and every verdict.
type RoundTrips = (f64, Vec<Vec<u8>>, Vec<std::result::Result<(), Miss>>);

/// How often each reason of [`Miss`] is the first failed check.
fn tally_misses(verdicts: &[std::result::Result<(), Miss>]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for m in verdicts.iter().filter_map(|v| v.err()) {
        *out.entry(m.name().to_string()).or_insert(0) += 1;
    }
    out
}

/// Round trips of single-object scenes counted by what their captions ask for: keys
/// `background NAME`, `size NAME` and `shape NAME`, values (passed, scenes).
fn single_object_breakdown(scenes: &[world::Scene], passed: &[bool]) -> BTreeMap<String, (usize, usize)> {
    let mut by = BTreeMap::new();
    for (scene, &ok) in scenes.iter().zip(passed) {
        let Some(o) = scene.objects.first() else { continue };
        for key in [
            format!("background {}", scene.background.name()),
            format!("size {}", o.size.name()),
            format!("shape {}", o.shape.name()),
        ] {
            let e: &mut (usize, usize) = by.entry(key).or_default();
            e.0 += ok as usize;
            e.1 += 1;
        }
    }
    by
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
        let (acc, _, _) = roundtrip_accuracy(dvae, device, &eval_scenes(cap, captions, seed, Split::Train))?;
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
    let mut seen_held_out_colours = BTreeMap::new();
    let mut dvae_roundtrip = BTreeMap::new();
    let mut dvae_roundtrip_held_out = BTreeMap::new();
    let mut dvae_single_object = BTreeMap::new();
    let mut dvae_roundtrip_misses = BTreeMap::new();
    let mut grid_rows: Vec<(String, Vec<Vec<u8>>)> = Vec::new();
    let (mut images, mut sampling) = (0usize, 0.0f64);
    let kept = match (&opts.samples_file, opts.samples) {
        (Some(path), 1..) => Some((path, samples_fingerprint(model, opts)?)),
        _ => None,
    };
    // the bytes each (split, capability) of a complete samples file holds
    let expected = opts.captions * opts.samples * size * size * 3;
    let reused = match &kept {
        Some((path, fingerprint)) => read_samples(path, fingerprint, expected, &opts.cells(), &mut log)?,
        None => None,
    };
    let mut drawn: Vec<(String, Vec<u8>)> = Vec::new();
    // per caption: which samples are right and the reranker's scores of them, for comparing
    // rankings offline (`rankings.json`)
    let mut rankings: Vec<serde_json::Value> = Vec::new();
    for (split, cap) in opts.cells() {
        let (mut single, mut top, mut n) = (0.0, 0.0, 0);
        let (mut single_strict, mut top_strict) = (0.0, 0.0);
        let (mut ordered, mut pairs) = (0.0, 0usize);
        let mut any_right = 0usize;
        let mut control = Subset::default();
        let controlled = split == Split::Train && HELD_OUT.contains(&cap);
        // evaluation scenes use seeds the training stream does not (it draws from `sample`)
        let scenes = eval_scenes(cap, opts.captions, opts.seed, split);
        if split == Split::Train {
            let (acc, row, verdicts) = roundtrip_accuracy(&model.dvae.net, model.device, &scenes)?;
            dvae_roundtrip.insert(cap.name().to_string(), acc);
            dvae_roundtrip_misses.insert(cap.name().to_string(), tally_misses(&verdicts));
            let passed: Vec<bool> = verdicts.iter().map(|v| v.is_ok()).collect();
            if cap == Capability::SingleObject {
                dvae_single_object = single_object_breakdown(&scenes, &passed);
            }
            if opts.samples == 0 && !scenes.is_empty() {
                grid_rows.push((scenes[0].caption.clone(), row));
            }
        } else {
            let (acc, _, _) = roundtrip_accuracy(&model.dvae.net, model.device, &scenes)?;
            dvae_roundtrip_held_out.insert(cap.name().to_string(), acc);
        }
        if opts.samples == 0 {
            continue; // the dVAE alone
        }
        let key = samples_key(split, cap);
        let stored = reused.as_ref().and_then(|r| r.get(&key));
        let mut all_rgb = Vec::new();
        let (mut misses, mut top1_misses) = (BTreeMap::new(), BTreeMap::new());
        let picture = size * size * 3;
        for (c, scene) in scenes.iter().enumerate() {
            let t0 = Instant::now();
            let rgb: Vec<Vec<u8>> = match stored {
                // complete: `read_samples` checked every length
                Some(bytes) => {
                    let at = c * opts.samples * picture;
                    bytes[at..at + opts.samples * picture].chunks(picture).map(<[u8]>::to_vec).collect()
                }
                None => {
                    let samples = model.generate(
                        &scene.caption,
                        opts.samples,
                        opts.seed + c as u64,
                        None,
                        &opts.sample,
                        |_| true,
                    )?;
                    samples.into_iter().map(|s| s.rgb).collect()
                }
            };
            images += rgb.len();
            let scores = model.rerank(&scene.caption, &rgb)?;
            let best = scores.as_deref().map_or(0, pick);
            sampling += t0.elapsed().as_secs_f64();
            // each sample read the committed way and strictly (the regions found once)
            let (verdicts, strict): (Vec<_>, Vec<bool>) = rgb
                .iter()
                .map(|x| {
                    let v = judge_at(scene, x, size, &[SHAPE_MARGIN, 0.0]);
                    (v[0], v[1].is_ok())
                })
                .unzip();
            for v in &verdicts {
                if let Err(m) = v {
                    *misses.entry(m.name().to_string()).or_insert(0) += 1;
                }
            }
            if let Err(m) = verdicts[best] {
                *top1_misses.entry(m.name().to_string()).or_insert(0) += 1;
            }
            let oks: Vec<bool> = verdicts.iter().map(Result::is_ok).collect();
            single_strict += share_right(&strict);
            top_strict += strict[best] as u8 as f64;
            if let Some(scores) = &scores {
                let (g, p) = ordered_pairs(scores, &oks);
                ordered += g;
                pairs += p;
            }
            rankings.push(
                    serde_json::json!({ "key": key, "caption": scene.caption, "right": oks, "right_strict": strict, "reranker": scores }),
                );
            let right = share_right(&oks);
            single += right;
            top += oks[best] as u8 as f64;
            any_right += usize::from(oks.contains(&true));
            if controlled && world::uses_held_out_colour(scene) {
                control.single += right;
                control.rerank_top1 += oks[best] as u8 as f64;
                control.n += 1;
            }
            n += 1;
            if c == 0 && split == Split::Train {
                let mut row = vec![world::render(scene, size), rgb[best].clone()];
                row.extend(rgb.iter().take(6).cloned());
                grid_rows.push((scene.caption.clone(), row));
            }
            if stored.is_none() {
                all_rgb.extend(rgb.into_iter().flatten());
            }
        }
        if stored.is_none() {
            drawn.push((key, all_rgb));
        }
        let rerank_pairs = (pairs > 0).then(|| ordered / pairs as f64);
        let acc = Accuracy {
            single: single / n as f64,
            rerank_top1: top / n as f64,
            n,
            rerank_pairs,
            pairs,
            any_right: any_right as f64 / n as f64,
            misses,
            top1_misses,
            single_strict: single_strict / n as f64,
            rerank_top1_strict: top_strict / n as f64,
        };
        log(&format!("{:?} {}: single {:.2}, top-1 {:.2}", split, cap.name(), acc.single, acc.rerank_top1));
        if controlled {
            let k = control.n.max(1) as f64;
            control.single /= k;
            control.rerank_top1 /= k;
            seen_held_out_colours.insert(cap.name().to_string(), control);
        }
        match split {
            Split::Train => accuracy.insert(cap.name().to_string(), acc),
            Split::HeldOut => held_out.insert(cap.name().to_string(), acc),
        };
    }
    if let (Some((path, fingerprint)), None) = (&kept, &reused) {
        write_samples(path, fingerprint, &drawn)?;
        log(&format!("samples kept in {} for the next evaluation of this model", path.display()));
    }
    // sampling and reranking time only; none without samples or with reused ones (null in the JSON)
    let seconds_per_image = if images == 0 || reused.is_some() { f64::NAN } else { sampling / images as f64 };
    let report = Report {
        accuracy,
        held_out,
        seen_held_out_colours,
        dvae_psnr_db: dvae_psnr(&model.dvae.net, model.device, 64, opts.seed)?,
        dvae_roundtrip,
        dvae_roundtrip_held_out,
        dvae_roundtrip_misses,
        dvae_single_object,
        dvae_codes_used: dvae_codes_used(&model.dvae.net, model.device, 512, opts.seed)?,
        seconds_per_image,
        device: format!("{:?}", model.device).to_lowercase(),
        samples_per_caption: opts.samples,
        sampling: opts.sample.clone(),
        captions: opts.captions,
        reranker: model.reranker.is_some(),
        samples_reused: reused.is_some(),
    };
    let json = serde_json::to_string_pretty(&report).map_err(|e| Error::Invalid(e.to_string()))?;
    write_atomic(&out.join("report.json"), json.as_bytes())?;
    if !rankings.is_empty() {
        let json = serde_json::to_string(&rankings).map_err(|e| Error::Invalid(e.to_string()))?;
        write_atomic(&out.join("rankings.json"), json.as_bytes())?;
    }
    write_atomic(&out.join("report.md"), markdown(&report, &grid_rows).as_bytes())?;
    save_rows(&out.join("grid.png"), &grid_rows, size)?;
    Ok(report)
}

/// What the samples of an evaluation depend on: a samples file holding another fingerprint is
/// drawn again.
fn samples_fingerprint(model: &Model, opts: &EvalOptions) -> Result<String> {
    let mut text = format!(
        "captions {} samples {} seed {} options {:?} device {:?} kind {:?} size {}\n",
        opts.captions,
        opts.samples,
        opts.seed,
        opts.sample,
        model.device,
        model.transformer.vs.variables().values().next().map(Tensor::kind),
        model.config.dvae.image_size
    );
    // every cell's captions, whatever `only` narrows the evaluation to: a file of a full
    // evaluation serves a narrowed one (which reads only its cells)
    let all = EvalOptions { only: Vec::new(), ..opts.clone() };
    for (split, cap) in all.cells() {
        for scene in eval_scenes(cap, opts.captions, opts.seed, split) {
            let ids = model.encode_prompt(&scene.caption)?.ids;
            text += &format!("{}: {:?}\n", scene.caption, ids);
        }
    }
    let h = crate::shards::fnv1a(text.as_bytes()) ^ model.weights_hash()?;
    Ok(format!("{h:016x}"))
}

const SAMPLES_MARK: &str = "tessera-eval-samples";

fn samples_key(split: Split, cap: Capability) -> String {
    format!("{}/{}", if split == Split::Train { "seen" } else { "held_out" }, cap.name())
}

/// The metadata of a samples file, read from its header alone (so a file cut short is still
/// known for one); None when the bytes are not a samples file.
fn samples_metadata(bytes: &[u8]) -> Option<serde_json::Map<String, serde_json::Value>> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let header: serde_json::Value = serde_json::from_slice(bytes.get(8..8usize.checked_add(n)?)?).ok()?;
    let meta = header.get("__metadata__")?.as_object()?.clone();
    meta.contains_key(SAMPLES_MARK).then_some(meta)
}

/// The samples kept in `path`, by [`samples_key`], when they were drawn with `fingerprint`;
/// None (with the reason logged) when the file is missing, unreadable or of another model.
/// A file that is not a samples file is refused, so it is never overwritten.
fn read_samples(
    path: &Path,
    fingerprint: &str,
    expected: usize,
    cells: &[(Split, Capability)],
    log: &mut impl FnMut(&str),
) -> Result<Option<BTreeMap<String, Vec<u8>>>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            log(&format!("no samples in {} yet: drawing them", path.display()));
            return Ok(None);
        }
        Err(e) => return Err(Error::io(path, e)),
    };
    let meta = samples_metadata(&bytes).ok_or_else(|| {
        Error::Invalid(format!(
            "{} exists and is not a samples file of `tessera eval`; name another file (it is left as it is)",
            path.display()
        ))
    })?;
    if meta.get("fingerprint").and_then(|v| v.as_str()) != Some(fingerprint) {
        log(&format!(
            "{} holds samples of another transformer, dVAE, tokenizer or settings: drawing new ones (the file will be replaced)",
            path.display()
        ));
        return Ok(None);
    }
    let st = match safetensors::SafeTensors::deserialize(&bytes) {
        Ok(st) => st,
        Err(e) => {
            log(&format!("{} is damaged ({e}): drawing new samples (the file will be replaced)", path.display()));
            return Ok(None);
        }
    };
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() == safetensors::Dtype::U8 && view.data().len() == expected {
            out.insert(name, view.data().to_vec());
        }
    }
    let keys = cells.iter().map(|&(split, cap)| samples_key(split, cap));
    if let Some(missing) = keys.into_iter().find(|k| !out.contains_key(k)) {
        log(&format!(
            "{} is incomplete ({missing} missing or cut short): drawing new samples (the file will be replaced)",
            path.display()
        ));
        return Ok(None);
    }
    log(&format!("samples read back from {} (only the reranker runs)", path.display()));
    Ok(Some(out))
}

/// Writes the samples (RGB8 bytes per [`samples_key`], captions × samples × H × W × 3) with
/// their fingerprint, atomically. Called only after [`read_samples`] has looked at `path`,
/// which refuses a file that is not a samples file, so no other file is replaced.
fn write_samples(path: &Path, fingerprint: &str, drawn: &[(String, Vec<u8>)]) -> Result<()> {
    let raws: Vec<(String, crate::io::Raw)> = drawn
        .iter()
        .map(|(k, v)| {
            (k.clone(), crate::io::Raw { shape: vec![v.len()], data: v.clone(), dtype: safetensors::Dtype::U8 })
        })
        .collect();
    let meta = std::collections::HashMap::from([
        (SAMPLES_MARK.to_string(), "1".to_string()),
        ("fingerprint".to_string(), fingerprint.to_string()),
    ]);
    let bytes = safetensors::serialize(raws.iter().map(|(n, r)| (n.as_str(), r)), &Some(meta))
        .map_err(|e| Error::Invalid(format!("cannot serialise samples: {e}")))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    write_atomic(path, &bytes)
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
    if r.samples_per_caption > 0 {
        let o = &r.sampling;
        s += &format!(
            " Sampling: temperature {}, top-k {}, top-p {}, guidance {}.",
            o.temperature, o.top_k, o.top_p, o.guidance
        );
    }
    s += "\n\n";
    s += "| capability | single (seen) | top-1 of N (seen) | single (held out) | top-1 of N (held out) | ground truth through the dVAE, seen / held out | reranker orders right, seen / held out | any of N right, seen / held out | captions |\n";
    s += "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n";
    for (k, roundtrip) in &r.dvae_roundtrip {
        let (a, h) = (r.accuracy.get(k), r.held_out.get(k));
        let f = |v: Option<f64>| v.map(|x| format!("{:.0}%", 100.0 * x)).unwrap_or_else(|| "–".into());
        let pairs = |v: Option<&Accuracy>| match v.and_then(|v| v.rerank_pairs.map(|p| (p, v.pairs))) {
            Some((p, n)) => format!("{:.0}% of {n}", 100.0 * p),
            None => "–".into(),
        };
        s += &format!(
            "| {k} | {} | {} | {} | {} | {} / {} | {} / {} | {} / {} | {} |\n",
            f(a.map(|a| a.single)),
            f(a.map(|a| a.rerank_top1)),
            f(h.map(|h| h.single)),
            f(h.map(|h| h.rerank_top1)),
            f(Some(*roundtrip)),
            f(r.dvae_roundtrip_held_out.get(k).copied()),
            pairs(a),
            pairs(h),
            f(a.map(|a| a.any_right)),
            f(h.map(|h| h.any_right)),
            r.captions
        );
    }
    if r.accuracy
        .values()
        .chain(r.held_out.values())
        .any(|a| a.single_strict != a.single || a.rerank_top1_strict != a.rerank_top1)
    {
        let rates = |a: &Accuracy| format!("{:.0}% / {:.0}%", 100.0 * a.single_strict, 100.0 * a.rerank_top1_strict);
        let cells: Vec<String> = r
            .accuracy
            .iter()
            .map(|(k, a)| match r.held_out.get(k) {
                Some(h) => format!("{k} {}, {}", rates(a), rates(h)),
                None => format!("{k} {}", rates(a)),
            })
            .collect();
        s += &format!(
            "\nRead strictly (each shape by its best template alone, without the evaluator's look-alike margin), per sample / top-1, seen and held out: {}.\n",
            cells.join("; ")
        );
    }
    let controls: Vec<String> = r
        .seen_held_out_colours
        .iter()
        .filter(|(k, c)| c.n > 0 && r.held_out.contains_key(*k))
        .map(|(k, c)| {
            let h = &r.held_out[k];
            format!(
                "{k} {:.0}% / {:.0}% of {} (held out {:.0}% / {:.0}%)",
                100.0 * c.single,
                100.0 * c.rerank_top1,
                c.n,
                100.0 * h.single,
                100.0 * h.rerank_top1
            )
        })
        .collect();
    if !controls.is_empty() {
        let colours: Vec<&str> = world::held_out_colours().iter().map(|c| c.name()).collect();
        s += &format!(
            "\nHeld-out pairs are drawn in {} only. Seen captions whose objects take one of those colours, per sample / top-1 (the held-out cells' like-for-like control): {}.\n",
            colours.join(", "),
            controls.join("; ")
        );
    }
    s += "\n\"Reranker orders right\": of the pairs of one caption's samples where one is right and the other wrong, the share the reranker scores the right one higher (50% is chance), and the number of such pairs. \"Any of N right\": the captions with at least one right sample, the top-1 a perfect reranker would reach.\n";
    if r.samples_reused {
        s += "\nThe samples were read back from a samples file (drawn earlier by the same transformer, dVAE and settings); only the reranker ran again.\n";
    }
    if !r.dvae_single_object.is_empty() {
        s += "\nSingle objects' ground truth through the dVAE, by what the caption asks for (passed of scenes):\n\n";
        for group in ["background", "size", "shape"] {
            let parts: Vec<String> = r
                .dvae_single_object
                .iter()
                .filter_map(|(k, &(ok, n))| {
                    let name = k.strip_prefix(group)?.trim_start();
                    Some(format!("{name} {:.0}% ({ok} of {n})", 100.0 * ok as f64 / n.max(1) as f64))
                })
                .collect();
            s += &format!("- {group}: {}\n", parts.join(", "));
        }
    }
    let tally = |m: &BTreeMap<String, usize>| {
        let mut v: Vec<_> = m.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        v.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", ")
    };
    if r.dvae_roundtrip_misses.values().any(|m| !m.is_empty()) {
        s += &format!(
            "\nWhy ground truth fails its round trip through the dVAE (the evaluator's first failed check, of {} scenes per capability):\n\n",
            r.captions
        );
        for (k, m) in r.dvae_roundtrip_misses.iter().filter(|(_, m)| !m.is_empty()) {
            s += &format!("- {k}: {}\n", tally(m));
        }
    }
    let mut why = String::new();
    for (label, map) in [("seen", &r.accuracy), ("held out", &r.held_out)] {
        for (k, a) in map.iter().filter(|(_, a)| !a.misses.is_empty()) {
            why += &format!("| {k} ({label}) | {} | {} |\n", tally(&a.misses), tally(&a.top1_misses));
        }
    }
    if !why.is_empty() {
        s += "\nWhy samples miss (the evaluator's first failed check), over all samples and over the reranker's picks:\n\n| capability | all samples | top-1 |\n| --- | --- | --- |\n";
        s += &why;
    }
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
