//! Judged samples: the model's own samples of the synthetic world's scenes, each judged right
//! or wrong by the evaluator ([`crate::eval::score`]), kept on disk for the reranker to learn
//! from.
//!
//! A reranker learns to tell a caption's picture from other captions' pictures and from
//! contrasting pictures the world draws; at inference it ranks the transformer's samples of one
//! prompt, whose wrong ones are the transformer's own near misses (a look-alike shape, an object
//! that melted into its neighbour). Judged samples show it exactly those: each scene's right
//! samples as its pictures, its wrong ones as the pictures its caption must score below
//! (`train reranker --judged DIR`).
//!
//! A folder of parts, `part-NNNNN.safetensors`, each with the samples of [`SCENES_PER_PART`]
//! consecutive scenes of the world's training split (held-out colour–shape pairs never
//! appear): `pictures` (U8 [n·K, H, W, 3], scene by scene, K samples each), `right` (U8
//! [n·K]) and `codes` (U16 [n·K, image tokens]: the codes the transformer drew, which the
//! pictures decode; parts written before codes were kept have none), with the captions, the
//! settings and the dVAE's codes fingerprint in its metadata. Parts are written atomically and
//! a run that was killed starts again at the first part missing.
//!
//! The right samples' codes are training data too ([`write_right_shards`], `train shards
//! --from-judged`): the transformer fine-tuned on the very code sequences it drew and the
//! evaluator passed (rejection sampling). Pictures encoded again would not do: a decoded
//! sample encoded again is not the sequence the transformer drew.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::error::{Error, Result};
use crate::model::Model;
use crate::sample::{SampleOptions, Sampler, SeedRng};
use crate::world::{self, Split};

/// Scenes per part file.
pub const SCENES_PER_PART: usize = 64;
const MARK: &str = "tessera-judged-samples";
/// The metadata key of the dVAE's codes fingerprint ([`Model::dvae_codes_mark`]).
const DVAE_KEY: &str = "dvae";

/// What `tessera train judged` draws.
#[derive(Debug, Clone)]
pub struct JudgedOptions {
    /// World scenes (rounded up to whole parts).
    pub scenes: usize,
    /// Samples per scene.
    pub per_scene: usize,
    /// Rows per sampling batch (whole scenes: rounded down to a multiple of `per_scene`).
    pub batch: usize,
    /// Seed of the scenes and of the samples' draws.
    pub seed: u64,
    pub sample: SampleOptions,
}

/// What a run wrote.
#[derive(Debug, Clone)]
pub struct JudgedSummary {
    pub parts: usize,
    /// Parts drawn by this run (the rest were there already).
    pub drawn: usize,
    pub samples: usize,
    pub right: usize,
    /// Scenes with at least one right and one wrong sample: those the reranker learns from.
    pub informative: usize,
    pub samples_per_s: f64,
}

/// The path of part `i`.
pub fn part_path(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("part-{i:05}.safetensors"))
}

/// The world scene of index `i` (training split) that judged samples of `seed` draw.
pub fn scene(seed: u64, i: usize) -> world::Scene {
    world::sample(seed ^ 0x1D6E_D5A3, i as u64, Split::Train)
}

/// The part files in `dir`, in order of their names.
fn part_paths(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("part-") && n.ends_with(".safetensors"))
        })
        .collect();
    paths.sort();
    Ok(paths)
}

/// Part `path` when it is whole and holds pictures of `size` px; otherwise `None`, with the
/// reason on stderr (a damaged part is named and left out, never half used).
fn read_usable_part(path: &Path, size: usize) -> Option<Part> {
    match read_part(path) {
        Ok(p) if p.size == size => Some(p),
        Ok(p) => {
            eprintln!("skipping {}: its pictures are {} px, the model's {size} px", path.display(), p.size);
            None
        }
        Err(e) => {
            eprintln!("skipping {e}");
            None
        }
    }
}

