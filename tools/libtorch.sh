#!/usr/bin/env bash
# Makes libtorch 2.11.0 available to the build: installs the PyPI wheel once into a cache
# outside the repository, then points `.libtorch` (read by .cargo/config.toml) at it.
# Idempotent and safe to interrupt: the install lands in a temporary folder that is renamed
# into place only when complete.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
version=2.11.0
cache=${TESSERA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tessera}
dest="$cache/torch-$version"
if [ ! -f "$dest/torch/lib/libtorch_cpu.so" ]; then
  echo "tessera: installing libtorch $version into $dest (once, ~4.6 GB, a few minutes)" >&2
  mkdir -p "$cache"
  python3 -m pip --version >/dev/null 2>&1 || {
    echo "tessera: python3 with pip is needed to fetch libtorch; installing it" >&2
    apt-get update -qq && apt-get install -y -qq python3-pip >/dev/null
  }
  tmp="$dest.partial.$$"
  rm -rf "$tmp"
  python3 -m pip install --quiet --no-cache-dir --disable-pip-version-check \
    --target "$tmp" "torch==$version" >&2
  rm -rf "$dest"
  mv "$tmp" "$dest"
fi
# The CUDA wheels carry the runtime headers but not their compiler-internal part (crt/), which
# the build of src/shim.cpp (CUDA graphs) includes; it comes as a separate 130 kB wheel. Without
# it the build goes on and leaves CUDA graphs out.
inc="$dest/nvidia/cu13/include"
if [ -f "$inc/cuda_runtime_api.h" ] && [ ! -f "$inc/crt/host_config.h" ]; then
  tmp=$(mktemp -d)
  if python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" \
      "nvidia-cuda-crt==13.0.88" >&2 && python3 -m zipfile -e "$tmp"/nvidia_cuda_crt-*.whl "$tmp/x"; then
    rm -rf "$inc/crt.partial"
    cp -r "$tmp/x/nvidia/cu13/include/crt" "$inc/crt.partial"
    mv "$inc/crt.partial" "$inc/crt"
  else
    echo "tessera: could not fetch the CUDA crt headers; building without CUDA graphs" >&2
  fi
  rm -rf "$tmp"
fi
ln -sfn "$dest/torch" "$repo/.libtorch"
