//! Build-time settings for every binary of the crate (the CLI, tests, benches):
//! - an rpath to libtorch so no `LD_LIBRARY_PATH` is needed. `libtorch_cuda` is not linked
//!   (rustc links with `--as-needed`, which drops it): `src/shim.cpp` opens it at start where an
//!   NVIDIA driver is installed, so CPU machines never map the CUDA libraries;
//! - `src/shim.cpp`, what tch does not bind (fused AdamW, foreach kernels) and that loading,
//!   compiled against the same libtorch headers; `src/shim_cuda.cpp`, CUDA graphs, compiled into
//!   a small shared library linked to libtorch_cuda (where libtorch has CUDA and the CUDA runtime
//!   headers are found beside it) and carried inside the binary; and `src/kernels.cpp`, the CPU
//!   decode kernels (see `src/kernels.rs`);
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
    build_shim(Path::new(&root), &lib, cuda, openmp);
    if openmp {
        println!("cargo:rustc-link-search=native={}", lib.display());
        println!("cargo:rustc-link-arg=-l:libgomp.so.1");
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

/// Compiles `src/shim.cpp` and `src/kernels.cpp` (and, with `cuda`, `src/shim_cuda.cpp` into
/// the shared library that shim.cpp carries); `lib`: libtorch's library folder; `cuda`: libtorch
/// has its CUDA library; `openmp`: its OpenMP runtime.
fn build_shim(root: &Path, lib: &Path, cuda: bool, openmp: bool) {
    println!("cargo:rerun-if-changed=src/shim.cpp");
    println!("cargo:rerun-if-changed=src/shim_cuda.cpp");
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
        Some(dir) if cuda => match build_cuda_shim(&root, lib, &dir, &abi) {
            Ok(header_dir) => {
                b.define("TESSERA_CUDA_SHIM", None).include(header_dir);
            }
            Err(e) => println!("cargo:warning=CUDA graphs left out: {e}"),
        },
        _ if cuda => println!("cargo:warning=CUDA runtime headers not found: CUDA graphs left out"),
        _ => {}
    }
    b.compile("tessera_shim");
}

/// Builds `$OUT_DIR/libtessera_cuda.so` from `src/shim_cuda.cpp`, linked to libtorch_cuda, and
/// writes the header through which shim.cpp includes its bytes. Returns the header's folder.
fn build_cuda_shim(root: &Path, lib: &Path, cuda_headers: &Path, abi: &str) -> Result<PathBuf, String> {
    let out = PathBuf::from(std::env::var("OUT_DIR").map_err(|e| e.to_string())?);
    let so = out.join("libtessera_cuda.so");
    let mut cmd = cc::Build::new().cpp(true).warnings(false).get_compiler().to_command();
    cmd.args(["-shared", "-fPIC", "-O2", "-g0", "-std=c++17", "-DGLOG_USE_GLOG_EXPORT", "-w"])
        .arg(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .arg("-I")
        .arg(root.join("include"))
        .arg("-I")
        .arg(root.join("include/torch/csrc/api/include"))
        .arg("-I")
        .arg(cuda_headers)
        .arg("-I")
        .arg("src")
        .arg("src/shim_cuda.cpp")
        .arg("-o")
        .arg(&so)
        .arg(format!("-L{}", lib.display()))
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        // every symbol resolved now: a missing one fails the build, not the GPU machine's run
        .args([
            "-Wl,-z,defs",
            "-Wl,-s",
            "-Wl,--no-as-needed",
            "-ltorch_cuda",
            "-lc10_cuda",
            "-Wl,--as-needed",
            "-ltorch_cpu",
            "-lc10",
        ]);
    let status = cmd.status().map_err(|e| format!("cannot run the C++ compiler: {e}"))?;
    if !status.success() {
        return Err(format!("compiling src/shim_cuda.cpp failed ({status})"));
    }
    // the assembler string, then the C string around it
    let asm_path = so.display().to_string().replace('\\', "\\\\").replace('"', "\\\"");
    let directive = format!(".incbin \"{asm_path}\"");
    let c_string = directive.replace('\\', "\\\\").replace('"', "\\\"");
    let header = format!("#define TESSERA_CUDA_SHIM_INCBIN \"{c_string}\\n\"\n");
    std::fs::write(out.join("tessera_cuda_shim.h"), header).map_err(|e| e.to_string())?;
    Ok(out)
}
