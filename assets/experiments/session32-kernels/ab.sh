#!/bin/bash
# Before (last stop, commit 1dc429f) against after (the CPU decode kernels), interleaved rounds:
# sampled image tokens/s of S, P and the default model at batch 4 and 16, one caption a batch,
# 2 libtorch threads, f32. Usage: ab.sh BEFORE_BIN AFTER_BIN OUT_DIR
set -u
OLD=$1; NEW=$2; OUT=$3; mkdir -p "$OUT"
for round in 1 2 3; do
  for b in 4 16; do
    for side in old new; do
      BIN=$OLD; [ $side = new ] && BIN=$NEW
      "$BIN" bench --configs S,P,default --sample-batch $b --train-batch 0 --runs 3 --threads 2 \
        > "$OUT/$round-$side-$b.json" 2>/dev/null
      python3 - "$OUT/$round-$side-$b.json" $round $side $b <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(sys.argv[2], sys.argv[3], "b=" + sys.argv[4],
      " ".join("%s %.0f" % (k, v["sample_tokens_per_s"]) for k, v in d["configs"].items()), flush=True)
PY
    done
  done
done
