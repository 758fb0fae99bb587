#!/usr/bin/env bash
# Vectorized fused kernels: correctness on the fixtures, per-op
# profile, bench 650M/3B, a 20,000-sequence embed job, and the PyTorch reference, in one run.
set -u
E="bash .gpu/run.sh esmbed"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
for m in tiny_h16 tiny_h64 tiny_h16_bf16; do
  timeout 90 $E verify --model tests/fixtures/$m --device cuda --json 2>&1 | tee -a $OUT/verify.jsonl
done
ESMBED_PROFILE=1 timeout 90 $E bench --shape 650M --device cuda -n 1000 --method packed --json > $OUT/profile.jsonl 2>&1
grep '"op"' $OUT/profile.jsonl | head -8
timeout 200 $E bench --shape 650M,3B --device cuda --lengths-file .gpu/lengths.txt --json 2>&1 | tee $OUT/bench.jsonl
timeout 120 $E embed .gpu/synthetic20k.fasta.gz -o /tmp/emb20k.parquet --model random:650M --device cuda --no-progress --json > $OUT/embed20k.json 2> $OUT/embed20k.log
tail -3 $OUT/embed20k.log
cd .gpu && COMPILE=1 timeout 330 python torch_baseline.py 650M,3B 2>&1 | grep -v Warning | tee $OUT/torch.jsonl
