//! A whole model on disk and in memory: one directory with `config.json`, `tokenizer.json`,
//! `dvae.safetensors` and `transformer.safetensors`. Each component has its own `VarStore`, so
//! it can be loaded, frozen, cast and placed on its own. Loading checks every file against the
//! config and names what does not match.

use std::path::{Path, PathBuf};

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::config::Config;
use crate::dvae::Dvae;
use crate::error::{Error, Result};
use crate::io::{load_varstore_bytes, save_varstore, write_atomic};
use crate::sample::{SampleOptions, Sampler, batch_seeds};
use crate::text::{Encoded, TextTokenizer, bootstrap_corpus};
use crate::transformer::Transformer;

pub const CONFIG_FILE: &str = "config.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const DVAE_FILE: &str = "dvae.safetensors";
pub const TRANSFORMER_FILE: &str = "transformer.safetensors";
pub const RERANKER_FILE: &str = "reranker.safetensors";
/// How the embedded default model is named in messages and sample metadata.
pub const EMBEDDED_DEFAULT: &str = "<embedded default>";

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/default_model.rs"));
}

/// The reranker with its weights.
#[derive(Debug)]
pub struct RerankerModel {
    pub vs: VarStore,
    pub net: crate::clip::Reranker,
}

impl RerankerModel {
    pub fn new(cfg: &Config, device: Device) -> Self {
        let vs = VarStore::new(device);
        let net = crate::clip::Reranker::new(
            vs.root(),
            &cfg.reranker,
            cfg.text.vocab_size,
            cfg.text.text_len,
            cfg.dvae.image_size,
        );
        Self { vs, net }
    }
}

/// The dVAE with its weights.
#[derive(Debug)]
pub struct DvaeModel {
    pub vs: VarStore,
    pub net: Dvae,
}

impl DvaeModel {
    pub fn new(cfg: &Config, device: Device) -> Self {
        let vs = VarStore::new(device);
        let net = Dvae::new(vs.root(), &cfg.dvae);
        Self { vs, net }
    }

    /// The dVAE `cfg` describes with the weights of `bytes` (the file at `path`, named in
    /// errors), checked to fit the config before anything is allocated.
    pub fn from_bytes(cfg: &Config, device: Device, bytes: &[u8], path: &Path) -> Result<Self> {
        weights_fit(path, bytes, crate::params::count(cfg).dvae)?;
        let mut m = Self::new(cfg, device);
        load_varstore_bytes(&mut m.vs, bytes, path)?;
        Ok(m)
    }
}

/// The transformer with its weights.
#[derive(Debug)]
pub struct TransformerModel {
    pub vs: VarStore,
    pub net: Transformer,
}

impl TransformerModel {
    pub fn new(cfg: &Config, device: Device) -> Self {
        let vs = VarStore::new(device);
        let net = Transformer::new(vs.root(), cfg);
        Self { vs, net }
    }
}

/// A caption, image tokenizer and transformer ready to sample.
#[derive(Debug)]
pub struct Model {
    pub config: Config,
    pub tokenizer: TextTokenizer,
    pub dvae: DvaeModel,
    pub transformer: TransformerModel,
    /// Present when the directory has `reranker.safetensors`.
    pub reranker: Option<RerankerModel>,
    pub device: Device,
    /// Test hook: a sampling batch larger than this fails as if the device ran out of memory.
    pub inject_oom_above: Option<usize>,
    /// The most samples [`Model::generate`] draws together; `None`: every sample on a GPU
    /// (halved when it runs out of memory), [`CPU_SAMPLE_BATCH`] on the CPU.
    pub sample_batch: Option<usize>,
}

/// Samples drawn together by [`Model::generate`] on the CPU. A decode step there is bound by
/// the weights' reads at a few rows and by arithmetic from ~16 rows on; past ~64–128 rows the
/// cache no longer stays in the caches and each row's keys come from memory: the default model
/// samples ~20,000 tokens/s at batch 64 and 128 (2 threads), 18,800 at 256 and 16,600 at 512,
/// which also holds the whole batch's cache (3 GB for 512 guided samples).
pub const CPU_SAMPLE_BATCH: usize = 64;

/// One generated image.
#[derive(Debug, Clone)]
pub struct Sample {
    pub seed: u64,
    pub tokens: Vec<i64>,
    /// RGB8, row-major, `size × size × 3`.
    pub rgb: Vec<u8>,
    pub size: usize,
}

