#!/usr/bin/env bash
# Medians of cold runs: the paper's 512 -> 32 job and 64 samples in bf16 with and without graphs,
# each a fresh process, with the time breakdown that generate prints.
set -u
out=${OUT:?}
bin=gpu/tessera
dev=${DEV:-cuda}
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib
m=assets/models/default
p="a small red circle above a large green square"
one() { # name, env, args...
  local name=$1 envs=$2; shift 2
  local t0=$(date +%s%N)
  env $envs "$bin" generate --model $m --prompt "$p" --seed 1 --device $dev --out /tmp/o-$name "$@" >/tmp/log 2>&1
  local rc=$? t1=$(date +%s%N)
  echo "$name rc=$rc whole=$(( (t1-t0)/1000000 ))ms $(grep '^time:' /tmp/log) | $(tr '\r' '\n' </tmp/log | tail -n 1)" | tee -a $out/times.txt
}
for i in 1 2 3 4 5; do one n512k32 "TESSERA_CUDA_GRAPHS=1" -n 512 --keep 32; done
for i in 1 2 3; do one n512k32_nographs "TESSERA_CUDA_GRAPHS=0" -n 512 --keep 32; done
for i in 1 2 3; do one n64_bf16_graph "TESSERA_CUDA_GRAPHS=1" -n 64 --dtype bf16 --decode static; done
for i in 1 2 3; do one n64_bf16_eager "TESSERA_CUDA_GRAPHS=0" -n 64 --dtype bf16 --decode static; done
for i in 1 2 3; do one n64_f32_graph "TESSERA_CUDA_GRAPHS=1" -n 64; done
for i in 1 2; do one n1 "TESSERA_CUDA_GRAPHS=1" -n 1; done
