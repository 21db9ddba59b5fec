//! Link-time settings for every binary of the crate (the CLI, tests, benches): an rpath to
//! libtorch so no `LD_LIBRARY_PATH` is needed, and `libtorch_cuda` kept as a real dependency
//! (rustc links with `--as-needed`, which would drop it because nothing references it
//! directly, and then libtorch never registers its CUDA backend).
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=build.rs");
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
