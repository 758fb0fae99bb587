#!/usr/bin/env bash
# One GPU, one call: esmbed score against PyTorch. (1) numerics: the fixture models' scores in
# bf16 and f16 on the GPU against transformers' f32 reference (tests/fixtures/*/scores.json);
# (2) speed: pseudo-log-likelihoods of the first N sequences of the benchmark's length mix (650M
# shape, random weights) through esmbed score, and through the two PyTorch procedures of
# bench/torch_pll.py (time-boxed by BOX seconds each, shrunk to what is left of a 590 s call;
# .gpu/pllN.fasta.gz, when there, saves generating the input on the GPU machine).
# Everything lands in $OUT/results.tgz.
#   N=1000 BOX=40 NUMERICS=0 LIMIT=490 bash bench/gpu_scores.sh     # the 1,000-sequence run
set -u
N=${N:-100}
BOX=${BOX:-60}
NUMERICS=${NUMERICS:-1}
LIMIT=${LIMIT:-300}
E="bash .gpu/run.sh esmbed"
R=$OUT/r; mkdir -p $R
rm -rf /tmp/pll*.parquet /tmp/.pll*.esmbed /tmp/fx*.parquet /tmp/.fx*
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $R/gpu.txt
export TORCH_BASELINE_DIR=.gpu
if [ "$NUMERICS" = 1 ]; then
for m in tiny_h16 tiny_h64; do
  python - "$m" > /tmp/$m.fasta <<'PY'
import json, sys
d = json.load(open(f"tests/fixtures/{sys.argv[1]}/scores.json"))
for s in d["sequences"]:
    print(f">{s['id']}\n{s['sequence']}")
PY
  for dt in bf16 f16; do
    $E score /tmp/$m.fasta --model tests/fixtures/$m --device cuda --dtype $dt --per-residue --no-progress -o /tmp/fx_${m}_$dt.parquet 2>> $R/numerics.log
  done
done
python - > $R/numerics.txt 2>&1 <<'PY'
import json
import pyarrow.parquet as pq
for m in ("tiny_h16", "tiny_h64"):
    ref = json.load(open(f"tests/fixtures/{m}/scores.json"))["sequences"]
    for dt in ("bf16", "f16"):
        t = pq.read_table(f"/tmp/fx_{m}_{dt}.parquet").to_pydict()
        worst = max(abs(g - r["pll"]) / max(1.0, abs(r["pll"])) for g, r in zip(t["pll"], ref))
        terms = max(abs(g - w) / max(1.0, abs(w)) for row, r in zip(t["pll_per_residue"], ref)
                    for g, w in zip(row, r["per_position"]))
        print(f"{m} {dt}: PLL worst relative error {worst:.2e}, per-residue terms {terms:.2e}")
PY
fi
if [ -f .gpu/pll$N.fasta.gz ]; then cp .gpu/pll$N.fasta.gz /tmp/pll.fasta.gz
else python bench/make_synthetic.py fasta $N /tmp/pll.fasta.gz; fi
# PyTorch builds its model beside esmbed's run and scores after it, in what is left of a 590 s call
# (each time box may overrun by one sequence).
rm -f /tmp/esmbed.done
WAIT_FOR=/tmp/esmbed.done python bench/torch_pll.py /tmp/pll.fasta.gz 650M $BOX > $R/torch.jsonl 2> $R/torch.log &
TORCH=$!
timeout $LIMIT $E score /tmp/pll.fasta.gz --model random:650M --device cuda --dtype ${DTYPE:-bf16} --no-progress --json -o /tmp/pll.parquet > $R/esmbed.json 2> $R/esmbed.log
LEFT=$(( (590 - SECONDS - 10) / 2 ))
BOX=$(( BOX < LEFT ? BOX : (LEFT > 5 ? LEFT : 5) ))
echo $BOX > /tmp/esmbed.done
wait $TORCH
tar czf $OUT/results.tgz -C $R .
cat $R/gpu.txt $R/numerics.txt 2>/dev/null; tail -2 $R/esmbed.log; cat $R/torch.jsonl
python -c "
import json
e = json.load(open('$R/esmbed.json')); rate = e['residues'] / e['seconds']
print('esmbed', e['residues'], 'residues in', round(e['seconds'], 1), 's:', round(rate, 1), 'residues/s')
for line in open('$R/torch.jsonl'):
    t = json.loads(line); print(t['method'], t['residues_per_second'], 'residues/s; esmbed / it =', round(rate / t['residues_per_second'], 2),
        '; masked-copy tokens/s', t.get('copy_tokens_per_second'), 'vs esmbed', round(e['tokens'] / e['seconds']))
"
