#!/bin/bash
# Interleaved rounds of `generate` on the embedded default model (guided, seed 7, 2 threads):
# every binary at each N in turn; prints the "sampling and decoding" seconds of each run.
# Usage: gen-ab.sh ROUNDS "NS" BIN...   (NS: e.g. "1 4 16 64")
set -u
R=$1; NS=$2; shift 2
for round in $(seq "$R"); do
  for n in $NS; do
    for bin in "$@"; do
      t=$("$bin" generate --prompt "a small red circle above a large green square" -n "$n" --seed 7 \
        --threads 2 --out "/tmp/gen-ab-$$" 2>&1 | sed -n 's/.*sampling and decoding \([0-9.]*\)s.*/\1/p')
      echo "$round $(basename "$bin") n=$n $t"
      rm -rf "/tmp/gen-ab-$$"
    done
  done
done
