"""esmbed: ESM-2 and ESM C protein embeddings and scores, exact and fast, Arrow in and out.

The Rust engine of the ``esmbed`` command, from Python, with no second implementation:

- :class:`Embedder` loads a model once and embeds sequences held in memory (a list of str, a
  pyarrow array or table, a pandas or Polars Series or DataFrame) into a ``pyarrow.Table`` with
  the columns ``esmbed embed`` writes, or a NumPy array;
- :func:`embed_file` runs the whole resumable job (files in, Parquet out), as ``esmbed embed``;
- :func:`sql` runs SQL with ``esm_embed(sequence)`` and the other functions, as ``esmbed sql``.

Keyword options are the command line's, with ``_`` for ``-``: ``esmbed embed --max-length 512
--long window`` is ``embed_file(..., max_length=512, long="window")``. Errors are
:mod:`esmbed.errors` exceptions, one class per kind, with the library's message. The model runs
without the GIL, and Ctrl-C stops a job cleanly (:class:`~esmbed.errors.Interrupted`).
"""

from __future__ import annotations

import json
import warnings
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import pyarrow as pa

from esmbed import _native
from esmbed.errors import (
    BadInputError,
    EsmbedError,
    InternalError,
    Interrupted,
    ModelError,
    StorageError,
    UsageError,
)

__version__: str = _native.__version__

__all__ = [
    "Embedder",
    "embed_file",
    "sql",
    "cuda_available",
    "EsmbedError",
    "BadInputError",
    "StorageError",
    "ModelError",
    "UsageError",
    "Interrupted",
    "InternalError",
    "RowsNotEmbedded",
]


class RowsNotEmbedded(UserWarning):
    """Some rows could not be embedded; they are absent from the table (see ``return_errors``)."""


class _Stream:
    """An Arrow C stream made by Rust, handed to pyarrow through the PyCapsule interface."""

    def __init__(self, capsule: Any) -> None:
        self._capsule = capsule

    def __arrow_c_stream__(self, requested_schema: Any = None) -> Any:
        capsule, self._capsule = self._capsule, None
        if capsule is None:
            raise RuntimeError("this stream was read already")
        return capsule


def _table(capsule: Any) -> pa.Table:
    # Zero-copy: the table's buffers are the ones Rust produced.
    return pa.RecordBatchReader.from_stream(_Stream(capsule)).read_all()


def _as_table(sequences: Any, column: str, ids: Optional[Sequence[Optional[str]]]) -> pa.Table:
    """Whatever holds the sequences, as a pyarrow Table with a ``column`` column."""
    if isinstance(sequences, pa.Table):
        table = sequences
    elif isinstance(sequences, pa.RecordBatch):
        table = pa.Table.from_batches([sequences])
    elif isinstance(sequences, (pa.Array, pa.ChunkedArray)):
        table = pa.table({column: sequences})
    elif type(sequences).__module__.startswith("pandas"):
        if hasattr(sequences, "columns"):
            table = pa.Table.from_pandas(sequences, preserve_index=False)
        else:
            table = pa.table({column: pa.Array.from_pandas(sequences)})
    elif hasattr(sequences, "__arrow_c_stream__"):
        # Polars DataFrames stream structs (a table); Series stream their values.
        try:
            table = pa.table(sequences)
        except (TypeError, ValueError, pa.ArrowInvalid):
            table = pa.table({column: pa.chunked_array(sequences)})
    elif hasattr(sequences, "__arrow_c_array__"):
        table = pa.table({column: pa.array(sequences)})
    elif isinstance(sequences, str):
        raise TypeError("pass a list of sequences, not one str: embed([sequence])")
    else:
        table = pa.table({column: pa.array(list(sequences), pa.string())})
    if column not in table.column_names:
        raise UsageError(
            f"no column {column!r} among {table.column_names}: pass seq_column=... to name "
            "the column holding the sequences"
        )
    if ids is not None:
        if len(ids) != table.num_rows:
            raise UsageError(f"{len(ids)} ids for {table.num_rows} sequences")
        table = table.append_column("id", pa.array(list(ids), pa.string()))
    return table


def _argv(options: Dict[str, Any]) -> List[str]:
    """Keyword options as command-line arguments: ``max_length=512`` → ``--max-length=512``,
    ``True`` → the flag, ``False``/``None`` → nothing, a list → comma-separated."""
    argv = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv.append(f"{flag}={','.join(str(v) for v in value)}")
        else:
            argv.append(f"{flag}={value}")
    return argv


