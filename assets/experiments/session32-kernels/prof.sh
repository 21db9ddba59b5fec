#!/bin/bash
# Profiles P sampling with call stacks (perf, dwarf unwinding) and attributes the main thread's samples
# to the innermost tessera frame; agg2.py restricts them to the sampling loop. Needs perf.
# prof.sh BIN BATCH OUT: dwarf profile of 4 s of P sampling at BATCH, main thread attributed
B=$1; SB=$2; O=$3
($B bench --configs P --sample-batch $SB --train-batch 0 --runs ${RUNS:-1} > /dev/null 2>&1 &)
sleep ${DELAY:-1.5}; P=$(pgrep -f "bench --configs P --sample-batch $SB" | head -1)
timeout 200 perf record -F 250 --call-graph dwarf,8192 -p $P -o $O.data -- sleep ${DUR:-2.5} > /dev/null 2>&1
kill $P 2>/dev/null
timeout 600 perf script -i $O.data -F tid,ip,sym --no-inline 2>/dev/null > $O.script
python3 "$(dirname "$0")/agg2.py" $O.script 30 all
