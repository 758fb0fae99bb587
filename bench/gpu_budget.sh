#!/usr/bin/env bash
# Pack size against throughput: esmbed bench (packed) at several --tokens-per-batch on the
# PyTorch reference's exact lengths, 650M and 3B. Results in $OUT/budget.jsonl.
set -u
E="bash .gpu/run.sh esmbed"
export TORCH_BASELINE_DIR=.gpu
python bench/make_synthetic.py lengths 4000 /tmp/lengths.txt
for run in "650M 32768" "650M 65536" "650M 131072" "3B 16384" "3B 32768" "3B 65536"; do
  set -- $run
  timeout 120 $E bench --shape $1 --device cuda --lengths-file /tmp/lengths.txt --method packed \
    --tokens-per-batch $2 --json 2>/dev/null | sed "s/^{/{\"tokens_per_batch\":$2,/" >> $OUT/budget.jsonl
done
cut -c1-150 $OUT/budget.jsonl