/// Refuses a weight file too small for the parameters the config describes (2 bytes each at
/// least, bf16), before any memory is allocated for them: a config.json that does not belong
/// to its weights — or asks for a giant model — is an error, never an allocation of its size.
pub fn weights_fit(path: &Path, bytes: &[u8], params: u64) -> Result<()> {
    if (bytes.len() as u64) < 2 * params {
        return Err(Error::checkpoint(
            path,
            format!(
                "holds only {} bytes, too few for the {params} parameters config.json describes: the file is corrupt or truncated, or the weights of another configuration",
                bytes.len()
            ),
        ));
    }
    Ok(())
}

/// Converts images [B, 3, H, W] in [0, 1] to RGB8 buffers.
pub fn to_rgb8(images: &Tensor) -> Result<Vec<Vec<u8>>> {
    let imgs = (images.clamp(0.0, 1.0) * 255.0)
        .round()
        .to_kind(Kind::Uint8)
        .permute([0, 2, 3, 1])
        .to_device(Device::Cpu)
        .contiguous();
    let b = imgs.size()[0];
    (0..b).map(|i| Ok(Vec::<u8>::try_from(&imgs.get(i).flatten(0, -1))?)).collect()
}

/// Converts RGB8 images (each `size × size × 3`) to a tensor [B, 3, H, W] in [0, 1].
pub fn from_rgb8(images: &[Vec<u8>], size: usize, device: Device) -> Result<Tensor> {
    let mut flat = Vec::with_capacity(images.len() * size * size * 3);
    for img in images {
        if img.len() != size * size * 3 {
            return Err(Error::Invalid(format!("image buffer of {} bytes is not {size}×{size} RGB", img.len())));
        }
        flat.extend_from_slice(img);
    }
    Ok(Tensor::from_slice(&flat)
        .view([images.len() as i64, size as i64, size as i64, 3])
        .permute([0, 3, 1, 2])
        .to_kind(Kind::Float)
        .to_device(device)
        / 255.0)
}

impl Model {
    /// A randomly initialised model whose tokenizer is trained on a small built-in corpus.
    pub fn random_init(config: &Config, device: Device, seed: i64) -> Result<Self> {
        config.validate()?;
        tch::manual_seed(seed);
        let corpus = bootstrap_corpus();
        let vocab = config.text.vocab_size.max(300);
        let tokenizer = TextTokenizer::train(corpus.iter(), vocab)?;
        if tokenizer.vocab_size() > config.text.vocab_size {
            return Err(Error::Config(format!(
                "text vocabulary {} is too small for the byte-level tokenizer ({} tokens)",
                config.text.vocab_size,
                tokenizer.vocab_size()
            )));
        }
        Ok(Self {
            config: config.clone(),
            tokenizer,
            dvae: DvaeModel::new(config, device),
            transformer: TransformerModel::new(config, device),
            reranker: None,
            device,
            inject_oom_above: None,
            sample_batch: None,
        })
    }

    /// Casts the transformer's weights for sampling: bf16 halves the bytes each decode step
    /// reads and runs on the CPU's bf16 dot-product units where it has them. The dVAE stays in
    /// f32. Saving writes f32 whatever the dtype.
    pub fn set_dtype(&mut self, kind: Kind) -> Result<()> {
        match kind {
            Kind::Float | Kind::BFloat16 | Kind::Half => {
                self.transformer.vs.set_kind(kind);
                Ok(())
            }
            other => Err(Error::Invalid(format!("cannot sample in dtype {other:?}"))),
        }
    }

