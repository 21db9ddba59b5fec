#!/usr/bin/env bash
# After call.sh: compares the models that came back (A: a whole `gpu-default` model; B: the
# CPU-trained candidate dVAE with the committed transformer carried over to its codes and
# trained on the GPU) with the committed default model and, with --adopt A or --adopt B, makes
# one of them the default model (config, tokenizer and weights; its logs, plan and reports
# under names of their own). Run from the repository root:
#   assets/experiments/next-gpu/adopt.sh FILES_DIR [--adopt A|B]
# FILES_DIR holds A.tgz and/or B.tgz, logs.tgz and check.json as the call left them. Without
# --adopt nothing in the repository changes. Adopt only a model that scores better where it
# counts (top-1 of the issue's capabilities, held-out pairs included). After adopting: the
# model's `sampling` settings (the committed model's temperature 0.8 and guidance 1.5 were chosen
# by evaluation, and the call scored both arms with them: an adopted config.json without a
# `sampling` section gets them; re-check them), then `tessera eval --model assets/models/default --captions 50 --samples 16
# --out …/eval` and `--captions 100 --samples 0 --out …/eval-dvae` if the call's did not
# finish, the README's table and screenshot, TRAINING.md. B's dVAE is the committed one
# (D512g since the twentieth session: the grown decoder, width 96, 2 blocks per group);
# A's keeps its preset's, and a decoder-only fine-tune changes no code, so the transformer
# stays valid (`train dvae --decoder-only`, fifteenth and nineteenth sessions).
set -euo pipefail
files=${1:?usage: adopt.sh FILES_DIR [--adopt A|B]}
adopt=${2:-}
pick=${3:-}
D=assets/models/default
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
[ -f "$files/logs.tgz" ] && tar xzf "$files/logs.tgz" -C "$work"
arms=()
for t in A B; do
  [ -f "$files/$t.tgz" ] && tar xzf "$files/$t.tgz" -C "$work" && arms+=("$t")
done
[ ${#arms[@]} -gt 0 ] || { echo "adopt.sh: neither A.tgz nor B.tgz is in $files" >&2; exit 1; }
python3 - "$work" "$D" "${arms[@]}" <<'PY'
import json, sys
work, committed, arms = sys.argv[1], sys.argv[2], sys.argv[3:]
def load(path):
    try:
        return json.load(open(path))
    except (OSError, ValueError):
        return None
old_dvae = load(f"{committed}/eval-dvae/report.json")
for arm in arms:
    new_dvae = load(f"{work}/{arm}/eval-dvae/report.json")
    print(f"dVAE round trips (ground truth through the dVAE), committed -> {arm}:")
    if new_dvae and old_dvae:
        for cap, v in sorted(old_dvae["dvae_roundtrip"].items()):
            print(f"  {cap:22} {100 * v:4.0f}% -> {100 * new_dvae['dvae_roundtrip'].get(cap, float('nan')):4.0f}%")
        print(f"  PSNR {old_dvae['dvae_psnr_db']:.2f} -> {new_dvae['dvae_psnr_db']:.2f} dB")
        by = new_dvae.get("dvae_single_object", {})
        if by:
            print(f"  {arm}'s single objects:", ", ".join(f"{k} {ok}/{n}" for k, (ok, n) in sorted(by.items())))
    else:
        print(f"  (no round-trip report from {arm})")
for name, path in [(a, f"{work}/{a}/eval/report.json") for a in arms] + [("committed", f"{committed}/eval/report.json")]:
    r = load(path)
    if not r:
        print(f"{name}: no report")
        continue
    for split in ["accuracy", "held_out"]:
        row = ", ".join(f"{cap} {100 * a['rerank_top1']:.0f}%" for cap, a in sorted(r.get(split, {}).items()))
        print(f"{name}, top-1 {split} ({r['captions']} captions): {row}")
for arm in arms:
    plan = load(f"{work}/{arm}/train-all.json")
    if plan:
        for s in plan.get("stages", []):
            print(f"  {arm} stage {s['name']}: {s.get('seconds', 0):.0f}s of {s.get('planned_s', 0):.0f}s planned, {json.dumps(s.get('result'))[:300]}")
PY
[ "$adopt" = "--adopt" ] || { echo "(compare only: pass --adopt A or --adopt B to make one the default model in $D)"; exit 0; }
case $pick in A | B) ;; *) echo "adopt.sh: --adopt takes A or B" >&2; exit 1 ;; esac
for f in config.json tokenizer.json dvae.safetensors transformer.safetensors reranker.safetensors; do
  [ -s "$work/$pick/$f" ] || { echo "adopt.sh: $pick/$f did not come back; nothing adopted" >&2; exit 1; }
done
n=3
while [ -e "$D/logs/train-all-gpu$n.json" ]; do n=$((n + 1)); done
old_sampling=$(python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1])).get("sampling", {})))' "$D/config.json")
cp "$work/$pick"/{config.json,tokenizer.json,dvae.safetensors,transformer.safetensors,reranker.safetensors} "$D/"
# the sampling settings the arms were scored with (the committed model's), unless the arm has its own
python3 - "$D/config.json" "$old_sampling" <<'PY'
import json, sys
path, old = sys.argv[1], json.loads(sys.argv[2])
cfg = json.load(open(path))
if old and not cfg.get("sampling"):
    cfg["sampling"] = old
    json.dump(cfg, open(path, "w"), indent=2)
    print(f"sampling settings kept from the previous model: {old}")
PY
for f in dvae transformer reranker; do
  [ -f "$work/$pick/$f.log.jsonl" ] && cp "$work/$pick/$f.log.jsonl" "$D/logs/$f-gpu$n.log.jsonl"
done
cp "$work/$pick/train-all.json" "$D/logs/train-all-gpu$n.json"
for r in eval eval-dvae; do
  [ -f "$work/$pick/$r/report.json" ] && rm -rf "${D:?}/$r" && cp -r "$work/$pick/$r" "$D/$r"
done
ls -la "$D" "$D/logs"
echo "adopted $pick as GPU run $n: now check the sampling settings, the README and TRAINING.md"
