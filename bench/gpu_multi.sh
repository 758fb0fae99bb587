#!/usr/bin/env bash
# Several GPUs of one host, in one run (issues: all GPUs of a host, scaling on 4/8 GPUs, SQL):
#  - esmbed bench, 650M and 3B, on 1, 2, 4 (8) GPUs: throughput, per-GPU busy %;
#  - esmbed embed of 20,000 synthetic sequences on one GPU and on every GPU: identical outputs?
#  - the same rows through esmbed sql (COPY ... esm_embed ...) on one GPU: throughput vs embed.
# Run from the repository root on the GPU machine with OUT set; .gpu/ holds the packed esmbed and
# torch_baseline.py (for the synthetic lengths). Every step has a watchdog that records thread
# states if it hangs.
set -u
E="bash .gpu/run.sh esmbed"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
N=$(nvidia-smi -L | wc -l)

# watch NAME SECONDS CMD...: run CMD (stdout to $OUT/NAME.out, stderr to $OUT/NAME.log); on
# timeout dump the state of its threads to $OUT/NAME.hang and kill it. Returns CMD's status.
watch() {
  local name=$1 limit=$2; shift 2
  "$@" > $OUT/$name.out 2> $OUT/$name.log &
  local pid=$! t=0
  while kill -0 $pid 2>/dev/null && [ $t -lt $limit ]; do sleep 1; t=$((t+1)); done
  if kill -0 $pid 2>/dev/null; then
    for p in $(pgrep -P $pid) $pid $(pgrep -f "esmbed-bin|/esmbed " ); do
      echo "== $p $(cat /proc/$p/cmdline | tr '\0' ' ' | cut -c1-120)"
      for t in /proc/$p/task/*; do echo "$(basename $t) $(cat $t/comm) $(awk '{print $3}' $t/stat) $(cat $t/wchan)"; done
    done > $OUT/$name.hang 2>&1
    nvidia-smi >> $OUT/$name.hang 2>&1
    pkill -9 -P $pid; kill -9 $pid; pkill -9 -f "esmbed" ; sleep 2
    echo "$name: TIMEOUT after ${limit}s" | tee -a $OUT/summary.txt
    return 124
  fi
  wait $pid; local rc=$?
  echo "$name: rc=$rc ${t}s" | tee -a $OUT/summary.txt
  return $rc
}

# A quick two-GPU check first: stop early (and keep the device budget) if it fails.
watch quick2 100 $E bench --shape 650M --device cuda:0,1 -n 3000 --method packed --json || exit 1
cat $OUT/quick2.out

TORCH_BASELINE_DIR=.gpu python bench/make_synthetic.py fasta 20000 /tmp/syn20k.fasta.gz
sets="cuda:0"
[ "$N" -ge 2 ] && sets="$sets cuda:0,1"
[ "$N" -ge 4 ] && sets="$sets cuda:0,1,2,3"
[ "$N" -ge 8 ] && sets="$sets cuda:0,1,2,3,4,5,6,7"
for devs in $sets; do
  k=$(echo $devs | tr -cd ',' | wc -c); k=$((k+1))
  watch bench650M_$k 120 $E bench --shape 650M --device $devs -n ${N650:-16000} --method packed --json && cat $OUT/bench650M_$k.out >> $OUT/scaling.jsonl
  watch bench3B_$k 150 $E bench --shape 3B --device $devs -n ${N3B:-8000} --method packed --json && cat $OUT/bench3B_$k.out >> $OUT/scaling.jsonl
done

J="--model random:650M --no-progress --json"
watch embed_1gpu 120 $E embed /tmp/syn20k.fasta.gz -o /tmp/one.parquet $J --device cuda:0
watch embed_all 120 $E embed /tmp/syn20k.fasta.gz -o /tmp/all.parquet $J --device cuda
tail -4 $OUT/embed_1gpu.log $OUT/embed_all.log
Q="CREATE EXTERNAL TABLE p STORED AS FASTA LOCATION '/tmp/syn20k.fasta.gz';
   COPY (SELECT id, esm_embed(sequence) AS embedding FROM p) TO '/tmp/sql.parquet' STORED AS PARQUET"
watch sql_1gpu 120 $E sql --model random:650M --device cuda:0 -c "$Q"
tail -3 $OUT/sql_1gpu.log
python - <<'PY' | tee $OUT/compare.txt
import numpy as np, pyarrow.parquet as pq
def load(p):
    t = pq.read_table(p, columns=["id", "embedding"])
    e = t.column("embedding").combine_chunks()
    return t.column("id").to_pylist(), e.values.to_numpy(zero_copy_only=False).reshape(len(t), -1)
ids1, e1 = load("/tmp/one.parquet")
idsa, ea = load("/tmp/all.parquet")
print("one GPU vs every GPU: same ids in order:", ids1 == idsa, "| bitwise-identical embeddings:", np.array_equal(e1, ea),
      "| max abs diff:", float(np.abs(e1 - ea).max()))
ids_s, es = load("/tmp/sql.parquet")
order = {k: i for i, k in enumerate(ids_s)}
es = es[[order[k] for k in ids1]]
cos = (e1 * es).sum(1) / np.linalg.norm(e1, axis=1) / np.linalg.norm(es, axis=1)
print("sql vs embed (one GPU): rows", len(ids_s), "| min cosine", float(cos.min()), "| max abs diff", float(np.abs(e1 - es).max()))
PY
