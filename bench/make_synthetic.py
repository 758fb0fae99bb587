"""Synthetic workloads for the GPU runs, from the PyTorch reference's length distribution.

    python bench/make_synthetic.py lengths 4000 lengths.txt       # torch_baseline.lengths(4000), one per line
    python bench/make_synthetic.py fasta 20000 synthetic20k.fasta.gz  # lengths(20000, seed=1), random residues

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
    if kind == "lengths":
        with open(out, "w") as f:
            f.write("\n".join(str(l) for l in lengths(n)) + "\n")
    elif kind == "fasta":
        g = torch.Generator().manual_seed(2)
        with gzip.open(out, "wt") as f:
            for i, l in enumerate(lengths(n, seed=1)):
                residues = torch.randint(0, 20, (l,), generator=g).tolist()
                f.write(f">syn{i}\n{''.join(AA[r] for r in residues)}\n")
    else:
        sys.exit(f"unknown kind {kind!r}: lengths or fasta")


if __name__ == "__main__":
    main()