/// One part read back.
#[derive(Debug, Clone)]
pub struct Part {
    pub captions: Vec<String>,
    pub per_scene: usize,
    pub size: usize,
    /// RGB8 pictures, scene by scene.
    pub pictures: Vec<Vec<u8>>,
    pub right: Vec<bool>,
    /// The image codes each picture decodes, where the part kept them.
    pub codes: Option<Vec<Vec<u16>>>,
    meta: std::collections::HashMap<String, String>,
}

/// Reads part `path`; a file that is not a whole part is an error naming it.
pub fn read_part(path: &Path) -> Result<Part> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |m: &str| Error::checkpoint(path, format!("not a part of judged samples: {m}"));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(&e.to_string()))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    if !meta.contains_key(MARK) {
        return Err(bad("its metadata has no mark"));
    }
    let captions: Vec<String> = meta
        .get("captions")
        .and_then(|c| serde_json::from_str(c).ok())
        .ok_or_else(|| bad("no captions in its metadata"))?;
    let num = |k: &str| meta.get(k).and_then(|v| v.parse::<usize>().ok()).ok_or_else(|| bad(&format!("no {k}")));
    let (per_scene, size) = (num("per_scene")?, num("size")?);
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(&e.to_string()))?;
    let n = captions.len() * per_scene;
    let picture = size * size * 3;
    let pictures = st.tensor("pictures").map_err(|e| bad(&e.to_string()))?;
    let right = st.tensor("right").map_err(|e| bad(&e.to_string()))?;
    if pictures.data().len() != n * picture || right.data().len() != n || n == 0 {
        return Err(bad(&format!("its tensors do not hold {} scenes × {per_scene} samples", captions.len())));
    }
    let codes = match st.tensor("codes") {
        Ok(c) => {
            let per = c.shape().get(1).copied().unwrap_or(0);
            if c.dtype() != safetensors::Dtype::U16 || c.shape() != [n, per] || per == 0 {
                return Err(bad(&format!("its codes are not U16 [{n}, image tokens]")));
            }
            let all: Vec<u16> = c.data().chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
            Some(all.chunks(per).map(<[u16]>::to_vec).collect())
        }
        Err(_) => None,
    };
    Ok(Part {
        captions,
        per_scene,
        size,
        pictures: pictures.data().chunks(picture).map(<[u8]>::to_vec).collect(),
        right: right.data().iter().map(|&r| r != 0).collect(),
        codes,
        meta,
    })
}

/// The settings a part records, as its metadata holds them.
fn settings(model: &Model, o: &JudgedOptions) -> Result<Vec<(String, String)>> {
    let h = model.weights_hash()?;
    Ok(vec![
        ("per_scene".into(), o.per_scene.to_string()),
        ("size".into(), model.config.dvae.image_size.to_string()),
        ("seed".into(), o.seed.to_string()),
        ("sampling".into(), format!("{:?}", o.sample)),
        ("model".into(), format!("{h:016x}")),
        (DVAE_KEY.into(), model.dvae_codes_mark()?),
    ])
}

