#!/usr/bin/env bash
# Correctness of a CUDA build on the GPU machine, in one call: the GPU test binary (every fixture
# against the CPU f32 path, the fused kernels at ESM-2's widths, typed out-of-memory errors),
# `esmbed verify` (bf16, f16) on every fixture and on the naming variants, and a quick packed bench.
# Carry .gpu/ with `esmbed.xz` and the test binary as `gpu-tests.xz` (see bench/README.md).
set -u
E="bash .gpu/run.sh esmbed"
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpu.txt
if [[ -f .gpu/gpu-tests.xz ]]; then timeout 200 bash .gpu/run.sh gpu-tests --test-threads 1 > $R/gpu-tests.log 2>&1; echo "gpu tests: exit $?" >> $R/gpu-tests.log; fi
for m in tiny_h16 tiny_h64 tiny_h16_bf16 naming/legacy_gamma_beta naming/sharded_model_level naming/bare_bin naming/no_inv_freq; do
  timeout 60 $E verify --model tests/fixtures/$m --device cuda --json >> $R/verify.jsonl 2>> $R/verify.log
done
timeout 120 $E bench --shape 650M,3B --device cuda -n 2000 --method packed --json > $R/quick.jsonl 2>> $R/quick.log
tar czf $OUT/results.tgz -C $R .
tail -8 $R/gpu-tests.log; cat $R/verify.jsonl | cut -c1-260; tail -3 $R/verify.log; cut -c1-300 $R/quick.jsonl
