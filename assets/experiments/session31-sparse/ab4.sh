#!/bin/bash
# batch 4, interleaved: sparse and masked decode steps, P and the default model, 2 threads
cd "$(dirname "$0")/../../.."
for i in 1 2 3 4 5 6; do
  for mode in growing growing-masked; do
    for src in "--random-init P" "--random-init default"; do
      t=$(./target/release/tessera generate $src --prompt "a red circle above a blue square" -n 4 --seed 1 --threads 2 --decode $mode --out /tmp/ab4 2>&1 | sed -n 's/.*sampling and decoding \([0-9.]*\)s.*/\1/p')
      echo "$i $mode ${src#--random-init } $t"
    done
  done
done