class Embedder:
    """A protein language model loaded once, embedding sequences held in memory.

    ``Embedder(model, device, dtype, **options)`` loads ``model``: a hub id
    (``facebook/esm2_t33_650M_UR50D``, ``biohub/ESMC-300M``), a short name (``650M``,
    ``esmc-300m``), a local HuggingFace directory or a fair-esm ``.pt`` file, on ``device``
    (``auto``: every GPU, else the CPU; ``cpu``; ``cuda``; ``cuda:0,1``) in ``dtype``
    (``auto``: f32 on the CPU, where results equal transformers', bf16 on GPUs; ``f16``;
    ``fp8`` on Hopper GPUs, after checking the model with ``esmbed verify --dtype bf16,fp8``).

    Options, as ``esmbed embed``'s: ``tokens_per_batch`` (tokens per pack), ``max_length``
    (residues; default the model's crop: 1022 ESM-2, 2046 ESM C), ``long`` (``truncate``,
    ``error`` or ``window``), ``unknown`` (``error``, ``x``, ``unk``), ``output_dtype``
    (``f32``, ``f16``), ``reuse`` (embed identical sequences once; the result is the same).

    Example::

        >>> embedder = esmbed.Embedder("650M", device="cuda")
        >>> table = embedder.embed(["MKTAYIAKQR", "MSEQVE"], layers=(20, -1))
        >>> table.column_names
        ['length', 'truncated', 'embedding_20', 'embedding']
    """

    def __init__(
        self,
        model: str = "facebook/esm2_t33_650M_UR50D",
        device: str = "auto",
        dtype: Optional[str] = None,
        *,
        tokens_per_batch: Optional[int] = None,
        max_length: Optional[int] = None,
        long: str = "truncate",
        unknown: str = "error",
        output_dtype: str = "f32",
        reuse: bool = True,
    ) -> None:
        self._native = _native.Embedder(model, device, dtype or "auto", tokens_per_batch)
        self.max_length = max_length
        self.long = long
        self.unknown = unknown
        self.output_dtype = output_dtype
        self.reuse = reuse
        #: The last :meth:`embed` job's summary (rows, errors, tokens, seconds, devices...).
        self.last_summary: Optional[Dict[str, Any]] = None

    @property
    def model(self) -> str:
        """The model as named."""
        return self._native.model

    @property
    def hidden_size(self) -> int:
        """Width of the embeddings."""
        return self._native.hidden_size

    @property
    def num_layers(self) -> int:
        """Layers of the model: layer numbers run from 0 (embeddings) to this (normalized);
        negative numbers count from the end (-1 is the last)."""
        return self._native.num_layers

    @property
    def devices(self) -> List[str]:
        """The devices the model runs on (one replica each)."""
        return self._native.devices

    @property
    def dtype(self) -> str:
        """The compute dtype."""
        return self._native.dtype

    @property
    def tokens_per_batch(self) -> int:
        """Tokens per pack."""
        return self._native.tokens_per_batch

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the weights, as the output's metadata records it."""
        return self._native.fingerprint

    def __repr__(self) -> str:
        return (
            f"Embedder({self.model!r}, devices={self.devices}, dtype={self.dtype!r}, "
            f"hidden_size={self.hidden_size}, num_layers={self.num_layers})"
        )

    def embed(
        self,
        sequences: Any,
        layers: Iterable[int] = (-1,),
        pooling: Iterable[str] = ("mean",),
        per_residue: bool = False,
        *,
        ids: Optional[Sequence[Optional[str]]] = None,
        seq_column: str = "sequence",
        id_column: str = "id",
        pll: bool = False,
        strict: bool = False,
        dedupe: bool = False,
        return_errors: bool = False,
    ) -> Any:
        """Embed ``sequences``; returns a ``pyarrow.Table`` (or ``(table, errors)``).

        ``sequences``: a list of str, a pyarrow array, table or record batch, a pandas or Polars
        Series or DataFrame, or anything with the Arrow PyCapsule interface; tables need a
        ``seq_column`` column (and may have ``id_column``); ``ids`` names the rows of a list.

        The table has the columns ``esmbed embed`` writes, rows in input order: the input's
        other columns, ``length``, ``truncated``, then per layer ``embedding`` (mean over
        residues, BOS/EOS excluded; ``FixedSizeList<float32>[hidden_size]``),
        ``bos_embedding`` (``pooling=("mean", "bos")``), ``residue_embeddings``
        (``per_residue=True``); the model's last layer gets the plain names, others a ``_K``
        suffix. ``pll=True`` adds ``pll`` and ``pseudo_perplexity`` (needs a masked-LM
        checkpoint).

        Rows that cannot be embedded (invalid letters, empty, too long with
        ``long="error"``...) are left out: ``strict=True`` raises
        :class:`~esmbed.errors.BadInputError` at the first instead; ``return_errors=True``
        returns ``(table, errors)``, the errors with each row's ``position`` (0-based), ``id``,
        ``problem`` and ``reason``; otherwise a :class:`RowsNotEmbedded` warning says how many.
        """
        table = _as_table(sequences, seq_column, ids)
        pooling = tuple(pooling)
        unknown_pooling = set(pooling) - {"mean", "bos"}
        if unknown_pooling:
            raise UsageError(
                f"pooling {sorted(unknown_pooling)}: use 'mean' and/or 'bos' "
                "(per_residue=True for every residue's vector)"
            )
        rows, errors, summary = self._native.embed(
            table.__arrow_c_stream__(),
            seq_column=seq_column,
            id_column=id_column,
            name="sequences",
            layers=list(layers),
            mean="mean" in pooling,
            bos="bos" in pooling,
            per_residue=per_residue,
            pll=pll,
            strict=strict,
            dedupe=dedupe,
            reuse=self.reuse,
            max_length=self.max_length,
            long=self.long,
            unknown=self.unknown,
            output_dtype=self.output_dtype,
            rows_per_part=None,
        )
        out, errors_table = _table(rows), _table(errors)
        self.last_summary = json.loads(summary)
        if return_errors:
            return out, errors_table
        if errors_table.num_rows:
            first = errors_table.slice(0, 1).to_pylist()[0]
            warnings.warn(
                RowsNotEmbedded(
                    f"{errors_table.num_rows} of {table.num_rows} rows were not embedded (first: "
                    f"position {first['position']}: {first['reason']}); pass "
                    "return_errors=True to get them all, or strict=True to raise"
                ),
                stacklevel=2,
            )
        return out

    def embed_numpy(
        self,
        sequences: Any,
        layer: int = -1,
        pooling: str = "mean",
        **options: Any,
    ) -> np.ndarray:
        """One vector per sequence as an ``[n, hidden_size]`` float32 array (zero-copy from the
        Arrow column), in input order. Every row must embed: a bad one raises
        :class:`~esmbed.errors.BadInputError` (``strict=True``)."""
        if pooling not in ("mean", "bos"):
            raise UsageError(f"pooling {pooling!r}: use 'mean' or 'bos'")
        table = self.embed(sequences, layers=(layer,), pooling=(pooling,), strict=True, **options)
        name = "embedding" if pooling == "mean" else "bos_embedding"
        column = next(c for c in table.column_names if c == name or c.startswith(name + "_"))
        values = table.column(column).combine_chunks()
        flat = values.flatten().to_numpy(zero_copy_only=False)
        matrix: np.ndarray = flat.reshape(len(values), self.hidden_size)
        return matrix.astype(np.float32, copy=False)


