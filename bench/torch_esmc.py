"""PyTorch reference throughput for ESM C, beside `esmbed bench --shape esmc-*` (random weights of
the real shapes, bf16, the GPU), on the ESM-2 reference's workload (`torch_baseline.lengths`, the
same UniRef50-like length mix and seed):

  padded_sorted           transformers' EsmcModel (sdpa), length-sorted token-budgeted padded batches
  packed_varlen           a packed forward on the same module's weights, torch's varlen attention
  packed_varlen_compiled  the same under torch.compile (COMPILE=1)

    TORCH_BASELINE_DIR=.gpu COMPILE=1 python bench/torch_esmc.py esmc-300m,esmc-600m

Prints one JSON line per method (tokens/s counting <cls>/<eos>, MFU against PEAK_TFLOPS, default
989), after a check that the packed forward equals EsmcModel on a few sequences. `--check-cpu`
checks the packed forward against EsmcModel on the CPU (a per-sequence attention stands in for
varlen), with no GPU.
"""
import json
import os
import sys
import time

import torch
from transformers import EsmcConfig, EsmcModel

sys.path.insert(0, os.environ.get("TORCH_BASELINE_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "bench")))
from torch_baseline import get_varlen, lengths, rand_tokens, token_budget_batches  # noqa: E402

SIZES = {  # layers, hidden, heads, intermediate (the hub configs)
    "esmc-300m": (30, 960, 15, 2560),
    "esmc-600m": (36, 1152, 18, 3072),
    "esmc-6b": (80, 2560, 40, 6912),
}


def make_model(size, dtype, device="cuda"):
    layers, hidden, heads, ffn = SIZES[size]
    cfg = EsmcConfig(vocab_size=64, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=ffn,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        torch.manual_seed(0)
        model = EsmcModel(cfg)
    return model.to(dtype).eval()


def flops_per_token(size, avg_len):
    layers, h, _, ffn = SIZES[size]
    return layers * (8 * h * h + 6 * h * ffn + 4 * avg_len * h)


def rope(pos, dim, dtype):
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=pos.device, dtype=torch.float32) / dim))
    f = pos.float()[:, None] * inv[None, :]
    emb = torch.cat([f, f], -1)
    return emb.cos()[:, None, :].to(dtype), emb.sin()[:, None, :].to(dtype)


def rotate(x, cos, sin):
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def packed_layers(model, x, cos, sin, cu, mx, attn):
    cfg = model.config
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    d = h // heads
    for layer in model.layers:
        a = layer.self_attn
        n = layer.input_layernorm(x)
        q = a.q_norm(a.q_proj(n)).view(-1, heads, d)
        k = a.k_norm(a.k_proj(n)).view(-1, heads, d)
        v = a.v_proj(n).view(-1, heads, d)
        o = attn(rotate(q, cos, sin), rotate(k, cos, sin), v, cu, mx).reshape(-1, h)
        x = x + a.o_proj(o) / layer.scaling_factor
        n = layer.post_attention_layernorm(x)
        x = x + layer.mlp(n) / layer.scaling_factor
    return model.norm(x)


_compiled = {}


@torch.inference_mode()
def packed_forward(model, ids, cu, pos, mx, attn, compiled=False):
    d = model.config.hidden_size // model.config.num_attention_heads
    x = model.embed_tokens(ids)
    cos, sin = rope(pos, d, x.dtype)
    fn = packed_layers
    if compiled:
        fn = _compiled.setdefault(id(model), torch.compile(packed_layers, dynamic=True))
    return fn(model, x, cos, sin, cu, mx, attn)


def per_sequence_attention(q, k, v, cu, mx):
    """Exact attention within each packed sequence (CPU check)."""
    out = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (t[s:e].transpose(0, 1) for t in (q, k, v))
        out.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs).transpose(0, 1))
    return torch.cat(out, 0)


def pack_inputs(seqs, idx, device):
    ids = torch.cat([seqs[i] for i in idx]).to(device)
    ls = torch.tensor([len(seqs[i]) for i in idx])
    cu = torch.zeros(len(idx) + 1, dtype=torch.int32)
    cu[1:] = ls.cumsum(0)
    pos = torch.cat([torch.arange(n) for n in ls.tolist()]).to(device)
    return ids, cu.to(device), pos, int(ls.max()), ls


