//! The caption tokenizer [P 2.2]: lowercased byte-level BPE, trained and run by the
//! `tokenizers` crate and saved as a Hugging Face `tokenizer.json`. Captions are cut to the
//! model's text length and the caller is told when that happened; padding is the model's
//! business (each position has its own learned padding token), not the tokenizer's.

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::normalizers::{Lowercase, NFKC, Sequence as NormSeq};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{ModelWrapper, Tokenizer};

use crate::error::{Error, Result};
use crate::io::write_atomic;

/// A caption as token ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// At most `text_len` ids.
    pub ids: Vec<i64>,
    /// Tokens the caption had before truncation (of its first part only, when `cut`).
    pub full_len: usize,
    /// Whether the text was so long that only its beginning was tokenised (it has more than
    /// `full_len` tokens).
    pub cut: bool,
}

impl Encoded {
    pub fn truncated(&self) -> bool {
        self.cut || self.full_len > self.ids.len()
    }
}

/// Byte-level BPE with lowercasing, plus an optional copy that applies BPE dropout.
#[derive(Clone)]
pub struct TextTokenizer {
    tok: Tokenizer,
    dropout: Option<Tokenizer>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TextTokenizer(vocab {})", self.vocab_size())
    }
}

fn tk_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

impl TextTokenizer {
    /// Trains a byte-level BPE vocabulary of at most `vocab_size` tokens on `texts`.
    pub fn train<I, S>(texts: I, vocab_size: usize) -> Result<Self>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        let alphabet = ByteLevel::alphabet();
        if vocab_size < alphabet.len() {
            return Err(Error::Tokenizer(format!(
                "vocabulary size {vocab_size} is below the {} byte symbols",
                alphabet.len()
            )));
        }
        let trainer = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .initial_alphabet(alphabet.into_iter().collect())
            .build();
        let mut tok = Tokenizer::new(BPE::default());
        tok.with_normalizer(Some(NormSeq::new(vec![NFKC.into(), Lowercase.into()])));
        tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        tok.with_decoder(Some(ByteLevelDecoder::default()));
        let mut trainer = TrainerWrapper::BpeTrainer(trainer);
        tok.train(&mut trainer, texts).map_err(tk_err)?;
        Ok(Self { tok, dropout: None })
    }

    pub fn from_json(json: &str) -> Result<Self> {
        // the tokenizer library panics on some malformed files (found by fuzzing): contained
        // here and reported as the damaged file it is
        let parsed = std::panic::catch_unwind(|| json.parse::<Tokenizer>())
            .map_err(|_| Error::Tokenizer("tokenizer.json is damaged (its reader gave up)".into()))?;
        let tok: Tokenizer = parsed.map_err(tk_err)?;
        if !matches!(tok.get_model(), ModelWrapper::BPE(_)) {
            return Err(Error::Tokenizer("tokenizer.json does not hold a BPE model".into()));
        }
        Ok(Self { tok, dropout: None })
    }

    pub fn load(path: &Path) -> Result<Self> {
        let json = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&json).map_err(|e| Error::checkpoint(path, e.to_string()))
    }

    pub fn to_json(&self) -> Result<String> {
        self.tok.to_string(false).map_err(tk_err)
    }

    /// Writes `tokenizer.json` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        write_atomic(path, self.to_json()?.as_bytes())
    }

    /// Number of ids the tokenizer can produce.
    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }

    /// Returns a copy whose training-time encoding drops merges with probability `p`.
    pub fn with_dropout(mut self, p: f32) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            return Err(Error::Invalid(format!("BPE dropout {p} must lie in [0, 1)")));
        }
        self.dropout = None;
        if p > 0.0 {
            let ModelWrapper::BPE(bpe) = self.tok.get_model() else {
                return Err(Error::Tokenizer("not a BPE model".into()));
            };
            let mut bpe = bpe.clone();
            bpe.dropout = Some(p);
            let mut tok = self.tok.clone();
            tok.with_model(bpe);
            self.dropout = Some(tok);
        }
        Ok(self)
    }

    fn encode_with(tok: &Tokenizer, prompt: &str, text_len: usize) -> Result<Encoded> {
        if prompt.trim().is_empty() {
            return Err(Error::EmptyPrompt);
        }
        // Only the first `text_len` tokens are used: the text beyond a generous bound (no
        // token spans 64 bytes) is not tokenised at all, so a pasted book costs no time.
        let limit = text_len.saturating_mul(64).max(1024);
        let cut = prompt.len() > limit;
        let prompt = if cut { &prompt[..prompt.floor_char_boundary(limit)] } else { prompt };
        let enc = tok.encode(prompt, false).map_err(tk_err)?;
        let all = enc.get_ids();
        let ids = all.iter().take(text_len).map(|&i| i as i64).collect();
        Ok(Encoded { ids, full_len: all.len(), cut })
    }

    /// Encodes a prompt for sampling: lowercased, at most `text_len` tokens.
    pub fn encode(&self, prompt: &str, text_len: usize) -> Result<Encoded> {
        Self::encode_with(&self.tok, prompt, text_len)
    }

    /// Encodes a caption for training, with BPE dropout when it was enabled.
    pub fn encode_train(&self, caption: &str, text_len: usize) -> Result<Encoded> {
        Self::encode_with(self.dropout.as_ref().unwrap_or(&self.tok), caption, text_len)
    }

    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids: Vec<u32> = ids.iter().filter_map(|&i| u32::try_from(i).ok()).collect();
        self.tok.decode(&ids, true).map_err(tk_err)
    }
}

/// A small procedural corpus of scene descriptions, used to give randomly initialised models
/// a working tokenizer before a trained one exists.
pub fn bootstrap_corpus() -> Vec<String> {
    const COLOURS: &[&str] = &[
        "red", "green", "blue", "yellow", "purple", "orange", "pink", "brown", "black", "white", "gray", "navy",
        "olive", "teal", "cyan", "magenta",
    ];
    const SHAPES: &[&str] = &[
        "circle", "square", "triangle", "pentagon", "hexagon", "heptagon", "octagon", "star", "heart", "cube",
        "diamond", "cross", "sign",
    ];
    const SIZES: &[&str] = &["small", "large", "tiny", "big", "medium"];
    const RELS: &[&str] = &["above", "below", "left of", "right of", "on top of", "next to"];
    let mut out = Vec::new();
    for (i, c) in COLOURS.iter().enumerate() {
        for (j, s) in SHAPES.iter().enumerate() {
            let size = SIZES[(i + j) % SIZES.len()];
            let rel = RELS[(i * 7 + j) % RELS.len()];
            let c2 = COLOURS[(i + 3 * j + 1) % COLOURS.len()];
            let s2 = SHAPES[(2 * i + j + 5) % SHAPES.len()];
            out.push(format!("a {size} {c} {s} {rel} a {c2} {s2}"));
            out.push(format!("an image of {} {c} {s}s on a white background", i % 6 + 2));
            out.push(format!("a sign with the word '{s}' on it"));
        }
    }
    out
}
