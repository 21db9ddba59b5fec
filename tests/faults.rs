//! Faults injected: `kill -9` in the middle of exports and autosaves (a child process that
//! writes in a loop, killed at random moments), and a full disk during training, export and
//! autosave. After each, nothing earlier is lost and nothing is half-written.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tessera::store::{SampleParams, SampleStore, export, read_png_params};

fn params(seed: u64) -> SampleParams {
    crate::common::sample_params("a red circle above a green square", seed)
}

/// A 256 px picture whose PNG takes a little while to write.
fn picture(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..256 * 256 * 3)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Run as a child process by the kill -9 tests: writes exports or autosaves until killed.
#[test]
#[ignore = "a child process of the kill -9 tests"]
fn child_writer() {
    let (Ok(dir), Ok(kind)) = (std::env::var("TESSERA_CHILD_DIR"), std::env::var("TESSERA_CHILD_KIND")) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let store = SampleStore::open(&dir).unwrap();
    for seed in 0.. {
        let rgb = picture(seed);
        match kind.as_str() {
            "export" => {
                export(&dir, &[(&rgb, 256, &params(seed))]).unwrap();
            }
            _ => {
                store.add(seed, &rgb, 256, &params(seed)).unwrap();
            }
        }
    }
}

/// Starts the child writer, waits until it has written another picture into `watch`, then
/// kills it with SIGKILL `after` later (mid-write, most of the time).
fn kill_child(dir: &Path, kind: &str, watch: &Path, after: Duration) {
    let count = |d: &Path| std::fs::read_dir(d).map(|r| r.count()).unwrap_or(0);
    let before = count(watch);
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args(["--exact", "faults::child_writer", "--ignored", "--test-threads", "1", "--nocapture"])
        .env("TESSERA_CHILD_DIR", dir)
        .env("TESSERA_CHILD_KIND", kind)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while count(watch) <= before + 1 {
        assert!(t0.elapsed() < Duration::from_secs(60), "the child wrote nothing");
        assert!(child.try_wait().unwrap().is_none(), "the child writer ended");
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(after);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

fn pngs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    v.sort();
    v
}

fn hidden(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with('.'))
        .count()
}

#[test]
fn kill_9_during_exports_leaves_only_whole_pictures() {
    let _cpu = crate::common::heavy_cpu();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("exports");
    let mut kills = 0;
    for round in 0..8u64 {
        kill_child(&dir, "export", &dir, Duration::from_millis(3 * round));
        kills += 1;
    }
    let files = pngs(&dir);
    assert!(files.len() >= kills, "only {} exports in {kills} runs", files.len());
    for f in &files {
        // every visible file is whole: it decodes, and its parameters are there
        let img = image::open(f).unwrap_or_else(|e| panic!("{} is half-written: {e}", f.display())).to_rgb8();
        assert_eq!(img.dimensions(), (256, 256));
        let p = read_png_params(f).unwrap().expect("parameters");
        assert_eq!(img.as_raw(), &picture(p.seed), "{} holds another picture", f.display());
    }
    // the next export tidies what the killed ones were writing
    export(&dir, &[(&picture(999), 256, &params(999))]).unwrap();
    assert_eq!(hidden(&dir), 0, "temporary files left behind");
    eprintln!("kill -9 during exports: {kills} kills, {} whole pictures, none torn", files.len());
}

#[test]
fn kill_9_during_autosaves_loses_at_most_the_sample_being_written() {
    let _cpu = crate::common::heavy_cpu();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let kills = 8;
    for round in 0..kills {
        kill_child(&dir, "autosave", &dir.join("samples"), Duration::from_millis(3 * round as u64));
    }
    let store = SampleStore::open(&dir).unwrap();
    assert_eq!(hidden(&dir.join("samples")), 0, "temporary files left behind");
    let (samples, skipped) = store.load().unwrap();
    let on_disk = pngs(&dir.join("samples")).len();
    assert!(samples.len() + kills >= on_disk, "{} indexed of {on_disk} pictures after {kills} kills", samples.len());
    assert!(skipped <= kills, "{skipped} index lines lost in {kills} kills");
    for s in &samples {
        let rgb = store.read_rgb(s).unwrap();
        assert_eq!(rgb, picture(s.params.seed));
    }
    // the store keeps working: a new sample is indexed and comes back
    let before = samples.len();
    store.add(10_000, &picture(10_000), 256, &params(10_000)).unwrap();
    let (samples, _) = store.load().unwrap();
    assert_eq!(samples.len(), before + 1);
    eprintln!(
        "kill -9 during autosaves: {kills} kills, {} samples restored, {skipped} torn lines skipped, {} unindexed pictures",
        before,
        on_disk - before
    );
}

fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    v.sort();
    v
}

#[test]
fn a_full_disk_during_export_and_autosave_keeps_what_was_there() {
    let tmp = tempfile::tempdir().unwrap();
    let exports = tmp.path().join("exports");
    export(&exports, &[(&picture(1), 256, &params(1))]).unwrap();
    let before = snapshot(&exports);
    for limit in [0, 100, 50_000] {
        tessera::io::inject_write_failure(Some(limit));
        let err = export(&exports, &[(&picture(2), 256, &params(2))]).unwrap_err();
        tessera::io::inject_write_failure(None);
        let msg = err.to_string();
        assert!(msg.contains("No space left") && msg.contains("tessera-2.png"), "{msg}");
        assert_eq!(snapshot(&exports), before, "a failed export changed the folder");
        assert_eq!(hidden(&exports), 0);
    }
    let store = SampleStore::open(&tmp.path().join("store")).unwrap();
    store.add(1, &picture(1), 256, &params(1)).unwrap();
    for limit in [0, 100, 50_000] {
        tessera::io::inject_write_failure(Some(limit));
        assert!(store.add(2, &picture(2), 256, &params(2)).is_err());
        tessera::io::inject_write_failure(None);
        let (samples, _) = store.load().unwrap();
        assert_eq!(samples.len(), 1, "the failed autosave changed what is restored");
        assert_eq!(store.read_rgb(&samples[0]).unwrap(), picture(1));
    }
    // the index itself failing mid-line (the picture was written): the next sample still lands
    let index_len = std::fs::metadata(tmp.path().join("store/index.jsonl")).unwrap().len();
    let png_len = tessera::store::encode_png(&picture(3), 256, Some(&params(3))).unwrap().len() as u64;
    tessera::io::inject_write_failure(Some(png_len + 10));
    assert!(store.add(3, &picture(3), 256, &params(3)).is_err());
    tessera::io::inject_write_failure(None);
    assert!(std::fs::metadata(tmp.path().join("store/index.jsonl")).unwrap().len() > index_len, "no torn line");
    store.add(4, &picture(4), 256, &params(4)).unwrap();
    let (samples, skipped) = store.load().unwrap();
    assert_eq!(samples.iter().map(|s| s.job).collect::<Vec<_>>(), vec![1, 4]);
    assert_eq!(skipped, 1);
}

#[test]
fn a_full_disk_during_training_fails_clearly_and_resumes_from_the_last_checkpoint() {
    let _cpu = crate::common::heavy_cpu();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let train = |steps: &str, fail: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tessera"));
        c.args(["train", "dvae", "--preset", "tiny", "--steps", steps, "--batch", "4", "--checkpoint-every", "2"])
            .args(["--threads", "1", "--workers", "1", "--resume", "--dir"])
            .arg(&dir);
        if let Some(f) = fail {
            c.env("TESSERA_FAIL_WRITES_AFTER", f);
        }
        c.output().unwrap()
    };
    let o = train("4", None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let good = snapshot(&dir);
    for fail in ["0", "3000"] {
        let t0 = Instant::now();
        let o = train("8", Some(fail));
        assert!(!o.status.success(), "training went on with a full disk");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("No space left on device") && err.contains(dir.to_str().unwrap()), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(60));
        // the last good checkpoint and weights are intact, and no half-written file remains
        let now = snapshot(&dir);
        for (name, bytes) in &good {
            if name.ends_with(".safetensors") {
                let same = now.iter().find(|(n, _)| n == name).map(|(_, b)| b == bytes);
                assert_eq!(same, Some(true), "{name} changed or vanished after a failed write");
            }
        }
        assert_eq!(hidden(&dir), 0, "a temporary file was left");
    }
    // with space again, the run resumes from step 4 and finishes
    let o = train("8", None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let log = std::fs::read_to_string(dir.join("dvae.log.jsonl")).unwrap();
    assert!(log.contains("\"step\":8"), "{log}");
}
