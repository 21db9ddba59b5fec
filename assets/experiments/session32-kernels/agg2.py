# agg2.py SCRIPT [N] [all]: perf script output (tid, ip, sym) → main-thread samples by innermost
# tessera frame and the tch op under it.
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
# the sampling loop's samples, or every main-thread sample with a third argument 'all'
samp=main if sys.argv[3:] == ['all'] else [s for s in main if any('Sampler::run' in f or 'Sampler::step' in f for f in s['frames'])]
def short(s): return re.sub(r'\(.*','',s)[:60]
c=collections.Counter()
for s in samp:
    fr=s['frames']
    tes=[f for f in fr if f.startswith('tessera::')] or ['? '+(fr[0] if fr else '')]
    op='-'
    for f in fr:
        if f.startswith('tessera::'): break
        if 'tch::wrappers' in f: op=re.sub(r'.*>::','',f)[:30]
    c[short(tes[0])+' | '+op]+=1
print("main",len(main),"in sampling",len(samp))
for k,v in c.most_common(int(sys.argv[2]) if len(sys.argv)>2 else 25): print("%5.1f%% %s"%(100*v/len(samp),k))
