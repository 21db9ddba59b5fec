#!/bin/bash
# The app's own diagnostics (one 8-sample job on the embedded default model, 1 libtorch
# thread, guided, under a virtual display), binaries alternating. Usage: app.sh OUT_DIR BIN...
set -u
OUT=$1; shift; mkdir -p "$OUT"
for round in 1 2; do
  for bin in "$@"; do
    name=$(basename "$bin")
    xvfb-run -a -s "-screen 0 1400x900x24" "$bin" app --diagnostics "$OUT/$name-$round.json" > /dev/null 2>&1
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], sys.argv[3], 'tokens/s %.0f, job %.2f s, first preview %.2f s, cancel %.0f ms' % (d['tokens_per_s'], d['job_seconds'], d['first_preview_s'], d['cancel_ack_ms']))" "$OUT/$name-$round.json" "$name" $round
  done
done
