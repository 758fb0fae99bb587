"""FP8 fidelity without a GPU: esmbed's `--dtype fp8` arithmetic emulated on the CPU on
transformers' ESM-2, against the same model in f32.

Every projection of every block (Q, K, V, attention output, FC1, FC2) takes e4m3 inputs the way
esmbed's kernels make them: each activation row (token) scaled by its own amax / 448, each weight
row (output channel) by its own, rounded to e4m3 (torch.float8_e4m3fn, round to nearest even),
multiplied back and accumulated in f32. Nothing else is rounded, so the figures are the floor that
the e4m3 format itself sets, with no kernel in the way: if `esmbed verify --dtype fp8` on a GPU
shows about the same, the kernels are not the limit. Prints the min / mean cosine of mean
embeddings (last layer, BOS/EOS excluded) and the max relative error of a mean element, per
variant: all projections in FP8, then each kept in f32 (`--keep`), then whole blocks kept.

    python bench/fp8_emulate.py /tmp/outliers-150M-x50 -n 8
    python bench/fp8_emulate.py tests/fixtures/tiny_h16 --keep fc2 qkv --keep-blocks 0,-1
"""

import argparse
import random

import torch
from transformers import EsmModel

from torch_pll import tokens  # the ESM alphabet's ids with <cls> and <eos>

E4M3_MAX = 448.0
AMINO = "LAGVESIKRDTPNQFYMHCW"


def e4m3_rows(x):
    """Quantize-dequantize each row (last dim) with the scale amax / 448, as esmbed does."""
    amax = x.abs().amax(dim=-1, keepdim=True)
    live = amax > 1e-30  # an all-zero row quantizes to zeros, as in esmbed's kernels
    scale = torch.where(live, amax / E4M3_MAX, torch.ones_like(amax))
    q = (x / scale).to(torch.float8_e4m3fn).to(torch.float32) * scale
    return torch.where(live, q, torch.zeros_like(q))


class Fp8Linear(torch.nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.weight = e4m3_rows(linear.weight.data.float())
        self.bias = None if linear.bias is None else linear.bias.data.float()

    def forward(self, x):
        y = e4m3_rows(x.float()) @ self.weight.T
        return y if self.bias is None else y + self.bias


def to_fp8(model, keep=(), keep_blocks=()):
    blocks = model.encoder.layer
    for i, block in enumerate(blocks):
        if i in keep_blocks or i - len(blocks) in keep_blocks:
            continue
        attn = block.attention.self
        for name in ("query", "key", "value"):
            if "qkv" not in keep:
                setattr(attn, name, Fp8Linear(getattr(attn, name)))
        if "out" not in keep:
            block.attention.output.dense = Fp8Linear(block.attention.output.dense)
        if "fc1" not in keep:
            block.intermediate.dense = Fp8Linear(block.intermediate.dense)
        if "fc2" not in keep:
            block.output.dense = Fp8Linear(block.output.dense)
    return model


def sequences(n, seed=7):
    """`esmbed verify`'s kind of set: the edge lengths, then random ones."""
    r = random.Random(seed)
    lengths = [1, 2, 3, 50, 1022] + [r.randint(20, 600) for _ in range(n)]
    return ["".join(r.choice(AMINO) for _ in range(length)) for length in lengths]


@torch.no_grad()
def mean_embeddings(model, seqs):
    out = []
    for s in seqs:
        hidden = model(input_ids=tokens(s)[None]).last_hidden_state
        out.append(hidden[0, 1:-1].float().mean(0))
    return out


def report(name, got, want, seqs):
    cos = [torch.nn.functional.cosine_similarity(g, w, dim=0).item() for g, w in zip(got, want)]
    rel = max(((g - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want))
    worst = len(seqs[cos.index(min(cos))])
    print(f"{name}: min cosine {min(cos):.6f}, mean {sum(cos) / len(cos):.6f}, "
          f"max rel. error of a mean element {rel:.4f} (worst: a {worst}-residue sequence)", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="an ESM-2 checkpoint directory (transformers)")
    ap.add_argument("-n", type=int, default=8, help="random-length sequences besides 1, 2, 3, 50, 1022")
    ap.add_argument("--keep", nargs="*", default=["qkv", "out", "fc1", "fc2"],
                    help="projections to try in f32, one at a time")
    ap.add_argument("--keep-blocks", default="0,-1", help="blocks to try in f32 together ('' for none)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    seqs = sequences(a.n)
    load = lambda: EsmModel.from_pretrained(a.model, dtype=torch.float32, add_pooling_layer=False).eval()
    want = mean_embeddings(load(), seqs)
    report("fp8, every projection", mean_embeddings(to_fp8(load()), seqs), want, seqs)
    for p in a.keep:
        report(f"fp8, {p} in f32", mean_embeddings(to_fp8(load(), keep=(p,)), seqs), want, seqs)
    if a.keep_blocks:
        blocks = tuple(int(b) for b in a.keep_blocks.split(","))
        report(f"fp8, blocks {a.keep_blocks} in f32",
               mean_embeddings(to_fp8(load(), keep_blocks=blocks), seqs), want, seqs)


if __name__ == "__main__":
    main()
