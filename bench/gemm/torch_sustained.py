"""cuBLAS's sustained speed on ESM-2 650M's projection shapes, as PyTorch's F.linear (bias in the
epilogue) runs them: 20 and 400 back-to-back calls at 65,536 and 62,000 tokens, bf16. The 400-call
figures (the GPU at its power limit, as in a real job) are the ceiling esmbed's GEMMs are compared
with. `python bench/gemm/torch_sustained.py` on the GPU machine.
"""
import torch, torch.nn.functional as F, json
torch.manual_seed(0)
def t(fn, reps):
    for _ in range(3): fn()
    s,e=torch.cuda.Event(True),torch.cuda.Event(True); torch.cuda.synchronize(); s.record()
    for _ in range(reps): fn()
    e.record(); torch.cuda.synchronize(); return s.elapsed_time(e)/reps
for T in (65536, 62000):
  for name,(n,k) in {"qkv":(3840,1280),"fc1":(5120,1280),"fc2":(1280,5120),"out":(1280,1280)}.items():
    x=torch.randn(T,k,device="cuda",dtype=torch.bfloat16); w=(torch.randn(n,k,device="cuda")/k**.5).bfloat16(); b=torch.randn(n,device="cuda").bfloat16()
    for reps in (20,400):
        ms=t(lambda: F.linear(x,w,b), reps)
        print(json.dumps(dict(T=T,op=name,reps=reps,ms=round(ms,4),tflops=round(2*T*n*k/ms/1e9,1))),flush=True)
