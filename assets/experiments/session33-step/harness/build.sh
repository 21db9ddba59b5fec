#!/bin/bash
# Builds the C++ timing harnesses against the project's kernels and libtorch (run from the
# repository root after the first build, which fetches libtorch into .libtorch):
#   att   B THREADS FLUSH_MB  — P's four attention patterns over a cache of B rows, per step
#   step  R [bf16]            — P's 17 decode products at R rows, each weight its own (cold);
#                               bf16: bf16-valued weights in f32 and in bf16 panels
# KERNELS=path/to/kernels.cpp builds against another version of the kernels.
set -eu
L=$(readlink -f .libtorch)
K=$(readlink -f "${KERNELS:-src/kernels.cpp}")
D=$(dirname "$0")
for h in att step; do
  g++ -O3 -std=c++17 -fopenmp -ffp-contract=fast -Wno-psabi -D_GLIBCXX_USE_CXX11_ABI=1 \
    -DGLOG_USE_GLOG_EXPORT -DKFILE="\"$K\"" -DKNAME="\"$(basename "$K")\"" -I"$(dirname "$K")" \
    -I"$L/include" -I"$L/include/torch/csrc/api/include" "$D/$h.cpp" -o "$D/$h" \
    -L"$L/lib" -Wl,-rpath,"$L/lib" -ltorch_cpu -lc10 -l:libgomp.so.1
done
