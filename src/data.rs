//! Training data: the synthetic world, folders of `name.png|jpg` + `name.txt` pairs, and
//! WebDataset tar shards. Real images get the paper's random crop and resize. Files that cannot
//! be read are skipped and counted, never fatal. A loader thread prepares batches ahead of the
//! trainer, in an order fixed by (seed, step), so a resumed run sees the same data.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::sample::SeedRng;
use crate::world::{self, Split};

/// One captioned picture, `size × size` RGB8.
#[derive(Debug, Clone)]
pub struct Example {
    pub rgb: Vec<u8>,
    pub caption: String,
    /// The scene drawn (the synthetic world only).
    pub scene: Option<world::Scene>,
}

/// Where examples come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// The synthetic world: example i is scene (seed, i). `pictures` (spec `world-balanced`,
    /// `world-dense`) changes what is drawn for a dVAE, which never reads the captions.
    /// `mix` (a spec's `@CAP=W,…`) changes how often each capability is drawn.
    World { seed: u64, split: Split, pictures: world::Pictures, mix: world::Mix },
    /// Captioned image files loaded into memory (folder pairs or tar shards).
    Files { items: Vec<(Vec<u8>, String)>, skipped: usize },
}

/// Counts of what could not be read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Skipped {
    pub files: usize,
}

impl Source {
    /// Parses a data spec: `world`, `world:SEED`, `world-held-out:SEED`, `world-balanced:SEED`,
    /// `world-dense:SEED`, each optionally followed by `@CAP=W,…` (capability weights,
    /// [`world::Mix::parse`]), a folder, or a `.tar` file or folder of `.tar` shards.
    pub fn open(spec: &str) -> Result<Self> {
        if let Some(rest) = spec.strip_prefix("world") {
            let (rest, mix) = match rest.split_once('@') {
                Some((r, m)) => (r, world::Mix::parse(m).map_err(|e| Error::Invalid(format!("{e} (in {spec:?})")))?),
                None => (rest, world::Mix::USUAL),
            };
            let (split, rest) = match rest.strip_prefix("-held-out") {
                Some(r) => (Split::HeldOut, r),
                None => (Split::Train, rest),
            };
            let (pictures, rest) = if let Some(r) = rest.strip_prefix("-balanced") {
                (world::Pictures::EvenBackgrounds, r)
            } else if let Some(r) = rest.strip_prefix("-dense") {
                (world::Pictures::Dense, r)
            } else {
                (world::Pictures::Usual, rest)
            };
            let seed = match rest.strip_prefix(':') {
                Some(s) => s.parse().map_err(|_| Error::Invalid(format!("bad world seed in {spec:?}")))?,
                None if rest.is_empty() => 0,
                None => return Err(Error::Invalid(format!("unknown data spec {spec:?}"))),
            };
            return Ok(Source::World { seed, split, pictures, mix });
        }
        let path = Path::new(spec);
        if !path.exists() {
            return Err(Error::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "no such data")));
        }
        let mut items = Vec::new();
        let mut skipped = 0;
        let mut tars = Vec::new();
        if path.is_file() {
            tars.push(path.to_path_buf());
        } else {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| Error::io(path, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            entries.sort();
            let mut captions: BTreeMap<String, String> = BTreeMap::new();
            let mut images: BTreeMap<String, PathBuf> = BTreeMap::new();
            for p in entries {
                let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
                let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or("").to_string();
                match ext.as_str() {
                    "tar" => tars.push(p),
                    "txt" => match std::fs::read_to_string(&p) {
                        Ok(t) => {
                            captions.insert(stem, t.trim().to_string());
                        }
                        Err(_) => skipped += 1,
                    },
                    "png" | "jpg" | "jpeg" => {
                        images.insert(stem, p);
                    }
                    _ => {}
                }
            }
            for (stem, img) in images {
                match (captions.get(&stem), std::fs::read(&img)) {
                    (Some(c), Ok(bytes)) if !c.is_empty() => items.push((bytes, c.clone())),
                    _ => skipped += 1,
                }
            }
        }
        for tar in tars {
            skipped += read_tar(&tar, &mut items)?;
        }
        Ok(Source::Files { items, skipped })
    }

    /// Refuses a source whose pictures are for a dVAE alone (`world-dense`: its crowds' captions
    /// ask for nothing a transformer or reranker should learn to draw), naming `stage`.
    pub fn for_captions(self, stage: &str) -> Result<Self> {
        match self {
            Source::World { pictures: world::Pictures::Dense, .. } => Err(Error::Invalid(format!(
                "world-dense draws pictures for a dVAE; train the {stage} on world or world-balanced"
            ))),
            s => Ok(s),
        }
    }

    pub fn skipped(&self) -> usize {
        match self {
            Source::World { .. } => 0,
            Source::Files { skipped, .. } => *skipped,
        }
    }

    /// Examples available (`None` for the unbounded world).
    pub fn count(&self) -> Option<usize> {
        match self {
            Source::World { .. } => None,
            Source::Files { items, .. } => Some(items.len()),
        }
    }

    /// Example `index` at `size × size`, or `None` when its image cannot be decoded.
    /// `rng` drives the random crop of real images.
    pub fn get(&self, index: u64, size: usize, rng: &mut SeedRng) -> Option<Example> {
        match self {
            Source::World { seed, split, pictures, mix } => {
                let scene = world::sample_mixed(*seed, index, *split, *pictures, mix);
                Some(Example { rgb: world::render(&scene, size), caption: scene.caption.clone(), scene: Some(scene) })
            }
            Source::Files { items, .. } => {
                if items.is_empty() {
                    return None;
                }
                let (bytes, caption) = &items[(index % items.len() as u64) as usize];
                let rgb = random_crop(bytes, size, rng)?;
                Some(Example { rgb, caption: caption.clone(), scene: None })
            }
        }
    }
}

