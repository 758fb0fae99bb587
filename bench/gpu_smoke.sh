#!/usr/bin/env bash
# Quick check of a new CUDA build on the GPU machine: the fixtures against the CPU f32 reference
# (`esmbed verify`, bf16 and f16) and a per-op profile of the 650M and 3B shapes.
set -u
E="bash .gpu/run.sh esmbed"
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpu.txt
for m in tiny_h16 tiny_h64 tiny_h16_bf16; do
  timeout 90 $E verify --model tests/fixtures/$m --device cuda --json >> $R/verify.jsonl 2>> $R/verify.log
done
ESMBED_PROFILE=1 timeout 90 $E bench --shape 650M --device cuda -n 1000 --method packed --json > $R/profile650M.jsonl 2>&1
ESMBED_PROFILE=1 timeout 90 $E bench --shape 3B --device cuda -n 500 --method packed --json > $R/profile3B.jsonl 2>&1
timeout 120 $E bench --shape 650M,3B --device cuda -n 2000 --method packed --json > $R/quick.jsonl 2>&1
tar czf $OUT/results.tgz -C $R .
cat $R/verify.jsonl; tail -3 $R/verify.log; grep -h '"op"\|tokens_per_s' $R/profile*.jsonl | cut -c1-200; cat $R/quick.jsonl | cut -c1-300
