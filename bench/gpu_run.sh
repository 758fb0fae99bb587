#!/usr/bin/env bash
# One GPU, one call: esmbed bench (650M, 3B; packed and padded) on the PyTorch reference's exact
# lengths, a 20,000-sequence esmbed embed job (650M shape), and the PyTorch reference (packed
# varlen, eager and torch.compile) on the same machine. Everything lands in $OUT/results.tgz.
# Correctness and the per-op profile of the same build: bench/gpu_smoke.sh.
set -u
E="bash .gpu/run.sh esmbed"
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpu.txt
export TORCH_BASELINE_DIR=.gpu
python bench/make_synthetic.py lengths 4000 /tmp/lengths.txt
python bench/make_synthetic.py fasta 20000 /tmp/syn20k.fasta.gz
timeout 200 $E bench --shape 650M,3B --device cuda --lengths-file /tmp/lengths.txt --json > $R/bench.jsonl 2> $R/bench.log
timeout 120 $E embed /tmp/syn20k.fasta.gz -o /tmp/emb20k.parquet --model random:650M --device cuda --no-progress --json > $R/embed20k.json 2> $R/embed20k.log
(cd .gpu && SKIP_PADDED=1 COMPILE=1 timeout 240 python torch_baseline.py 650M,3B 2>&1 | grep -v Warning) > $R/torch.jsonl
tar czf $OUT/results.tgz -C $R .
cut -c1-260 $R/bench.jsonl; tail -2 $R/embed20k.log; cut -c1-200 $R/embed20k.json; cat $R/torch.jsonl