/// Draws and judges the samples of `o.scenes` world scenes into `dir` (see the module doc),
/// skipping parts already there with the same settings; `progress` sees (parts done, parts).
pub fn draw(
    model: &Model,
    dir: &Path,
    o: &JudgedOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<JudgedSummary> {
    if o.scenes == 0 || o.per_scene < 2 {
        return Err(Error::Invalid(
            "judged samples need at least one scene and two samples per scene (a right one and a wrong one to compare)"
                .into(),
        ));
    }
    o.sample.validate()?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let parts = o.scenes.div_ceil(SCENES_PER_PART);
    let want = settings(model, o)?;
    let size = model.config.dvae.image_size;
    let image_len = model.config.image_len();
    let per_batch = (o.batch / o.per_scene).max(1);
    let t0 = Instant::now();
    let mut s = JudgedSummary { parts, drawn: 0, samples: 0, right: 0, informative: 0, samples_per_s: 0.0 };
    let mut drawn_samples = 0;
    for p in 0..parts {
        let path = part_path(dir, p);
        let kept = path
            .exists()
            .then(|| read_part(&path))
            .and_then(|r| r.ok())
            .filter(|part| want.iter().all(|(k, v)| part.meta.get(k) == Some(v)));
        let (captions, right) = match kept {
            Some(part) => (part.captions, part.right),
            None => {
                let scenes: Vec<world::Scene> =
                    (p * SCENES_PER_PART..(p + 1) * SCENES_PER_PART).map(|i| scene(o.seed, i)).collect();
                let mut pictures = Vec::with_capacity(scenes.len() * o.per_scene * size * size * 3);
                let mut right = Vec::with_capacity(scenes.len() * o.per_scene);
                let mut codes: Vec<u16> = Vec::with_capacity(scenes.len() * o.per_scene * image_len);
                for (c, chunk) in scenes.chunks(per_batch).enumerate() {
                    let mut ids = Vec::new();
                    let mut seeds = Vec::new();
                    for (j, sc) in chunk.iter().enumerate() {
                        let enc = model.encode_prompt(&sc.caption)?;
                        let first = (p * SCENES_PER_PART + c * per_batch + j) * o.per_scene;
                        let mut rng = SeedRng::new(o.seed ^ 0x5A3B_1E00 ^ first as u64);
                        for _ in 0..o.per_scene {
                            ids.push(enc.ids.clone());
                            seeds.push(rng.next_u64());
                        }
                    }
                    let net = &model.transformer.net;
                    let text = net.pad_text(&ids);
                    let tokens = Sampler::new(net, &text, None, &seeds, &o.sample)?.run(|_| true)?;
                    let rgb = model.decode(&tokens)?;
                    let drawn = Vec::<i64>::try_from(&tokens.to_device(tch::Device::Cpu).flatten(0, -1))?;
                    codes.extend(drawn.iter().map(|&c| c as u16));
                    for (j, sc) in chunk.iter().enumerate() {
                        for x in &rgb[j * o.per_scene..(j + 1) * o.per_scene] {
                            right.push(crate::eval::score(sc, x, size));
                            pictures.extend_from_slice(x);
                        }
                    }
                }
                let captions: Vec<String> = scenes.into_iter().map(|sc| sc.caption).collect();
                write_part(&path, &captions, &pictures, &right, Some(&codes), &want, size)?;
                s.drawn += 1;
                drawn_samples += right.len();
                (captions, right)
            }
        };
        s.samples += right.len();
        s.right += right.iter().filter(|&&r| r).count();
        s.informative += right.chunks(o.per_scene).filter(|r| r.contains(&true) && r.contains(&false)).count();
        debug_assert_eq!(captions.len() * o.per_scene, right.len());
        progress(p + 1, parts);
    }
    s.samples_per_s = drawn_samples as f64 / t0.elapsed().as_secs_f64().max(1e-9);
    Ok(s)
}

/// Writes one part (atomically): `captions` scene by scene, `right.len() / captions.len()`
/// samples each, `pictures` their RGB8 bytes in the same order, `codes` (where given) the
/// image codes they decode, the same number per sample; `settings` go to its metadata.
pub fn write_part(
    path: &Path,
    captions: &[String],
    pictures: &[u8],
    right: &[bool],
    codes: Option<&[u16]>,
    settings: &[(String, String)],
    size: usize,
) -> Result<()> {
    let n = right.len();
    if captions.is_empty() || !n.is_multiple_of(captions.len()) || pictures.len() != n * size * size * 3 {
        return Err(Error::Invalid(format!(
            "{} pictures and {n} verdicts do not make whole scenes of {} captions",
            pictures.len() / (size * size * 3).max(1),
            captions.len()
        )));
    }
    if let Some(c) = codes
        && (c.is_empty() || !c.len().is_multiple_of(n))
    {
        return Err(Error::Invalid(format!("{} codes are not the same number for each of {n} samples", c.len())));
    }
    let mut raws = vec![
        (
            "pictures",
            crate::io::Raw { shape: vec![n, size, size, 3], data: pictures.to_vec(), dtype: safetensors::Dtype::U8 },
        ),
        (
            "right",
            crate::io::Raw {
                shape: vec![n],
                data: right.iter().map(|&r| u8::from(r)).collect(),
                dtype: safetensors::Dtype::U8,
            },
        ),
    ];
    if let Some(c) = codes {
        let data = c.iter().flat_map(|v| v.to_le_bytes()).collect();
        raws.push(("codes", crate::io::Raw { shape: vec![n, c.len() / n], data, dtype: safetensors::Dtype::U16 }));
    }
    let mut meta: std::collections::HashMap<String, String> = settings.iter().cloned().collect();
    meta.insert(MARK.into(), "1".into());
    meta.insert("per_scene".into(), (n / captions.len()).to_string());
    meta.insert("size".into(), size.to_string());
    meta.insert("captions".into(), serde_json::to_string(captions).map_err(|e| Error::Invalid(e.to_string()))?);
    let bytes = safetensors::serialize(raws.iter().map(|(n, r)| (*n, r)), &Some(meta))
        .map_err(|e| Error::Invalid(format!("cannot serialise judged samples: {e}")))?;
    crate::io::write_atomic(path, &bytes)
}

/// One scene a reranker learns from: its caption, its right samples and its wrong ones
/// (indices into [`JudgedSet::pictures`]).
#[derive(Debug, Clone)]
pub struct JudgedScene {
    pub caption: String,
    pub right: Vec<usize>,
    pub wrong: Vec<usize>,
}

/// The informative scenes of a folder of parts (at least one right and one wrong sample),
/// with their pictures.
#[derive(Debug, Default)]
pub struct JudgedSet {
    pub scenes: Vec<JudgedScene>,
    pub pictures: Vec<Vec<u8>>,
    /// Scenes read, informative or not.
    pub read: usize,
}

impl JudgedSet {
    /// Reads every part in `dir` (pictures of `size` px); a damaged part is named on stderr
    /// and skipped, never half used; none readable is an error.
    pub fn load(dir: &Path, size: usize) -> Result<Self> {
        let paths = part_paths(dir)?;
        let mut set = JudgedSet::default();
        for path in &paths {
            let Some(part) = read_usable_part(path, size) else { continue };
            for (c, caption) in part.captions.iter().enumerate() {
                set.read += 1;
                let samples = c * part.per_scene..(c + 1) * part.per_scene;
                let judged = &part.right[samples.clone()];
                if !(judged.contains(&true) && judged.contains(&false)) {
                    continue;
                }
                let base = set.pictures.len();
                set.pictures.extend(part.pictures[samples].iter().cloned());
                let (right, wrong): (Vec<usize>, Vec<usize>) =
                    (base..base + judged.len()).partition(|&i| judged[i - base]);
                set.scenes.push(JudgedScene { caption: caption.clone(), right, wrong });
            }
        }
        if set.scenes.is_empty() {
            return Err(Error::Invalid(format!(
                "{} holds no scene with both a right and a wrong sample (parts read: {}, scenes: {})",
                dir.display(),
                paths.len(),
                set.read
            )));
        }
        Ok(set)
    }

    /// `n` scenes for one training step, drawn with replacement from `rng`: for each, one of
    /// its right samples (the caption's picture) and `k` of its wrong ones (fewer where it has
    /// fewer: the rest repeat the first, marked not real).
    pub fn batch(&self, n: usize, k: usize, rng: &mut SeedRng) -> JudgedBatch {
        let mut b = JudgedBatch::default();
        for _ in 0..n {
            let s = &self.scenes[(rng.next_u64() % self.scenes.len() as u64) as usize];
            b.captions.push(s.caption.clone());
            b.pictures.push(self.pictures[s.right[(rng.next_u64() % s.right.len() as u64) as usize]].clone());
            let mut wrong = s.wrong.clone();
            // a partial Fisher–Yates shuffle picks k distinct wrong samples
            for j in 0..k.min(wrong.len()) {
                let r = j + (rng.next_u64() % (wrong.len() - j) as u64) as usize;
                wrong.swap(j, r);
            }
            for j in 0..k {
                let real = j < wrong.len();
                b.negatives.push(self.pictures[wrong[if real { j } else { 0 }]].clone());
                b.real.push(real);
            }
        }
        b
    }
}

/// Judged scenes for one step: captions, their pictures, and `k` wrong samples per caption.
#[derive(Debug, Default)]
pub struct JudgedBatch {
    pub captions: Vec<String>,
    pub pictures: Vec<Vec<u8>>,
    /// k per caption, caption b's at b·k..(b+1)·k.
    pub negatives: Vec<Vec<u8>>,
    pub real: Vec<bool>,
}

/// How a reranker ranks one capability's judged samples (or all of them).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RankCell {
    pub scenes: usize,
    /// Scenes with at least one right sample: what a perfect reranker's pick reaches.
    pub any_right: usize,
    /// Scenes whose highest-scored sample is right.
    pub top1_right: usize,
    pub samples: usize,
    pub samples_right: usize,
    /// (right, wrong) sample pairs of one scene, and those the reranker scores right first
    /// (a tie counts half), as `tessera eval`'s pair order.
    pub pairs: usize,
    pub pairs_ordered: f64,
}

