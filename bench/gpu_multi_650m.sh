#!/usr/bin/env bash
# The 650M half of bench/gpu_multi.sh (same machine, same settings), with every output in one
# archive: bench on 1, 2, 4 GPUs and the 20,000-sequence embed job on one GPU and on all.
set -u
E="bash .gpu/run.sh esmbed"
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpu.txt
TORCH_BASELINE_DIR=.gpu python bench/make_synthetic.py fasta 20000 /tmp/syn20k.fasta.gz
for devs in cuda:0 cuda:0,1 cuda:0,1,2,3; do
  k=$(echo $devs | tr -cd ',' | wc -c); k=$((k+1))
  timeout 120 $E bench --shape 650M --device $devs -n 16000 --method packed --json > $R/bench650M_$k.json 2> $R/bench650M_$k.log
done
J="--model random:650M --no-progress --json"
timeout 120 $E embed /tmp/syn20k.fasta.gz -o /tmp/one.parquet $J --device cuda:0 > $R/embed_1gpu.json 2> $R/embed_1gpu.log
timeout 120 $E embed /tmp/syn20k.fasta.gz -o /tmp/all.parquet $J --device cuda > $R/embed_all.json 2> $R/embed_all.log
tar czf $OUT/results.tgz -C $R .
cat $R/*.json | grep -o '"tokens_per_s":[0-9.]*\|"seconds":[0-9.]*' | head -20
