//! Build-time settings for every binary of the crate (the CLI, tests, benches):
//! - an rpath to libtorch so no `LD_LIBRARY_PATH` is needed, and `libtorch_cuda` kept as a
//!   real dependency (rustc links with `--as-needed`, which would drop it because nothing
//!   references it directly, and then libtorch never registers its CUDA backend);
//! - `src/shim.cpp`, what tch does not bind (fused AdamW, foreach kernels, CUDA graphs),
//!   compiled against the same libtorch headers; its CUDA half only where libtorch has CUDA
//!   and the CUDA runtime headers are found beside it; and `src/kernels.cpp`, the CPU decode
//!   kernels (see `src/kernels.rs`);
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
    let mut lib = PathBuf::from(&root).join("lib");
    if let Ok(real) = lib.canonicalize() {
        lib = real;
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    let cuda = lib.join("libtorch_cuda.so").exists();
    // libtorch's OpenMP runtime: the CPU kernels' `at::parallel_for` expands to OpenMP pragmas
    // in our own code, so it is compiled with OpenMP and linked to that same runtime (one pool
    // of threads; without it the kernels run on one thread)
    let openmp = lib.join("libgomp.so.1").exists();
    build_shim(Path::new(&root), cuda, openmp);
    if openmp {
        println!("cargo:rustc-link-search=native={}", lib.display());
        println!("cargo:rustc-link-arg=-l:libgomp.so.1");
    }
    if cuda {
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

/// Compiles `src/shim.cpp` and `src/kernels.cpp`; `cuda`: libtorch has its CUDA library;
/// `openmp`: its OpenMP runtime.
fn build_shim(root: &Path, cuda: bool, openmp: bool) {
    println!("cargo:rerun-if-changed=src/shim.cpp");
    println!("cargo:rerun-if-changed=src/kernels.cpp");
    println!("cargo:rerun-if-changed=src/ffi.h");
    let root = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    let mut b = cc::Build::new();
    b.cpp(true)
        .file("src/shim.cpp")
        .file("src/kernels.cpp")
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-psabi")
        // the decode kernels' multiply-adds fused where the CPU has FMA (C++17 mode turns it off)
        .flag_if_supported("-ffp-contract=fast")
        .warnings(false);
    if openmp {
        b.flag("-fopenmp");
    }
    // the CUDA runtime headers: from the CUDA wheels installed beside torch, or a CUDA toolkit
    let mut headers: Vec<PathBuf> = Vec::new();
    if let Some(Ok(entries)) = root.parent().map(|site| std::fs::read_dir(site.join("nvidia"))) {
        headers.extend(entries.flatten().map(|e| e.path().join("include")));
    }
    if let Ok(home) = std::env::var("CUDA_HOME") {
        headers.push(PathBuf::from(home).join("include"));
    }
    headers.push(PathBuf::from("/usr/local/cuda/include"));
    let runtime =
        headers.into_iter().find(|d| d.join("cuda_runtime_api.h").is_file() && d.join("crt/host_config.h").is_file());
    match runtime {
        Some(dir) if cuda => {
            b.define("TESSERA_CUDA", None).include(dir);
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg=-lc10_cuda");
            println!("cargo:rustc-link-arg=-Wl,--as-needed");
        }
        _ if cuda => println!("cargo:warning=CUDA runtime headers not found: CUDA graphs left out"),
        _ => {}
    }
    b.compile("tessera_shim");
}
