#!/usr/bin/env bash
# Two GPUs of one host: esmbed bench (650M, 3B) on one GPU and on both, and the 20,000-sequence
# embed job on one GPU and on both (identical outputs?). Everything lands in $OUT/results.tgz.
set -u
E="bash .gpu/run.sh esmbed"
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpu.txt
TORCH_BASELINE_DIR=.gpu python bench/make_synthetic.py fasta 20000 /tmp/syn20k.fasta.gz
for devs in cuda:0 cuda:0,1; do
  k=$(echo $devs | tr -cd ',' | wc -c); k=$((k+1))
  timeout 120 $E bench --shape 650M --device $devs -n 16000 --method packed --json > $R/bench650M_$k.json 2> $R/bench650M_$k.log
  timeout 150 $E bench --shape 3B --device $devs -n 8000 --method packed --json > $R/bench3B_$k.json 2> $R/bench3B_$k.log
done
J="--model random:650M --no-progress --json --overwrite"
timeout 120 $E embed /tmp/syn20k.fasta.gz -o /tmp/one.parquet $J --device cuda:0 > $R/embed_1gpu.json 2> $R/embed_1gpu.log
timeout 120 $E embed /tmp/syn20k.fasta.gz -o /tmp/two.parquet $J --device cuda:0,1 > $R/embed_2gpu.json 2> $R/embed_2gpu.log
python -c "
import pyarrow.parquet as pq
a=pq.read_table('/tmp/one.parquet'); b=pq.read_table('/tmp/two.parquet')
print('ids equal', a.column('id').to_pylist()==b.column('id').to_pylist(), '| embeddings identical', a.column('embedding').equals(b.column('embedding')))" > $R/identical.txt 2>&1
tar czf $OUT/results.tgz -C $R .
cat $R/identical.txt; tail -4 $R/embed_2gpu.log
