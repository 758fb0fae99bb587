"""The Python package against the command line, on the repository's tiny fixture models (CPU).

Run from a venv where the built wheel is installed (``.ci/run`` does it): ``pytest python/tests``.
``ESMBED_CARGO_BIN`` (the cargo-built ``esmbed``), when set, is compared too.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import esmbed

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
ESM2 = str(FIXTURES / "tiny_h16")
ESMC = str(FIXTURES / "tiny_esmc")
ESM2_HEADLESS = str(FIXTURES / "tiny_h16_bf16")
AMINO = "ACDEFGHIKLMNPQRSTVWY"


def sequences(n: int, seed: int = 7, shortest: int = 5, longest: int = 60) -> list:
    rng = random.Random(seed)
    return ["".join(rng.choice(AMINO) for _ in range(rng.randint(shortest, longest))) for _ in range(n)]


def write_fasta(path: Path, records: list) -> Path:
    path.write_text("".join(f">{i} protein {i}\n{s}\n" for i, s in records))
    return path


def esmbed_command() -> list:
    """The wheel's `esmbed` entry point, beside this interpreter."""
    command = Path(sys.executable).with_name("esmbed")
    assert command.exists(), f"the wheel installs the esmbed command at {command}"
    return [str(command)]


def run_cli(argv: list, command: list | None = None, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(
        (command or esmbed_command()) + argv, capture_output=True, text=True, **kwargs
    )
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def embedder() -> esmbed.Embedder:
    return esmbed.Embedder(ESM2)


# --- the command in the wheel ---------------------------------------------------------------


def test_entry_point_runs_the_cli():
    assert esmbed.__version__ in run_cli(["--version"]).stdout
    usage = subprocess.run(esmbed_command() + ["embed", "--no-such-flag"], capture_output=True, text=True)
    assert usage.returncode == 2 and "--no-such-flag" in usage.stderr
    assert "--tokens-per-batch" in run_cli(["embed", "--help"]).stdout


# --- Embedder.embed equals the command line's output -------------------------------------------


@pytest.mark.parametrize("model", [ESM2, ESMC])
def test_embed_equals_cli_bitwise(tmp_path, model):
    seqs = sequences(40)
    if model == ESMC:
        seqs[3] = seqs[3][:20] + "|" + seqs[3][20:]  # a chain break
    records = [(f"p{i}", s) for i, s in enumerate(seqs)]
    fasta = write_fasta(tmp_path / "in.fasta", records)
    flags = ["--model", model, "--layers=1,-1", "--bos", "--per-residue"]
    commands = [esmbed_command()]
    if os.environ.get("ESMBED_CARGO_BIN"):
        commands.append([os.environ["ESMBED_CARGO_BIN"]])
    py = esmbed.Embedder(model).embed(
        seqs, ids=[i for i, _ in records], layers=(1, -1), pooling=("mean", "bos"), per_residue=True
    )
    for k, command in enumerate(commands):
        out = tmp_path / f"cli{k}.parquet"
        run_cli(["embed", str(fasta), "-o", str(out), *flags], command)
        cli = pq.read_table(out)
        for name in ["id", "length", "truncated", "embedding", "embedding_1", "bos_embedding",
                     "bos_embedding_1", "residue_embeddings", "residue_embeddings_1"]:
            assert py.column(name).combine_chunks().equals(cli.column(name).combine_chunks()), name


def test_embed_table_shape_and_order(embedder):
    seqs = sequences(25, seed=3)
    table = embedder.embed(seqs)
    assert table.column_names == ["length", "truncated", "embedding"]
    assert table.column("length").to_pylist() == [len(s) for s in seqs]
    vectors = embedder.embed_numpy(seqs)
    assert vectors.shape == (25, embedder.hidden_size) and vectors.dtype == np.float32
    # Each row is the sequence's own: embedding one alone gives the same vector.
    alone = embedder.embed_numpy([seqs[11]])
    np.testing.assert_allclose(alone[0], vectors[11], rtol=1e-5, atol=1e-6)
    assert embedder.num_layers == 3 and embedder.devices == ["cpu"] and embedder.dtype == "f32"


# --- Arrow in from everywhere ------------------------------------------------------------------


def test_inputs_from_pyarrow_pandas_polars(embedder):
    seqs = sequences(12, seed=5)
    expected = embedder.embed(seqs).column("embedding")
    ids = [f"s{i}" for i in range(len(seqs))]
    inputs = {
        "list": seqs,
        "tuple": tuple(seqs),
        "generator": (s for s in seqs),
        "pyarrow array": pa.array(seqs),
        "pyarrow large_string": pa.array(seqs, pa.large_string()),
        "pyarrow chunked": pa.chunked_array([seqs[:5], seqs[5:]]),
        "pyarrow table": pa.table({"id": ids, "sequence": seqs}),
        "pyarrow record batch": pa.record_batch({"sequence": seqs}),
        "pandas series": pd.Series(seqs),
        "pandas dataframe": pd.DataFrame({"id": ids, "sequence": seqs}),
        "polars series": pl.Series("aa", seqs),
        "polars dataframe": pl.DataFrame({"id": ids, "sequence": seqs}),
    }
    for what, value in inputs.items():
        table = embedder.embed(value)
        assert table.column("embedding").equals(expected), what
        if what.endswith(("table", "dataframe")):
            assert table.column("id").to_pylist() == ids, what


def test_other_columns_pass_through(embedder):
    table = pa.table({"acc": ["a", "b"], "aa": ["MKTAYIAK", "MSEQ"], "score": [1.5, 2.5]})
    out = embedder.embed(table, seq_column="aa", id_column="acc")
    assert out.column_names[:2] == ["acc", "score"]
    assert out.column("score").to_pylist() == [1.5, 2.5]
    with pytest.raises(esmbed.UsageError, match="seq_column"):
        embedder.embed(table)


def test_the_gil_is_released_while_the_model_runs(embedder):
    import threading

    done = threading.Event()
    ticks = 0
    worker = threading.Thread(target=lambda: (embedder.embed(sequences(300, seed=4, longest=200)), done.set()))
    worker.start()
    while not done.is_set():  # Python code keeps running while the job does
        ticks += 1
        time.sleep(0.001)
    worker.join()
    assert ticks > 20


def test_output_is_zero_copy_arrow(embedder):
    table = embedder.embed(sequences(4))
    values = table.column("embedding").combine_chunks().flatten()
    # The float buffer is Rust's: numpy views it without a copy.
    array = values.to_numpy(zero_copy_only=True)
    assert array.base is not None and array.dtype == np.float32


# --- bad rows ----------------------------------------------------------------------------------


def test_errors_table_for_bad_rows(embedder):
    seqs = ["MKTAYIAK", "MKJ1", "", None, "MSEQ", "MKTAYIAK"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = embedder.embed(seqs)
    assert [w.category for w in caught] == [esmbed.RowsNotEmbedded]
    assert table.num_rows == 3
    table, errors = embedder.embed(seqs, return_errors=True)
    assert table.column("length").to_pylist() == [8, 4, 8]
    assert errors.column_names == ["id", "position", "input", "record", "problem", "reason"]
    rows = errors.to_pylist()
    assert [r["position"] for r in rows] == [1, 2, 3]
    assert [r["problem"] for r in rows] == ["invalid_residue", "empty_sequence", "null_sequence"]
    assert all(r["input"] == "sequences" and r["reason"] for r in rows)


def test_strict_raises_bad_input(embedder):
    with pytest.raises(esmbed.BadInputError, match="record 2") as raised:
        embedder.embed(["MKTAYIAK", "MKT1"], strict=True)
    assert isinstance(raised.value, ValueError) and isinstance(raised.value, esmbed.EsmbedError)
    with pytest.raises(esmbed.BadInputError):
        embedder.embed_numpy(["MKTAYIAK", "MKT1"])


def test_error_kinds_are_classes(embedder):
    with pytest.raises(esmbed.ModelError, match="no-such-model"):
        esmbed.Embedder(str(FIXTURES / "no-such-model"))
    with pytest.raises(esmbed.UsageError, match="dtype"):
        esmbed.Embedder(ESM2, dtype="f8")
    with pytest.raises(esmbed.UsageError, match="long="):
        esmbed.Embedder(ESM2, long="sometimes").embed(["MKT"])
    with pytest.raises(esmbed.UsageError, match="pll needs the masked-LM head"):
        esmbed.Embedder(ESM2_HEADLESS).embed(["MKTAYIAK"], pll=True)
    assert issubclass(esmbed.Interrupted, KeyboardInterrupt)


def test_pll_equals_cli_score(tmp_path, embedder):
    seqs = sequences(6, seed=11, longest=20)
    fasta = write_fasta(tmp_path / "in.fasta", [(f"p{i}", s) for i, s in enumerate(seqs)])
    run_cli(["score", str(fasta), "-o", str(tmp_path / "s.parquet"), "--model", ESM2])
    cli = pq.read_table(tmp_path / "s.parquet")
    py = embedder.embed(seqs, pll=True)
    assert py.column("pll").to_pylist() == cli.column("pll").to_pylist()


# --- embed_file: the whole job -----------------------------------------------------------------


def test_embed_file_equals_cli_and_resumes(tmp_path):
    records = [(f"p{i}", s) for i, s in enumerate(sequences(60, seed=2))]
    fasta = write_fasta(tmp_path / "in.fasta", records + [("bad", "MKT1")])
    flags = dict(model=ESM2, layers=[2, -1], rows_per_part=6, tokens_per_batch=256)
    cli_out = tmp_path / "cli.parquet"
    run_cli(["embed", str(fasta), "-o", str(cli_out), "--model", ESM2, "--layers=2,-1",
             "--rows-per-part=6", "--tokens-per-batch=256"])
    summary = esmbed.embed_file(str(fasta), str(tmp_path / "py.parquet"), **flags)
    assert summary["rows"] == 61 and summary["embedded"] == 60 and summary["errors"] == 1
    assert pq.read_table(tmp_path / "py.parquet").equals(pq.read_table(cli_out))
    assert pq.read_table(summary["errors_output"]).column("id").to_pylist() == ["bad"]

    # Ctrl-C in the middle: Interrupted, no output, finished parts kept; resume=True completes it.
    out = tmp_path / "interrupted.parquet"
    script = (
        "import esmbed, sys\n"
        f"try: esmbed.embed_file({str(fasta)!r}, {str(out)!r}, **{flags!r})\n"
        "except esmbed.Interrupted as e: print('interrupted:', e); sys.exit(42)\n"
    )
    env = dict(os.environ, ESMBED_TEST_PART_DELAY_MS="300")
    job = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    staging = tmp_path / ".interrupted.parquet.esmbed"
    deadline = time.time() + 60
    while not (staging.exists() and len(list(staging.glob("part-*.parquet"))) >= 2):
        assert time.time() < deadline and job.poll() is None, "the job should still be running"
        time.sleep(0.05)
    job.send_signal(signal.SIGINT)
    stdout, _ = job.communicate(timeout=60)
    assert job.returncode == 42 and "interrupted" in stdout
    assert not out.exists()
    with pytest.raises(esmbed.UsageError, match="resume"):
        esmbed.embed_file(str(fasta), str(out), **flags)
    resumed = esmbed.embed_file(str(fasta), str(out), resume=True, **flags)
    assert resumed["parts_resumed"] >= 2
    assert pq.read_table(out).equals(pq.read_table(cli_out))


def test_embed_file_usage_error(tmp_path):
    with pytest.raises(esmbed.UsageError, match="no-such-option"):
        esmbed.embed_file("x.fasta", str(tmp_path / "o.parquet"), no_such_option=3)
    with pytest.raises(esmbed.BadInputError, match="no such file"):
        esmbed.embed_file(str(tmp_path / "missing.fasta"), str(tmp_path / "o.parquet"), model=ESM2)


# --- sql ---------------------------------------------------------------------------------------


def test_sql_returns_a_table(tmp_path, embedder):
    seqs = sequences(5, seed=9)
    fasta = write_fasta(tmp_path / "p.fasta", [(f"p{i}", s) for i, s in enumerate(seqs)])
    table = esmbed.sql(
        f"CREATE EXTERNAL TABLE p STORED AS FASTA LOCATION '{fasta}';"
        "SELECT id, esm_embed(sequence) AS e FROM p ORDER BY id",
        model=ESM2,
    )
    assert table.column("id").to_pylist() == [f"p{i}" for i in range(5)]
    expected = embedder.embed_numpy(seqs)
    got = np.stack([np.asarray(v, dtype=np.float32) for v in table.column("e").to_pylist()])
    np.testing.assert_array_equal(got, expected)
    assert esmbed.sql("SELECT 1 + 1 AS two", no_model=True).to_pylist() == [{"two": 2}]


def test_help_is_useful():
    doc = esmbed.Embedder.__doc__ or ""
    assert "device" in doc and "dtype" in doc
    assert "seq_column" in (esmbed.Embedder.embed.__doc__ or "")
    out = subprocess.run([sys.executable, "-c", "import esmbed; help(esmbed.Embedder)"],
                         capture_output=True, text=True, env=dict(os.environ, PAGER="cat"))
    assert out.returncode == 0 and "embed_numpy" in out.stdout


def test_example_script_type_checks():
    mypy = str(Path(sys.executable).with_name("mypy"))
    example = REPO / "examples" / "python" / "nearest_neighbours.py"
    for target in ([str(example)], ["-p", "esmbed"]):  # the example, and the package's own stubs
        done = subprocess.run([mypy, "--strict", "--ignore-missing-imports", *target],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
