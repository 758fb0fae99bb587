"""A random-weight ESM-2 / ESM C checkpoint of a real shape with trained-model-like activation
outliers, written by transformers' save_pretrained, for measuring FP8 fidelity
(`esmbed verify --model DIR --dtype bf16,fp8`).

Random weights give activations without the outliers trained transformers show (a few hidden
channels of the residual stream, and a few FFN neurons, ×20-×100 the rest), and per-token FP8
scales are only tested by those: a token whose row holds one huge channel gives every other
channel of that row a coarse e4m3 grid. This script injects them:

- residual stream: `--channels` hidden channels, their embedding columns and the rows of every
  block's attention-output and FFN-output projections (weights and biases) scaled by
  `--factor`, so that every block adds to them;
- FFN: `--channels` neurons of every block's FFN input projection (ESM-2's FC1 rows and bias,
  ESM C's up rows, so that SwiGLU's product grows by the factor once, not squared) scaled by
  `--factor / 4`.

    python bench/make_outlier_model.py /tmp/outliers-650m --shape 650M --factor 50
"""

import argparse

import torch

SHAPES = {
    # name: (family, layers, hidden, heads, ffn)
    "8M": ("esm", 6, 320, 20, 1280),
    "35M": ("esm", 12, 480, 20, 1920),
    "150M": ("esm", 30, 640, 20, 2560),
    "650M": ("esm", 33, 1280, 20, 5120),
    "esmc-300m": ("esmc", 30, 960, 15, 2560),
    "esmc-600m": ("esmc", 36, 1152, 18, 3072),
}


def build(shape, seed):
    family, layers, hidden, heads, ffn = SHAPES[shape]
    torch.manual_seed(seed)
    if family == "esm":
        from transformers import EsmConfig, EsmForMaskedLM

        config = EsmConfig(
            vocab_size=33, hidden_size=hidden, num_hidden_layers=layers,
            num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=1026,
            position_embedding_type="rotary", token_dropout=True, mask_token_id=32,
            pad_token_id=1, emb_layer_norm_before=False, layer_norm_eps=1e-5,
        )
        return family, EsmForMaskedLM(config)
    from transformers import EsmcConfig, EsmcForMaskedLM

    config = EsmcConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=ffn,
    )
    return family, EsmcForMaskedLM(config)


# Parameter-name patterns of the projections, per family: (residual-stream writers, FFN inputs).
PATTERNS = {
    "esm": (("attention.output.dense", "output.dense"), ("intermediate.dense",)),
    "esmc": (("self_attn.o_proj", "mlp.down_proj"), ("mlp.up_proj",)),
}


@torch.no_grad()
def inject(family, model, channels, factor, seed):
    g = torch.Generator().manual_seed(seed + 1)
    hidden = model.config.hidden_size
    ffn = model.config.intermediate_size
    hot = torch.randperm(hidden, generator=g)[:channels]
    neurons = torch.randperm(ffn, generator=g)[:channels]
    writers, ffn_inputs = PATTERNS[family]
    touched = 0
    for name, p in model.named_parameters():
        if "embed" in name and name.endswith("weight") and p.shape[-1] == hidden and "lm_head" not in name:
            p[:, hot] *= factor
            touched += 1
        elif any(f"{w}." in name for w in writers) and "intermediate" not in name and p.shape[0] == hidden:
            p[hot] *= factor  # weight rows [H, *] or bias [H]
            touched += 1
        elif any(f"{w}." in name for w in ffn_inputs) and p.shape[0] == ffn:
            p[neurons] *= factor / 4
            touched += 1
    return hot.tolist(), neurons.tolist(), touched


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--shape", default="650M", choices=sorted(SHAPES))
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--factor", type=float, default=50.0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    family, model = build(a.shape, a.seed)
    hot, neurons, touched = inject(family, model, a.channels, a.factor, a.seed)
    model.save_pretrained(a.out)
    print(f"{a.out}: {a.shape} ({family}), hidden channels {hot} and FFN neurons {neurons} "
          f"×{a.factor:g} / ×{a.factor / 4:g} in {touched} tensors")


if __name__ == "__main__":
    main()
