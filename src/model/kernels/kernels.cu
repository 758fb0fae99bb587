__device__ __forceinline__ float load_bf16(unsigned short h) { return __uint_as_float(((unsigned int)h) << 16); }
__device__ __forceinline__ unsigned short store_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffff) > 0x7f800000) return 0x7fc0;
    u += 0x7fff + ((u >> 16) & 1);
    return (unsigned short)(u >> 16);
}
__device__ __forceinline__ float load_f16(unsigned short h) {
    float f; asm("{ cvt.f32.f16 %0, %1; }" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ unsigned short store_f16(float f) {
    unsigned short h; asm("{ cvt.rn.f16.f32 %0, %1; }" : "=h"(h) : "f"(f)); return h;
}
__device__ __forceinline__ float gelu_erf(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
#define LO(v, LOAD) LOAD((unsigned short)((v) & 0xffff))
#define HI(v, LOAD) LOAD((unsigned short)((v) >> 16))
/* Two values rounded (to nearest even, as the scalar stores) and packed, low half first, in one
   instruction (sm_80+, which FlashAttention needs anyway): the element-wise kernels were
   issue-bound on the scalar rounding. */
__device__ __forceinline__ unsigned int store_bf16x2(float lo, float hi) {
    unsigned int d; asm("{ cvt.rn.bf16x2.f32 %0, %1, %2; }" : "=r"(d) : "f"(hi), "f"(lo)); return d;
}
__device__ __forceinline__ unsigned int store_f16x2(float lo, float hi) {
    unsigned int d; asm("{ cvt.rn.f16x2.f32 %0, %1, %2; }" : "=r"(d) : "f"(hi), "f"(lo)); return d;
}
#define PACK(f0, f1, STORE) STORE##x2(f0, f1)

/* Exact (erf) GELU in place, eight elements per thread (16-byte accesses). */
#define GELU(NAME, LOAD, STORE)                                                                   \
extern "C" __global__ void NAME##_gelu8(uint4* x, unsigned long long n8) {                        \
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n8; \
         i += (unsigned long long)blockDim.x * gridDim.x) {                                       \
        uint4 v = x[i];                                                                           \
        v.x = PACK(gelu_erf(LO(v.x, LOAD)), gelu_erf(HI(v.x, LOAD)), STORE);                      \
        v.y = PACK(gelu_erf(LO(v.y, LOAD)), gelu_erf(HI(v.y, LOAD)), STORE);                      \
        v.z = PACK(gelu_erf(LO(v.z, LOAD)), gelu_erf(HI(v.z, LOAD)), STORE);                      \
        v.w = PACK(gelu_erf(LO(v.w, LOAD)), gelu_erf(HI(v.w, LOAD)), STORE);                      \
        x[i] = v;                                                                                 \
    }                                                                                             \
}                                                                                                 \
extern "C" __global__ void NAME##_gelu1(unsigned short* x, unsigned long long n) {                \
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;  \
         i += (unsigned long long)blockDim.x * gridDim.x)                                         \
        x[i] = STORE(gelu_erf(LOAD(x[i])));                                                       \
}
GELU(bf16, load_bf16, store_bf16)
GELU(f16, load_f16, store_f16)

/* SwiGLU over the rows of ESM C's fused gate/up GEMM output, [rows, 2 * ffn] (the gate's ffn
   columns, then the up's): out[r, c] = silu(gate[r, c]) * up[r, c], in f32 and rounded once (the
   unfused path rounds silu(gate) and then the product). Eight outputs per thread (16-byte
   accesses; ffn a multiple of 8), grid-stride. */
