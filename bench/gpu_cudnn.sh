#!/usr/bin/env bash
# One GPU call for cuDNN's fused attention (`--features cuda,cudnn`, ESMBED_ATTENTION=cudnn):
# correctness and batch invariance first (`esmbed verify --dtype bf16` on tiny_h64, head dim 64,
# and tiny_h16, 16) for each variant in VARIANTS (env assignments joined by +), then
# `esmbed bench` under each variant of BENCH against FlashAttention (`flash`) on the
# reference's exact lengths, with the graphs each run built and their build time.
#   SHAPES="650M esmc-600m" VARIANTS="X=1 ESMBED_CUDNN_DYNAMIC=1" bash bench/gpu_cudnn.sh
set -u
E="bash .gpu/run.sh esmbed"
R=$OUT
export TORCH_BASELINE_DIR=.gpu
python bench/make_synthetic.py lengths 4000 /tmp/lengths.txt
VARIANTS=${VARIANTS:-"X=1 ESMBED_CUDNN_DYNAMIC=1"}
log() { grep -E "attention|cuDNN|rror" $1 | sed -E 's/^[^ ]+ +[A-Z]+ //; s/graph [0-9]+ \([^)]*\): built in [0-9.]+ ms, //' | cut -c1-220 | sort | uniq -c | sort -rn | head -${2:-4}; }
PASS=
for v in $VARIANTS; do
  exact=1
  for m in ${FIXTURES:-tiny_h64 tiny_h16}; do
    env ${v//+/ } ESMBED_ATTENTION=cudnn RUST_LOG=info,esmbed::cudnn=debug timeout ${VERIFY_LIMIT:-40} $E verify --model tests/fixtures/$m \
      --device cuda --dtype bf16 -n 8 --json > $R/verify.jsonl 2> $R/verify.log
    echo "verify $m [$v] rc $?: $(grep -o '"attention":"[^"]*"\|"min_cosine":[0-9.]*\|"invariance_max_abs":[0-9.e-]*' $R/verify.jsonl | tr '\n' ' ')"
    grep -q '"invariance_max_abs":0.0[,}]' $R/verify.jsonl || exact=0
    log $R/verify.log 4
  done
  [ $exact = 1 ] && [ -z "$PASS" ] && PASS=$v
done
echo "first batch-invariant variant: ${PASS:-none}"
BENCH=${BENCH:-flash X=1 ESMBED_CUDNN_DYNAMIC=1 ESMBED_CUDNN_FIXED_S=1 ESMBED_CUDNN_DYNAMIC=1+ESMBED_CUDNN_FIXED_S=1}; [ -n "$PASS" ] && [[ " $BENCH " != *" $PASS "* ]] && BENCH="$BENCH $PASS"
for s in ${SHAPES:-650M esmc-600m}; do
  for v in $BENCH; do
    a=cudnn; vars=${v//+/ }; [ $v = flash ] && a=flash && vars=X=1
    env $vars ESMBED_ATTENTION=$a RUST_LOG=info,esmbed::cudnn=debug timeout ${BENCH_LIMIT:-60} $E bench --shape $s \
      --dtype ${DTYPE:-bf16} --device cuda --method packed --lengths-file /tmp/lengths.txt --json > $R/bench.jsonl 2> $R/bench.log
    echo "bench $s [$v]: $(grep -o '"tokens_per_s":[0-9.]*\|"attention":"[^"]*"' $R/bench.jsonl | head -2 | tr '\n' ' ') graphs $(grep -c 'attention graph' $R/bench.log), build ms $(grep -o 'built in [0-9.]*' $R/bench.log | awk '{t+=$3} END {print t+0}')"
    cat $R/bench.jsonl >> $R/bench_all.jsonl
    log $R/bench.log 2
  done
done
