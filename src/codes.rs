//! Images ↔ image tokens through a model directory's dVAE alone (`tessera dvae encode | decode
//! | roundtrip`): a directory that holds only `config.json` and `dvae.safetensors` — an imported
//! OpenAI dVAE, say — is enough. Token files are JSON: the grid, the codebook size, the
//! fingerprint of the dVAE that made them, and the codes row by row; a file made by another dVAE
//! is refused, since its codes would decode to noise.

use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::Device;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::io::write_atomic;
use crate::model::{DvaeModel, Model, from_rgb8, to_rgb8};

/// The `format` field of a token file.
pub const TOKEN_FORMAT: &str = "tessera-image-tokens";

/// A token file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenFile {
    pub format: String,
    /// Side of the token grid.
    pub grid: usize,
    /// Codebook size.
    pub vocab: usize,
    /// Side in pixels of the images the dVAE reads and draws.
    pub image_size: usize,
    /// Fingerprint of the dVAE weight file that made the codes.
    pub dvae: String,
    /// `grid × grid` codes, row by row.
    pub tokens: Vec<u32>,
}

impl TokenFile {
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let bad = |msg: String| Error::checkpoint(path, msg);
        let t: TokenFile =
            serde_json::from_slice(&bytes).map_err(|e| bad(format!("not a token file (expected JSON): {e}")))?;
        if t.format != TOKEN_FORMAT {
            return Err(bad(format!("format is {:?}, not {TOKEN_FORMAT:?}", t.format)));
        }
        if t.grid == 0 || t.grid.checked_mul(t.grid) != Some(t.tokens.len()) {
            return Err(bad(format!("{} codes for a {}×{} grid", t.tokens.len(), t.grid, t.grid)));
        }
        if let Some(c) = t.tokens.iter().find(|&&c| c as usize >= t.vocab) {
            return Err(bad(format!("code {c} is outside the codebook of {}", t.vocab)));
        }
        Ok(t)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_string(self).map_err(|e| Error::Invalid(e.to_string()))?;
        write_atomic(path, json.as_bytes())
    }
}

/// A model directory's dVAE, loaded without the rest of the model.
#[derive(Debug)]
pub struct DvaeOnly {
    pub cfg: Config,
    pub model: DvaeModel,
    /// Fingerprints of its encoder and of its weight file (token files and shards record the
    /// encoder's, [`crate::shards::DvaeFingerprint`]).
    pub fingerprint: crate::shards::DvaeFingerprint,
    /// The weight file's bytes, exactly those loaded and fingerprinted.
    weights: Vec<u8>,
    device: Device,
}

/// One image through the dVAE and back.
#[derive(Debug, Clone)]
pub struct Roundtrip {
    /// The input as the dVAE reads it: centre-cropped and resized, RGB8.
    pub input: Vec<u8>,
    pub reconstruction: Vec<u8>,
    pub tokens: TokenFile,
    /// PSNR of the reconstruction against the input, dB.
    pub psnr_db: f64,
    pub encode_s: f64,
    pub decode_s: f64,
}

