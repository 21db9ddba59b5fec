#!/usr/bin/env bash
# Makes OpenAI's published dVAE package (PyPI `DALL-E` 0.1: the classes its encoder.pkl and
# decoder.pkl were pickled from) importable next to the torch that tools/libtorch.sh installs,
# and prints the PYTHONPATH to use. Installed once into the same cache, with only the modules
# that package imports (not its test and training extras); a half-finished install is never used.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$repo/tools/libtorch.sh"
cache=${TESSERA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tessera}
torch="$cache/torch-2.11.0"
dest="$cache/dall-e-0.1"
if [ ! -f "$dest/dall_e/encoder.py" ]; then
  echo "tessera: installing the reference dVAE package (DALL-E 0.1) into $dest (once)" >&2
  tmp="$dest.partial.$$"
  rm -rf "$tmp"
  python3 -m pip install --quiet --no-cache-dir --disable-pip-version-check --root-user-action=ignore --no-deps --target "$tmp" \
    "DALL-E==0.1" "attrs>=21" "numpy>=1.24" "requests>=2.28" "urllib3>=1.26" idna certifi charset-normalizer >&2
  rm -rf "$dest"
  mv "$tmp" "$dest"
fi
echo "$dest:$torch"
