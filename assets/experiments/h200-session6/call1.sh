#!/usr/bin/env bash
# One device call: (A) the default model's transformer and reranker trained further on the GPU,
# on the committed dVAE's codes; (B) at the same time the committed dVAE's decoder fine-tuned on
# its encoder's hard codes (tokens unchanged); then the speed check on the committed model.
set -u
out=${OUT:?}
bin=${BIN:-gpu/tessera}
dev=${DEV:-cuda}
TA=${TA:-330} TB=${TB:-300} TC=${TC:-190}
BA=${BA:-4m50s} BB=${BB:-4m30s}
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib
t0=$(date +%s)
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; date; } >/tmp/info.txt 2>&1
mkdir -p /tmp/B
cp assets/models/default/{config.json,tokenizer.json,dvae.safetensors} /tmp/B/
timeout $TA "$bin" train all --dir /tmp/A --dvae-from assets/models/default --init-from assets/models/default \
  --budget "$BA" --device "$dev" --workers ${WA:-10} --eval-captions 10 --eval-samples 16 ${EXTRA_A:-} >/tmp/A.log 2>&1 &
pa=$!
timeout $TB "$bin" train dvae --dir /tmp/B --decoder-only --recon mse --time "$BB" --batch ${BATCH_B:-256} --lr 3e-4 \
  --lr-end 1e-5 --checkpoint-every 100000 --sample-every 0 --workers ${WB:-5} --device "$dev" ${EXTRA_B:-} >/tmp/B.log 2>&1 &
pb=$!
nvidia-smi dmon -s u -c 30 -d 10 >/tmp/util.txt 2>&1 &
wait $pa; echo "A exit $? at $(( $(date +%s) - t0 ))s" >>/tmp/info.txt
wait $pb; echo "B exit $? at $(( $(date +%s) - t0 ))s" >>/tmp/info.txt
tar czf "$out/A.tgz" -C /tmp --ignore-failed-read A/transformer.safetensors A/reranker.safetensors A/train-all.json \
  A/transformer.log.jsonl A/reranker.log.jsonl A/eval A/samples A/config.json 2>/dev/null
tar czf "$out/B.tgz" -C /tmp --ignore-failed-read B/dvae.safetensors B/dvae-decoder.log.jsonl 2>/dev/null
timeout $TC tools/gpu-check "$bin" assets/models/default --device "$dev" ${QUICK:-} --out "$out/check.json" >/tmp/check.log 2>&1
echo "check exit $? at $(( $(date +%s) - t0 ))s" >>/tmp/info.txt
pkill -f "nvidia-smi dmon" 2>/dev/null
for f in A B check; do tr '\r' '\n' </tmp/$f.log | grep -v '^\s*$' | grep -v '^\[.*\] \[' | tail -n 60 >/tmp/$f.tail; done
tar czf "$out/logs.tgz" -C /tmp --ignore-failed-read info.txt util.txt A.tail B.tail check.tail A.log B.log 2>/dev/null
cat /tmp/info.txt; tail -n 12 /tmp/A.tail; tail -n 5 /tmp/B.tail; tail -n 5 /tmp/check.tail
ls -la "$out"
