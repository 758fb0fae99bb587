#!/usr/bin/env bash
# One GPU call: ESM C on the GPU (the generic, unfused path) -- verify of both fixture models in bf16
# and f16 against the CPU f32 path, and esmbed bench of the ESM C shapes beside ESM-2 650M.
# Copy the ESM C fixtures along (the working tree and .gpu must stay under 64 MiB).
set -u
E="bash .gpu/run.sh esmbed"
nvidia-smi --query-gpu=name --format=csv > $OUT/gpu.txt
for m in tiny_esmc tiny_esmc_h16; do
  timeout 120 $E verify --model tests/fixtures/$m --device cuda --json > $OUT/verify_$m.jsonl 2> $OUT/verify_$m.log
done
timeout 200 $E bench --shape esmc-300m,esmc-600m,650M --device cuda > $OUT/bench.json 2> $OUT/bench.log
tail -3 $OUT/verify_*.log; cat $OUT/verify_*.jsonl | head -20; tail -5 $OUT/bench.log
