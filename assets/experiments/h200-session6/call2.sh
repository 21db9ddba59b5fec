#!/usr/bin/env bash
# Second call: both parts again from where the first call left them (gpu/m2: committed encoder,
# the fine-tuned decoder, the transformer and reranker of the first call).
set -u
out=${OUT:?}
bin=gpu/tessera
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib
t0=$(date +%s)
rm -rf /tmp/A2 /tmp/B2; mkdir -p /tmp/B2; cp gpu/m2/{config.json,tokenizer.json,dvae.safetensors} /tmp/B2/
timeout 270 "$bin" train all --dir /tmp/A2 --dvae-from gpu/m2 --init-from gpu/m2 --budget 3m55s --device cuda \
  --workers 10 --eval-captions 10 --eval-samples 16 >/tmp/A2.log 2>&1 &
pa=$!
timeout 250 "$bin" train dvae --dir /tmp/B2 --decoder-only --recon mse --time 3m40s --batch 256 --lr 2e-4 --lr-end 5e-6 \
  --checkpoint-every 100000 --sample-every 0 --workers 5 --device cuda >/tmp/B2.log 2>&1 &
pb=$!
wait $pa; echo "A2 exit $? at $(( $(date +%s) - t0 ))s" >/tmp/info2.txt
wait $pb; echo "B2 exit $? at $(( $(date +%s) - t0 ))s" >>/tmp/info2.txt
for f in A2 B2; do tr '\r' '\n' </tmp/$f.log | grep -v '^\s*$' | grep -v '^\[.*\] \[' | tail -n 60 >/tmp/$f.tail; done
tar czf "$out/A2.tgz" -C /tmp --ignore-failed-read A2/transformer.safetensors A2/reranker.safetensors A2/train-all.json \
  A2/transformer.log.jsonl A2/reranker.log.jsonl A2/eval A2/config.json info2.txt A2.tail B2.tail 2>/dev/null
tar czf "$out/B2.tgz" -C /tmp --ignore-failed-read B2/dvae.safetensors B2/dvae-decoder.log.jsonl 2>/dev/null
cat /tmp/info2.txt; tail -n 3 /tmp/B2.tail; ls -la "$out"
