//! Token shards: a training set encoded once by the dVAE and kept on disk as image tokens and
//! captions, so the transformer and the reranker train without rendering or encoding a single
//! image (the paper and its re-implementations pre-tokenise the same way).
//!
//! A shard `shard-NNNNN.tok` is: the magic `TSRTOK01`, a little-endian `u32` length and a JSON
//! header (`count`, `image_len`, `vocab`, `dvae` = a hash of the encoder of the dVAE that made
//! the tokens and of its ε, [`DvaeFingerprint`], `first` = index of the first example),
//! `count × image_len` little-endian `u16` tokens, `count` captions (`u32` length + UTF-8), and
//! an FNV-1a 64 hash of everything before it. Each shard is written atomically. Reading checks
//! the magic, the header, every length and the hash: a corrupt or truncated shard is named and
//! skipped, never used; a shard made by another dVAE is refused as a whole set (its tokens
//! would mean other pictures).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::DvaeConfig;
use crate::error::{Error, Result};
use crate::io::write_atomic;

const MAGIC: &[u8; 8] = b"TSRTOK01";
/// Largest header accepted (a real one is ~100 bytes).
const MAX_HEADER: usize = 1 << 16;

/// FNV-1a, 64-bit: the shards' checksum and the dVAE's fingerprint.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// What a dVAE is known by: `codes`, a hash of its encoder alone (the part that decides which
/// code each cell gets, [`codes_fingerprint`]), which shards and token files record; and
/// `file`, a hash of the whole weight file, which shards and token files written before the
/// encoder's hash recorded and which are still accepted. A dVAE whose decoder was fine-tuned or
/// grown (`train dvae --decoder-only`) keeps its codes and so its shards. The encoder sees
/// pixels mapped into (ε, 1 − ε), so a config with another `dvae.eps` gives other codes from
/// the same weights: both hashes then carry that ε (the paper's 0.1 adds nothing, so every
/// fingerprint recorded before stays valid).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DvaeFingerprint {
    pub codes: String,
    pub file: String,
}

impl DvaeFingerprint {
    /// The fingerprints of a dVAE weight file's bytes, read with `cfg`.
    pub fn of(bytes: &[u8], cfg: &DvaeConfig) -> Result<Self> {
        let with_eps = |mark: String| {
            if cfg.eps == PAPER_EPS { mark } else { format!("{mark}-eps{}", cfg.eps) }
        };
        Ok(Self { codes: with_eps(codes_fingerprint(bytes)?), file: with_eps(fingerprint(bytes)) })
    }

    /// Whether tokens recorded with `mark` are this dVAE's codes.
    pub fn accepts(&self, mark: &str) -> bool {
        mark == self.codes || mark == self.file
    }
}

/// The fingerprints of a dVAE weight file read with `cfg`, as shards record and check them.
pub fn dvae_fingerprint(path: &Path, cfg: &DvaeConfig) -> Result<DvaeFingerprint> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    DvaeFingerprint::of(&bytes, cfg)
}

/// The ε of the paper's pixel map, the one every fingerprint was taken with before ε counted.
const PAPER_EPS: f64 = 0.1;

/// The fingerprint of a file's bytes.
pub fn fingerprint(bytes: &[u8]) -> String {
    format!("{:016x}", fnv1a(bytes))
}

/// The fingerprint of the codes a dVAE weight file gives: FNV-1a over the name, dtype, shape
/// and bytes of every `encoder.*` tensor in name order, written `enc-` and 16 hex digits (a
/// whole-file fingerprint has no prefix). A file with no encoder tensor is known by its whole
/// bytes.
pub fn codes_fingerprint(bytes: &[u8]) -> Result<String> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| Error::Invalid(format!("cannot read the dVAE weights: {e}")))?;
    let mut names: Vec<String> = st.names().into_iter().filter(|n| n.starts_with("encoder.")).cloned().collect();
    if names.is_empty() {
        return Ok(fingerprint(bytes));
    }
    names.sort();
    let mut h: Vec<u8> = Vec::new();
    for name in &names {
        let t = st.tensor(name).map_err(|e| Error::Invalid(format!("cannot read the dVAE tensor {name}: {e}")))?;
        h.extend_from_slice(name.as_bytes());
        h.extend_from_slice(format!("|{:?}|{:?}|", t.dtype(), t.shape()).as_bytes());
        h.extend_from_slice(&fnv1a(t.data()).to_le_bytes());
    }
    Ok(format!("enc-{:016x}", fnv1a(&h)))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardHeader {
    pub count: usize,
    pub image_len: usize,
    pub vocab: usize,
    pub dvae: String,
    /// Index of the shard's first example in the data it was encoded from.
    pub first: u64,
}