impl DvaeOnly {
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        let cfg = Model::load_config(dir)?;
        let path = dir.join(crate::model::DVAE_FILE);
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let mut model = DvaeModel::from_bytes(&cfg, device, &bytes, &path)?;
        model.vs.freeze();
        // the same bytes as the weights (a file being rewritten cannot make them disagree)
        let fingerprint = crate::shards::DvaeFingerprint::of(&bytes, &cfg.dvae)?;
        Ok(Self { cfg, model, fingerprint, weights: bytes, device })
    }

    pub fn image_size(&self) -> usize {
        self.cfg.dvae.image_size
    }

    /// Codes of RGB8 pixels of the dVAE's image size.
    pub fn encode_rgb(&self, rgb: &[u8]) -> Result<TokenFile> {
        let size = self.image_size();
        let x = from_rgb8(&[rgb.to_vec()], size, self.device)?;
        let codes = tch::no_grad(|| self.model.net.encode(&x)).flatten(0, -1).to_device(Device::Cpu);
        let tokens: Vec<i64> = Vec::try_from(&codes)?;
        Ok(TokenFile {
            format: TOKEN_FORMAT.into(),
            grid: self.cfg.dvae.grid_size(),
            vocab: self.cfg.dvae.vocab_size,
            image_size: size,
            dvae: self.fingerprint.codes.clone(),
            tokens: tokens.into_iter().map(|t| t as u32).collect(),
        })
    }

    /// Codes of an image file (centre-cropped to a square and resized to the dVAE's size).
    pub fn encode_file(&self, path: &Path) -> Result<TokenFile> {
        let (rgb, _) = crate::store::read_rgb_square(path, Some(self.image_size()))?;
        self.encode_rgb(&rgb)
    }

    /// RGB8 pixels drawn from codes made by this dVAE.
    pub fn decode(&self, t: &TokenFile) -> Result<Vec<u8>> {
        let d = &self.cfg.dvae;
        if t.grid != d.grid_size() || t.vocab != d.vocab_size {
            return Err(Error::Invalid(format!(
                "the tokens are a {}×{} grid of {} codes, and this dVAE reads {}×{} of {}",
                t.grid,
                t.grid,
                t.vocab,
                d.grid_size(),
                d.grid_size(),
                d.vocab_size
            )));
        }
        if !self.fingerprint.accepts(&t.dvae) {
            return Err(Error::Invalid(format!(
                "the tokens were made by another dVAE (fingerprint {}, this one is {}): decode them with the dVAE that made them",
                t.dvae, self.fingerprint.codes
            )));
        }
        let g = t.grid as i64;
        let codes: Vec<i64> = t.tokens.iter().map(|&c| c as i64).collect();
        let codes = tch::Tensor::from_slice(&codes).view([1, g, g]).to_device(self.device);
        let img = tch::no_grad(|| self.model.net.decode(&codes));
        to_rgb8(&img)?.pop().ok_or_else(|| Error::Invalid("the decoder returned no image".into()))
    }

    /// Encodes and decodes an image file, timing each half.
    pub fn roundtrip(&self, path: &Path) -> Result<Roundtrip> {
        let (input, _) = crate::store::read_rgb_square(path, Some(self.image_size()))?;
        let t0 = Instant::now();
        let tokens = self.encode_rgb(&input)?;
        let t1 = Instant::now();
        let reconstruction = self.decode(&tokens)?;
        let decode_s = t1.elapsed().as_secs_f64();
        let psnr_db = psnr(&input, &reconstruction);
        Ok(Roundtrip { input, reconstruction, tokens, psnr_db, encode_s: (t1 - t0).as_secs_f64(), decode_s })
    }
}

/// PSNR of two RGB8 buffers of the same length, dB (∞ when identical).
pub fn psnr(a: &[u8], b: &[u8]) -> f64 {
    let n = a.len().min(b.len()).max(1) as f64;
    let mse = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum::<f64>() / n;
    10.0 * (255.0f64 * 255.0 / mse).log10()
}

/// Writes square RGB8 pixels as a PNG, atomically.
pub fn write_png(path: &Path, rgb: &[u8], size: usize) -> Result<()> {
    write_atomic(path, &crate::store::encode_png(rgb, size, None)?)
}

/// Starts a model directory around another directory's trained dVAE: the configuration of
/// `base` (a preset) with that dVAE's configuration, and a copy of its weights. The
/// transformer, tokenizer and reranker are then trained as for any model directory.
pub fn init_with_dvae(dir: &Path, base: &Config, dvae_dir: &Path) -> Result<Config> {
    let donor = DvaeOnly::load(dvae_dir, Device::Cpu)?;
    let mut cfg = base.clone();
    if cfg.dvae != donor.cfg.dvae {
        cfg.dvae = donor.cfg.dvae.clone();
        cfg.name = format!("{}+{}", base.name, donor.cfg.name);
    }
    cfg.validate()?;
    let target = dir.join(crate::model::DVAE_FILE);
    if target.exists() {
        // the same dVAE again (a retried or resumed start) is fine; another one is not
        let same = std::fs::read(&target).is_ok_and(|b| b == donor.weights);
        if !same {
            return Err(Error::Invalid(format!("{} already holds another dVAE; use a new directory", dir.display())));
        }
    }
    crate::train::init_dir(dir, &cfg)?;
    if !target.exists() {
        write_atomic(&target, &donor.weights)?;
    }
    Ok(cfg)
}
