#!/usr/bin/env bash
# One GPU call for ESM C: `esmbed verify` of both fixture models in bf16 and f16 against the CPU f32
# path, `esmbed bench` of the ESM C shapes beside ESM-2 650M, and (TORCH=1) the PyTorch reference
# (bench/torch_esmc.py: EsmcModel padded, packed varlen, packed varlen under torch.compile) on the
# same workload. Results in $OUT. The ESM C fixtures must travel with the working tree, which
# with .gpu must stay under 64 MiB.
#   FUSED=0 bash bench/gpu_esmc_check.sh    # the same on candle's generic ops (the fused block is the default)
set -u
E="bash .gpu/run.sh esmbed"
if [ "${FUSED:-1}" = 0 ]; then export ESMBED_ESMC_FUSED=0; fi
SHAPES=${SHAPES:-esmc-300m,esmc-600m}
nvidia-smi --query-gpu=name --format=csv > $OUT/gpu.txt
for m in tiny_esmc tiny_esmc_h16; do
  timeout 120 $E verify --model tests/fixtures/$m --device cuda --json > $OUT/verify_$m.jsonl 2> $OUT/verify_$m.log
done
timeout 200 $E bench --shape $SHAPES,650M --device cuda > $OUT/bench.json 2> $OUT/bench.log
ESMBED_PROFILE=1 timeout 60 $E bench --shape esmc-600m --device cuda > $OUT/profile.json 2> $OUT/profile.log
if [ "${TORCH:-0}" = 1 ]; then
  TORCH_BASELINE_DIR=.gpu COMPILE=1 timeout 300 python bench/torch_esmc.py $SHAPES > $OUT/torch.jsonl 2> $OUT/torch.log
fi
cat $OUT/verify_*.jsonl; cat $OUT/bench.json; cat $OUT/torch.jsonl 2>/dev/null