/// The path of shard `i` in `dir`.
pub fn shard_path(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("shard-{i:05}.tok"))
}

/// Serialises one shard; `tokens` holds `captions.len() × image_len` codes.
pub fn encode_shard(header: &ShardHeader, tokens: &[u16], captions: &[String]) -> Result<Vec<u8>> {
    if captions.len() != header.count || tokens.len() != header.count * header.image_len {
        return Err(Error::Invalid(format!(
            "shard of {} captions and {} tokens does not match its header ({} × {})",
            captions.len(),
            tokens.len(),
            header.count,
            header.image_len
        )));
    }
    let json = serde_json::to_vec(header).map_err(|e| Error::Invalid(e.to_string()))?;
    let mut out = Vec::with_capacity(16 + json.len() + tokens.len() * 2 + captions.len() * 48);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    for t in tokens {
        out.extend_from_slice(&t.to_le_bytes());
    }
    for c in captions {
        out.extend_from_slice(&(c.len() as u32).to_le_bytes());
        out.extend_from_slice(c.as_bytes());
    }
    let h = fnv1a(&out);
    out.extend_from_slice(&h.to_le_bytes());
    Ok(out)
}

/// Writes one shard atomically.
pub fn write_shard(path: &Path, header: &ShardHeader, tokens: &[u16], captions: &[String]) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    write_atomic(path, &encode_shard(header, tokens, captions)?)
}

/// One shard's contents.
#[derive(Debug, Clone)]
pub struct Shard {
    pub header: ShardHeader,
    pub tokens: Vec<u16>,
    pub captions: Vec<String>,
}

/// Parses a shard; every way it can be broken is an error that says what is wrong.
pub fn decode_shard(bytes: &[u8]) -> std::result::Result<Shard, String> {
    if bytes.len() < MAGIC.len() + 4 + 8 || &bytes[..8] != MAGIC {
        return Err("not a token shard (bad magic or too short)".into());
    }
    let (body, tail) = bytes.split_at(bytes.len() - 8);
    let stored = u64::from_le_bytes(tail.try_into().map_err(|_| "truncated checksum")?);
    if fnv1a(body) != stored {
        return Err("checksum mismatch (corrupt or truncated)".into());
    }
    let mut pos = 8;
    let take = |pos: &mut usize, n: usize| -> std::result::Result<&[u8], String> {
        let end = pos.checked_add(n).filter(|&e| e <= body.len()).ok_or("truncated")?;
        let s = &body[*pos..end];
        *pos = end;
        Ok(s)
    };
    let hlen = u32::from_le_bytes(take(&mut pos, 4)?.try_into().map_err(|_| "truncated")?) as usize;
    if hlen > MAX_HEADER {
        return Err(format!("header of {hlen} bytes is implausible"));
    }
    let header: ShardHeader =
        serde_json::from_slice(take(&mut pos, hlen)?).map_err(|e| format!("unreadable header: {e}"))?;
    let n_tokens = header.count.checked_mul(header.image_len).ok_or("header sizes overflow")?;
    if n_tokens.saturating_mul(2) > body.len() {
        return Err(format!("header announces {n_tokens} tokens, more than the file holds"));
    }
    let raw = take(&mut pos, n_tokens * 2)?;
    let tokens: Vec<u16> = raw.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
    if let Some(t) = tokens.iter().find(|&&t| t as usize >= header.vocab) {
        return Err(format!("token {t} outside the codebook of {}", header.vocab));
    }
    // every caption takes at least its 4-byte length: a count beyond that is a lie
    if header.count > body.len() / 4 {
        return Err(format!("header announces {} captions, more than the file can hold", header.count));
    }
    let mut captions = Vec::with_capacity(header.count);
    for _ in 0..header.count {
        let n = u32::from_le_bytes(take(&mut pos, 4)?.try_into().map_err(|_| "truncated")?) as usize;
        let s = std::str::from_utf8(take(&mut pos, n)?).map_err(|_| "caption is not UTF-8")?;
        captions.push(s.to_string());
    }
    if pos != body.len() {
        return Err(format!("{} unexpected bytes after the captions", body.len() - pos));
    }
    Ok(Shard { header, tokens, captions })
}

