#!/usr/bin/env bash
# Which cuBLASLt candidates serve ESM-2's GEMMs best: the per-op profile of 650M and 3B with the
# heuristic's first..fourth candidate (ESMBED_LT_ALGO) and smaller workspaces
# (ESMBED_LT_WORKSPACE_MIB), plus the candidates' configurations (tile, split-K, stages).
set -u
E="bash .gpu/run.sh esmbed"
R=$OUT/r; mkdir -p $R
for shape in 650M 3B; do
  n=$([ $shape = 650M ] && echo 1000 || echo 500)
  for setting in "ALGO=0" "ALGO=1" "ALGO=2" "ALGO=3" "WORKSPACE_MIB=4" "WORKSPACE_MIB=0"; do
    env ESMBED_PROFILE=1 ESMBED_LT_$setting timeout 60 $E bench --shape $shape --device cuda -n $n \
      --method packed --json > $R/$shape-$setting.log 2>&1
    echo "== $shape $setting"
    grep -h '"op"' $R/$shape-$setting.log | python3 -c "
import sys,json
print(' '.join(f\"{d['op']}={d['seconds']:.4f}\" for d in map(json.loads, sys.stdin)))"
    grep '^gemm' $R/$shape-$setting.log | sed 's/m=[0-9]* n=[0-9]* k=/k=/; s/ n=[0-9]*//' | awk '{$1=$1};1' | sort | uniq -c | sort -rn | head -8
  done
done
tar czf $OUT/results.tgz -C $R .
