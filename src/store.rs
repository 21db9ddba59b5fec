//! Files the app writes: PNGs that carry their generation parameters in a text chunk,
//! exports that never overwrite, and the autosave store (every sample, with an append-only
//! index) that brings the gallery back after a restart or a crash.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// PNG text-chunk keyword holding a sample's [`SampleParams`] as JSON.
pub const PARAMS_KEY: &str = "tessera";
const INDEX_FILE: &str = "index.jsonl";

/// Everything needed to reproduce a sample (and to restore the app's settings from it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleParams {
    pub prompt: String,
    pub seed: u64,
    pub temperature: f64,
    pub top_k: usize,
    pub top_p: f64,
    pub guidance: f64,
    /// Samples drawn in the job, and how many were kept.
    pub n: usize,
    pub keep: usize,
    /// Model name and where it came from.
    pub model: String,
    /// Reranker score, when the model has a reranker.
    pub score: Option<f32>,
    /// Image tokens kept from a canvas (0 = drawn from scratch).
    #[serde(default)]
    pub kept_tokens: usize,
}

/// Encodes an RGB8 square image as PNG, with `params` as JSON in an iTXt chunk.
pub fn encode_png(rgb: &[u8], size: usize, params: Option<&SampleParams>) -> Result<Vec<u8>> {
    if rgb.len() != size * size * 3 {
        return Err(Error::Invalid(format!("{} bytes is not a {size}×{size} RGB image", rgb.len())));
    }
    let mut out = Vec::new();
    let err = |e: png::EncodingError| Error::Invalid(format!("PNG encoding: {e}"));
    {
        let mut enc = png::Encoder::new(&mut out, size as u32, size as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.add_text_chunk("Software".into(), "Tessera".into()).map_err(err)?;
        if let Some(p) = params {
            let json = serde_json::to_string(p).map_err(|e| Error::Invalid(e.to_string()))?;
            enc.add_itxt_chunk(PARAMS_KEY.into(), json).map_err(err)?;
            enc.add_itxt_chunk("Description".into(), p.prompt.clone()).map_err(err)?;
        }
        let mut w = enc.write_header().map_err(err)?;
        w.write_image_data(rgb).map_err(err)?;
        w.finish().map_err(err)?;
    }
    Ok(out)
}

/// Reads the [`SampleParams`] a Tessera PNG carries (`None` for other PNGs).
pub fn read_png_params(path: &Path) -> Result<Option<SampleParams>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let dec = png::Decoder::new(std::io::BufReader::new(file));
    let reader =
        dec.read_info().map_err(|e| Error::Image { path: path.into(), msg: format!("not a readable PNG: {e}") })?;
    let info = reader.info();
    let text = info
        .utf8_text
        .iter()
        .find(|t| t.keyword == PARAMS_KEY)
        .and_then(|t| t.get_text().ok())
        .or_else(|| info.uncompressed_latin1_text.iter().find(|t| t.keyword == PARAMS_KEY).map(|t| t.text.clone()));
    match text {
        None => Ok(None),
        Some(t) => serde_json::from_str(&t).map(Some).map_err(|e| Error::Image {
            path: path.into(),
            msg: format!("its Tessera parameters are unreadable: {e}"),
        }),
    }
}

/// Writes `bytes` to `path` atomically and only if `path` does not exist yet: the data goes
/// to a temporary file that is then hard-linked into place (linking fails on an existing
/// name, so nothing is ever overwritten, even by a concurrent writer).
pub fn write_new_atomic(path: &Path, bytes: &[u8]) -> Result<bool> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = crate::io::temp_path(dir, path);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        crate::io::write_all(&mut f, bytes).map_err(|e| Error::io(path, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        match std::fs::hard_link(&tmp, path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(Error::io(path, e)),
        }
    })();
    let _ = std::fs::remove_file(&tmp);
    result
}

/// Exports images into `dir` as `tessera-SEED.png` (then `-2`, `-3`, … when taken), never
/// overwriting; returns the paths written.
pub fn export(dir: &Path, items: &[(&[u8], usize, &SampleParams)]) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    crate::io::remove_stale_temps(dir);
    let mut written = Vec::new();
    for (rgb, size, params) in items {
        let bytes = encode_png(rgb, *size, Some(params))?;
        let mut k = 1;
        loop {
            let name = if k == 1 {
                format!("tessera-{}.png", params.seed)
            } else {
                format!("tessera-{}-{k}.png", params.seed)
            };
            let path = dir.join(name);
            if write_new_atomic(&path, &bytes)? {
                written.push(path);
                break;
            }
            k += 1;
        }
    }
    Ok(written)
}

/// One line of the autosave index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredSample {
    /// File name inside the store's `samples/` folder.
    pub file: String,
    pub job: u64,
    pub size: usize,
    pub params: SampleParams,
}

/// The app's autosave folder: `samples/*.png` plus `index.jsonl`, one line per sample,
/// appended and synced after the image is in place, so a killed app loses at most the
/// sample being written and never corrupts earlier ones.
#[derive(Debug, Clone)]
pub struct SampleStore {
    dir: PathBuf,
}

