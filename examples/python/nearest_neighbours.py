"""FASTA → embeddings (Parquet) → a Polars DataFrame → each protein's nearest neighbours.

    python examples/python/nearest_neighbours.py proteins.fasta [MODEL] [DEVICE]

MODEL defaults to the 650M ESM-2 (from the hub, or a local directory), DEVICE to ``auto``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import polars as pl

import esmbed


def nearest_neighbours(fasta: str, model: str, device: str, k: int = 3) -> pl.DataFrame:
    with tempfile.TemporaryDirectory() as scratch:
        output = str(Path(scratch) / "embeddings.parquet")
        # The whole job: resumable, every bad record in embeddings.errors.parquet.
        summary = esmbed.embed_file(fasta, output, model=model, device=device, quiet=True)
        assert summary is not None
        print(f"{summary['embedded']} of {summary['rows']} proteins embedded", file=sys.stderr)
        frame = pl.read_parquet(output)
    # `embedding` is FixedSizeList<float32>[H]: Polars reads it as an Array column, [n, H].
    vectors = frame["embedding"].to_numpy().astype(np.float32)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    order = np.argsort(-similarity, axis=1)[:, :k]
    ids = frame["id"].to_list()
    return pl.DataFrame(
        {
            "id": ids,
            "neighbours": [[ids[j] for j in row] for row in order],
            "cosine": [[float(similarity[i, j]) for j in row] for i, row in enumerate(order)],
        }
    )


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    model = sys.argv[2] if len(sys.argv) > 2 else "facebook/esm2_t33_650M_UR50D"
    device = sys.argv[3] if len(sys.argv) > 3 else "auto"
    with pl.Config(fmt_str_lengths=80, tbl_rows=20):
        print(nearest_neighbours(sys.argv[1], model, device))


if __name__ == "__main__":
    main()
