#!/usr/bin/env python3
"""Write the fuzz targets' seed corpus (small valid inputs and near-misses) under corpus/.
Needs numpy, pyarrow and safetensors; run from fuzz/: python make_corpus.py"""
import gzip, io, json, os, shutil
import numpy as np
import pyarrow as pa, pyarrow.parquet as pq
from safetensors.numpy import save

HERE = os.path.dirname(os.path.abspath(__file__))
C = os.path.join(HERE, "corpus")

def put(target, name, data):
    os.makedirs(os.path.join(C, target), exist_ok=True)
    with open(os.path.join(C, target, name), "wb") as f:
        f.write(data)

fasta = open(os.path.join(HERE, "..", "examples", "data", "some_proteins.fasta"), "rb").read()
put("fasta", "proteins", fasta[:3000])
put("fasta", "proteins.gz", gzip.compress(fasta[:3000], mtime=0))
put("fasta", "edge", b"\n\n>a desc\nMKT\nVRQ*\n>\nMJ\n>b\n\n>c\r\nmk tv\r\n")
put("fasta", "not_fasta", b"id,sequence\nx,MKT\n")

def parquet(table):
    buf = io.BytesIO(); pq.write_table(table, buf, row_group_size=2); return buf.getvalue()
put("parquet", "plain", parquet(pa.table({"id": ["a", "b", "c"], "sequence": ["MKT", None, "MJV"]})))
put("parquet", "large_string", parquet(pa.table({"id": pa.array(["a"], pa.large_string()),
                                                 "sequence": pa.array(["MKTAYIAK"], pa.large_string())})))
put("parquet", "int_sequence", parquet(pa.table({"id": [1, 2], "sequence": [3, 4]})))
put("parquet", "no_sequence", parquet(pa.table({"name": ["a"], "aa": ["MKT"]})))

config = json.load(open(os.path.join(HERE, "..", "tests", "fixtures", "tiny_h16", "config.json")))
put("config", "tiny_h16", json.dumps(config).encode())
bad = dict(config, num_attention_heads=0); put("config", "zero_heads", json.dumps(bad).encode())
bad = dict(config, hidden_size=65); put("config", "indivisible", json.dumps(bad).encode())
put("config", "esm1b", json.dumps(dict(config, position_embedding_type="absolute")).encode())

# A valid 1-layer model for the checkpoint target's config (hidden 8, 2 heads, FFN 16).
rng = np.random.default_rng(0)
h, f, v = 8, 16, 33
t = {"embeddings.word_embeddings.weight": rng.normal(size=(v, h)).astype(np.float32),
     "encoder.emb_layer_norm_after.weight": np.ones(h, np.float32),
     "encoder.emb_layer_norm_after.bias": np.zeros(h, np.float32)}
p = "encoder.layer.0."
for name, shape in [("attention.self.query", (h, h)), ("attention.self.key", (h, h)),
                    ("attention.self.value", (h, h)), ("attention.output.dense", (h, h)),
                    ("intermediate.dense", (f, h)), ("output.dense", (h, f))]:
    t[p + name + ".weight"] = rng.normal(size=shape).astype(np.float32)
    t[p + name + ".bias"] = rng.normal(size=shape[0]).astype(np.float32)
for ln in ["attention.LayerNorm", "LayerNorm"]:
    t[p + ln + ".weight"] = np.ones(h, np.float32)
    t[p + ln + ".bias"] = np.zeros(h, np.float32)
t[p + "attention.self.rotary_embeddings.inv_freq"] = (1 / 10000 ** (np.arange(0, 4, 2) / 4)).astype(np.float32)
put("checkpoint", "safetensors", b"\x00" + save(t))
legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma") if k.startswith(p) else k: a for k, a in t.items()}
put("checkpoint", "legacy", b"\x00" + save(legacy))
index = {"weight_map": {k: "model-00001-of-00001.safetensors" for k in t}}
put("checkpoint", "index", b"\x01" + json.dumps(index).encode())
put("checkpoint", "index_escape", b"\x01" + json.dumps({"weight_map": {"x": "../../etc/passwd"}}).encode())
print("corpus written")
