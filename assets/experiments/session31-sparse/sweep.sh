#!/bin/bash
# rounds of the CPU sampling bench: batch 4 and 16, sparse (growing) and masked steps, f32
cd "$(dirname "$0")/../../.."
for round in 1 2 3; do
  for b in 4 16; do
    for mode in growing growing-masked; do
      ./target/release/tessera bench --configs P,default,S --sample-batch $b --train-batch 0 --runs 3 --threads 2 --decode $mode 2>/dev/null > assets/experiments/session31-sparse/bench-$round-$b-$mode.json
      python3 -c "
import json,sys; r=json.load(open('assets/experiments/session31-sparse/bench-$round-$b-$mode.json'))
print('$round', '$mode', 'b=$b', ' '.join(f\"{n} {c['sample_tokens_per_s']:.0f} tok/s {c['sample_ms_per_step']:.2f} ms/step bw {c['sample_bandwidth_utilisation']:.2f}\" for n,c in r['configs'].items()))"
    done
  done
done