__device__ __forceinline__ float silu(float x) { return x / (1.0f + __expf(-x)); }
#define SWIGLU2(g, u, LOAD, STORE) PACK(silu(LO(g, LOAD)) * LO(u, LOAD), silu(HI(g, LOAD)) * HI(u, LOAD), STORE)
#define SWIGLU(NAME, LOAD, STORE)                                                                 \
extern "C" __global__ void NAME##_swiglu8(const uint4* gate_up, uint4* out, unsigned long long rows, \
        unsigned int ffn8) {                                                                      \
    unsigned long long n = rows * ffn8;                                                           \
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;  \
         i += (unsigned long long)blockDim.x * gridDim.x) {                                       \
        unsigned long long r = i / ffn8, c = i % ffn8;                                            \
        uint4 g = gate_up[r * 2 * ffn8 + c], u = gate_up[r * 2 * ffn8 + ffn8 + c], v;             \
        v.x = SWIGLU2(g.x, u.x, LOAD, STORE);                                                     \
        v.y = SWIGLU2(g.y, u.y, LOAD, STORE);                                                     \
        v.z = SWIGLU2(g.z, u.z, LOAD, STORE);                                                     \
        v.w = SWIGLU2(g.w, u.w, LOAD, STORE);                                                     \
        out[i] = v;                                                                               \
    }                                                                                             \
}
SWIGLU(bf16, load_bf16, store_bf16)
SWIGLU(f16, load_f16, store_f16)

/* LayerNorm over rows of 8 * cols8 <= 32 * 8 * V elements, one warp per row: the row is read
   once, with 16-byte loads all in flight together, and kept in registers for the statistics (f32:
   the mean, then the mean squared deviation, PyTorch's biased variance) and the output,
   y = (x - mean) * rstd * w + b rounded once. Instantiated for V = 8, 12 and 20 (rows up to 2048,
   3072 and 5120: every ESM-2 up to 15B); the smallest that fits is used, since the registers a
   thread holds (4 * V for the row) decide how many warps an SM keeps in flight. */
#define SUM8(v, LOAD) (((LO(v.x, LOAD) + HI(v.x, LOAD)) + (LO(v.y, LOAD) + HI(v.y, LOAD))) +      \
                       ((LO(v.z, LOAD) + HI(v.z, LOAD)) + (LO(v.w, LOAD) + HI(v.w, LOAD))))
#define SQ2(u, LOAD) ((LO(u, LOAD) - mean) * (LO(u, LOAD) - mean) + (HI(u, LOAD) - mean) * (HI(u, LOAD) - mean))
#define NORM2(u, g, s, LOAD, STORE) PACK((LO(u, LOAD) - mean) * rstd * LO(g, LOAD) + LO(s, LOAD),   \
                                         (HI(u, LOAD) - mean) * rstd * HI(g, LOAD) + HI(s, LOAD), STORE)
/* The row statistics, with `in`, `cols8`, `eps` and `lane` in scope: the row in `v`, `mean` and
   `rstd`. Every lane loads its part of the row before the reductions (warp shuffles). */
#define LAYER_NORM_STATS(LOAD, V)                                                                \
    uint4 v[V];                                                                                \
    float sum = 0.0f;                                                                             \
    _Pragma("unroll") for (int i = 0; i < V; i++) {                                            \
        unsigned int c = lane + 32u * i;                                                          \
        if (c < cols8) { v[i] = in[c]; sum += SUM8(v[i], LOAD); }                                 \
    }                                                                                             \
    float n = (float)(cols8 * 8);                                                                 \
    float mean = warp_sum(sum) / n;                                                               \
    float sq = 0.0f;                                                                              \
    _Pragma("unroll") for (int i = 0; i < V; i++) {                                            \
        if (lane + 32u * i < cols8)                                                               \
            sq += (SQ2(v[i].x, LOAD) + SQ2(v[i].y, LOAD)) + (SQ2(v[i].z, LOAD) + SQ2(v[i].w, LOAD)); \
    }                                                                                             \
    float rstd = rsqrtf(warp_sum(sq) / n + eps);
/* The statistics and the store, with `w`, `b` and `o` in scope too; the stores come after the
   reductions, so `o` may be `in` (in place). */
