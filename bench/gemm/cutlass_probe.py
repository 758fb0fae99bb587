"""Times the CUTLASS GEMMs of bench/gemm/cutlass_gemm.cu (bias, bias + exact GELU, bias + residual
fused in the epilogue) against PyTorch's cuBLAS on ESM-2's projection shapes, and checks them
against an f32 reference.

    # here (nvcc from ../shared/gpu/setup-cuda.sh; CUTLASS 3.5 headers from its cache):
    C=$(ls -d ~/.cache/esmbed-cuda/cudaforge/git/checkouts/*/include | head -1)
    for e in 0 1 2; do nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a \\
        --expt-relaxed-constexpr -DESM_GEMM_EPI=$e -I$C -Xcompiler -fPIC -c bench/gemm/cutlass_gemm.cu -o epi$e.o; done
    nvcc -shared -cudart static -gencode arch=compute_90a,code=sm_90a -o .gpu/libesm_gemm.so epi*.o \\
        -L$CUDA_HOME/lib/stubs -lcuda
    # on the GPU machine:
    python bench/gemm/cutlass_probe.py .gpu/libesm_gemm.so [configs] > gemm.jsonl

Each line: model, op, config (or "torch"), tokens, ms, TFLOP/s, max error relative to the output's
scale, and whether two runs were bitwise equal. Measured 2026-11-26 on an H200
(bench/results/2026-11-26-h200-s4/configs*): every configuration was 15-25 % slower than cuBLAS, so
fusing the GELU into a CUTLASS epilogue loses more than the separate GELU pass costs.
"""
import ctypes
import json
import sys

import torch
import torch.nn.functional as F

lib = ctypes.CDLL(sys.argv[1])
fns = [getattr(lib, f"esm_gemm_epi{e}") for e in range(3)]
for f in fns:
    f.restype = ctypes.c_int
    f.argtypes = [ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 5 + [ctypes.c_int] * 3 + [ctypes.c_void_p]

SHAPES = {
    "650M": (1280, 5120, 65536),
    "3B": (2560, 10240, 32768),
}
CONFIGS = [int(c) for c in (sys.argv[2].split(",") if len(sys.argv) > 2 else "0,1,2,3".split(","))]


def timeit(fn, reps=20):
    for _ in range(3):
        fn()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    s.record()
    for _ in range(reps):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / reps


def main():
    torch.manual_seed(0)
    stream = torch.cuda.current_stream().cuda_stream
    for dtype, dcode in ((torch.bfloat16, 0), (torch.float16, 1)):
        for model, (h, ffn, m) in SHAPES.items():
            ops = {
                "qkv": (3 * h, h, 0),
                "out": (h, h, 2),
                "fc1": (ffn, h, 1),
                "fc2": (h, ffn, 2),
            }
            for op, (n, k, epi) in ops.items():
                if dtype == torch.float16 and model == "3B":
                    continue
                mm = m - 5  # a token count that no tile divides
                x = (torch.randn(mm, k, device="cuda") * 0.5).to(dtype)
                w = (torch.randn(n, k, device="cuda") / k**0.5).to(dtype)
                b = (torch.randn(n, device="cuda") * 0.1).to(dtype)
                r = torch.randn(mm, n, device="cuda").to(dtype) if epi == 2 else None
                ref = x.float() @ w.float().t() + b.float()
                if epi == 1:
                    ref = F.gelu(ref)
                if epi == 2:
                    ref = ref + r.float()
                flops = 2.0 * mm * n * k
                scale = ref.abs().max().item()
                # cuBLAS through PyTorch, the way the previous path ran it
                if epi == 0:
                    tfn = lambda: F.linear(x, w, b)
                elif epi == 1:
                    tfn = lambda: F.gelu(F.linear(x, w, b))
                else:
                    tfn = lambda: torch.addmm(r, x, w.t())
                ms = timeit(tfn)
                err = (tfn().float() - ref).abs().max().item() / scale
                print(json.dumps(dict(dtype=str(dtype)[6:], model=model, op=op, config="torch", tokens=mm,
                                      ms=round(ms, 4), tflops=round(flops / ms / 1e9, 1), err=err)), flush=True)
                for cfg in CONFIGS:
                    out = torch.empty(mm, n, device="cuda", dtype=dtype)
                    args = (dcode, cfg, w.data_ptr(), x.data_ptr(), b.data_ptr(),
                            r.data_ptr() if r is not None else None, out.data_ptr(), mm, n, k, stream)
                    rc = fns[epi](*args)
                    if rc != 0:
                        print(json.dumps(dict(model=model, op=op, config=cfg, rc=rc)), flush=True)
                        continue
                    torch.cuda.synchronize()
                    first = out.clone()
                    ms = timeit(lambda: fns[epi](*args))
                    same = torch.equal(first, out)
                    err = (out.float() - ref).abs().max().item() / scale
                    print(json.dumps(dict(dtype=str(dtype)[6:], model=model, op=op, config=cfg, tokens=mm,
                                          ms=round(ms, 4), tflops=round(flops / ms / 1e9, 1), err=err,
                                          bitwise_repeat=same)), flush=True)


main()
