//! The command line, as a user runs it.

use std::process::Command;

fn tessera() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
}

#[test]
fn generate_writes_pngs_and_completes_from_an_image() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = tessera()
        .args(["generate", "--random-init", "tiny", "--prompt", "a red circle", "-n", "2", "--seed", "7"])
        .args(["--top-k", "10", "--guidance", "2", "--device", "cpu", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for seed in [7, 8] {
        let img = image::open(out.join(format!("sample-{seed}.png"))).unwrap();
        assert_eq!((img.width(), img.height()), (16, 16));
    }
    // the same run again never overwrites
    let o = tessera()
        .args(["generate", "--random-init", "tiny", "--prompt", "a red circle", "-n", "1", "--seed", "7", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(out.join("sample-7-1.png").exists());
    // every way of reading the cache draws the same pictures (sparse layers' steps read only
    // their pattern's keys by default; masked and static steps read every key)
    for decode in ["growing-masked", "static"] {
        let other = dir.path().join(decode);
        let o = tessera()
            .args(["generate", "--random-init", "tiny", "--prompt", "a red circle", "-n", "2", "--seed", "7"])
            .args(["--top-k", "10", "--guidance", "2", "--device", "cpu", "--decode", decode, "--out"])
            .arg(&other)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        for seed in [7, 8] {
            let name = format!("sample-{seed}.png");
            let (a, b) = (std::fs::read(out.join(&name)).unwrap(), std::fs::read(other.join(&name)).unwrap());
            assert!(a == b, "--decode {decode} drew another {name}");
        }
    }
    // completion from a picture of another size
    let pic = dir.path().join("top.png");
    image::RgbImage::from_pixel(40, 30, image::Rgb([200, 30, 30])).save(&pic).unwrap();
    let o = tessera()
        .args([
            "generate",
            "--random-init",
            "tiny",
            "--prompt",
            "a cat",
            "-n",
            "1",
            "--keep-rows",
            "2",
            "--prefix-image",
        ])
        .arg(&pic)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn bad_input_gives_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let o = tessera().args(args).arg("--out").arg(dir.path()).output().unwrap();
        assert!(!o.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
        err
    };
    assert!(run(&["generate", "--random-init", "tiny", "--prompt", ""]).contains("prompt is empty"));
    assert!(run(&["generate", "--random-init", "nope", "--prompt", "x"]).contains("unknown preset"));
    let err = run(&["generate", "--random-init", "tiny", "--prompt", "x", "--decode", "sideways"]);
    assert!(err.contains("unknown decode mode \"sideways\" (auto, static, growing or growing-masked)"), "{err}");
    let model = dir.path().join("missing");
    assert!(
        run(&["generate", "--model", model.to_str().unwrap(), "--prompt", "x"]).contains("no such model directory")
    );
    let bad = dir.path().join("bad.png");
    std::fs::write(&bad, b"not an image").unwrap();
    let err = run(&[
        "generate",
        "--random-init",
        "tiny",
        "--prompt",
        "x",
        "--keep-rows",
        "1",
        "--prefix-image",
        bad.to_str().unwrap(),
    ]);
    assert!(err.contains("not a readable image"), "{err}");
}

#[test]
fn info_reports_parameter_counts_as_json() {
    let o = tessera().args(["info", "--preset", "dalle_12b", "--json"]).output().unwrap();
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let t = v["params"]["transformer"].as_u64().unwrap() as f64;
    assert!((t - 12e9).abs() / 12e9 < 0.05);
    assert!(v["params"]["total"].as_u64().unwrap() > v["params"]["transformer"].as_u64().unwrap());
    assert_eq!(v["layer_attention"][63], "conv");
}

#[test]
fn bench_with_bf16_weights_counts_half_the_weight_bytes() {
    // tiny's weights rounded to bf16 values are read as bf16 by CPU f32 steps: the step's
    // bytes drop by half the weights' f32 bytes, the cache's stay
    let run = |extra: &[&str]| {
        let mut args = vec!["bench", "--configs", "tiny", "--sample-batch", "2", "--train-batch", "0", "--runs", "1"];
        args.extend_from_slice(extra);
        let o = tessera().args(&args).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    let (f32w, bf16w) = (run(&[]), run(&["--bf16-weights"]));
    assert_eq!((f32w["bf16_weights"].as_bool(), bf16w["bf16_weights"].as_bool()), (Some(false), Some(true)));
    let bytes = |v: &serde_json::Value| v["configs"]["tiny"]["sample_bytes_per_step"].as_f64().unwrap();
    let info = tessera().args(["info", "--preset", "tiny", "--json"]).output().unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    let transformer = info["params"]["transformer"].as_u64().unwrap() as f64;
    let saved = bytes(&f32w) - bytes(&bf16w);
    // the step's weights (all but the embeddings) at 2 bytes instead of 4
    assert!(saved > 0.0 && saved < 2.0 * transformer, "saved {saved} bytes of {transformer} parameters");
    assert!(bf16w["configs"]["tiny"]["sample_tokens_per_s"].as_f64().unwrap() > 0.0);
}

/// libtorch's CUDA libraries (~350 MB mapped, ~0.13 s of start) are not linked: they are opened
/// before `main` only where the NVIDIA driver is, or when forced. Forced on a machine without a
/// GPU they load and register libtorch's CUDA backend (with the CUDA graph functions), CPU
/// pictures stay the same bytes, and asking for CUDA names why it is unavailable.
#[test]
fn cuda_libraries_load_only_where_a_driver_is_and_change_no_cpu_picture() {
    let dir = tempfile::tempdir().unwrap();
    let with = |mode: Option<&str>, args: &[&str]| {
        let mut c = tessera();
        c.args(args);
        match mode {
            Some(m) => c.env("TESSERA_CUDA", m),
            None => c.env_remove("TESSERA_CUDA"),
        };
        c.output().unwrap()
    };
    let status = |mode: Option<&str>| {
        let o = with(mode, &["bench", "--configs", "tiny", "--sample-batch", "1", "--train-batch", "0", "--runs", "1"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        serde_json::from_value::<tessera::shim::CudaLibraries>(v["cuda_libraries"].clone()).unwrap()
    };
    let off = status(Some("0"));
    assert!(!off.loaded && !off.registered && !off.graphs, "{off:?}");
    assert!(off.note.contains("TESSERA_CUDA=0"), "{off:?}");
    let forced = status(Some("force"));
    assert!(forced.loaded && forced.registered, "{forced:?}");
    // graphs come with every build whose libtorch has CUDA and its runtime headers
    assert!(forced.graphs || forced.note.contains("built without"), "{forced:?}");
    // by default: loaded exactly where the driver is
    let default = status(None);
    let no_driver = default.note.contains("no NVIDIA driver");
    assert_eq!(default.loaded, !no_driver, "{default:?}");
    // the same CPU pictures with and without the CUDA libraries in the process
    let mut pictures = Vec::new();
    for mode in ["0", "force"] {
        let out = dir.path().join(mode);
        let o = tessera()
            .env("TESSERA_CUDA", mode)
            .args(["generate", "--random-init", "tiny", "--prompt", "a red circle", "-n", "2", "--seed", "3"])
            .args(["--device", "cpu", "--out"])
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        pictures.push([3, 4].map(|s| std::fs::read(out.join(format!("sample-{s}.png"))).unwrap()));
    }
    assert!(pictures[0] == pictures[1], "loading the CUDA libraries changed a CPU picture");
    // asking for CUDA where it cannot be is a clear error that says why
    let o = tessera()
        .env("TESSERA_CUDA", "0")
        .args(["generate", "--random-init", "tiny", "--prompt", "a red circle", "--device", "cuda", "--out"])
        .arg(dir.path().join("cuda"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("CUDA was asked for") && err.contains("TESSERA_CUDA=0"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Every preset the library knows is named wherever a command takes one, so a user reading
/// `--help` learns of all of them (the lists are written by hand and drifted once).
#[test]
fn every_command_that_takes_a_preset_names_all_of_them_in_its_help() {
    for cmd in
        [&["train", "dvae"][..], &["train", "all"], &["train", "transformer"], &["init"], &["generate"], &["info"]]
    {
        let o = tessera().args(cmd).arg("--help").output().unwrap();
        assert!(o.status.success(), "{cmd:?}");
        let help = String::from_utf8_lossy(&o.stdout);
        let flag = |l: &str| ["--preset", "--random-init"].iter().any(|f| l.trim_start().starts_with(f));
        let line = help.lines().position(flag);
        let line = line.unwrap_or_else(|| panic!("{cmd:?} --help names no preset flag"));
        let text: String = help.lines().skip(line).take(4).collect::<Vec<_>>().join(" ");
        for p in tessera::config::PRESETS {
            let named = text.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '-')).any(|w| w == *p);
            assert!(named, "{cmd:?} --help does not name preset {p}: {text}");
        }
    }
}

#[test]
fn a_models_own_sampling_settings_apply_unless_a_flag_is_given() {
    // a tiny model whose config.json says "draw the most likely token" (temperature 0)
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    let mut cfg = tessera::Config::tiny();
    cfg.sampling.temperature = 0.0;
    let mut m = tessera::Model::random_init(&cfg, tch::Device::Cpu, 3).unwrap();
    m.reranker = Some(tessera::model::RerankerModel::new(&cfg, tch::Device::Cpu));
    m.save(&model).unwrap();
    let text = std::fs::read_to_string(model.join("config.json")).unwrap();
    assert!(text.contains("\"sampling\""), "config.json records the model's sampling: {text}");
    assert_eq!(tessera::Model::load_config(&model).unwrap().sampling.temperature, 0.0);
    let run = |extra: &[&str], out: &str| {
        let out = dir.path().join(out);
        let o = tessera()
            .args(["generate", "--prompt", "a red circle", "-n", "2", "--keep", "2", "--seed", "5", "--device", "cpu"])
            .args(extra)
            .arg("--model")
            .arg(&model)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        [5, 6].map(|s| std::fs::read(out.join(format!("sample-{s}.png"))).unwrap())
    };
    // greedy: two seeds, one picture; told otherwise on the command line, they differ
    let [a, b] = run(&[], "own");
    assert_eq!(a, b, "the model's temperature 0 was not used");
    let [c, d] = run(&["--temperature", "1"], "flag");
    assert_ne!(c, d, "--temperature 1 did not override the model's setting");
    // eval reports the settings it drew with
    let o = tessera()
        .args(["eval", "--captions", "1", "--samples", "2", "--device", "cpu", "--top-k", "3", "--model"])
        .arg(&model)
        .arg("--out")
        .arg(dir.path().join("eval"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("eval/report.json")).unwrap()).unwrap();
    assert_eq!(report["sampling"]["temperature"], 0.0);
    assert_eq!(report["sampling"]["top_k"], 3);
    // plain sampling is not written, and a bad setting in config.json is refused on load
    let plain = dir.path().join("plain");
    tessera::Model::random_init(&tessera::Config::tiny(), tch::Device::Cpu, 3).unwrap().save(&plain).unwrap();
    assert!(!std::fs::read_to_string(plain.join("config.json")).unwrap().contains("sampling"));
    let bad = text.replace("\"temperature\": 0.0", "\"temperature\": -1.0");
    assert_ne!(bad, text);
    std::fs::write(model.join("config.json"), bad).unwrap();
    let err = tessera::Model::load(&model, tch::Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("sampling") && err.contains("temperature"), "{err}");
}

#[test]
fn set_changes_a_preset_for_a_new_model() {
    let dir = tempfile::tempdir().unwrap();
    let info = tessera().args(["info", "--preset", "tiny", "--set", "dvae.vocab_size=64", "--json"]).output().unwrap();
    assert!(info.status.success(), "{}", String::from_utf8_lossy(&info.stderr));
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["config"]["dvae"]["vocab_size"], 64);
    let m = dir.path().join("m");
    let o = tessera()
        .args(["train", "dvae", "--preset", "tiny", "--set", "dvae.vocab_size=64", "--steps", "2", "--batch", "2"])
        .args(["--device", "cpu", "--sample-every", "0", "--workers", "1", "--dir"])
        .arg(&m)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cfg = tessera::model::Model::load_config(&m).unwrap();
    assert_eq!(cfg.dvae.vocab_size, 64);
    let st = tch::Tensor::read_safetensors(m.join("dvae.safetensors")).unwrap();
    let logits = st.iter().filter(|(_, t)| t.size().contains(&64)).count();
    assert!(logits > 0, "no weight has the 64 codes");
    // the trainer's directory holds a dVAE alone: eval scores its round trips, and refuses samples
    let eval = |samples: &str| {
        tessera()
            .args(["eval", "--captions", "2", "--device", "cpu", "--samples", samples, "--model"])
            .arg(&m)
            .arg("--out")
            .arg(dir.path().join(format!("eval{samples}")))
            .output()
            .unwrap()
    };
    let o = eval("0");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(r["dvae_psnr_db"].as_f64().is_some_and(|p| p > 0.0), "{r}");
    assert_eq!(r["dvae_roundtrip"].as_object().map(|c| c.len()), Some(6), "{r}");
    let o = eval("1");
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("missing file"));
    // a misspelt key, or --set without a preset, is an error before any work
    let o = tessera().args(["info", "--preset", "tiny", "--set", "dvae.vocab=64"]).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("dvae.vocab=64"));
    let o = tessera().args(["train", "dvae", "--set", "dvae.vocab_size=64", "--dir"]).arg(&m).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--preset"));
}

/// A reader that stops early (`tessera info | head -1`) ends the run quietly, as with other
/// Unix tools: no panic message about a broken pipe.
#[cfg(unix)]
#[test]
fn a_closed_pipe_ends_a_command_quietly() {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = tessera()
        .args(["info", "--preset", "dalle_12b"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // read nothing: the first write that does not fit the pipe's buffer meets a closed pipe
    drop(child.stdout.take());
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let status = child.wait().unwrap();
    assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "{err}");
    // killed by SIGPIPE (or done before it wrote, if everything fitted before the close)
    use std::os::unix::process::ExitStatusExt;
    assert!(status.success() || status.signal() == Some(13), "{status:?}");
}