impl SampleStore {
    pub fn open(dir: &Path) -> Result<Self> {
        let samples = dir.join("samples");
        std::fs::create_dir_all(&samples).map_err(|e| Error::io(&samples, e))?;
        crate::io::remove_stale_temps(&samples);
        Ok(Self { dir: dir.to_path_buf() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path_of(&self, s: &StoredSample) -> PathBuf {
        self.dir.join("samples").join(&s.file)
    }

    /// Saves one sample and records it in the index.
    pub fn add(&self, job: u64, rgb: &[u8], size: usize, params: &SampleParams) -> Result<StoredSample> {
        let bytes = encode_png(rgb, size, Some(params))?;
        let mut k = 0;
        let file = loop {
            let file = format!("{job:06}-{}-{k}.png", params.seed);
            if write_new_atomic(&self.dir.join("samples").join(&file), &bytes)? {
                break file;
            }
            k += 1;
        };
        let entry = StoredSample { file, job, size, params: params.clone() };
        let mut line = serde_json::to_string(&entry).map_err(|e| Error::Invalid(e.to_string()))?;
        line.push('\n');
        let index = self.dir.join(INDEX_FILE);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&index)
            .map_err(|e| Error::io(&index, e))?;
        // a line torn by a kill has no newline: end it, so this entry starts a line of its own
        if !ends_with_newline(&mut f).map_err(|e| Error::io(&index, e))? {
            line.insert(0, '\n');
        }
        crate::io::write_all(&mut f, line.as_bytes()).map_err(|e| Error::io(&index, e))?;
        f.sync_data().map_err(|e| Error::io(&index, e))?;
        Ok(entry)
    }

    /// Every indexed sample whose image still exists, and how many lines were skipped (a
    /// torn last line after a kill, or files deleted by hand).
    pub fn load(&self) -> Result<(Vec<StoredSample>, usize)> {
        let index = self.dir.join(INDEX_FILE);
        let bytes = match std::fs::read(&index) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
            Err(e) => return Err(Error::io(&index, e)),
        };
        let mut out = Vec::new();
        let mut skipped = 0;
        // line by line: a damaged line (torn by a kill, or not even UTF-8) costs that line only
        for line in bytes.split(|&b| b == b'\n').filter(|l| !l.trim_ascii().is_empty()) {
            match serde_json::from_slice::<StoredSample>(line) {
                // only a plain file name inside samples/: an edited index cannot point elsewhere
                Ok(s) if is_plain_name(&s.file) && self.path_of(&s).is_file() => out.push(s),
                _ => skipped += 1,
            }
        }
        Ok((out, skipped))
    }

    /// Reads a stored sample's pixels.
    pub fn read_rgb(&self, s: &StoredSample) -> Result<Vec<u8>> {
        let (rgb, size) = read_rgb_square(&self.path_of(s), Some(s.size))?;
        debug_assert_eq!(size, s.size);
        Ok(rgb)
    }

    /// The next job number (one past the largest stored).
    pub fn next_job(samples: &[StoredSample]) -> u64 {
        samples.iter().map(|s| s.job + 1).max().unwrap_or(1)
    }
}

/// Reads an image file as RGB8, centre-cropped to a square and resized to `size` (or kept at
/// its own size when `size` is `None` and it is square). Returns the pixels and the side.
pub fn read_rgb_square(path: &Path, size: Option<usize>) -> Result<(Vec<u8>, usize)> {
    let (rgb, side, _) = square_rgb(&read_image(path)?, size);
    Ok((rgb, side))
}

/// Whether a file is empty or ends with a newline.
fn ends_with_newline(f: &mut std::fs::File) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    if f.metadata()?.len() == 0 {
        return Ok(true);
    }
    f.seek(SeekFrom::End(-1))?;
    let mut last = [0u8];
    f.read_exact(&mut last)?;
    Ok(last[0] == b'\n')
}

/// Whether `name` is a bare file name (no folder, no `..`, nothing hidden).
fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('.') && !name.contains(['/', '\\', '\0'])
}

/// The most pixels and bytes an image file may ask for when decoded: a header that declares
/// more is refused before anything of that size is allocated.
pub fn image_limits() -> image::Limits {
    let mut l = image::Limits::default();
    l.max_image_width = Some(1 << 14);
    l.max_image_height = Some(1 << 14);
    l.max_alloc = Some(512 << 20);
    l
}

/// Reads an image file as RGB8, recognising its format from its content.
pub fn read_image(path: &Path) -> Result<image::RgbImage> {
    let mut reader = image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    reader.limits(image_limits());
    let img =
        reader.decode().map_err(|e| Error::Image { path: path.into(), msg: format!("not a readable image: {e}") })?;
    Ok(img.to_rgb8())
}

/// Decodes image bytes under [`image_limits`].
pub fn decode_image(bytes: &[u8]) -> Option<image::DynamicImage> {
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().ok()?;
    reader.limits(image_limits());
    reader.decode().ok()
}

/// Centre-crops an image to a square and resizes it to `size` (default: the square's own
/// side); returns the pixels, the side, and the crop rectangle (x, y, side) in the source.
pub fn square_rgb(img: &image::RgbImage, size: Option<usize>) -> (Vec<u8>, usize, [u32; 3]) {
    let (w, h) = img.dimensions();
    let side = w.min(h);
    let (x, y) = ((w - side) / 2, (h - side) / 2);
    let crop = image::imageops::crop_imm(img, x, y, side, side).to_image();
    let target = size.unwrap_or(side as usize).max(1) as u32;
    let out = if target == side {
        crop
    } else {
        image::imageops::resize(&crop, target, target, image::imageops::FilterType::Triangle)
    };
    (out.into_raw(), target as usize, [x, y, side])
}
