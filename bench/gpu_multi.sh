#!/usr/bin/env bash
# Several GPUs of one host, in one run (issues: all GPUs of a host, scaling on 4/8 GPUs, SQL):
#  - esmbed bench, 650M and 3B, on 1, 2, 4 (8) GPUs: throughput, per-GPU busy %;
#  - esmbed embed of 20,000 synthetic sequences on one GPU and on every GPU: identical outputs?
#  - the same rows through esmbed sql (COPY ... esm_embed ...) on one GPU: throughput vs embed.
# Run from the repository root on the GPU machine with OUT set; .gpu/ holds the packed esmbed and
# torch_baseline.py (for the synthetic lengths).
set -u
E="bash .gpu/run.sh esmbed"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
N=$(nvidia-smi -L | wc -l)
TORCH_BASELINE_DIR=.gpu python bench/make_synthetic.py fasta 20000 /tmp/syn20k.fasta.gz

sets="cuda:0"
[ "$N" -ge 2 ] && sets="$sets cuda:0,1"
[ "$N" -ge 4 ] && sets="$sets cuda:0,1,2,3"
[ "$N" -ge 8 ] && sets="$sets cuda:0,1,2,3,4,5,6,7"
for devs in $sets; do
  timeout 150 $E bench --shape 650M --device $devs -n ${N650:-24000} --method packed --json 2>>$OUT/bench.log | tee -a $OUT/scaling.jsonl
  timeout 200 $E bench --shape 3B --device $devs -n ${N3B:-12000} --method packed --json 2>>$OUT/bench.log | tee -a $OUT/scaling.jsonl
done

J="--model random:650M --no-progress --json"
timeout 150 $E embed /tmp/syn20k.fasta.gz -o /tmp/one.parquet $J --device cuda:0 > $OUT/embed_1gpu.json 2> $OUT/embed_1gpu.log
timeout 150 $E embed /tmp/syn20k.fasta.gz -o /tmp/all.parquet $J --device cuda > $OUT/embed_all.json 2> $OUT/embed_all.log
tail -4 $OUT/embed_1gpu.log $OUT/embed_all.log
Q="CREATE EXTERNAL TABLE p STORED AS FASTA LOCATION '/tmp/syn20k.fasta.gz';
   COPY (SELECT id, esm_embed(sequence) AS embedding FROM p) TO '/tmp/sql.parquet' STORED AS PARQUET"
timeout 150 $E sql --model random:650M --device cuda:0 -c "$Q" > $OUT/sql_1gpu.txt 2> $OUT/sql_1gpu.log
tail -3 $OUT/sql_1gpu.log
python - <<'PY' | tee $OUT/compare.txt
import numpy as np, pyarrow.parquet as pq
def load(p):
    t = pq.read_table(p, columns=["id", "embedding"])
    e = t.column("embedding").combine_chunks()
    return t.column("id").to_pylist(), e.values.to_numpy(zero_copy_only=False).reshape(len(t), -1)
ids1, e1 = load("/tmp/one.parquet")
idsa, ea = load("/tmp/all.parquet")
ids_s, es = load("/tmp/sql.parquet")
print("one GPU vs every GPU: same ids in order:", ids1 == idsa, "| bitwise-identical embeddings:", np.array_equal(e1, ea),
      "| max abs diff:", float(np.abs(e1 - ea).max()))
order = {k: i for i, k in enumerate(ids_s)}
es = es[[order[k] for k in ids1]]
cos = (e1 * es).sum(1) / np.linalg.norm(e1, axis=1) / np.linalg.norm(es, axis=1)
print("sql vs embed (one GPU): rows", len(ids_s), "| min cosine", float(cos.min()), "| max abs diff", float(np.abs(e1 - es).max()))
PY