/// Every readable shard of a folder, concatenated.
#[derive(Debug, Clone, Default)]
pub struct TokenShards {
    pub image_len: usize,
    /// `len() × image_len` tokens.
    pub tokens: Vec<u16>,
    pub captions: Vec<String>,
    /// Shards that could not be used, with the reason (each was also reported on stderr).
    pub skipped: Vec<(PathBuf, String)>,
    pub files: usize,
}

impl TokenShards {
    /// Reads `dir/shard-*.tok`. Shards must match `image_len`, `vocab` and the dVAE
    /// (`dvae` accepts their mark); a corrupt shard is skipped with a warning naming it; shards made by
    /// another dVAE or of another shape are an error (the whole set is stale).
    pub fn open(dir: &Path, image_len: usize, vocab: usize, dvae: &DvaeFingerprint) -> Result<Self> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension().is_some_and(|e| e == "tok")
                    && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("shard-"))
            })
            .collect();
        paths.sort();
        let mut out = TokenShards { image_len, ..Default::default() };
        for p in paths {
            let shard = match std::fs::read(&p).map_err(|e| e.to_string()).and_then(|b| decode_shard(&b)) {
                Ok(s) => s,
                Err(why) => {
                    eprintln!("warning: skipping token shard {}: {why}", p.display());
                    out.skipped.push((p, why));
                    continue;
                }
            };
            let h = &shard.header;
            if h.image_len != image_len || h.vocab != vocab {
                return Err(Error::Invalid(format!(
                    "token shard {} holds {} tokens of a {}-code book per image; this model has {image_len} of {vocab}: encode the shards again",
                    p.display(),
                    h.image_len,
                    h.vocab
                )));
            }
            if !dvae.accepts(&h.dvae) {
                return Err(Error::Invalid(format!(
                    "token shard {} was encoded by another dVAE than this model's: encode the shards again",
                    p.display()
                )));
            }
            out.tokens.extend_from_slice(&shard.tokens);
            out.captions.extend(shard.captions);
            out.files += 1;
        }
        if out.captions.is_empty() {
            return Err(Error::Invalid(format!("{} holds no readable token shard", dir.display())));
        }
        Ok(out)
    }

    pub fn len(&self) -> usize {
        self.captions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.captions.is_empty()
    }

    /// Tokens and caption of example `i`.
    pub fn get(&self, i: usize) -> (&[u16], &str) {
        (&self.tokens[i * self.image_len..(i + 1) * self.image_len], &self.captions[i])
    }

    /// The example served at position `i` of the training stream: each pass over the set
    /// visits every example once, in an order shuffled by `seed` and the pass number.
    pub fn stream_index(&self, seed: u64, i: u64) -> usize {
        let n = self.len() as u64;
        let (epoch, pos) = (i / n, i % n);
        let mut rng = crate::sample::SeedRng::new(seed ^ epoch.wrapping_mul(0xA24B_AED4_963E_E407));
        // an affine bijection of 0..n: a multiplier coprime with n and an offset
        let mut a = (rng.next_u64() % n) | 1;
        while gcd(a, n) != 1 {
            a += 2;
        }
        let b = rng.next_u64() % n;
        ((pos as u128 * a as u128 + b as u128) % n as u128) as usize
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}
