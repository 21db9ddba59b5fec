#!/bin/bash
# Interleaved rounds of `tessera bench` (sampled image tokens/s, 2 libtorch threads, f32, one
# caption a batch) for several binaries: each round runs every binary at each batch of BATCHES (default
# "4 16") on each configuration in turn, so that the host's slow spells fall on all of them.
# Usage: [BATCHES="1 4 16 64"] ab.sh ROUNDS "CONFIGS" OUT_DIR BIN...   (CONFIGS: e.g. "default P")
set -u
R=$1; CONFIGS=$2; OUT=$3; shift 3; mkdir -p "$OUT"
for round in $(seq "$R"); do
  for c in $CONFIGS; do
    for b in ${BATCHES:-4 16}; do
      for bin in "$@"; do
        name=$(basename "$bin")
        "$bin" bench --configs "$c" --sample-batch $b --train-batch 0 --runs 3 --threads 2 \
          > "$OUT/$round-$name-$c-$b.json" 2>/dev/null
        python3 - "$OUT/$round-$name-$c-$b.json" "$round" "$name" "$c" "$b" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))["configs"][sys.argv[4]]
print(sys.argv[2], sys.argv[3], sys.argv[4], "b=" + sys.argv[5], "%.0f" % d["sample_tokens_per_s"],
      "%.3f" % d["sample_ms_per_step"], flush=True)
PY
      done
    done
  done
done