/// Reads image + caption pairs of a WebDataset shard (members `key.png|jpg` and `key.txt`);
/// returns how many could not be used.
fn read_tar(path: &Path, items: &mut Vec<(Vec<u8>, String)>) -> Result<usize> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut archive = tar::Archive::new(file);
    let mut captions: BTreeMap<String, String> = BTreeMap::new();
    let mut images: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut skipped = 0;
    let entries = match archive.entries() {
        Ok(e) => e,
        Err(_) => return Ok(1),
    };
    for entry in entries {
        let Ok(mut entry) = entry else {
            skipped += 1;
            break; // a broken header ends what can be read of the shard
        };
        let name = entry.path().ok().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
        let Some((key, ext)) = name.rsplit_once('.') else { continue };
        let mut buf = Vec::new();
        if entry.read_to_end(&mut buf).is_err() {
            skipped += 1;
            continue;
        }
        match ext.to_ascii_lowercase().as_str() {
            "txt" => {
                captions.insert(key.to_string(), String::from_utf8_lossy(&buf).trim().to_string());
            }
            "png" | "jpg" | "jpeg" => {
                images.insert(key.to_string(), buf);
            }
            _ => {}
        }
    }
    for (key, img) in images {
        match captions.get(&key) {
            Some(c) if !c.is_empty() => items.push((img, c.clone())),
            _ => skipped += 1,
        }
    }
    Ok(skipped)
}

/// Decodes an image, takes a random square crop of 80–100% of its shorter side, and resizes
/// it to `size` (the paper's augmentation for real images).
pub fn random_crop(bytes: &[u8], size: usize, rng: &mut SeedRng) -> Option<Vec<u8>> {
    let img = crate::store::decode_image(bytes)?.to_rgb8();
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        return None;
    }
    let short = w.min(h) as f64;
    let side = ((short * (0.8 + 0.2 * rng.next_f64())).round() as u32).clamp(1, w.min(h));
    let x = (rng.next_f64() * (w - side + 1) as f64) as u32;
    let y = (rng.next_f64() * (h - side + 1) as f64) as u32;
    let crop = image::imageops::crop_imm(&img, x.min(w - side), y.min(h - side), side, side).to_image();
    Some(image::imageops::resize(&crop, size as u32, size as u32, image::imageops::FilterType::Triangle).into_raw())
}
