//! Property-based fuzzing of every parser of outside bytes: weight files and configs, the
//! tokenizer, image files, the PNG parameters of drop-to-restore, dataset folders and tar
//! shards, the autosave index. Each must return (an error naming the file, or a value), never
//! panic, and never allocate what a file merely claims. Cases per parser: `TESSERA_FUZZ_CASES`
//! (default 256 in CI; the README's run used 10,000).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestRunner};
use tch::Device;
use tessera::Model;
use tessera::store::{SampleParams, SampleStore, encode_png, read_image, read_png_params};

fn cases() -> u32 {
    std::env::var("TESSERA_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
}

fn runner() -> TestRunner {
    TestRunner::new(RunnerConfig { cases: cases(), failure_persistence: None, ..RunnerConfig::default() })
}

/// One edit of a byte string: flip a bit, overwrite a byte, cut the tail, insert or delete a
/// run, or duplicate a slice.
#[derive(Debug, Clone)]
enum Edit {
    Flip(usize, u8),
    Set(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Duplicate(usize, usize),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    let edit = prop_oneof![
        4 => (any::<usize>(), 0u8..8).prop_map(|(p, b)| Edit::Flip(p, b)),
        3 => (any::<usize>(), any::<u8>()).prop_map(|(p, v)| Edit::Set(p, v)),
        1 => any::<usize>().prop_map(Edit::Truncate),
        1 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..64)).prop_map(|(p, v)| Edit::Insert(p, v)),
        1 => (any::<usize>(), 1usize..256).prop_map(|(p, n)| Edit::Delete(p, n)),
        1 => (any::<usize>(), 1usize..256).prop_map(|(p, n)| Edit::Duplicate(p, n)),
    ];
    prop::collection::vec(edit, 1..6)
}

fn apply(bytes: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    for e in edits {
        let n = b.len().max(1);
        match e {
            Edit::Flip(p, bit) if !b.is_empty() => b[p % n] ^= 1 << bit,
            Edit::Set(p, v) if !b.is_empty() => b[p % n] = *v,
            Edit::Truncate(p) => b.truncate(p % n),
            Edit::Insert(p, v) => {
                let at = p % (b.len() + 1);
                b.splice(at..at, v.iter().copied());
            }
            Edit::Delete(p, len) => {
                let at = p % n;
                let end = (at + len).min(b.len());
                if at < end {
                    b.drain(at..end);
                }
            }
            Edit::Duplicate(p, len) => {
                let at = p % n;
                let end = (at + len).min(b.len());
                let slice = b[at.min(b.len())..end].to_vec();
                b.splice(at.min(b.len())..at.min(b.len()), slice);
            }
            _ => {}
        }
    }
    b
}

/// Runs `f` on `TESSERA_FUZZ_CASES` inputs from `strategy`; a panic inside `f` is a failure
/// (the runner reports the smallest input that panics).
fn fuzz<S: Strategy>(name: &str, strategy: S, f: impl Fn(S::Value) -> Result<(), TestCaseError>) {
    let t0 = Instant::now();
    let result = runner().run(&strategy, f);
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
    eprintln!("fuzz {name}: {} cases in {:.1} s", cases(), t0.elapsed().as_secs_f64());
}

fn tiny_model_dir(dir: &Path) -> PathBuf {
    crate::common::saved_tiny_model(dir, 1)
}

fn params(prompt: &str) -> SampleParams {
    crate::common::sample_params(prompt, 7)
}

/// An error that names the file it is about.
fn names(e: &impl std::fmt::Display, path: &Path) -> Result<(), TestCaseError> {
    let msg = e.to_string();
    let name = path.file_name().unwrap().to_string_lossy();
    prop_assert!(msg.contains(name.as_ref()), "error does not name {name}: {msg}");
    Ok(())
}

