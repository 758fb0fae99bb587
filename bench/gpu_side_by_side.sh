#!/usr/bin/env bash
# One GPU, one call, on the PyTorch reference's exact 4,000 lengths: `esmbed bench` in each
# VARIANT (dtype:attention, attention = flash | cudnn; cudnn needs a `cuda,cudnn` build) per
# shape (LONG_VARIANTS for the LONG_SHAPES, whose runs take minutes), then the PyTorch reference
# (ESM-2: ../shared/bench/torch_baseline.py, ESM C: bench/torch_esmc.py; packed varlen, and
# torch.compile for COMPILE_SHAPES), then one table: tokens/s, MFU and the ratios to
# torch.compile and to packed varlen. Raw output in $OUT/results.tgz.
#   SHAPES="650M 3B 15B" COMPILE_SHAPES="650M 3B" bash bench/gpu_side_by_side.sh
#   SHAPES="esmc-300m esmc-600m esmc-6b" COMPILE_SHAPES="esmc-300m esmc-600m" bash bench/gpu_side_by_side.sh
set -u
E="bash .gpu/run.sh esmbed"
R=$OUT/r; mkdir -p $R
SHAPES=${SHAPES:-650M 3B}
COMPILE_SHAPES=${COMPILE_SHAPES:-$SHAPES}
VARIANTS=${VARIANTS:-bf16:flash bf16:cudnn fp8:cudnn}
LONG_SHAPES=${LONG_SHAPES:-15B esmc-6b}
LONG_VARIANTS=${LONG_VARIANTS:-bf16:cudnn fp8:cudnn}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpu.txt
export TORCH_BASELINE_DIR=$PWD/.gpu
python bench/make_synthetic.py lengths 4000 /tmp/lengths.txt
for s in $SHAPES; do
  vs=$VARIANTS; [[ " $LONG_SHAPES " == *" $s "* ]] && vs=$LONG_VARIANTS
  for v in $vs; do
    d=${v%%:*}; a=${v#*:}
    ESMBED_ATTENTION=$a RUST_LOG=info timeout ${BENCH_LIMIT:-150} $E bench --shape $s --dtype $d --device cuda \
      --method packed --lengths-file /tmp/lengths.txt --json > $R/one.jsonl 2>> $R/esmbed.log
    echo "esmbed $s $v rc $?: $(cut -c1-200 $R/one.jsonl)"
    python -c "import json,sys; [print(json.dumps({**json.loads(l), 'variant': sys.argv[1]})) for l in open(sys.argv[2])]" \
      "$v" $R/one.jsonl >> $R/esmbed.jsonl
  done
done
for s in $SHAPES; do
  c=; [[ " $COMPILE_SHAPES " == *" $s "* ]] && c=1
  ref=$PWD/.gpu/torch_baseline.py; [[ $s == esmc-* ]] && ref=$PWD/bench/torch_esmc.py
  (cd .gpu && SKIP_PADDED=1 COMPILE=$c timeout ${TORCH_LIMIT:-300} python $ref $s 2>&1 | grep -v Warning) >> $R/torch.jsonl
done
tar czf $OUT/results.tgz -C $R .
cat $R/gpu.txt
python - $R <<'PY'
import json, sys
R = sys.argv[1]
rows = [json.loads(l) for l in open(f"{R}/esmbed.jsonl") if l.strip()]
torch = [json.loads(l) for l in open(f"{R}/torch.jsonl") if l.startswith("{")]
ref = {}
for t in torch:
    if "method" in t:
        ref.setdefault(t["model"], {})[t["method"]] = t
print("| model | run | tokens/s | MFU | vs torch.compile | vs torch packed |")
print("|---|---|---|---|---|---|")
for m in dict.fromkeys([r["model"] for r in rows] + list(ref)):
    base = ref.get(m, {})
    comp = base.get("packed_varlen_compiled", {}).get("tokens_per_s")
    packed = base.get("packed_varlen", {}).get("tokens_per_s")
    ratio = lambda x, b: f"{x / b:.3f}" if b else "-"
    for r in rows:
        if r["model"] == m:
            label = f"esmbed {r['variant']} ({r.get('attention', '?')})"
            print(f"| {m} | {label} | {r['tokens_per_s']:,.0f} | {r['mfu']:.3f} | "
                  f"{ratio(r['tokens_per_s'], comp)} | {ratio(r['tokens_per_s'], packed)} |")
    for k, t in base.items():
        print(f"| {m} | torch {k} | {t['tokens_per_s']:,.0f} | {t['mfu']:.3f} | "
              f"{ratio(t['tokens_per_s'], comp)} | {ratio(t['tokens_per_s'], packed)} |")
PY
grep -h "rror\|panick" $R/esmbed.log | sort | uniq -c | head -5