#define LAYER_NORM_ROW(LOAD, STORE, V)                                                           \
    LAYER_NORM_STATS(LOAD, V)                                                                    \
    _Pragma("unroll") for (int i = 0; i < V; i++) {                                            \
        unsigned int c = lane + 32u * i;                                                          \
        if (c < cols8) {                                                                          \
            uint4 g = w[c], s = b[c];                                                             \
            o[c] = make_uint4(NORM2(v[i].x, g.x, s.x, LOAD, STORE), NORM2(v[i].y, g.y, s.y, LOAD, STORE), \
                              NORM2(v[i].z, g.z, s.z, LOAD, STORE), NORM2(v[i].w, g.w, s.w, LOAD, STORE)); \
        }                                                                                         \
    }                                                                                             \

#define LAYER_NORM(NAME, LOAD, STORE, V)                                                         \
extern "C" __global__ void NAME##_layer_norm##V(const uint4* x, const uint4* w, const uint4* b,  \
        uint4* out, unsigned int rows, unsigned int cols8, float eps) {                           \
    unsigned int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;                              \
    unsigned int lane = threadIdx.x & 31;                                                         \
    if (row >= rows) return;                                                                      \
    const uint4* in = x + (unsigned long long)row * cols8;                                        \
    uint4* o = out + (unsigned long long)row * cols8;                                             \
    LAYER_NORM_ROW(LOAD, STORE, V)                                                                \
}                                                                                                 \
/* In place on cols8 vectors of rows stride8 vectors apart (ESM C's Q/K norms, on the QKV GEMM's
   output). */                                                                                    \
extern "C" __global__ void NAME##_layer_norm_strided##V(uint4* x, const uint4* w, const uint4* b, \
        unsigned int rows, unsigned int cols8, unsigned int stride8, float eps) {                 \
    unsigned int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;                              \
    unsigned int lane = threadIdx.x & 31;                                                         \
    if (row >= rows) return;                                                                      \
    uint4* o = x + (unsigned long long)row * stride8;                                             \
    const uint4* in = o;                                                                          \
    LAYER_NORM_ROW(LOAD, STORE, V)                                                                \
}
LAYER_NORM(bf16, load_bf16, store_bf16, 8)
LAYER_NORM(bf16, load_bf16, store_bf16, 12)
LAYER_NORM(bf16, load_bf16, store_bf16, 20)
LAYER_NORM(f16, load_f16, store_f16, 8)
LAYER_NORM(f16, load_f16, store_f16, 12)
LAYER_NORM(f16, load_f16, store_f16, 20)

/* Rotate-half (NeoX) rotary in place on the query and key heads of a fused projection output
   (rows of `row` elements: heads2 = 2 * heads heads of 2 * half, then the values, untouched).
   cos/sin: f32 [tokens, half], positions already per sequence. In f32 as HF does it
   (x * cos + rotate_half(x) * sin with f32 tables), rounded once. Each thread takes two
   neighbouring pairs (i, i + half) and (i + 1, i + 1 + half). */
#define ROTARY(NAME, LOAD, STORE)                                                                 \
extern "C" __global__ void NAME##_rotary(unsigned short* qkv, const float* cos, const float* sin, \
        unsigned int tokens, unsigned int heads2, unsigned int half, unsigned int row) {          \
    unsigned int quarter = half >> 1;                                                             \
    unsigned long long total = (unsigned long long)tokens * heads2 * quarter;                     \
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;        \
         i < total; i += (unsigned long long)blockDim.x * gridDim.x) {                            \
        unsigned int j = (unsigned int)(i % quarter) * 2;                                         \
        unsigned long long th = i / quarter;                                                      \
        unsigned int h = (unsigned int)(th % heads2);                                             \
        unsigned long long t = th / heads2;                                                       \
        unsigned short* base = qkv + t * row + (unsigned long long)h * 2 * half + j;              \
        unsigned int* p1 = (unsigned int*)base;                                                   \
        unsigned int* p2 = (unsigned int*)(base + half);                                          \
        unsigned int a = *p1, b = *p2;                                                            \
        float c0 = cos[t * half + j], c1 = cos[t * half + j + 1];                                 \
        float s0 = sin[t * half + j], s1 = sin[t * half + j + 1];                                 \
        float x10 = LO(a, LOAD), x11 = HI(a, LOAD), x20 = LO(b, LOAD), x21 = HI(b, LOAD);         \
        *p1 = PACK(x10 * c0 + (-x20) * s0, x11 * c1 + (-x21) * s1, STORE);                        \
        *p2 = PACK(x20 * c0 + x10 * s0, x21 * c1 + x11 * s1, STORE);                              \
    }                                                                                             \
}
ROTARY(bf16, load_bf16, store_bf16)
ROTARY(f16, load_f16, store_f16)