#[test]
fn weight_files_and_configs() {
    let _cpu = crate::common::heavy_cpu();
    let tmp = tempfile::tempdir().unwrap();
    let good = tiny_model_dir(&tmp.path().join("good"));
    let bad = tmp.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    for f in ["config.json", "tokenizer.json", "dvae.safetensors", "transformer.safetensors", "reranker.safetensors"] {
        std::fs::copy(good.join(f), bad.join(f)).unwrap();
    }
    let restore = |f: &str| std::fs::copy(good.join(f), bad.join(f)).unwrap();
    for file in ["dvae.safetensors", "transformer.safetensors", "reranker.safetensors", "config.json", "tokenizer.json"]
    {
        let original = std::fs::read(good.join(file)).unwrap();
        fuzz(file, edits(), |e| {
            let path = bad.join(file);
            std::fs::write(&path, apply(&original, &e)).unwrap();
            if let Err(err) = Model::load(&bad, Device::Cpu) {
                if file == "config.json" {
                    // a changed config may disagree with any file of the model: named too
                    prop_assert!(err.to_string().contains(bad.to_str().unwrap()), "{err}");
                } else {
                    names(&err, &path)?;
                }
            }
            Ok(())
        });
        restore(file);
    }
    // random bytes in place of each file
    fuzz("random weight bytes", prop::collection::vec(any::<u8>(), 0..4096), |bytes| {
        let path = bad.join("transformer.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        let err = Model::load(&bad, Device::Cpu).expect_err("random bytes loaded as weights");
        names(&err, &path)
    });
    restore("transformer.safetensors");
}

/// A config.json that asks for a giant model, or one its weights cannot hold, is refused
/// before anything of its size is allocated.
#[test]
fn configs_that_ask_for_too_much_are_refused_before_allocating() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_model_dir(&tmp.path().join("m"));
    let original: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let fields = [
        ("dvae", "hidden"),
        ("dvae", "vocab_size"),
        ("dvae", "groups"),
        ("dvae", "n_init"),
        ("dvae", "image_size"),
        ("text", "vocab_size"),
        ("text", "text_len"),
        ("transformer", "d_model"),
        ("transformer", "n_layers"),
        ("transformer", "head_dim"),
        ("transformer", "mlp_ratio"),
        ("reranker", "text_width"),
        ("reranker", "text_layers"),
        ("reranker", "image_width"),
        ("reranker", "text_heads"),
    ];
    let values =
        prop_oneof![Just(0u64), Just(3), Just(4096), Just(1 << 20), Just(1 << 31), Just(u64::MAX), any::<u64>(),];
    fuzz("config sizes", (prop::sample::select(fields.to_vec()), values), |((section, key), v)| {
        let mut c = original.clone();
        c[section][key] = v.into();
        let path = dir.join("config.json");
        std::fs::write(&path, c.to_string()).unwrap();
        let t0 = Instant::now();
        let r = Model::load(&dir, Device::Cpu);
        prop_assert!(t0.elapsed() < Duration::from_secs(10), "{section}.{key} = {v} took {:?}", t0.elapsed());
        if let Err(e) = r {
            let msg = e.to_string();
            prop_assert!(msg.contains(".json") || msg.contains(".safetensors"), "{msg}");
        }
        Ok(())
    });
}

#[test]
fn the_tokenizer_takes_any_text() {
    let tmp = tempfile::tempdir().unwrap();
    let m = Model::load(&tiny_model_dir(&tmp.path().join("m")), Device::Cpu).unwrap();
    let text_len = m.config.text.text_len;
    let tok = &m.tokenizer;
    fuzz("prompts", any::<String>(), |s| {
        match tok.encode(&s, text_len) {
            Ok(e) => prop_assert!(e.ids.len() <= text_len),
            Err(e) => prop_assert!(s.trim().is_empty(), "{s:?} refused: {e}"),
        }
        Ok(())
    });
    let controls: String = (0u32..0x20).chain(0x7f..0xa0).filter_map(char::from_u32).collect();
    fuzz(
        "control characters",
        prop::collection::vec(prop::sample::select(controls.chars().collect::<Vec<_>>()), 0..200),
        |v| {
            let s: String = v.into_iter().collect();
            let _ = tok.encode(&s, text_len);
            Ok(())
        },
    );
    // a 5 MB prompt is cut to the text length, quickly
    let huge = "a red circle above a green square ".repeat(150_000);
    let t0 = Instant::now();
    let e = tok.encode(&huge, text_len).unwrap();
    assert_eq!(e.ids.len(), text_len);
    assert!(e.truncated() && e.cut, "a 5 MB prompt must read as cut");
    let short = tok.encode("a red circle", text_len).unwrap();
    assert!(!short.cut);
    eprintln!("a {} MB prompt encoded in {:.3} s", huge.len() / 1_000_000, t0.elapsed().as_secs_f64());
    // the app counts the prompt's tokens every frame: a pasted book must not freeze it (this
    // took 3.3 s before the text beyond the model's length was left untokenised)
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    // a damaged tokenizer.json is an error, not a panic
    let json = tok.to_json().unwrap();
    fuzz("tokenizer.json", edits(), |e| {
        let s = String::from_utf8_lossy(&apply(json.as_bytes(), &e)).into_owned();
        let _ = tessera::text::TextTokenizer::from_json(&s);
        Ok(())
    });
}

