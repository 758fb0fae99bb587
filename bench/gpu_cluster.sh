#!/usr/bin/env bash
# The cluster on GPUs, in one call (issue: a cluster of GPU machines): 20,000 synthetic sequences
# (650M shape, bf16) as 8 Parquet files, COPY ... esm_embed ... TO a directory
#  - locally: esmbed sql on every GPU of the host (one process, one device pool);
#  - through a cluster on loopback: a scheduler and one executor per GPU (CUDA_VISIBLE_DEVICES), the
#    same query from esmbed sql --cluster;
# tokens/s of each, per GPU, and the outputs compared (same ids, cosines). Results in $OUT.
# Run from the repository root on the GPU machine; .gpu/ holds the packed esmbed and
# torch_baseline.py.
set -u
E="bash .gpu/run.sh esmbed"
PY=/opt/torch/.venv/bin/python
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/gpu.txt
N=$(nvidia-smi -L | wc -l)
TORCH_BASELINE_DIR=.gpu $PY bench/make_synthetic.py fasta 20000 /tmp/syn20k.fasta.gz
$PY - <<'PY'
import gzip, pyarrow as pa, pyarrow.parquet as pq, os
ids, seqs = [], []
with gzip.open("/tmp/syn20k.fasta.gz", "rt") as f:
    for line in f:
        line = line.strip()
        if line.startswith(">"): ids.append(line[1:].split()[0]); seqs.append("")
        else: seqs[-1] += line
os.makedirs("/tmp/in", exist_ok=True)
k = len(ids) // 8
for p in range(8):
    sl = slice(p * k, None if p == 7 else (p + 1) * k)
    pq.write_table(pa.table({"id": ids[sl], "sequence": seqs[sl]}), f"/tmp/in/p{p}.parquet")
print("tokens", sum(len(s) + 2 for s in seqs), "rows", len(ids))
PY
TOKENS=$($PY -c "import pyarrow.parquet as pq; t=pq.read_table('/tmp/in'); print(sum(len(s)+2 for s in t.column('sequence').to_pylist()))")
DEVS=$(seq -s, 0 $((N-1)))
Q() { echo "CREATE EXTERNAL TABLE p STORED AS PARQUET LOCATION '/tmp/in/';
  COPY (SELECT id, esm_embed(sequence) AS embedding FROM p) TO '$1' STORED AS PARQUET"; }
now() { date +%s.%N; }
calc() { $PY -c "print(round($1, 2))"; }

# Local, every GPU (model load excluded from its tokens/s line; whole command timed too).
t0=$(now); timeout 150 $E sql --model random:650M --device cuda:$DEVS --partitions 8 -c "$(Q /tmp/local/)" > $OUT/local.out 2> $OUT/local.log
t1=$(now); echo "local rc=$? whole command $(calc "$t1 - $t0") s" | tee -a $OUT/summary.txt
grep "esm_embed:" $OUT/local.log | tail -3 | tee -a $OUT/summary.txt

# The cluster: one scheduler, and (layout 1) one executor per GPU, then (layout 2, several GPUs)
# one executor using every GPU, or (layout 3, one GPU) two executors sharing it.
cluster() {  # cluster LAYOUT: start, wait for the executors, two rounds of the query, stop
  local layout=$1 want=$2 i n PIDS
  $E scheduler --bind 127.0.0.1:50050 2> $OUT/scheduler$layout.log & PIDS="$!"
  sleep 1
  if [ $layout = 1 ]; then
    for g in $(seq 0 $((N-1))); do
      CUDA_VISIBLE_DEVICES=$g $E executor --scheduler 127.0.0.1:50050 --bind 127.0.0.1:$((50051 + 2*g)) \
        --model random:650M --device cuda --work-dir /tmp/work$g 2> $OUT/executor$layout-$g.log & PIDS="$PIDS $!"
    done
  elif [ $layout = 2 ]; then
    $E executor --scheduler 127.0.0.1:50050 --bind 127.0.0.1:50051 \
      --model random:650M --device cuda:$DEVS --work-dir /tmp/work 2> $OUT/executor$layout.log & PIDS="$PIDS $!"
  else  # two executors sharing GPU 0
    for k in 0 1; do
      $E executor --scheduler 127.0.0.1:50050 --bind 127.0.0.1:$((50051 + 2*k)) \
        --model random:650M --device cuda:0 --work-dir /tmp/work$k 2> $OUT/executor$layout-$k.log & PIDS="$PIDS $!"
    done
  fi
  for i in $(seq 1 240); do
    n=$($PY -c "import json,urllib.request as u; print(len(json.load(u.urlopen('http://127.0.0.1:50050/api/executors'))))" 2>/dev/null || echo 0)
    [ "$n" = "$want" ] && break; sleep 0.5
  done
  echo "layout $layout: executors registered: $n of $want after $((i/2)) s" | tee -a $OUT/summary.txt
  for round in 1 2; do
    rm -rf /tmp/cluster
    t0=$(now); timeout 150 $E sql --cluster 127.0.0.1:50050 --model random:650M --partitions 8 -c "$(Q /tmp/cluster/)" > $OUT/cluster$layout-$round.out 2> $OUT/cluster$layout-$round.log
    rc=$?; t1=$(now)
    echo "layout $layout round $round rc=$rc $(calc "$t1 - $t0") s, $(calc "$TOKENS / ($t1 - $t0)") tokens/s" | tee -a $OUT/summary.txt
    [ $rc = 0 ] || tail -5 $OUT/cluster$layout-$round.log
  done
  kill $PIDS; pkill -f "esmbed (scheduler|executor)"; sleep 2
}
compare() {
$PY - <<'PY' | tee -a $OUT/summary.txt
import numpy as np, pyarrow.parquet as pq
def load(p):
    t = pq.read_table(p, columns=["id", "embedding"])
    e = t.column("embedding").combine_chunks()
    m = e.values.to_numpy(zero_copy_only=False).reshape(len(t), -1)
    order = np.argsort(np.array(t.column("id").to_pylist()))
    return np.array(t.column("id").to_pylist())[order], m[order]
a_ids, a = load("/tmp/local"); b_ids, b = load("/tmp/cluster")
cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
print("rows local", len(a_ids), "cluster", len(b_ids), "| same ids:", bool((a_ids == b_ids).all()),
      "| bitwise equal:", bool(np.array_equal(a, b)), "| min cosine", float(cos.min()), "| max abs diff", float(np.abs(a - b).max()))
PY
}
cluster 1 $N; compare
if [ $N -gt 1 ]; then cluster 2 1; else cluster 3 2; fi; compare
echo "TOKENS=$TOKENS N=$N" | tee -a $OUT/summary.txt
cat $OUT/summary.txt
