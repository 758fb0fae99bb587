// An experiment, not part of the build: Hopper GEMMs y = x W^T + b with ESM-2's epilogues fused
// (bias; bias + exact erf GELU; bias + residual), on CUTLASS 3.5 (the headers that ship with
// candle-flash-attn), timed against cuBLAS by cutlass_probe.py (which says how to build it).
//
// Each GEMM is computed transposed, D^T[N, M] = W[N, K] * x^T[K, M], so both operands are K-major
// (the TN layout Hopper's TMA and WGMMA want) and the per-output-feature bias becomes a per-row
// bias of D^T, which CUTLASS's fused epilogues broadcast. The accumulator stays f32 through bias,
// residual and GELU and is rounded once. Fixed tile configurations, no split-K: bitwise
// reproducible. Result (H200, 2026-11-26): 15-25 % slower than cuBLAS 13 on these shapes, so the
// fused GELU does not pay for itself; esmbed keeps cuBLASLt.
#include <cuda_runtime.h>

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/tensor_ref.h"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"

using namespace cute;

namespace {

enum Epi { kBias = 0, kBiasGelu = 1, kBiasResidual = 2 };

template <int E> struct Act;
template <> struct Act<kBias> { template <class T> using Fn = cutlass::epilogue::thread::Identity<T>; };
template <> struct Act<kBiasGelu> { template <class T> using Fn = cutlass::epilogue::thread::GELU<T>; };
template <> struct Act<kBiasResidual> { template <class T> using Fn = cutlass::epilogue::thread::Identity<T>; };

template <class T, int E, class Tile, class Cluster, class KSched, class ESched>
struct Gemm {
  using LayoutA = cutlass::layout::RowMajor;     // W [N, K]
  using LayoutB = cutlass::layout::ColumnMajor;  // x [M, K] read as K x M
  using LayoutD = cutlass::layout::ColumnMajor;  // y [M, N] written as N x M
  static constexpr int kAlign = 16 / sizeof(T);
  using ElementC = std::conditional_t<E == kBiasResidual, T, void>;
  using Fusion = cutlass::epilogue::fusion::LinCombPerRowBiasEltAct<
      Act<E>::template Fn, T, float, T, T, float, kAlign, cutlass::FloatRoundStyle::round_to_nearest>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, ElementC, LayoutD, kAlign, T,
      LayoutD, kAlign, ESched, Fusion>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, T, LayoutA, kAlign, T, LayoutB, kAlign,
      float, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      KSched>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Op = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static int run(const void* w, const void* x, const void* bias, const void* res, void* out, int m,
                 int n, int k, cudaStream_t stream) {
    using StrideA = typename Kernel::StrideA;
    using StrideB = typename Kernel::StrideB;
    using StrideC = typename Kernel::StrideC;
    using StrideD = typename Kernel::StrideD;
    StrideA sa = make_stride(int64_t(k), Int<1>{}, int64_t(0));
    StrideB sb = make_stride(int64_t(k), Int<1>{}, int64_t(0));
    StrideC sc = make_stride(Int<1>{}, int64_t(n), int64_t(0));
    StrideD sd = make_stride(Int<1>{}, int64_t(n), int64_t(0));
    int device = 0;
    cudaGetDevice(&device);
    cutlass::KernelHardwareInfo hw;
    hw.device_id = device;
    cudaDeviceGetAttribute(&hw.sm_count, cudaDevAttrMultiProcessorCount, device);
    typename Op::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {n, m, k, 1},
        {static_cast<const T*>(w), sa, static_cast<const T*>(x), sb},
        {{}, static_cast<const T*>(res), sc, static_cast<T*>(out), sd},
        hw};
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = E == kBiasResidual ? 1.0f : 0.0f;
    args.epilogue.thread.bias_ptr = static_cast<const T*>(bias);
    Op op;
    if (op.can_implement(args) != cutlass::Status::kSuccess) return 1;
    if (Op::get_workspace_size(args) != 0) return 2;
    if (op.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) return 3;
    if (op.run(stream) != cutlass::Status::kSuccess) return 4;
    return cudaGetLastError() == cudaSuccess ? 0 : 5;
  }
};

using Coop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using CoopEpi = cutlass::epilogue::TmaWarpSpecializedCooperative;
using Ping = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using PingEpi = cutlass::epilogue::TmaWarpSpecialized;

template <class T, int E>
int dispatch(int cfg, const void* w, const void* x, const void* bias, const void* res, void* out,
             int m, int n, int k, cudaStream_t s) {
  switch (cfg) {
    case 0:
      return Gemm<T, E, Shape<_128, _256, _64>, Shape<_2, _1, _1>, Coop, CoopEpi>::run(w, x, bias, res, out, m, n, k, s);
    case 1:
      return Gemm<T, E, Shape<_128, _256, _64>, Shape<_1, _2, _1>, Coop, CoopEpi>::run(w, x, bias, res, out, m, n, k, s);
    case 2:
      return Gemm<T, E, Shape<_64, _256, _64>, Shape<_1, _2, _1>, Ping, PingEpi>::run(w, x, bias, res, out, m, n, k, s);
    case 3:
      return Gemm<T, E, Shape<_256, _128, _64>, Shape<_2, _1, _1>, Coop, CoopEpi>::run(w, x, bias, res, out, m, n, k, s);
    case 4:
      return Gemm<T, E, Shape<_128, _256, _64>, Shape<_1, _1, _1>, Coop, CoopEpi>::run(w, x, bias, res, out, m, n, k, s);
    case 5:
      return Gemm<T, E, Shape<_128, _128, _64>, Shape<_1, _2, _1>, Ping, PingEpi>::run(w, x, bias, res, out, m, n, k, s);
    case 6:
      return Gemm<T, E, Shape<_128, _128, _64>, Shape<_2, _1, _1>, Ping, PingEpi>::run(w, x, bias, res, out, m, n, k, s);
    case 7:
      return Gemm<T, E, Shape<_128, _128, _64>, Shape<_1, _1, _1>, Ping, PingEpi>::run(w, x, bias, res, out, m, n, k, s);
    case 8:
      return Gemm<T, E, Shape<_256, _128, _64>, Shape<_1, _2, _1>, Coop, CoopEpi>::run(w, x, bias, res, out, m, n, k, s);
    default:
      return 100;
  }
}

}  // namespace

#ifndef ESM_GEMM_EPI
#define ESM_GEMM_EPI 0
#endif
#define ESM_CAT2(a, b) a##b
#define ESM_CAT(a, b) ESM_CAT2(a, b)

// One translation unit per epilogue (compiled three times, -DESM_GEMM_EPI=0/1/2, in parallel).
extern "C" int ESM_CAT(esm_gemm_epi, ESM_GEMM_EPI)(int dtype, int cfg, const void* w, const void* x,
                                                 const void* bias, const void* res, void* out, int m,
                                                 int n, int k, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  if (dtype == 0)
    return dispatch<cutlass::bfloat16_t, ESM_GEMM_EPI>(cfg, w, x, bias, res, out, m, n, k, s);
#ifndef ESM_BF16_ONLY
  return dispatch<cutlass::half_t, ESM_GEMM_EPI>(cfg, w, x, bias, res, out, m, n, k, s);
#else
  return 101;
#endif
}
