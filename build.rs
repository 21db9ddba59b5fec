//! Build-time settings for every binary of the crate (the CLI, tests, benches):
//! - an rpath to libtorch so no `LD_LIBRARY_PATH` is needed, and `libtorch_cuda` kept as a
//!   real dependency (rustc links with `--as-needed`, which would drop it because nothing
//!   references it directly, and then libtorch never registers its CUDA backend);
//! - the embedded default model: every file of `assets/models/default/` is compiled into the
//!   binary (`$OUT_DIR/default_model.rs`), so the app and `generate` work from any directory.
use std::path::{Path, PathBuf};

const MODEL_FILES: &[&str] =
    &["config.json", "tokenizer.json", "dvae.safetensors", "transformer.safetensors", "reranker.safetensors"];

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=build.rs");
    embed_default_model();
    let Ok(root) = std::env::var("LIBTORCH") else {
        return;
    };
    let mut lib = PathBuf::from(root).join("lib");
    if let Ok(real) = lib.canonicalize() {
        lib = real;
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-search=native={}", lib.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}

fn embed_default_model() {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let dir = Path::new(&manifest).join("assets/models/default");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut code = String::from(
        "/// Files of the embedded default model (name, bytes).\npub static FILES: &[(&str, &[u8])] = &[\n",
    );
    // the slim command-line build (no `embedded-model` feature) carries no weights
    let embed = std::env::var_os("CARGO_FEATURE_EMBEDDED_MODEL").is_some();
    for name in MODEL_FILES.iter().filter(|_| embed) {
        let path = dir.join(name);
        println!("cargo:rerun-if-changed={}", path.display());
        if path.is_file() {
            code.push_str(&format!("    ({name:?}, include_bytes!({:?})),\n", path.display().to_string()));
        }
    }
    code.push_str("];\n");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap_or_else(|_| ".".into())).join("default_model.rs");
    if let Err(e) = std::fs::write(&out, code) {
        panic!("cannot write {}: {e}", out.display());
    }
}
