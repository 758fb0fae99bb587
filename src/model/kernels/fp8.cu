/* FP8 (e4m3) quantization for `--dtype fp8`, appended to kernels.cu (its bf16 helpers and
   LayerNorm macros) and compiled for compute_89, the first architecture with e4m3 conversions.

   Every kernel here writes one row's values as e4m3 with one f32 scale per row: s = amax / 448
   (1 for an all-zero row, or one below 1e-30), q = satfinite(round(x / s)), so that x ≈ q · s, which the FP8 GEMM
   applies in its epilogue (cuBLASLt's outer-vector scales). The values quantized are those the
   bf16 path would have written (rounded to bf16 first), so the two paths differ by the e4m3
   rounding alone. The whole row is held in registers: read once, written once. */
#define E4M3_MAX 448.0f

/* Two values as e4m3, rounded to nearest even and saturated, low byte first. */
__device__ __forceinline__ unsigned int e4m3x2(float lo, float hi) {
    unsigned short d;
    asm("{ cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2; }" : "=h"(d) : "f"(hi), "f"(lo));
    return d;
}
__device__ __forceinline__ float abs_max2(unsigned int v) {
    return fmaxf(fabsf(LO(v, load_bf16)), fabsf(HI(v, load_bf16)));
}
__device__ __forceinline__ float abs_max8(uint4 v) {
    return fmaxf(fmaxf(abs_max2(v.x), abs_max2(v.y)), fmaxf(abs_max2(v.z), abs_max2(v.w)));
}
__device__ __forceinline__ unsigned int quant4(unsigned int a, unsigned int b, float inv) {
    return e4m3x2(LO(a, load_bf16) * inv, HI(a, load_bf16) * inv)
         | (e4m3x2(LO(b, load_bf16) * inv, HI(b, load_bf16) * inv) << 16);
}
/* Eight bf16 values as eight e4m3 bytes. */
__device__ __forceinline__ uint2 quant8(uint4 v, float inv) {
    return make_uint2(quant4(v.x, v.y, inv), quant4(v.z, v.w, inv));
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
/* The maximum over a block of at most 256 threads (whole warps), given to every thread. */
__device__ __forceinline__ float block_max(float v) {
    __shared__ float partial[8];
    v = warp_max(v);
    unsigned int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    float m = lane < (blockDim.x >> 5) ? partial[lane] : 0.0f;
    return warp_max(m);
}
/* A row whose largest magnitude is below 1e-30 is quantized as zeros (scale 1): for smaller
   scales 1 / s would overflow to infinity, and 0 · inf is NaN. */
__device__ __forceinline__ float scale_of(float amax) { return amax > 1e-30f ? amax / E4M3_MAX : 1.0f; }

/* The element-wise inputs of the row kernels: a row of 8-element vectors of the op's result,
   from row `row` of `x`. */
#define OP_COPY(x, row, c, cols8) (x[(unsigned long long)(row) * (cols8) + (c)])
__device__ __forceinline__ uint4 gelu8(uint4 v) {
    v.x = PACK(gelu_erf(LO(v.x, load_bf16)), gelu_erf(HI(v.x, load_bf16)), store_bf16);
    v.y = PACK(gelu_erf(LO(v.y, load_bf16)), gelu_erf(HI(v.y, load_bf16)), store_bf16);
    v.z = PACK(gelu_erf(LO(v.z, load_bf16)), gelu_erf(HI(v.z, load_bf16)), store_bf16);
    v.w = PACK(gelu_erf(LO(v.w, load_bf16)), gelu_erf(HI(v.w, load_bf16)), store_bf16);
    return v;
}
#define OP_GELU(x, row, c, cols8) gelu8(OP_COPY(x, row, c, cols8))
/* x is [rows, 2 * cols]: the gate's columns, then the up's (ESM C's fused gate/up output). */
__device__ __forceinline__ uint4 swiglu8(uint4 g, uint4 u) {
    uint4 v;
    v.x = SWIGLU2(g.x, u.x, load_bf16, store_bf16);
    v.y = SWIGLU2(g.y, u.y, load_bf16, store_bf16);
    v.z = SWIGLU2(g.z, u.z, load_bf16, store_bf16);
    v.w = SWIGLU2(g.w, u.w, load_bf16, store_bf16);
    return v;
}
#define OP_SWIGLU(x, row, c, cols8) \
    swiglu8(x[(unsigned long long)(row) * 2 * (cols8) + (c)], x[(unsigned long long)(row) * 2 * (cols8) + (cols8) + (c)])

/* One block per row of 8 * cols8 <= 8 * blockDim.x * V outputs: op, then e4m3 with the row's
   scale. Instantiated for V = 1, 2, 4, 8 and 12 (rows up to 24576: ESM-2 15B's FC2 input has
   20480). */
#define QUANT_ROWS(OPNAME, OP, V)                                                                  \
extern "C" __global__ void bf16_quant_##OPNAME##V(const uint4* x, uint2* q, float* scale,         \
        unsigned int rows, unsigned int cols8) {                                                   \
    unsigned int row = blockIdx.x;                                                                 \
    if (row >= rows) return;                                                                       \
    uint4 v[V];                                                                                    \
    float m = 0.0f;                                                                                \
    _Pragma("unroll") for (int i = 0; i < V; i++) {                                             \
        unsigned int c = threadIdx.x + blockDim.x * i;                                             \
        if (c < cols8) { v[i] = OP(x, row, c, cols8); m = fmaxf(m, abs_max8(v[i])); }              \
    }                                                                                              \
    m = block_max(m);                                                                              \
    float s = scale_of(m), inv = 1.0f / s;                                                         \
    uint2* o = q + (unsigned long long)row * cols8;                                                \
    _Pragma("unroll") for (int i = 0; i < V; i++) {                                             \
        unsigned int c = threadIdx.x + blockDim.x * i;                                             \
        if (c < cols8) o[c] = quant8(v[i], inv);                                                   \
    }                                                                                              \
    if (threadIdx.x == 0) scale[row] = s;                                                          \
}
#define QUANT_ROWS_ALL(OPNAME, OP) \
    QUANT_ROWS(OPNAME, OP, 1) QUANT_ROWS(OPNAME, OP, 2) QUANT_ROWS(OPNAME, OP, 4) \
    QUANT_ROWS(OPNAME, OP, 8) QUANT_ROWS(OPNAME, OP, 12)