/// A PNG whose header declares `w × h` pixels, with a valid checksum and almost no data.
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
        out.extend((data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend(kind);
        out.extend(data);
        let crc = crc32(&out[start..]);
        out.extend(crc.to_be_bytes());
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    chunk(&mut out, b"IEND", &[]);
    out
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

#[test]
fn image_files_and_their_parameters() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 24;
    let rgb: Vec<u8> = (0..size * size * 3).map(|i| (i * 37 % 251) as u8).collect();
    let png = encode_png(&rgb, size, Some(&params("a red circle"))).unwrap();
    let mut jpeg = Vec::new();
    image::RgbImage::from_raw(size as u32, size as u32, rgb.clone())
        .unwrap()
        .write_to(&mut std::io::Cursor::new(&mut jpeg), image::ImageFormat::Jpeg)
        .unwrap();
    for (name, original) in [("png", png.clone()), ("jpeg", jpeg)] {
        let path = tmp.path().join(format!("x.{name}"));
        fuzz(name, edits(), |e| {
            let bytes = apply(&original, &e);
            std::fs::write(&path, &bytes).unwrap();
            if let Err(err) = read_image(&path) {
                names(&err, &path)?;
            }
            let _ = tessera::data::random_crop(&bytes, 16, &mut tessera::sample::SeedRng::new(1));
            if name == "png"
                && let Err(err) = read_png_params(&path)
            {
                names(&err, &path)?;
            }
            Ok(())
        });
    }
    // parameters that are not what Tessera wrote: an error naming the file, never a panic
    let path = tmp.path().join("params.png");
    fuzz("png parameters", any::<String>(), |text| {
        let mut p = params("x");
        p.prompt = text;
        std::fs::write(&path, encode_png(&rgb, size, Some(&p)).unwrap()).unwrap();
        let back = read_png_params(&path).unwrap();
        prop_assert_eq!(back, Some(p));
        Ok(())
    });
    // huge declared dimensions are refused at once, before any allocation of that size
    for (w, h) in [(1 << 20, 1 << 20), (u32::MAX, 1), (100_000, 100_000), (1, u32::MAX)] {
        let path = tmp.path().join(format!("huge-{w}x{h}.png"));
        std::fs::write(&path, png_claiming(w, h)).unwrap();
        let t0 = Instant::now();
        let err = read_image(&path).expect_err("a giant image was accepted");
        assert!(t0.elapsed() < Duration::from_secs(1), "{w}×{h} took {:?}", t0.elapsed());
        assert!(err.to_string().contains("huge-"), "{err}");
        assert!(
            tessera::data::random_crop(&std::fs::read(&path).unwrap(), 16, &mut tessera::sample::SeedRng::new(1))
                .is_none()
        );
    }
}

/// A WebDataset shard with pairs, a picture without caption, a non-UTF-8 caption, a symlink
/// and a path that climbs out of the archive.
fn tar_bytes(png: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, data).unwrap();
    };
    add("a.png", png);
    add("a.txt", b"a red circle");
    add("b.png", png);
    add("c.png", png);
    add("c.txt", b"\xff\xfe not utf-8 \xc3");
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_cksum();
    b.append_link(&mut h, "d.png", "/etc/passwd").unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_size(png.len() as u64);
    h.set_cksum();
    b.append_data(&mut h, "e.png", png).unwrap();
    b.into_inner().unwrap()
}

