#!/usr/bin/env bash
# One GPU call for cuDNN's fused attention (`--features cuda,cudnn`): correctness first (`esmbed
# verify` on the fixtures whose head dims cuDNN takes: tiny_h64 d=64, tiny_h16 d=16), with the
# kernel cache shared across shapes and, if that fails, without (ESMBED_CUDNN_DYNAMIC=0); then
# `esmbed bench` with cuDNN against ESMBED_ATTENTION=flash on the reference's exact lengths.
#   SHAPES="650M esmc-600m 3B" bash bench/gpu_cudnn.sh
set -u
E="bash .gpu/run.sh esmbed"
R=$OUT
python bench/make_synthetic.py lengths 4000 /tmp/lengths.txt
ok_with() {  # env assignments...: verify both fixtures under them
  for m in tiny_h64 tiny_h16; do
    env "$@" RUST_LOG=info,esmbed::cudnn=debug timeout ${VERIFY_LIMIT:-45} $E verify --model tests/fixtures/$m \
      --device cuda --dtype bf16,fp8 -n 8 --json > $R/verify.jsonl 2> $R/verify.log
    rc=$?
    echo "verify $m [$*] rc $rc: $(cut -c1-330 $R/verify.jsonl | tr '\n' ' ')"
    grep -E "attention|cuDNN|rror" $R/verify.log | cut -c1-300 | sort | uniq -c | sort -rn | head -6
    [ $rc = 0 ] || return 1
  done
}
CHOSEN=
for cfg in ESMBED_CUDNN_DYNAMIC=1 ESMBED_CUDNN_DYNAMIC=0; do
  if ok_with $cfg; then CHOSEN=$cfg; break; fi
done
echo "chosen: ${CHOSEN:-none}"
for s in ${SHAPES:-650M esmc-600m 3B}; do
  for a in ${CHOSEN:+cudnn} flash; do
    env ${CHOSEN:-X=1} ESMBED_ATTENTION=$a RUST_LOG=info,esmbed::cudnn=debug timeout ${BENCH_LIMIT:-90} $E bench --shape $s \
      --dtype ${DTYPE:-bf16} --device cuda --method packed --lengths-file /tmp/lengths.txt --json > $R/bench_${s}_${a}.jsonl 2> $R/bench.log
    echo "bench $s $a: $(head -1 $R/bench_${s}_${a}.jsonl | cut -c1-200)"
    echo "  graphs built: $(grep -c 'attention graph' $R/bench.log), total ms: $(grep -o 'built in [0-9.]*' $R/bench.log | awk '{s+=$3} END {print s}'); $(grep -E 'rror|unsupported|does not take' $R/bench.log | head -2 | cut -c1-250)"
  done
done