    /// Writes the model directory (each file atomically).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        Self::save_config(dir, &self.config)?;
        self.tokenizer.save(&dir.join(TOKENIZER_FILE))?;
        save_varstore(&self.dvae.vs, &dir.join(DVAE_FILE))?;
        save_varstore(&self.transformer.vs, &dir.join(TRANSFORMER_FILE))?;
        if let Some(r) = &self.reranker {
            save_varstore(&r.vs, &dir.join(RERANKER_FILE))?;
        }
        Ok(())
    }

    /// Writes `config.json` of a model directory (atomically).
    pub fn save_config(dir: &Path, config: &Config) -> Result<()> {
        let json = serde_json::to_string_pretty(config)
            .map_err(|e| Error::Invalid(format!("cannot serialise config: {e}")))?;
        write_atomic(&dir.join(CONFIG_FILE), json.as_bytes())
    }

    /// Reads and validates `config.json` of a model directory.
    pub fn load_config(dir: &Path) -> Result<Config> {
        let path = dir.join(CONFIG_FILE);
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        Self::parse_config(&bytes, &path)
    }

    fn parse_config(bytes: &[u8], path: &Path) -> Result<Config> {
        let cfg: Config =
            serde_json::from_slice(bytes).map_err(|e| Error::checkpoint(path, format!("not a valid config: {e}")))?;
        cfg.validate().map_err(|e| Error::checkpoint(path, e.to_string()))?;
        Ok(cfg)
    }

    /// Loads a model directory onto `device`.
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::checkpoint(dir, "no such model directory"));
        }
        Self::load_with(dir, device, |name| {
            let path = dir.join(name);
            match std::fs::read(&path) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::io(&path, e)),
            }
        })
    }

    /// A directory's dVAE in a model whose other parts are random and which has no reranker:
    /// what `eval --samples 0` needs to score a dVAE that a trainer wrote on its own. The
    /// transformer is never run, so it is a one-layer stand-in of width 8 (and `config` says
    /// so) whatever the directory's size: a paper-sized configuration allocates no 12B weights.
    pub fn load_dvae_only(dir: &Path, device: Device) -> Result<Self> {
        let mut config = Self::load_config(dir)?;
        config.transformer =
            crate::config::TransformerConfig { d_model: 8, n_layers: 1, n_heads: 1, head_dim: 8, ..config.transformer };
        let path = dir.join(DVAE_FILE);
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let mut m = Self::random_init(&config, device, 0)?;
        m.dvae = DvaeModel::from_bytes(&config, device, &bytes, &path)?;
        Ok(m)
    }

    /// Whether this binary carries an embedded default model (`assets/models/default` at
    /// build time).
    pub fn has_embedded_default() -> bool {
        embedded::FILES.iter().any(|(n, _)| *n == TRANSFORMER_FILE)
    }

    /// Loads the default model compiled into the binary.
    pub fn load_embedded_default(device: Device) -> Result<Self> {
        let origin = Path::new(EMBEDDED_DEFAULT);
        if !Self::has_embedded_default() {
            return Err(Error::checkpoint(origin, "this build has no embedded default model"));
        }
        Self::load_with(origin, device, |name| {
            Ok(embedded::FILES.iter().find(|(n, _)| *n == name).map(|(_, b)| b.to_vec()))
        })
    }

    /// Loads a model whose files `read` returns (`None` = no such file); `origin` names the
    /// model in messages.
    fn load_with(origin: &Path, device: Device, read: impl Fn(&str) -> Result<Option<Vec<u8>>>) -> Result<Self> {
        let need = |name: &str| -> Result<Vec<u8>> {
            read(name)?.ok_or_else(|| Error::checkpoint(origin.join(name), "missing file"))
        };
        let config = Self::parse_config(&need(CONFIG_FILE)?, &origin.join(CONFIG_FILE))?;
        let tok_path = origin.join(TOKENIZER_FILE);
        let tok_json = String::from_utf8(need(TOKENIZER_FILE)?)
            .map_err(|_| Error::checkpoint(&tok_path, "tokenizer.json is not UTF-8"))?;
        let tokenizer = TextTokenizer::from_json(&tok_json).map_err(|e| Error::checkpoint(&tok_path, e.to_string()))?;
        if tokenizer.vocab_size() > config.text.vocab_size {
            return Err(Error::checkpoint(
                &tok_path,
                format!(
                    "tokenizer has {} tokens but the config's text vocabulary is {}",
                    tokenizer.vocab_size(),
                    config.text.vocab_size
                ),
            ));
        }
        let dvae = DvaeModel::from_bytes(&config, device, &need(DVAE_FILE)?, &origin.join(DVAE_FILE))?;
        let transformer_bytes = need(TRANSFORMER_FILE)?;
        weights_fit(&origin.join(TRANSFORMER_FILE), &transformer_bytes, crate::params::count(&config).transformer)?;
        let mut transformer = TransformerModel::new(&config, device);
        load_varstore_bytes(&mut transformer.vs, &transformer_bytes, &origin.join(TRANSFORMER_FILE))?;
        let reranker = match read(RERANKER_FILE)? {
            Some(bytes) => {
                weights_fit(&origin.join(RERANKER_FILE), &bytes, crate::params::reranker_count(&config))?;
                let mut r = RerankerModel::new(&config, device);
                load_varstore_bytes(&mut r.vs, &bytes, &origin.join(RERANKER_FILE))?;
                Some(r)
            }
            None => None,
        };
        Ok(Self { config, tokenizer, dvae, transformer, reranker, device, inject_oom_above: None, sample_batch: None })
    }

    /// Encodes a prompt; empty prompts are an error.
    pub fn encode_prompt(&self, prompt: &str) -> Result<Encoded> {
        self.tokenizer.encode(prompt, self.config.text.text_len)
    }

    /// Image tokens [1, P] of the first `keep_rows` grid rows of an RGB8 image.
    pub fn prefix_tokens(&self, rgb: &[u8], keep_rows: usize) -> Result<Tensor> {
        let g = self.config.grid_size();
        if keep_rows > g {
            return Err(Error::Invalid(format!("keep-rows {keep_rows} exceeds the grid's {g} rows")));
        }
        self.prefix_tokens_n(rgb, keep_rows * g)
    }

    /// Image tokens [1, n] of the first `n` grid cells (raster order) of an RGB8 image.
    pub fn prefix_tokens_n(&self, rgb: &[u8], n: usize) -> Result<Tensor> {
        let g = self.config.grid_size();
        if n > g * g {
            return Err(Error::Invalid(format!("{n} kept tokens exceed the grid's {}", g * g)));
        }
        let x = from_rgb8(&[rgb.to_vec()], self.config.dvae.image_size, self.device)?;
        let codes = tch::no_grad(|| self.dvae.net.encode(&x));
        Ok(codes.flatten(1, -1).narrow(1, 0, n as i64))
    }

    /// Starts sampling `n` images for `prompt`, seeds `seed..seed+n`, optionally completing
    /// from given image tokens [1, P] or [n, P].
    pub fn sampler(
        &self,
        prompt: &str,
        n: usize,
        seed: u64,
        prefix: Option<&Tensor>,
        opts: &SampleOptions,
    ) -> Result<Sampler<'_>> {
        if n == 0 {
            return Err(Error::Invalid("the number of samples must be at least 1".into()));
        }
        if self.inject_oom_above.is_some_and(|limit| n > limit) {
            return Err(Error::Torch(tch::TchError::Torch(format!(
                "CUDA out of memory (injected for a batch of {n})"
            ))));
        }
        let enc = self.encode_prompt(prompt)?;
        let text = self.transformer.net.pad_text(&vec![enc.ids; n]);
        let prefix =
            prefix.map(|p| if p.size()[0] == 1 && n > 1 { p.repeat([n as i64, 1]) } else { p.shallow_clone() });
        Sampler::new(&self.transformer.net, &text, prefix.as_ref(), &batch_seeds(seed, n), opts)
    }

    /// A hash of the transformer's and the dVAE's weights (as they are in memory, in their
    /// dtype): what the samples of a model depend on beside its settings.
    pub fn weights_hash(&self) -> Result<u64> {
        let weights = [
            crate::io::varstore_to_safetensors(&self.transformer.vs)?,
            crate::io::varstore_to_safetensors(&self.dvae.vs)?,
        ];
        Ok(weights.iter().fold(0, |h, w| h ^ crate::shards::fnv1a(w).rotate_left(17)))
    }

    /// The fingerprint of the codes this model's dVAE gives (its encoder's weights as they are
    /// in memory, [`crate::shards::DvaeFingerprint::codes`]): two models whose marks agree
    /// read and draw the same code for the same picture.
    pub fn dvae_codes_mark(&self) -> Result<String> {
        let bytes = crate::io::varstore_to_safetensors(&self.dvae.vs)?;
        Ok(crate::shards::DvaeFingerprint::of(&bytes, &self.config.dvae)?.codes)
    }

    /// Decodes image tokens [B, I] into RGB8 images.
    pub fn decode(&self, tokens: &Tensor) -> Result<Vec<Vec<u8>>> {
        let g = self.config.grid_size() as i64;
        let imgs = tch::no_grad(|| self.dvae.net.decode(&tokens.view([-1, g, g])));
        to_rgb8(&imgs)
    }

    /// Reranker scores of RGB8 images for a prompt (higher is better), or `None` without a
    /// reranker.
    pub fn rerank(&self, prompt: &str, images: &[Vec<u8>]) -> Result<Option<Vec<f32>>> {
        let Some(r) = &self.reranker else { return Ok(None) };
        let enc = self.encode_prompt(prompt)?;
        let x = from_rgb8(images, self.config.dvae.image_size, self.device)?;
        let s = tch::no_grad(|| r.net.score(&x, &enc.ids));
        Ok(Some(Vec::<f32>::try_from(&s.to_kind(Kind::Float).to_device(Device::Cpu))?))
    }

    /// Samples and decodes `n` images in batches of [`Model::sample_batch_limit`] (on a GPU, all of
    /// them in one when the device holds it): when a batch runs out of memory, it is halved and
    /// retried (a sample depends on its seed alone, so the images are the same whatever the
    /// batches). `on_step` sees each batch's sampler.
    pub fn generate(
        &self,
        prompt: &str,
        n: usize,
        seed: u64,
        prefix: Option<&Tensor>,
        opts: &SampleOptions,
        mut on_step: impl FnMut(&Sampler) -> bool,
    ) -> Result<Vec<Sample>> {
        if n == 0 {
            return Err(Error::Invalid("the number of samples must be at least 1".into()));
        }
        let mut out = Vec::with_capacity(n);
        in_batches(n, self.sample_batch_limit(), |first, m| {
            // a prefix of one row serves every batch; one of n rows is cut with the batch
            let rows =
                prefix.map(|p| if p.size()[0] > 1 { p.narrow(0, first as i64, m as i64) } else { p.shallow_clone() });
            let batch_seed = seed.wrapping_add(first as u64);
            out.extend(self.generate_batch(prompt, m, batch_seed, rows.as_ref(), opts, &mut on_step)?);
            Ok(false)
        })?;
        Ok(out)
    }

    /// The most samples [`Model::generate`] draws together here: the `sample_batch` field when
    /// set (at least 1), else every sample on a GPU and [`CPU_SAMPLE_BATCH`] on the CPU.
    pub fn sample_batch_limit(&self) -> usize {
        match self.sample_batch {
            Some(b) => b.max(1),
            None if self.device == Device::Cpu => CPU_SAMPLE_BATCH,
            None => usize::MAX,
        }
    }

    fn generate_batch(
        &self,
        prompt: &str,
        n: usize,
        seed: u64,
        prefix: Option<&Tensor>,
        opts: &SampleOptions,
        on_step: impl FnMut(&Sampler) -> bool,
    ) -> Result<Vec<Sample>> {
        let tokens = self.sampler(prompt, n, seed, prefix, opts)?.run(on_step)?;
        let rgb = self.decode(&tokens)?;
        let toks = tokens.to_device(Device::Cpu);
        rgb.into_iter()
            .enumerate()
            .map(|(i, rgb)| {
                Ok(Sample {
                    seed: seed.wrapping_add(i as u64),
                    tokens: Vec::<i64>::try_from(&toks.get(i as i64))?,
                    rgb,
                    size: self.config.dvae.image_size,
                })
            })
            .collect()
    }
}

