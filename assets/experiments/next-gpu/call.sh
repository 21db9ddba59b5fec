#!/usr/bin/env bash
# One prepared device call (≤ 8 min) for the next session that has a GPU, issue 9 then issue 10.
# Two models are trained side by side on the one GPU (each `train all` leaves it mostly idle:
# TRAINING.md, sixth session), then both scored, then the speed check:
# (A) a whole new model of the `gpu-default` preset in one `train all` run: a dVAE of width 128
#     with 2,048 codes trained from scratch on the GPU's hundreds of thousands of pictures (the
#     committed encoder saw 38,400 on the CPU, and its codes lose shapes: TRAINING.md, twelfth
#     session), with the fourteenth session's recipe (squared error, β 1.65, the codebook-usage
#     term, straight-through on the encoder's argmax codes from the first step: on the CPU it
#     beat the paper's relaxation with a straight-through tail by 4.2 dB on the same pictures;
#     EXTRA_DVAE="--hard-tail 0.3" gives that recipe back), on the world drawn dense
#     (DVAE_DATA, default world-dense: from the same pictures single objects' round trips 84
#     against 69%, two objects' 60 against 46% on the CPU, nineteenth session); token shards; a transformer of d 288 × 6 from scratch
#     (other shapes than the committed one: `train all` says so and starts it afresh); the
#     committed tokenizer and reranker (same shapes) trained further (`--init-from`);
# (B) the default model's dVAE (CAND, default assets/models/default: since the twentieth session
#     the nineteenth session's D512g, trained on the world drawn dense on the CPU, its decoder
#     fine-tuned on in the twenty-sixth session: the same codes) kept as it is
#     (`--dvae-from`), the committed transformer (trained on its codes on the CPU for 4 h 27 min,
#     loss still falling) trained on for the whole budget (the dVAE stage is skipped and its
#     share goes to the transformer; the same codes, so nothing is carried over), the committed
#     reranker trained further on its pictures (`--init-from`);
#     each then scored (`eval`, 50 captions × 16 samples, at the committed model's sampling
#     settings, read from its config.json: EVAL_SAMPLING) with its dVAE's round trips
#     (`eval --samples 0`, 100 scenes per capability);
# (C) the speed check (`tools/gpu-check`) on the committed model, cut at TC seconds (it also
#     times the static decode steps' additive masks against boolean rows).
# Run from the repository root with the slim build in gpu/tessera:
#   OUT=... assets/experiments/next-gpu/call.sh
# To dry-run on a CPU: DEV=cpu, short budgets and PRESET=default (the preset's shapes are the
# committed model's, so it trains in seconds there; gpu-default's dVAE takes minutes a step).
# ARMS="A" or ARMS="B" runs one arm alone (its budget then has the GPU to itself).
# Then `assets/experiments/next-gpu/adopt.sh FILES_DIR` compares A and B with the committed model.
set -u
out=${OUT:?}
bin=${BIN:-gpu/tessera}
dev=${DEV:-cuda}
D=assets/models/default
CAND=${CAND:-$D}
TA=${TA:-300} TE=${TE:-80} TR=${TR:-30} TC=${TC:-60}
BA=${BA:-4m30s} BB=${BB:-4m30s}
ARMS=${ARMS:-A B}
DVAE_DATA=${DVAE_DATA:-world-dense}
# the committed model's own sampling settings, read from its config (absent: plain sampling)
EVAL_SAMPLING=${EVAL_SAMPLING:-$(python3 -c 'import json, sys
s = json.load(open(sys.argv[1])).get("sampling", {})
print(" ".join("--" + k.replace("_", "-") + " " + str(v) for k, v in s.items()))' "$D/config.json")}
export LD_LIBRARY_PATH="/opt/torch/.venv/lib/python3.12/site-packages/torch/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
t0=$(date +%s)
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; date; } >/tmp/info.txt 2>&1
nvidia-smi dmon -s u -c 30 -d 10 >/tmp/util.txt 2>&1 &
dmon=$!

# arm NAME train-all-flags...: trains /tmp/NAME, scores it, packs $out/NAME.tgz
arm() {
  local name=$1
  shift
  rm -rf "/tmp/$name"
  timeout $TA "$bin" train all --dir "/tmp/$name" --init-from $D --device "$dev" --eval-captions 0 "$@" \
    >"/tmp/$name.log" 2>&1
  echo "$name train exit $? at $(( $(date +%s) - t0 ))s" >>/tmp/info.txt
  # every arm scored with the committed model's sampling settings (a preset's own are plain)
  timeout $TE "$bin" eval --model "/tmp/$name" --captions ${EVAL_A:-50} --samples 16 --device "$dev" \
    $EVAL_SAMPLING --out "/tmp/$name/eval" >"/tmp/E$name.log" 2>&1
  echo "$name eval exit $? at $(( $(date +%s) - t0 ))s" >>/tmp/info.txt
  timeout $TR "$bin" eval --model "/tmp/$name" --captions ${EVAL_R:-100} --samples 0 --device "$dev" \
    --out "/tmp/$name/eval-dvae" >>"/tmp/E$name.log" 2>&1
  echo "$name round trips exit $? at $(( $(date +%s) - t0 ))s" >>/tmp/info.txt
  tar czf "$out/$name.tgz" -C /tmp --ignore-failed-read $name/config.json $name/tokenizer.json \
    $name/dvae.safetensors $name/transformer.safetensors $name/reranker.safetensors $name/train-all.json \
    $name/dvae.log.jsonl $name/transformer.log.jsonl $name/reranker.log.jsonl $name/eval $name/eval-dvae 2>/dev/null
}

pids=()
n_arms=$(wc -w <<<"$ARMS")
workers=$(( 15 / n_arms ))
for a in $ARMS; do
  case $a in
    A) arm A --preset ${PRESET:-gpu-default} --budget "$BA" --recon mse --beta 1.65 --usage-weight 1 \
         ${EXTRA_DVAE:---hard-tail 1 --argmax-codes} --dvae-data "$DVAE_DATA" --workers ${WA:-$workers} \
         ${EXTRA_A:-} & ;;
    B) arm B --dvae-from "$CAND" --budget "$BB" --workers ${WB:-$workers} ${EXTRA_B:-} & ;;
    *) echo "unknown arm $a" >>/tmp/info.txt; continue ;;
  esac
  pids+=($!)
done
wait "${pids[@]}"
timeout $TC tools/gpu-check "$bin" $D --device "$dev" ${QUICK:-} --out "$out/check.json" >/tmp/check.log 2>&1
echo "check exit $? at $(( $(date +%s) - t0 ))s" >>/tmp/info.txt
kill $dmon 2>/dev/null
tails=()
for f in A EA B EB check; do
  [ -f /tmp/$f.log ] || continue
  tr '\r' '\n' </tmp/$f.log | grep -v '^\s*$' | grep -v '^\[.*\] \[' | tail -n 60 >/tmp/$f.tail
  tails+=($f.tail)
done
tar czf "$out/logs.tgz" -C /tmp --ignore-failed-read info.txt util.txt "${tails[@]}" A.log B.log 2>/dev/null
cat /tmp/info.txt
for f in "${tails[@]}"; do echo "== $f"; tail -n 8 "/tmp/$f"; done
ls -la "$out"
