#!/usr/bin/env bash
# One GPU, one call: identical sequences embedded once. A 100,000-row FASTA of the reference's
# length mix where 30 % of rows repeat an earlier row's sequence, embedded with the 650M shape
# (random weights) with reuse (the default) and with --no-reuse; the outputs must be bitwise
# equal. Also the dry run's plan of the same job (its estimates against the real run) and the
# GPU's memory in use, sampled during the reuse run. Everything lands in $OUT/results.tgz.
set -u
E="bash .gpu/run.sh esmbed"
R=$OUT/r; mkdir -p $R
rm -rf /tmp/reuse.parquet /tmp/no_reuse.parquet /tmp/warm.parquet /tmp/.reuse.parquet.esmbed /tmp/.no_reuse.parquet.esmbed
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpu.txt
export TORCH_BASELINE_DIR=.gpu
python bench/make_synthetic.py fasta 100000 /tmp/rep.fasta.gz 0.3
A="/tmp/rep.fasta.gz --model random:650M --device cuda --no-progress --json"
timeout 120 $E embed $A -o /tmp/reuse.parquet --dry-run > $R/dry_run.json 2> $R/dry_run.log
timeout 120 $E embed ${A% --json} -o /tmp/reuse.parquet --dry-run > $R/dry_run.txt 2>> $R/dry_run.log
# A first CUDA run JIT-compiles kernels (~14 s on a fresh machine): warm the cache first, so the
# two timed runs pay the same.
zcat /tmp/rep.fasta.gz | head -4000 > /tmp/warm.fasta
timeout 120 $E embed /tmp/warm.fasta --model random:650M --device cuda --no-progress -o /tmp/warm.parquet 2> $R/warm.log
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > $R/memory_used.txt &
SMI=$!
timeout 200 $E embed $A -o /tmp/reuse.parquet > $R/reuse.json 2> $R/reuse.log
kill $SMI
timeout 240 $E embed $A -o /tmp/no_reuse.parquet --no-reuse > $R/no_reuse.json 2> $R/no_reuse.log
ls -l /tmp/reuse.parquet /tmp/no_reuse.parquet > $R/sizes.txt
python - <<'PY' > $R/compare.txt 2>&1
import hashlib, json, sys
try:
    import pyarrow.parquet as pq
    a, b = pq.read_table("/tmp/reuse.parquet"), pq.read_table("/tmp/no_reuse.parquet")
    print("rows", a.num_rows, b.num_rows, "equal", a.equals(b))
except ImportError:
    print("no pyarrow: comparing the files' bytes")
    h = [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in ("/tmp/reuse.parquet", "/tmp/no_reuse.parquet")]
    print("sha256", h, "equal", h[0] == h[1])
PY
tar czf $OUT/results.tgz -C $R .
cat $R/gpu.txt; cat $R/dry_run.txt; cat $R/compare.txt; cat $R/sizes.txt
python -c "
import json
d=json.load(open('$R/dry_run.json')); r=json.load(open('$R/reuse.json')); n=json.load(open('$R/no_reuse.json'))
print('dry run: rows', d['rows'], 'distinct', d['distinct'], 'tokens', d['tokens'], 'packs', d['packs'], 'bytes', d['output_bytes'], 'memory', d['memory'], 'est s', d['estimated_seconds'])
print('reuse:    rows', r['rows'], 'distinct', r['distinct'], 'reused', r['reused'], 'tokens', r['tokens'], 'packs', r['packs'], 's', round(r['seconds'],2), 'busy', round(r['model_busy_seconds'],2))
print('no-reuse: rows', n['rows'], 'tokens', n['tokens'], 'packs', n['packs'], 's', round(n['seconds'],2), 'busy', round(n['model_busy_seconds'],2))
print('speed-up', round(n['seconds']/r['seconds'],3))
"
sort -n $R/memory_used.txt | tail -1 | sed 's/^/peak MiB used /'
tail -3 $R/reuse.log
