#!/usr/bin/env bash
# One GPU, one call: the CUDA wheel (esmbed-cuda) installed into the GPU machine's Python, the
# fixtures embedded on the GPU against the same wheel's exact CPU path (bf16, f16), then the
# 20,000-sequence job (650M shape) through the wheel's `esmbed` command (esmbed::cli, the code of
# the binary), esmbed.embed_file and Embedder.embed, twice over, for tokens/s side by side.
# Results in $OUT/r.   needs: .gpu/esmbed_cuda-*.whl(.xz), .gpu/torch_baseline.py
set -u
R=$OUT/r; mkdir -p $R
PY=/opt/torch/.venv/bin/python
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpu.txt
# Into the machine's own Python; no index: every dependency must already be there (torch's CUDA 13
# wheels bring the NVIDIA libraries), which `pip install` checks from the wheel's metadata.
[[ -f $(echo .gpu/esmbed_cuda-*.whl.xz) ]] && xz -d .gpu/esmbed_cuda-*.whl.xz
$PY -m pip install --no-index .gpu/esmbed_cuda-*.whl > $R/pip.log 2>&1 || { cat $R/pip.log; exit 1; }
SO=$($PY -c "import esmbed._native as n; print(n.__file__)")
env -u LD_LIBRARY_PATH ldd $SO | grep -E "cuda|cublas|nvrtc|curand" > $R/ldd.txt
cat $R/ldd.txt
env -u LD_LIBRARY_PATH timeout 90 $PY bench/python_gpu_check.py numerics > $R/numerics.json 2> $R/numerics.log
cat $R/numerics.json; tail -3 $R/numerics.log
export TORCH_BASELINE_DIR=.gpu
$PY bench/make_synthetic.py fasta 20000 /tmp/syn20k.fasta.gz
for round in 1 2; do
  env -u LD_LIBRARY_PATH timeout 80 $(dirname $PY)/esmbed embed /tmp/syn20k.fasta.gz -o /tmp/cli$round.parquet \
    --model random:650M --device cuda --no-progress --json > $R/cli$round.json 2> $R/cli$round.log
  env -u LD_LIBRARY_PATH timeout 120 $PY bench/python_gpu_check.py job /tmp/syn20k.fasta.gz $round \
    > $R/python$round.json 2> $R/python$round.log
done
for f in $R/cli*.json; do
  $PY -c "import json,sys; s=json.load(open('$f')); print('$f'.split('/')[-1], s['tokens'], round(s['seconds'],2), round(s['tokens']/s['seconds']))"
done
cat $R/python*.json; tail -2 $R/python1.log
$PY - <<'PY'
import pyarrow.parquet as pq
a, b = pq.read_table("/tmp/cli2.parquet"), pq.read_table("/tmp/py_file2.parquet")
print("embed_file output equals the CLI's:", a.column("embedding").equals(b.column("embedding")))
PY