@torch.inference_mode()
def worst_vs_hf(model, seqs, sample, attn, device):
    ids, cu, pos, mx, _ = pack_inputs(seqs, sample, device)
    packed = packed_forward(model, ids, cu, pos, mx, attn).float()
    worst = 0.0
    for j, i in enumerate(sample):
        ref = model(input_ids=seqs[i][None].to(device)).last_hidden_state[0].float()
        got = packed[cu[j]:cu[j + 1]]
        worst = max(worst, (got - ref).abs().max().item() / ref.abs().max().item())
    return worst


@torch.inference_mode()
def run_padded(model, seqs, order, batches):
    for b in batches:
        idx = [order[i] for i in b]
        ml = max(len(seqs[i]) for i in idx)
        ids = torch.full((len(idx), ml), 1, dtype=torch.long)
        mask = torch.zeros((len(idx), ml), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, :len(seqs[i])] = seqs[i]
            mask[r, :len(seqs[i])] = 1
        h = model(input_ids=ids.cuda(), attention_mask=mask.cuda()).last_hidden_state
        m = mask.cuda()
        m[:, 0] = 0
        m.scatter_(1, (mask.sum(1) - 1).cuda().unsqueeze(1), 0)
        ((h * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True)).float().cpu()


@torch.inference_mode()
def run_packed(model, seqs, packs, attn, compiled):
    for p in packs:
        ids, cu, pos, mx, ls = pack_inputs(seqs, p, "cuda")
        h = packed_forward(model, ids, cu, pos, mx, attn, compiled)
        segs = torch.repeat_interleave(torch.arange(len(p)), ls).cuda()
        w = torch.ones(h.shape[0], device="cuda")
        w[cu[:-1].long()] = 0
        w[(cu[1:] - 1).long()] = 0
        pooled = torch.zeros(len(p), h.shape[1], device="cuda").index_add_(0, segs, h.float() * w[:, None])
        (pooled / (ls.cuda()[:, None] - 2)).cpu()


def timed(fn, warm, full):
    fn(warm)
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn(full)
    torch.cuda.synchronize()
    return time.perf_counter() - t


def main():
    if "--check-cpu" in sys.argv:
        model = make_model("esmc-300m", torch.float32, "cpu")
        model.layers = model.layers[:2]
        seqs = rand_tokens([5, 37, 120])
        print(json.dumps({"packed_vs_hf_rel_maxdiff_cpu": worst_vs_hf(model, seqs, [0, 1, 2], per_sequence_attention, "cpu")}))
        return
    sizes = sys.argv[1].split(",") if len(sys.argv) > 1 else ["esmc-300m", "esmc-600m"]
    n = int(os.environ.get("N", "4000"))
    seqs = rand_tokens(lengths(n))
    tok = sum(len(s) for s in seqs)
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "n": n, "tokens": tok}))
    varlen = get_varlen()
    peak = float(os.environ.get("PEAK_TFLOPS", "989")) * 1e12
    for size in sizes:
        model = make_model(size, torch.bfloat16)
        fpt = flops_per_token(size, tok / n)
        budget = int(os.environ.get("TOKENS_PER_BATCH", "32768" if size == "esmc-6b" else "65536"))
        order = sorted(range(n), key=lambda i: len(seqs[i]))

        def report(method, seconds, batches):
            print(json.dumps({"model": size, "method": method, "seconds": round(seconds, 3),
                              "tokens_per_s": round(tok / seconds), "mfu": round(tok * fpt / seconds / peak, 3),
                              "batches": batches}), flush=True)

        if not os.environ.get("SKIP_PADDED"):
            batches = token_budget_batches([len(seqs[i]) for i in order], budget)
            dt = timed(lambda b: run_padded(model, seqs, order, b), batches[:3], batches)
            report("padded_sorted", dt, len(batches))
        if varlen is None:
            continue
        packs, cur, count = [], [], 0
        for i in order:
            if cur and count + len(seqs[i]) > budget:
                packs.append(cur)
                cur, count = [], 0
            cur.append(i)
            count += len(seqs[i])
        packs.append(cur)
        sample = order[:2] + order[-2:]
        print(json.dumps({"model": size, "packed_vs_hf_rel_maxdiff": worst_vs_hf(model, seqs, sample, varlen, "cuda")}))
        methods = [("packed_varlen", False)] + ([("packed_varlen_compiled", True)] if os.environ.get("COMPILE") else [])
        for method, compiled in methods:
            try:
                dt = timed(lambda p: run_packed(model, seqs, p, varlen, compiled), packs[:3], packs)
            except Exception as e:  # a torch without varlen or compile support: say so, go on
                print(json.dumps({"model": size, "method": method, "error": repr(e)[:300]}))
                continue
            report(method, dt, len(packs))
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