def embed_file(
    inputs: Union[str, Sequence[str]],
    output: str,
    *,
    quiet: bool = False,
    **options: Any,
) -> Optional[Dict[str, Any]]:
    """Run ``esmbed embed INPUTS -o OUTPUT`` with ``options`` (the command's, ``_`` for ``-``);
    returns its summary as a dict (``None`` for ``dry_run=True``).

    The whole job: FASTA/Parquet/CSV files or directories, local or ``s3://``; Parquet out
    (``out.parquet``, or ``out/`` for a dataset of parts) with an errors file beside it;
    ``resume=True`` continues an interrupted job (Ctrl-C keeps finished parts), ``overwrite=True``
    replaces an output. The progress bar shows on a terminal; ``quiet=True`` hides it.

    Example::

        >>> esmbed.embed_file("proteins.fasta.gz", "emb.parquet", model="650M", device="cuda",
        ...                   layers=[20, -1], per_residue=False)
        {'rows': 20000, 'embedded': 19998, 'errors': 2, ...}
    """
    if isinstance(inputs, str):
        inputs = [inputs]
    argv = [*inputs, f"--output={output}", *_argv(dict(options, no_progress=quiet or None))]
    summary = _native.embed_file(argv)
    return None if summary is None else json.loads(summary)


def sql(query: str, **options: Any) -> pa.Table:
    """Run ``query`` (statements separated by ``;``) as ``esmbed sql -c QUERY`` would, with
    ``options`` (the command's: ``model``, ``device``, ``lenient``, ``max_length``...,
    ``no_model=True`` for SQL without a model); returns the last statement's rows.

    Example::

        >>> esmbed.sql("CREATE EXTERNAL TABLE p STORED AS FASTA LOCATION 'p.fasta'; "
        ...            "SELECT id, esm_embed(sequence) AS e FROM p", model="8M")
    """
    capsule = _native.sql([f"--command={query}", *_argv(options)])
    if capsule is None:
        return pa.table({})
    return _table(capsule)


def cuda_available() -> bool:
    """Whether this build of esmbed has GPU support and sees a GPU."""
    return bool(_native.cuda) and _native.cuda_device_count() > 0
