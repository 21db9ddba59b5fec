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
python3 - $O.script <<'PY'
import collections,re,sys
samples=[];cur=None
for line in open(sys.argv[1],errors='replace'):
    line=line.rstrip('\n')
    if not line.strip():
        if cur: samples.append(cur); cur=None
        continue
    if not line.startswith('\t') and not line.startswith(' '*4):
        cur={'tid':line.split()[0],'frames':[]}
    else:
        p=line.strip().split(None,1); cur['frames'].append(p[1] if len(p)>1 else '?')
tids=sorted(set(s['tid'] for s in samples))
main=[s for s in samples if s['tid']==tids[0]]
def short(s): return re.sub(r'\(.*','',s)[:60]
c=collections.Counter(); c2=collections.Counter()
for s in main:
    fr=s['frames']
    tes=[f for f in fr if f.startswith('tessera::')]
    if not tes: c['? '+short(fr[0])]+=1; continue
    op='-'
    for f in fr:
        if f.startswith('tessera::'): break
        if 'tch::wrappers' in f: op=re.sub(r'.*>::','',f)[:30]
    c[short(tes[0])+' | '+op]+=1
    # outermost interesting tessera frame below run/decode_step
    c2[short(tes[0])]+=1
tot=len(main)
print("main samples",tot)
for k,v in c.most_common(30): print("%5.1f%% %s"%(100*v/tot,k))
PY