impl RankCell {
    fn add(&mut self, scores: &[f32], right: &[bool]) {
        let best = crate::report::pick(scores);
        let (ordered, pairs) = crate::report::ordered_pairs(scores, right);
        self.scenes += 1;
        self.any_right += usize::from(right.contains(&true));
        self.top1_right += usize::from(right.get(best) == Some(&true));
        self.samples += right.len();
        self.samples_right += right.iter().filter(|&&r| r).count();
        self.pairs += pairs;
        self.pairs_ordered += ordered;
    }

    /// The pick's accuracy, the samples' and a perfect pick's, and the pair order (`None` with
    /// no scene or no pair).
    pub fn rates(&self) -> (f64, f64, f64, Option<f64>) {
        let of = |k: usize, n: usize| if n == 0 { 0.0 } else { k as f64 / n as f64 };
        (
            of(self.top1_right, self.scenes),
            of(self.samples_right, self.samples),
            of(self.any_right, self.scenes),
            (self.pairs > 0).then(|| self.pairs_ordered / self.pairs as f64),
        )
    }
}

/// A reranker's ranking of a folder of judged samples: by capability and in all.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Ranking {
    pub parts: usize,
    /// Parts named on stderr and left out (damaged, or pictures of another size).
    pub skipped: usize,
    pub cells: std::collections::BTreeMap<String, RankCell>,
    pub all: RankCell,
}

