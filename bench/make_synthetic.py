"""Synthetic workloads for the GPU runs, from the PyTorch reference's length distribution.

    python bench/make_synthetic.py lengths 4000 lengths.txt       # torch_baseline.lengths(4000), one per line
    python bench/make_synthetic.py fasta 20000 synthetic20k.fasta.gz  # lengths(20000, seed=1), random residues
    python bench/make_synthetic.py fasta 100000 rep.fasta.gz 0.3       # 30 % of rows repeat an earlier row's sequence

Needs torch and ../shared/bench/torch_baseline.py (or TORCH_BASELINE_DIR pointing at its folder).
"""
import gzip
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.environ.get("TORCH_BASELINE_DIR", os.path.join(here, "..", "..", "shared", "bench")))
import torch  # noqa: E402
from torch_baseline import lengths  # noqa: E402

AA = "ACDEFGHIKLMNPQRSTVWY"


def main():
    kind, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    repeat = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    if kind == "lengths":
        with open(out, "w") as f:
            f.write("\n".join(str(l) for l in lengths(n)) + "\n")
    elif kind == "fasta":
        g = torch.Generator().manual_seed(2)
        # Rows that repeat an earlier row's sequence, under their own id: exactly round(n * repeat).
        repeats = set(torch.randperm(n - 1, generator=g)[: round(n * repeat)].add(1).tolist())
        written = []
        with gzip.open(out, "wt") as f:
            for i, l in enumerate(lengths(n, seed=1)):
                if i in repeats:
                    seq = written[torch.randint(0, len(written), (1,), generator=g).item()]
                else:
                    residues = torch.randint(0, 20, (l,), generator=g).tolist()
                    seq = "".join(AA[r] for r in residues)
                if repeat > 0:
                    written.append(seq)
                f.write(f">syn{i}\n{seq}\n")
    else:
        sys.exit(f"unknown kind {kind!r}: lengths or fasta")


if __name__ == "__main__":
    main()