QUANT_ROWS_ALL(copy, OP_COPY)
QUANT_ROWS_ALL(gelu, OP_GELU)
QUANT_ROWS_ALL(swiglu, OP_SWIGLU)

/* LayerNorm then e4m3, one warp per row as bf16_layer_norm##V: the normalized row (rounded to
   bf16, as the bf16 kernel stores it) stays in registers for its amax. */
#define LAYER_NORM_FP8(V)                                                                          \
extern "C" __global__ void bf16_layer_norm_fp8_##V(const uint4* x, const uint4* w, const uint4* b, \
        uint2* q, float* scale, unsigned int rows, unsigned int cols8, float eps) {                \
    unsigned int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;                               \
    unsigned int lane = threadIdx.x & 31;                                                          \
    if (row >= rows) return;                                                                       \
    const uint4* in = x + (unsigned long long)row * cols8;                                         \
    LAYER_NORM_STATS(load_bf16, V)                                                                 \
    float m = 0.0f;                                                                                \
    _Pragma("unroll") for (int i = 0; i < V; i++) {                                             \
        unsigned int c = lane + 32u * i;                                                           \
        if (c < cols8) {                                                                           \
            uint4 g = w[c], s = b[c];                                                              \
            v[i] = make_uint4(NORM2(v[i].x, g.x, s.x, load_bf16, store_bf16),                      \
                              NORM2(v[i].y, g.y, s.y, load_bf16, store_bf16),                      \
                              NORM2(v[i].z, g.z, s.z, load_bf16, store_bf16),                      \
                              NORM2(v[i].w, g.w, s.w, load_bf16, store_bf16));                     \
            m = fmaxf(m, abs_max8(v[i]));                                                          \
        }                                                                                          \
    }                                                                                              \
    float s = scale_of(warp_max(m)), inv = 1.0f / s;                                               \
    uint2* o = q + (unsigned long long)row * cols8;                                                \
    _Pragma("unroll") for (int i = 0; i < V; i++) {                                             \
        unsigned int c = lane + 32u * i;                                                           \
        if (c < cols8) o[c] = quant8(v[i], inv);                                                   \
    }                                                                                              \
    if (lane == 0) scale[row] = s;                                                                 \
}
LAYER_NORM_FP8(8)
LAYER_NORM_FP8(12)
LAYER_NORM_FP8(20)
