#!/bin/bash
# Before (commit af2173e) against after (this session's last code), interleaved: CPU sampling
# bench of P and the default model, batch 4 and 16, f32, 2 threads. The after binary samples a
# batch from one caption (as generate does); the before binary's speed does not depend on that.
bin_dir=${BIN_DIR:-.}
out=${OUT:-ab2}
mkdir -p $out
for round in 1 2 3; do
  for b in 4 16; do
    for v in old new2; do
      extra="--train-batch 0"; [ $v = old ] && extra="--train-batch 1"
      "$bin_dir"/tessera-$v bench --configs P,default --sample-batch $b $extra --runs 3 --threads 2 2>/dev/null > $out/$round-$b-$v.json
      python3 -c "
import json; r=json.load(open('$out/$round-$b-$v.json'))
print('$round', '$v', 'b=$b', ' '.join(f\"{n} {c['sample_tokens_per_s']:.0f}\" for n,c in r['configs'].items()))"
    done
  done
done
