#!/usr/bin/env bash
# After call.sh: compares the model that came back (A: a whole `gpu-default` model) with the
# committed default model and, with --adopt, makes it the default model (config, tokenizer and
# weights; its logs, plan and reports under names of their own). Run from the repository root:
#   assets/experiments/next-gpu/adopt.sh FILES_DIR [--adopt]
# FILES_DIR holds A.tgz, logs.tgz and check.json as the call left them. Without --adopt nothing
# in the repository changes. Adopt only a model that scores better where it counts (top-1 of
# the issue's capabilities, held-out pairs included). After adopting: the model's `sampling`
# settings (the committed model's temperature 0.8 was chosen by evaluation: re-check it), then
# `tessera eval --model assets/models/default --captions 50 --samples 16 --out …/eval` and
# `--captions 100 --samples 0 --out …/eval-dvae` if the call's did not finish, the README's
# table and screenshot, TRAINING.md.
set -euo pipefail
files=${1:?usage: adopt.sh FILES_DIR [--adopt]}
adopt=${2:-}
D=assets/models/default
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for t in A logs; do
  [ -f "$files/$t.tgz" ] || { echo "adopt.sh: $files/$t.tgz is missing" >&2; exit 1; }
  tar xzf "$files/$t.tgz" -C "$work"
done
python3 - "$work" "$D" <<'PY'
import json, sys
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
    print("  (no round-trip report from A)")
for name, path in [("A", f"{work}/A/eval/report.json"), ("committed", f"{committed}/eval/report.json")]:
    r = load(path)
    if not r:
        print(f"{name}: no report")
        continue
    for split in ["accuracy", "held_out"]:
        row = ", ".join(f"{cap} {100 * a['rerank_top1']:.0f}%" for cap, a in sorted(r.get(split, {}).items()))
        print(f"{name}, top-1 {split} ({r['captions']} captions): {row}")
plan = load(f"{work}/A/train-all.json")
if plan:
    for s in plan.get("stages", []):
        print(f"  stage {s['name']}: {s.get('seconds', 0):.0f}s of {s.get('planned_s', 0):.0f}s planned, {json.dumps(s.get('result'))[:300]}")
PY
[ "$adopt" = "--adopt" ] || { echo "(compare only: pass --adopt to make A the default model in $D)"; exit 0; }
for f in config.json tokenizer.json dvae.safetensors transformer.safetensors reranker.safetensors; do
  [ -s "$work/A/$f" ] || { echo "adopt.sh: A/$f did not come back; nothing adopted" >&2; exit 1; }
done
n=3
while [ -e "$D/logs/train-all-gpu$n.json" ]; do n=$((n + 1)); done
cp "$work"/A/{config.json,tokenizer.json,dvae.safetensors,transformer.safetensors,reranker.safetensors} "$D/"
for f in dvae transformer reranker; do
  [ -f "$work/A/$f.log.jsonl" ] && cp "$work/A/$f.log.jsonl" "$D/logs/$f-gpu$n.log.jsonl"
done
cp "$work/A/train-all.json" "$D/logs/train-all-gpu$n.json"
for r in eval eval-dvae; do
  [ -f "$work/A/$r/report.json" ] && rm -rf "${D:?}/$r" && cp -r "$work/A/$r" "$D/$r"
done
ls -la "$D" "$D/logs"
echo "adopted as GPU run $n: now check the sampling settings, the README and TRAINING.md"
