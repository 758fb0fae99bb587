#!/usr/bin/env bash
# One GPU call for `--dtype fp8`: `esmbed bench` bf16 vs fp8 on the PyTorch reference's exact
# lengths, the per-op profile of fp8, (TORCH=1) the PyTorch reference (packed varlen, eager and
# torch.compile) in the same call, then fidelity (`esmbed verify` against the CPU f32 path, bf16
# beside fp8) on the fixtures and on random models of real shapes with trained-model-like
# activation outliers (bench/make_outlier_model.py). Only eight files come back from a call:
# everything that matters is printed.
#   SHAPES=650M,3B TORCH=1 bash bench/gpu_fp8.sh
# Knobs: FIXTURES, OUTLIER_SHAPES, FACTORS (1 = no outliers), KEEP_PROJ (ESMBED_FP8_BF16 values),
# KEEP_BLOCKS (ESMBED_FP8_BF16_BLOCKS values), SLOW_ACCUM=1, TORCH_SHAPES, PROFILE_SHAPE, PROFILE=0,
# OUTLIER_SHAPES= (empty: none), JOB=1 (20,000-sequence embed jobs). With a `cudnn` build,
# ESMBED_ATTENTION=cudnn runs every esmbed step on cuDNN's attention.
set -u
E="bash .gpu/run.sh esmbed"
SHAPES=${SHAPES:-650M,3B}
PY=${PY:-python}
R=$OUT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpu.txt
export TORCH_BASELINE_DIR=.gpu
python bench/make_synthetic.py lengths 4000 /tmp/lengths.txt

for d in bf16 fp8; do
  timeout ${BENCH_LIMIT:-150} $E bench --shape $SHAPES --dtype $d --device cuda --lengths-file /tmp/lengths.txt --json \
    > $R/bench_$d.jsonl 2> $R/bench_$d.log
  echo "bench $d:"; cut -c1-240 $R/bench_$d.jsonl; tail -1 $R/bench_$d.log | cut -c1-300
done
for p in ${KEEP_PROJ:-}; do
  ESMBED_FP8_BF16=$p timeout ${BENCH_LIMIT:-150} $E bench --shape 650M --dtype fp8 --device cuda --lengths-file /tmp/lengths.txt --json \
    > $R/bench_fp8_keep.jsonl 2> $R/bench_fp8_keep.log
  echo "bench fp8, $p in bf16:"; cut -c1-200 $R/bench_fp8_keep.jsonl | head -1
done
if [ "${SLOW_ACCUM:-0}" = 1 ]; then
  ESMBED_FP8_FAST_ACCUM=0 timeout ${BENCH_LIMIT:-150} $E bench --shape 650M --dtype fp8 --device cuda --lengths-file /tmp/lengths.txt --json \
    > $R/bench_fp8_slow_accum.jsonl 2> $R/bench_fp8_slow_accum.log
  echo "bench fp8 without fast accumulation:"; cut -c1-240 $R/bench_fp8_slow_accum.jsonl
fi
# JOB=1: a whole 20,000-sequence `esmbed embed` job in each dtype (650M shape), whose tokens/s the
# issue wants within 10 % of the bench's.
if [ "${JOB:-0}" = 1 ]; then
  python bench/make_synthetic.py fasta 20000 /tmp/syn20k.fasta.gz
  for d in bf16 fp8; do
    timeout ${JOB_LIMIT:-120} $E embed /tmp/syn20k.fasta.gz -o /tmp/emb20k_$d.parquet --model random:650M --device cuda \
      --dtype $d --no-progress --json > $R/embed20k_$d.json 2> $R/embed20k_$d.log
    echo "embed 20k $d rc $?: $(cut -c1-240 $R/embed20k_$d.json)"
  done
fi
if [ "${PROFILE:-1}" = 1 ]; then
  ESMBED_PROFILE=1 timeout 60 $E bench --shape ${PROFILE_SHAPE:-650M} --dtype fp8 --device cuda --lengths-file /tmp/lengths.txt \
    > $R/profile.json 2> $R/profile.log
  grep -v "^gemm" $R/profile.log | tail -25
fi
if [ "${TORCH:-0}" = 1 ]; then
  (cd .gpu && SKIP_PADDED=1 COMPILE=1 timeout ${TORCH_LIMIT:-240} python torch_baseline.py ${TORCH_SHAPES:-$SHAPES} 2>&1 | grep -v Warning) > $R/torch.jsonl
  cat $R/torch.jsonl
fi

# Fidelity last: the CPU f32 reference of a 150M model takes most of a minute per dtype.
# GPU tests binary (cargo test --release --features cuda --test gpu --no-run), if carried.
if [ -f .gpu/gpu-tests.xz ]; then
  timeout 120 bash .gpu/run.sh gpu-tests fp8_kernels --nocapture > $R/gpu-tests.log 2>&1; echo "gpu tests rc $?"
  grep -E "^fp8|test result|panicked|error" $R/gpu-tests.log | head -12
fi
verify() {  # name model-dir
  timeout ${VERIFY_LIMIT:-150} $E verify --model $2 --device cuda --dtype bf16,fp8 -n ${VERIFY_N:-8} --json \
    > $R/verify_$1.jsonl 2> $R/verify_$1.log
  echo "verify $1: $(tr '\n' ' ' < $R/verify_$1.jsonl | cut -c1-900)"; tail -1 $R/verify_$1.log | cut -c1-300
}
for m in ${FIXTURES-tiny_h64 tiny_esmc}; do verify $m tests/fixtures/$m; done
# Random models of real shapes: FACTORS (1 = no outliers) per shape in OUTLIER_SHAPES.
for s in ${OUTLIER_SHAPES-150M esmc-300m}; do
  for f in ${FACTORS:-50}; do
    timeout 120 $PY bench/make_outlier_model.py /tmp/outliers-$s-x$f --shape $s --factor $f 2>&1 | tail -1
    verify outliers-$s-x$f /tmp/outliers-$s-x$f
  done
done
# Variants on the first shape and factor: bf16 kept for some blocks or projections, slow accumulation.
first=/tmp/outliers-$(set -- ${OUTLIER_SHAPES-150M esmc-300m}; echo ${1:-none})-x$(set -- ${FACTORS:-50}; echo $1)
if [ "${SLOW_ACCUM:-0}" = 1 ]; then ESMBED_FP8_FAST_ACCUM=0 verify slow-accum $first; fi
for k in ${KEEP_BLOCKS:-}; do ESMBED_FP8_BF16_BLOCKS=$k verify keep-blocks-$k $first; done
for p in ${KEEP_PROJ:-}; do ESMBED_FP8_BF16=$p verify keep-$p $first; done

