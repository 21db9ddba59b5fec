#!/usr/bin/env bash
# One prepared device call (≤ 8 min) for the next session that has a GPU, issue 9 then issue 10:
# (A) the committed dVAE's decoder grown (deeper and wider: `--decoder-blocks`, `--decoder-hidden`;
#     training's --dtype is now auto, so bf16 on the GPU: pass EXTRA_A="--dtype f32" to compare)
#     and fine-tuned on its encoder's hard codes — tokens unchanged, so the committed transformer
#     stays valid — then round trips scored (`eval --samples 0`);
# (B) at the same time the transformer and reranker trained further on those same codes
#     (`train all --dvae-from D --init-from D`), evaluated inside `train all`;
# then the two composed (A's config and dVAE, B's transformer and reranker) and evaluated;
# (C) the speed check (`tools/gpu-check`) on the committed model, cut at TC seconds; (D) the
#     S decode step with additive against boolean static masks.
# Run from the repository root with the slim build in gpu/tessera:
#   OUT=... assets/experiments/next-gpu/call.sh        (DEV=cpu and short budgets to dry-run)
set -u
out=${OUT:?}
bin=${BIN:-gpu/tessera}
dev=${DEV:-cuda}
D=assets/models/default
TA=${TA:-300} TB=${TB:-300} TC=${TC:-75} TD=${TD:-40}
BA=${BA:-4m} BB=${BB:-4m10s}
# the committed decoder is width 96 with 2 blocks per group (eleventh session): grow it wider
GROW=${GROW:---decoder-blocks 2 --decoder-hidden 128}
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib
t0=$(date +%s)
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; date; } >/tmp/info.txt 2>&1
rm -rf /tmp/A /tmp/B /tmp/bench-*.jsonl /tmp/bench.err && mkdir -p /tmp/A
cp $D/{config.json,tokenizer.json,dvae.safetensors,transformer.safetensors,reranker.safetensors} /tmp/A/
( timeout $TA "$bin" train dvae --dir /tmp/A --decoder-only $GROW --recon mse --time "$BA" --batch ${BATCH_A:-256} \
    --lr ${LR_A:-3e-4} --lr-end 1e-5 --checkpoint-every ${CK_A:-500} --sample-every 0 --workers ${WA:-5} --device "$dev" \
    --bf16-weights ${EXTRA_A:-}
  echo "A train exit $? at $(( $(date +%s) - t0 ))s" >>/tmp/info.txt
  timeout 60 "$bin" eval --model /tmp/A --captions ${EVAL_A:-100} --samples 0 --device "$dev" --out /tmp/A/eval-dvae
  echo "A eval exit $? at $(( $(date +%s) - t0 ))s" >>/tmp/info.txt ) >/tmp/A.log 2>&1 &
pa=$!
timeout $TB "$bin" train all --dir /tmp/B --dvae-from $D --init-from $D --budget "$BB" --device "$dev" \
  --workers ${WB:-10} --eval-captions ${EVAL_B:-50} --eval-samples 16 ${EXTRA_B:-} >/tmp/B.log 2>&1 &
pb=$!
nvidia-smi dmon -s u -c 30 -d 10 >/tmp/util.txt 2>&1 &
wait $pa
wait $pb; echo "B exit $? at $(( $(date +%s) - t0 ))s" >>/tmp/info.txt
mkdir -p /tmp/C && cp /tmp/A/{config.json,tokenizer.json,dvae.safetensors} /tmp/C/ &&
  cp /tmp/B/{transformer.safetensors,reranker.safetensors} /tmp/C/ &&
  timeout 70 "$bin" eval --model /tmp/C --captions ${EVAL_C:-50} --samples 16 --device "$dev" --out /tmp/C/eval >/tmp/C.log 2>&1
echo "C eval exit $? at $(( $(date +%s) - t0 ))s" >>/tmp/info.txt
tar czf "$out/A.tgz" -C /tmp --ignore-failed-read A/dvae.safetensors A/config.json A/dvae-decoder.log.jsonl A/eval-dvae 2>/dev/null
tar czf "$out/B.tgz" -C /tmp --ignore-failed-read B/transformer.safetensors B/reranker.safetensors B/train-all.json \
  B/transformer.log.jsonl B/reranker.log.jsonl B/eval B/config.json C/eval 2>/dev/null
timeout $TC tools/gpu-check "$bin" $D --device "$dev" ${QUICK:-} --out "$out/check.json" >/tmp/check.log 2>&1
echo "check exit $? at $(( $(date +%s) - t0 ))s" >>/tmp/info.txt
# (D) the decode step with the static masks as an additive bias over an aligned cache (the
# default) against boolean rows over an unpadded cache, interleaved, in bf16 at batch 4
timeout $TD bash -c 'for m in add bool add; do
    [ $m = bool ] && export TESSERA_STATIC_MASKS=bool || unset TESSERA_STATIC_MASKS
    "$0" bench --device "$1" --dtype bf16 --configs S --runs 3 >>/tmp/bench-$m.jsonl 2>>/tmp/bench.err; done' "$bin" "$dev"
echo "bench pair exit $? at $(( $(date +%s) - t0 ))s" >>/tmp/info.txt
pkill -f "nvidia-smi dmon" 2>/dev/null
for f in A B C check; do tr '\r' '\n' </tmp/$f.log | grep -v '^\s*$' | grep -v '^\[.*\] \[' | tail -n 60 >/tmp/$f.tail; done
tar czf "$out/logs.tgz" -C /tmp --ignore-failed-read info.txt util.txt A.tail B.tail C.tail check.tail A.log B.log \
  bench-add.jsonl bench-bool.jsonl bench.err 2>/dev/null
cat /tmp/info.txt; tail -n 8 /tmp/A.tail; tail -n 12 /tmp/B.tail; tail -n 12 /tmp/C.tail; tail -n 5 /tmp/check.tail
ls -la "$out"