#[test]
fn dataset_folders_and_tar_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let rgb = vec![200u8; 16 * 16 * 3];
    let png = encode_png(&rgb, 16, None).unwrap();
    let original = tar_bytes(&png);
    // the clean shard: pairs read, the rest skipped and counted, nothing written anywhere
    let path = tmp.path().join("shard.tar");
    std::fs::write(&path, &original).unwrap();
    let s = tessera::data::Source::open(path.to_str().unwrap()).unwrap();
    assert_eq!(s.count(), Some(2), "a.png and c.png (lossy caption) are pairs");
    assert!(s.skipped() >= 2, "b.png (no caption) and the symlink are skipped: {}", s.skipped());
    fuzz("tar shards", edits(), |e| {
        std::fs::write(&path, apply(&original, &e)).unwrap();
        match tessera::data::Source::open(path.to_str().unwrap()) {
            Ok(s) => {
                let mut rng = tessera::sample::SeedRng::new(0);
                for i in 0..s.count().unwrap_or(0).min(4) {
                    let _ = s.get(i as u64, 8, &mut rng);
                }
            }
            Err(err) => names(&err, &path)?,
        }
        Ok(())
    });
    // a folder with a dangling symlink, a symlinked folder, a caption that is not UTF-8
    let dir = tmp.path().join("folder");
    std::fs::create_dir_all(dir.join("sub.png")).unwrap();
    std::fs::write(dir.join("x.png"), &png).unwrap();
    std::fs::write(dir.join("x.txt"), "a blue square").unwrap();
    std::fs::write(dir.join("y.png"), &png).unwrap();
    std::fs::write(dir.join("y.txt"), b"\xff\xfe").unwrap();
    std::os::unix::fs::symlink("/nonexistent/z.png", dir.join("z.png")).unwrap();
    std::fs::write(dir.join("z.txt"), "dangling").unwrap();
    std::os::unix::fs::symlink(&dir, dir.join("loop.png")).unwrap();
    let s = tessera::data::Source::open(dir.to_str().unwrap()).unwrap();
    assert_eq!(s.count(), Some(1));
    assert!(s.skipped() >= 3, "{}", s.skipped());
}

#[test]
fn the_autosave_index() {
    let tmp = tempfile::tempdir().unwrap();
    let store = SampleStore::open(tmp.path()).unwrap();
    let rgb = vec![9u8; 8 * 8 * 3];
    for i in 0..3 {
        store.add(1, &rgb, 8, &params(&format!("p{i}"))).unwrap();
    }
    let index = tmp.path().join("index.jsonl");
    let original = std::fs::read(&index).unwrap();
    fuzz("index.jsonl", edits(), |e| {
        std::fs::write(&index, apply(&original, &e)).unwrap();
        let (samples, _) = store.load().map_err(|e| TestCaseError::fail(e.to_string()))?;
        for s in &samples {
            // every entry it returns is a picture inside the store
            prop_assert!(store.path_of(s).starts_with(tmp.path().join("samples")));
            let _ = store.read_rgb(s);
        }
        Ok(())
    });
    // an entry that points outside the store is skipped, never read or written
    std::fs::write(tmp.path().join("outside.png"), encode_png(&rgb, 8, None).unwrap()).unwrap();
    let mut line: serde_json::Value = serde_json::from_slice(original.split(|&b| b == b'\n').next().unwrap()).unwrap();
    line["file"] = "../outside.png".into();
    std::fs::write(&index, format!("{line}\n")).unwrap();
    let (samples, skipped) = store.load().unwrap();
    assert!(samples.is_empty() && skipped == 1, "{samples:?}");
}

/// Whatever a sample's parameters say (they come back from PNGs people drop on the app),
/// exports land in the chosen folder under names Tessera makes.
#[test]
fn exports_stay_in_the_chosen_folder() {
    let _cpu = crate::common::heavy_cpu();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("chosen");
    let rgb = vec![1u8; 8 * 8 * 3];
    fuzz("export names", (any::<String>(), any::<u64>(), any::<String>()), |(prompt, seed, model)| {
        let mut p = params(&prompt);
        p.seed = seed;
        p.model = model;
        let written = tessera::store::export(&dir, &[(&rgb, 8, &p)]).map_err(|e| TestCaseError::fail(e.to_string()))?;
        for w in &written {
            prop_assert_eq!(w.parent(), Some(dir.as_path()));
            let name = w.file_name().unwrap().to_string_lossy();
            prop_assert!(name.starts_with("tessera-") && name.ends_with(".png"), "{name}");
        }
        Ok(())
    });
    // nothing was written anywhere else
    let outside: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(outside, vec![std::ffi::OsString::from("chosen")]);
}
