#!/bin/bash
# Old (af2173e) against new binary, interleaved: CPU sampling bench, batch 4 and 16, f32, 2 threads
# tessera-old: built from commit af2173e, tessera-new: this one; both in $bin_dir (default: .)
bin_dir=${BIN_DIR:-.}
out=${OUT:-ab}
mkdir -p $out
for round in 1 2 3; do
  for b in 4 16; do
    for v in old new; do
      extra="--train-batch 0"; [ $v = old ] && extra="--train-batch 1"
      "$bin_dir"/tessera-$v bench --configs P,default,S --sample-batch $b $extra --runs 3 --threads 2 2>/dev/null > $out/$round-$b-$v.json
      python3 -c "
import json; r=json.load(open('$out/$round-$b-$v.json'))
print('$round', '$v', 'b=$b', ' '.join(f\"{n} {c['sample_tokens_per_s']:.0f}\" for n,c in r['configs'].items()))"
    done
  done
done