/// Ranks every scene of the judged samples in `dir` with `model`'s reranker, as `tessera eval`
/// ranks its samples: the pick (the highest score) right or wrong, and the order of each
/// (right, wrong) pair. Scored on scenes the reranker did not learn from, it measures on
/// thousands of scenes what `eval` measures on tens per capability, with only the reranker
/// running. A scene's capability comes from the world scene its part index and seed name
/// (`unknown` where that scene's caption differs: a part moved or renamed).
///
/// With `redecode`, each part's codes (the sequences the transformer drew) are decoded again
/// by `model`'s dVAE and the pictures judged again by the evaluator before they are ranked:
/// another decoder of the same codes measured on the very samples the bank's model drew. A
/// part without codes, of another dVAE's codes, or whose scenes are not the ones its index and
/// seed name is then named and left out.
pub fn rank(model: &Model, dir: &Path, redecode: bool, mut progress: impl FnMut(usize, usize)) -> Result<Ranking> {
    if model.reranker.is_none() {
        return Err(Error::Invalid("the model has no reranker to rank judged samples with".into()));
    }
    let size = model.config.dvae.image_size;
    let mark = if redecode { model.dvae_codes_mark()? } else { String::new() };
    let paths = part_paths(dir)?;
    let mut r = Ranking::default();
    for (done, path) in paths.iter().enumerate() {
        let Some(mut part) = read_usable_part(path, size) else {
            r.skipped += 1;
            continue;
        };
        let index = path
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.strip_prefix("part-"))
            .and_then(|s| s.parse::<usize>().ok());
        let seed = part.meta.get("seed").and_then(|s| s.parse::<u64>().ok());
        let scenes: Vec<Option<world::Scene>> = (0..part.captions.len())
            .map(|c| {
                let sc = scene(seed?, index? * SCENES_PER_PART + c);
                (sc.caption == part.captions[c]).then_some(sc)
            })
            .collect();
        if redecode {
            let flat: std::result::Result<Vec<i64>, String> = match usable_codes(&part, &mark, model.config.image_len())
            {
                Ok(_) if scenes.iter().any(Option::is_none) => {
                    Err("its scenes are not those its index and seed name, so they cannot be judged".into())
                }
                Ok(codes) => Ok(codes.iter().flatten().map(|&c| i64::from(c)).collect()),
                Err(why) => Err(why),
            };
            let flat = match flat {
                Ok(f) => f,
                Err(why) => {
                    eprintln!("skipping {}: {why}", path.display());
                    r.skipped += 1;
                    continue;
                }
            };
            let n = part.right.len() as i64;
            let tokens = tch::Tensor::from_slice(&flat).view([n, -1]).to_device(model.device);
            part.pictures = model.decode(&tokens)?;
            part.right = part
                .pictures
                .iter()
                .enumerate()
                .map(|(i, x)| scenes[i / part.per_scene].as_ref().is_some_and(|sc| crate::eval::score(sc, x, size)))
                .collect();
        }
        for (c, caption) in part.captions.iter().enumerate() {
            let samples = c * part.per_scene..(c + 1) * part.per_scene;
            let scores = model.rerank(caption, &part.pictures[samples.clone()])?.unwrap_or_default();
            let capability = scenes[c].as_ref().map_or("unknown", |sc| sc.capability.name());
            r.cells.entry(capability.to_string()).or_default().add(&scores, &part.right[samples.clone()]);
            r.all.add(&scores, &part.right[samples]);
        }
        r.parts += 1;
        progress(done + 1, paths.len());
    }
    if r.parts == 0 {
        let what =
            if redecode { "part whose codes this model's dVAE decodes" } else { "readable part of judged samples" };
        return Err(Error::Invalid(format!("{} holds no {what}", dir.display())));
    }
    Ok(r)
}