/* The same rotary, one block per token and four pairs per thread: 8-byte accesses to the heads,
   16-byte reads of the tables, and no 64-bit division per element (which made the one-pair
   kernel above issue-bound, at a fraction of the memory bandwidth). Needs half % 4 == 0. */
#define ROTARY4(NAME, LOAD, STORE)                                                                \
extern "C" __global__ void NAME##_rotary4(unsigned short* qkv, const float4* cos,                 \
        const float4* sin, unsigned int tokens, unsigned int heads2, unsigned int half,           \
        unsigned int row) {                                                                       \
    unsigned int q4 = half >> 2, per_token = heads2 * q4;                                         \
    for (unsigned int t = blockIdx.x; t < tokens; t += gridDim.x) {                               \
        const float4* ct = cos + (unsigned long long)t * q4;                                      \
        const float4* st = sin + (unsigned long long)t * q4;                                      \
        unsigned short* r = qkv + (unsigned long long)t * row;                                    \
        for (unsigned int i = threadIdx.x; i < per_token; i += blockDim.x) {                      \
            unsigned int h = i / q4, g = i - h * q4;                                              \
            uint2* p1 = (uint2*)(r + h * 2 * half + g * 4);                                       \
            uint2* p2 = (uint2*)(r + h * 2 * half + half + g * 4);                                \
            uint2 a = *p1, b = *p2;                                                               \
            float4 c = ct[g], s = st[g];                                                          \
            float a0 = LO(a.x, LOAD), a1 = HI(a.x, LOAD), a2 = LO(a.y, LOAD), a3 = HI(a.y, LOAD); \
            float b0 = LO(b.x, LOAD), b1 = HI(b.x, LOAD), b2 = LO(b.y, LOAD), b3 = HI(b.y, LOAD); \
            *p1 = make_uint2(PACK(a0 * c.x + (-b0) * s.x, a1 * c.y + (-b1) * s.y, STORE),         \
                             PACK(a2 * c.z + (-b2) * s.z, a3 * c.w + (-b3) * s.w, STORE));        \
            *p2 = make_uint2(PACK(b0 * c.x + a0 * s.x, b1 * c.y + a1 * s.y, STORE),               \
                             PACK(b2 * c.z + a2 * s.z, b3 * c.w + a3 * s.w, STORE));              \
        }                                                                                         \
    }                                                                                             \
}
ROTARY4(bf16, load_bf16, store_bf16)
ROTARY4(f16, load_f16, store_f16)

/* Mean over the residue rows of each sequence of a pack: grid (sequences, column blocks). */
#define SEGMENT_MEAN(NAME, LOAD)                                                                  \
extern "C" __global__ void NAME##_segment_mean(const unsigned short* hidden,                      \
        const unsigned int* starts, const unsigned int* counts, float* out, unsigned int cols) {  \
    unsigned int s = blockIdx.x;                                                                  \
    unsigned int c = blockIdx.y * blockDim.x + threadIdx.x;                                       \
    if (c >= cols) return;                                                                        \
    unsigned long long row = starts[s];                                                           \
    unsigned int count = counts[s];                                                               \
    float acc = 0.0f;                                                                             \
    for (unsigned int r = 0; r < count; ++r) acc += LOAD(hidden[(row + r) * cols + c]);          \
    out[(unsigned long long)s * cols + c] = acc / (float)(count > 0 ? count : 1);                 \
}
SEGMENT_MEAN(bf16, load_bf16)
SEGMENT_MEAN(f16, load_f16)
