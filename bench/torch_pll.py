"""Pseudo-log-likelihoods with PyTorch, the two ways people compute them, for esmbed score's
comparison (transformers EsmForMaskedLM, bf16, random weights of a real ESM-2 shape, on the GPU):

  fair_esm : fair-esm's predict.py / compute_pppl: one forward per masked position, batch 1
  batched  : a careful user: all masked copies of a sequence, in batches of 64

    python bench/torch_pll.py SEQUENCES.fasta[.gz] 650M SECONDS

Each procedure scores the sequences in order for at most SECONDS (then stops at a sequence
boundary) and prints one JSON line: residues scored, seconds, residues/s.

With WAIT_FOR=PATH in the environment, the model is built first, then the script waits until PATH
exists and takes SECONDS from its content: it can start beside another GPU job and run after it.
"""
import gzip
import json
import os
import sys
import time

import torch
from transformers import EsmConfig, EsmForMaskedLM

SIZES = {"8M": (6, 320, 20), "35M": (12, 480, 20), "150M": (30, 640, 20),
         "650M": (33, 1280, 20), "3B": (36, 2560, 40), "15B": (48, 5120, 40)}
ALPHABET = "LAGVSERTIDPKQNFYMHWCXBUZO"  # token ids 4.. in the ESM alphabet
MASK = 32


def read_fasta(path):
    opener = gzip.open if path.endswith(".gz") else open
    seqs, cur = [], []
    with opener(path, "rt") as f:
        for line in f:
            line = line.strip()
            if line.startswith(">"):
                if cur:
                    seqs.append("".join(cur))
                cur = []
            elif line:
                cur.append(line)
    if cur:
        seqs.append("".join(cur))
    return seqs


def tokens(seq):
    return torch.tensor([0] + [4 + ALPHABET.index(c) for c in seq] + [2])


def model_of(size):
    layers, hidden, heads = SIZES[size]
    cfg = EsmConfig(vocab_size=33, hidden_size=hidden, num_hidden_layers=layers,
                    num_attention_heads=heads, intermediate_size=4 * hidden,
                    max_position_embeddings=1026, position_embedding_type="rotary",
                    token_dropout=True, mask_token_id=MASK, pad_token_id=1,
                    emb_layer_norm_before=False, layer_norm_eps=1e-5, attn_implementation="sdpa")
    with torch.device("cuda"):
        torch.manual_seed(0)
        return EsmForMaskedLM(cfg).to(torch.bfloat16).eval()


@torch.inference_mode()
def fair_esm(model, toks):
    total = 0.0
    for i in range(1, len(toks) - 1):
        masked = toks.clone()
        masked[i] = MASK
        logits = model(input_ids=masked[None].cuda()).logits
        total += torch.log_softmax(logits[0, i].float(), -1)[toks[i]].item()
    return total


@torch.inference_mode()
def batched(model, toks, batch=64):
    L = len(toks) - 2
    total = 0.0
    for start in range(1, L + 1, batch):
        pos = torch.arange(start, min(start + batch, L + 1))
        copies = toks.repeat(len(pos), 1)
        copies[torch.arange(len(pos)), pos] = MASK
        logits = model(input_ids=copies.cuda()).logits
        lp = torch.log_softmax(logits[torch.arange(len(pos)), pos.cuda()].float(), -1)
        total += lp[torch.arange(len(pos)), toks[pos].cuda()].sum().item()
    return total


def main():
    path, size, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    seqs = read_fasta(path)
    model = model_of(size)
    go = os.environ.get("WAIT_FOR")
    if go:
        while not os.path.exists(go):
            time.sleep(0.2)
        time.sleep(0.2)
        seconds = float(open(go).read().strip() or seconds)
    for name, fn in (("fair_esm", fair_esm), ("batched", batched)):
        fn(model, tokens(seqs[0][:50]))  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        residues = n = copies = 0
        for s in seqs:
            if time.perf_counter() - start > seconds:
                break
            fn(model, tokens(s))
            residues += len(s)
            copies += len(s) * (len(s) + 2)  # the masked copies' tokens, as esmbed counts them
            n += 1
        torch.cuda.synchronize()
        took = time.perf_counter() - start
        print(json.dumps(dict(method=name, model=size, sequences=n, residues=residues,
                              seconds=round(took, 2), residues_per_second=round(residues / took, 1),
                              copy_tokens_per_second=round(copies / took))),
              flush=True)


if __name__ == "__main__":
    main()