/// A part's codes when they are codes of the dVAE whose [`Model::dvae_codes_mark`] is `mark`,
/// `image_len` per sample; otherwise why not.
fn usable_codes<'a>(part: &'a Part, mark: &str, image_len: usize) -> std::result::Result<&'a [Vec<u16>], String> {
    match &part.codes {
        None => Err("it was written before parts kept their codes".into()),
        Some(_) if part.meta.get(DVAE_KEY).map(String::as_str) != Some(mark) => {
            Err("its codes were drawn through another dVAE than this model's".into())
        }
        Some(c) if c.first().map(Vec::len) != Some(image_len) => {
            Err(format!("its samples have {} codes, this model's {image_len}", c.first().map_or(0, Vec::len)))
        }
        Some(c) => Ok(c),
    }
}

/// The prefix of the token shards [`write_right_shards`] writes: beside a folder's own
/// `shard-NNNNN.tok` (the world's), read with them as one training set.
pub const RIGHT_SHARD_PREFIX: &str = "shard-judged-";

/// What [`write_right_shards`] found and wrote.
#[derive(Debug, Clone, Default)]
pub struct RightShards {
    /// Samples read (in the parts used), and the right ones among them, now in shards.
    pub samples: usize,
    pub right: usize,
    pub files: usize,
    /// Parts left out, with the reason (each also named on stderr).
    pub skipped: Vec<(PathBuf, String)>,
}

