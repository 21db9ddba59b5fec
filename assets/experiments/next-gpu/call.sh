#!/usr/bin/env bash
# One prepared device call (≤ 8 min) for the next session that has a GPU, issue 9 then issue 10:
# (A) a whole new model of the `gpu-default` preset in one `train all` run: a dVAE of width 128
#     with 2,048 codes trained from scratch on the GPU's hundreds of thousands of pictures (the
#     committed encoder saw 38,400 on the CPU, and its codes lose shapes: TRAINING.md, twelfth
#     session), with the fourteenth session's recipe (squared error, β 1.65, the codebook-usage
#     term, straight-through on the encoder's argmax codes from the first step: on the CPU it
#     beat the paper's relaxation with a straight-through tail by 4.2 dB on the same pictures;
#     EXTRA_DVAE="--hard-tail 0.3" gives that recipe back); token shards; a transformer of d 288 × 6 from scratch
#     (other shapes than the committed one: `train all` says so and starts it afresh); the
#     committed tokenizer and reranker (same shapes) trained further (`--init-from`);
#     then the model scored (`eval`, 50 captions × 16 samples) and its dVAE's round trips
#     (`eval --samples 0`, 100 scenes per capability);
# (C) the speed check (`tools/gpu-check`) on the committed model, cut at TC seconds (it also
#     times the static decode steps' additive masks against boolean rows).
# Run from the repository root with the slim build in gpu/tessera:
#   OUT=... assets/experiments/next-gpu/call.sh
# To dry-run on a CPU: DEV=cpu, short budgets and PRESET=default (the preset's shapes are the
# committed model's, so it trains in seconds there; gpu-default's dVAE takes minutes a step).
# Then `assets/experiments/next-gpu/adopt.sh FILES_DIR` compares A with the committed model.
set -u
out=${OUT:?}
bin=${BIN:-gpu/tessera}
dev=${DEV:-cuda}
D=assets/models/default
TA=${TA:-300} TE=${TE:-80} TR=${TR:-30} TC=${TC:-60}
BA=${BA:-4m30s}
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib
t0=$(date +%s)
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; date; } >/tmp/info.txt 2>&1
rm -rf /tmp/A
nvidia-smi dmon -s u -c 30 -d 10 >/tmp/util.txt 2>&1 &
timeout $TA "$bin" train all --dir /tmp/A --preset ${PRESET:-gpu-default} --init-from $D --budget "$BA" --device "$dev" \
  --recon mse --beta 1.65 --usage-weight 1 ${EXTRA_DVAE:---hard-tail 1 --argmax-codes} --workers ${WA:-15} --eval-captions 0 ${EXTRA_A:-} \
  >/tmp/A.log 2>&1
echo "A train exit $? at $(( $(date +%s) - t0 ))s" >>/tmp/info.txt
timeout $TE "$bin" eval --model /tmp/A --captions ${EVAL_A:-50} --samples 16 --device "$dev" --out /tmp/A/eval \
  >/tmp/E.log 2>&1
echo "A eval exit $? at $(( $(date +%s) - t0 ))s" >>/tmp/info.txt
timeout $TR "$bin" eval --model /tmp/A --captions ${EVAL_R:-100} --samples 0 --device "$dev" --out /tmp/A/eval-dvae \
  >>/tmp/E.log 2>&1
echo "A round trips exit $? at $(( $(date +%s) - t0 ))s" >>/tmp/info.txt
tar czf "$out/A.tgz" -C /tmp --ignore-failed-read A/config.json A/tokenizer.json A/dvae.safetensors \
  A/transformer.safetensors A/reranker.safetensors A/train-all.json A/dvae.log.jsonl A/transformer.log.jsonl \
  A/reranker.log.jsonl A/eval A/eval-dvae 2>/dev/null
timeout $TC tools/gpu-check "$bin" $D --device "$dev" ${QUICK:-} --out "$out/check.json" >/tmp/check.log 2>&1
echo "check exit $? at $(( $(date +%s) - t0 ))s" >>/tmp/info.txt
pkill -f "nvidia-smi dmon" 2>/dev/null
for f in A E check; do tr '\r' '\n' </tmp/$f.log | grep -v '^\s*$' | grep -v '^\[.*\] \[' | tail -n 60 >/tmp/$f.tail; done
tar czf "$out/logs.tgz" -C /tmp --ignore-failed-read info.txt util.txt A.tail E.tail check.tail A.log 2>/dev/null
cat /tmp/info.txt; tail -n 12 /tmp/A.tail; tail -n 6 /tmp/E.tail; tail -n 5 /tmp/check.tail
ls -la "$out"
