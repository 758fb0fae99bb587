"""The CUDA wheel on the GPU machine (bench/gpu_python.sh).

    python bench/python_gpu_check.py numerics             # fixtures: GPU bf16/f16 vs the CPU f32 path
    python bench/python_gpu_check.py job FASTA ROUND      # the job through embed_file and Embedder.embed
"""
import gzip
import json
import sys
import time

import numpy as np

import esmbed


def read_fasta(path):
    ids, seqs, current = [], [], []
    with gzip.open(path, "rt") as f:
        for line in f:
            if line.startswith(">"):
                if current:
                    seqs.append("".join(current))
                ids.append(line[1:].split()[0])
                current = []
            else:
                current.append(line.strip())
    seqs.append("".join(current))
    return ids, seqs


def numerics():
    rng = np.random.default_rng(0)
    aa = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
    seqs = ["".join(rng.choice(aa, n)) for n in [1, 2, 5, 17, 64, 130, 300, 511, 1022]]
    out = {"cuda_available": esmbed.cuda_available()}
    for model in ["tests/fixtures/tiny_h64", "tests/fixtures/tiny_h16", "tests/fixtures/tiny_esmc"]:
        exact = esmbed.Embedder(model, device="cpu").embed_numpy(seqs)
        for dtype in ["bf16", "f16"]:
            gpu = esmbed.Embedder(model, device="cuda", dtype=dtype)
            got = gpu.embed_numpy(seqs)
            cos = (got * exact).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(exact, axis=1))
            rel = np.abs(got - exact).max(1) / np.abs(exact).max(1)
            out[f"{model.split('/')[-1]}/{dtype}"] = {
                "devices": gpu.devices,
                "min_cosine": float(cos.min()),
                "max_rel_error": float(rel.max()),
            }
    print(json.dumps(out))


def job(fasta, round_):
    started = time.time()
    summary = esmbed.embed_file(fasta, f"/tmp/py_file{round_}.parquet", model="random:650M",
                                device="cuda", quiet=True, overwrite=True)
    file_wall = time.time() - started
    embedder = esmbed.Embedder("random:650M", device="cuda")
    ids, seqs = read_fasta(fasta)
    started = time.time()
    table = embedder.embed(seqs, ids=ids)
    memory_wall = time.time() - started
    inner = embedder.last_summary
    print(json.dumps({
        "round": round_,
        "embed_file": {"tokens": summary["tokens"], "seconds": summary["seconds"],
                       "tokens_per_second": summary["tokens"] / summary["seconds"],
                       "wall_with_load": file_wall},
        "Embedder.embed": {"rows": table.num_rows, "tokens": inner["tokens"],
                           "job_seconds": inner["seconds"], "call_seconds": memory_wall,
                           "tokens_per_second_job": inner["tokens"] / inner["seconds"],
                           "tokens_per_second_call": inner["tokens"] / memory_wall},
    }))


if __name__ == "__main__":
    if sys.argv[1] == "numerics":
        numerics()
    else:
        job(sys.argv[2], sys.argv[3])
