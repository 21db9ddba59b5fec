#!/usr/bin/env bash
# After call.sh: compares what came back with the committed default model and, with --adopt,
# composes it into assets/models/default (A's config and dVAE, B's transformer and reranker,
# the logs under names of their own). Run from the repository root:
#   assets/experiments/next-gpu/adopt.sh FILES_DIR [--adopt]
# FILES_DIR holds A.tgz, B.tgz, logs.tgz and check.json as the call left them. Without --adopt
# nothing in the repository changes. After adopting: `tessera eval --model
# assets/models/default --captions 50 --samples 16 --out assets/models/default/eval` and
# `--captions 100 --samples 0 --out …/eval-dvae`, then the README's table and screenshot.
set -euo pipefail
files=${1:?usage: adopt.sh FILES_DIR [--adopt]}
adopt=${2:-}
D=assets/models/default
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for t in A B logs; do
  [ -f "$files/$t.tgz" ] || { echo "adopt.sh: $files/$t.tgz is missing" >&2; exit 1; }
  tar xzf "$files/$t.tgz" -C "$work"
done
python3 - "$work" "$D" <<'PY'
import json, os, sys
work, committed = sys.argv[1], sys.argv[2]
def load(path):
    try:
        return json.load(open(path))
    except (OSError, ValueError):
        return None
new_dvae, old_dvae = load(f"{work}/A/eval-dvae/report.json"), load(f"{committed}/eval-dvae/report.json")
print("dVAE round trips (ground truth through the dVAE), committed -> A:")
if new_dvae and old_dvae:
    for cap, v in sorted(old_dvae["dvae_roundtrip"].items()):
        print(f"  {cap:22} {100 * v:4.0f}% -> {100 * new_dvae['dvae_roundtrip'].get(cap, float('nan')):4.0f}%")
    print(f"  PSNR {old_dvae['dvae_psnr_db']:.2f} -> {new_dvae['dvae_psnr_db']:.2f} dB")
    by = new_dvae.get("dvae_single_object", {})
    if by:
        print("  A's single objects:", ", ".join(f"{k} {ok}/{n}" for k, (ok, n) in sorted(by.items())))
else:
    print("  (no report from A)")
for name, path in [("B (its transformer and reranker, the committed dVAE)", f"{work}/B/eval/report.json"),
                   ("C (A's dVAE, B's transformer and reranker)", f"{work}/C/eval/report.json"),
                   ("committed", f"{committed}/eval/report.json")]:
    r = load(path)
    if not r:
        print(f"{name}: no report")
        continue
    row = ", ".join(f"{cap} {100 * a['rerank_top1']:.0f}%" for cap, a in sorted(r["accuracy"].items()))
    print(f"{name}, top-1 seen ({r['captions']} captions): {row}")
train_all = load(f"{work}/B/train-all.json")
if train_all:
    print("B's plan:", json.dumps(train_all)[:400])
PY
[ "$adopt" = "--adopt" ] || { echo "(compare only: pass --adopt to compose the model into $D)"; exit 0; }
for f in A/config.json A/dvae.safetensors B/transformer.safetensors B/reranker.safetensors; do
  [ -s "$work/$f" ] || { echo "adopt.sh: $f did not come back; nothing adopted" >&2; exit 1; }
done
n=3
while [ -e "$D/logs/dvae-decoder-gpu$n.log.jsonl" ]; do n=$((n + 1)); done
cp "$work/A/config.json" "$work/A/dvae.safetensors" "$D/"
cp "$work/B/transformer.safetensors" "$work/B/reranker.safetensors" "$D/"
cp "$work/A/dvae-decoder.log.jsonl" "$D/logs/dvae-decoder-gpu$n.log.jsonl"
for f in transformer reranker; do
  [ -f "$work/B/$f.log.jsonl" ] && cp "$work/B/$f.log.jsonl" "$D/logs/$f-gpu$n.log.jsonl"
done
[ -f "$work/B/train-all.json" ] && cp "$work/B/train-all.json" "$D/logs/train-all-gpu$n.json"
ls -la "$D" "$D/logs"
echo "adopted as GPU run $n: now evaluate, then update README and TRAINING.md"