/// Runs `f`, turning a panic inside libtorch's bindings (tch panics when an operation fails,
/// a device running out of memory in the middle of a sampling step among them) into an
/// error, so that callers can tell an out-of-memory batch apart and retry it smaller.
pub fn catch_torch<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|p| Err(Error::Torch(tch::TchError::Torch(panic_message(&*p)))))
}

/// The message a panic carried.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else {
        "unknown panic".into()
    }
}

/// Runs `f(first, m)` over samples `0..n` in batches of at most `batch`, in order: a batch that
/// runs out of memory (an error or a libtorch panic) is halved and retried from its first
/// sample, so `f` must start a batch afresh (a sample depends on its seed alone: the same
/// images at any batch). `f` returns whether to stop early; so does this.
pub fn in_batches(n: usize, batch: usize, mut f: impl FnMut(usize, usize) -> Result<bool>) -> Result<bool> {
    let (mut first, mut batch) = (0, batch.clamp(1, n.max(1)));
    while first < n {
        let m = batch.min(n - first);
        match catch_torch(|| f(first, m)) {
            Ok(true) => return Ok(true),
            Ok(false) => first += m,
            Err(e) if m > 1 && is_out_of_memory(&e) => batch = m / 2,
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

/// Whether an error is the device (or the host) running out of memory.
pub fn is_out_of_memory(e: &Error) -> bool {
    let Error::Torch(t) = e else { return false };
    let m = t.to_string();
    m.contains("out of memory") || m.contains("can't allocate memory") || m.contains("not enough memory")
}

/// Default output file name for sample `i` of a run.
pub fn sample_file_name(dir: &Path, seed: u64) -> PathBuf {
    dir.join(format!("sample-{seed}.png"))
}