/// Writes the right samples' codes of the bank `bank` as token shards in `out`
/// (`shard-judged-NNNNN.tok`, `per_shard` examples each, the caption of each sample's scene),
/// for the transformer to train on beside the world's shards: rejection sampling, the model
/// shown the very code sequences it drew that the evaluator passed. Only parts whose codes are
/// `model`'s dVAE's are used ([`Model::dvae_codes_mark`] in their metadata): a part drawn
/// through another dVAE, written before parts kept codes, or damaged is named and left out.
/// The shards record `shard_mark`, the fingerprint [`crate::shards::TokenShards::open`] checks
/// (that of the model directory's dVAE file). Earlier `shard-judged-*` files in `out` are
/// replaced: each new one is written atomically over its name, then those past the new count
/// are removed, so a killed run never leaves fewer right samples than it found.
pub fn write_right_shards(
    model: &Model,
    shard_mark: &str,
    bank: &Path,
    out: &Path,
    per_shard: usize,
) -> Result<RightShards> {
    if per_shard == 0 {
        return Err(Error::Invalid("--per-shard must be at least 1".into()));
    }
    let (mark, image_len, size) = (model.dvae_codes_mark()?, model.config.image_len(), model.config.dvae.image_size);
    let mut r = RightShards::default();
    let (mut tokens, mut captions): (Vec<u16>, Vec<String>) = (Vec::new(), Vec::new());
    for path in part_paths(bank)? {
        let Some(part) = read_usable_part(&path, size) else {
            r.skipped.push((path, "unreadable or of another picture size".into()));
            continue;
        };
        let codes = match usable_codes(&part, &mark, image_len) {
            Ok(c) => c,
            Err(why) => {
                eprintln!("skipping {}: {why}", path.display());
                r.skipped.push((path, why));
                continue;
            }
        };
        r.samples += part.right.len();
        for (i, (&right, c)) in part.right.iter().zip(codes).enumerate() {
            if right {
                tokens.extend_from_slice(c);
                captions.push(part.captions[i / part.per_scene].clone());
            }
        }
    }
    r.right = captions.len();
    if captions.is_empty() {
        return Err(Error::Invalid(format!(
            "{} holds no right sample whose codes this model's dVAE draws ({} samples read, {} parts left out)",
            bank.display(),
            r.samples,
            r.skipped.len()
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let name = |i: usize| format!("{RIGHT_SHARD_PREFIX}{i:05}.tok");
    for (i, names) in captions.chunks(per_shard).enumerate() {
        let first = i * per_shard;
        let header = crate::shards::ShardHeader {
            count: names.len(),
            image_len,
            vocab: model.config.dvae.vocab_size,
            dvae: shard_mark.to_string(),
            first: first as u64,
        };
        let path = out.join(name(i));
        crate::shards::write_shard(
            &path,
            &header,
            &tokens[first * image_len..(first + names.len()) * image_len],
            names,
        )?;
        r.files += 1;
    }
    let written: std::collections::HashSet<String> = (0..r.files).map(name).collect();
    for old in std::fs::read_dir(out).map_err(|e| Error::io(out, e))?.filter_map(|e| e.ok().map(|e| e.path())) {
        let stale = old
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(RIGHT_SHARD_PREFIX) && !written.contains(n));
        if stale {
            std::fs::remove_file(&old).map_err(|e| Error::io(&old, e))?;
        }
    }
    Ok(r)
}
