#!/usr/bin/env bash
# Two GPUs, the cuBLASLt build: one embed job on one GPU and on both (identical output?) and the
# 650M bench on one and two GPUs. Everything lands in $OUT/results.tgz.
set -u
E="bash .gpu/run.sh esmbed"
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpu.txt
TORCH_BASELINE_DIR=.gpu python bench/make_synthetic.py fasta 8000 /tmp/syn8k.fasta.gz
J="--model random:650M --no-progress --json --overwrite"
timeout 90 $E embed /tmp/syn8k.fasta.gz -o /tmp/one.parquet $J --device cuda:0 > $R/embed_1gpu.json 2> $R/embed_1gpu.log
timeout 90 $E embed /tmp/syn8k.fasta.gz -o /tmp/two.parquet $J --device cuda:0,1 > $R/embed_2gpu.json 2> $R/embed_2gpu.log
python -c "
import pyarrow.parquet as pq
a=pq.read_table('/tmp/one.parquet'); b=pq.read_table('/tmp/two.parquet')
print('rows', a.num_rows, b.num_rows, '| ids equal', a.column('id').to_pylist()==b.column('id').to_pylist(), '| embeddings identical', a.column('embedding').equals(b.column('embedding')))" > $R/identical.txt 2>&1
for devs in cuda:0 cuda:0,1; do
  k=$(echo $devs | tr -cd ',' | wc -c); k=$((k+1))
  timeout 90 $E bench --shape 650M --device $devs -n 12000 --method packed --json > $R/bench650M_$k.json 2> $R/bench650M_$k.log
done
tar czf $OUT/results.tgz -C $R .
cat $R/identical.txt; for f in $R/embed_*.log; do tail -n 2 $f; done; cut -c1-250 $R/bench650M_*.json
