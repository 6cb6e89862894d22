// One CUTLASS 3.x sm90 structured-sparse GEMM configuration behind a plain C entry point.
//
//   D[M, N] = A[M, K] (2:4 along K, compressed) @ B[K, N]      fp32 accumulation, no C operand
//
// A is given as CUTLASS's compressed operand: values [M, K/2] row-major (exactly our Packed24
// values) and metadata in Sm90GemmSparseConfig's layout for a K tile of SP24_META_K logical columns
// (megatron_sparse24/kernels/layout.py, layout "cutlass"). B is dense, either K-major
// (SP24_B_KMAJOR=1: a row-major [N, K] tensor, e.g. W for x @ W^T) or N-major (a row-major [K, N]
// tensor). D is row-major [M, N] (SP24_D_ROWMAJOR=1) or column-major (a row-major [N, M] tensor).
// Built by megatron_sparse24/cutlass/build.py, which defines the SP24_* macros per kernel.
#include <cuda_runtime.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/transform/device/transform_universal_adapter.hpp"
#include "cutlass/transform/kernel/sparse_gemm_compressor.hpp"
#include "cutlass/util/packed_stride.hpp"
#include "common.cuh"

namespace sp24 {
using namespace cute;

template <class Element, int TM, int TN, int TK, int CM, int CN, bool Cooperative, bool BKMajor, bool DRowMajor>
struct SparseGemm {
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cute::conditional_t<BKMajor, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
  using LayoutD = cute::conditional_t<DRowMajor, cutlass::layout::RowMajor, cutlass::layout::ColumnMajor>;
  static constexpr int kAlign = 128 / cutlass::sizeof_bits<Element>::value;
  using Tile = Shape<Int<TM>, Int<TN>, Int<TK>>;
  using Cluster = Shape<Int<CM>, Int<CN>, _1>;
  using MainloopSchedule = cute::conditional_t<Cooperative, cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                                               cutlass::gemm::KernelTmaWarpSpecializedPingpong>;
  using EpilogueSchedule = cute::conditional_t<Cooperative, cutlass::epilogue::TmaWarpSpecializedCooperative,
                                               cutlass::epilogue::TmaWarpSpecialized>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, LayoutD, kAlign,  // no C operand: D = A @ B
      Element, LayoutD, kAlign, EpilogueSchedule>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp,
      Element, LayoutA, kAlign,
      Element, LayoutB, kAlign, float, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      MainloopSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using SparseConfig = typename Mainloop::SparseConfig;
  static_assert(cute::min(TK, 128) == SP24_META_K, "all kernels of one library share one metadata layout");

  // sched: the persistent tile scheduler's run-time options (common.cuh), chosen per shape
  static typename Kernel::TileSchedulerArguments scheduler(int sched) { return scheduler_arguments<Kernel>(sched); }

  static typename Gemm::Arguments arguments(const void* a, const void* e, const void* b, void* d, int m, int n,
                                            int k, int sm_count, int sched) {
    auto shape = make_shape(m, n, k, 1);
    auto stride_b = cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, make_shape(n, k, 1));
    auto stride_d = cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, make_shape(m, n, 1));
    cutlass::KernelHardwareInfo hw;
    hw.device_id = 0;  // only read when sm_count is 0
    hw.sm_count = sm_count;
    using EA = typename Gemm::ElementA;
    using EE = typename Mainloop::ElementE;
    using EB = typename Gemm::ElementB;
    using ED = typename Gemm::EpilogueOutputOp::ElementOutput;
    return typename Gemm::Arguments{
        cutlass::gemm::GemmUniversalMode::kGemm,
        shape,
        {static_cast<const EA*>(a), SparseConfig::fill_layoutA(shape), static_cast<const EB*>(b), stride_b,
         static_cast<const EE*>(e), SparseConfig::fill_layoutE(shape)},
        {{1.0f, 0.0f}, nullptr, stride_d, static_cast<ED*>(d), stride_d},
        hw,
        scheduler(sched)};
  }

  // Return codes: common.cuh's launch.
  static int run(const void* a, const void* e, const void* b, void* d, int m, int n, int k, int sm_count,
                 int sched, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
    return launch<Gemm>(arguments(a, e, b, d, m, n, k, sm_count, sched), workspace, workspace_bytes, stream);
  }

  static size_t workspace_size(int m, int n, int k, int sm_count, int sched) {
    return Gemm::get_workspace_size(arguments(nullptr, nullptr, nullptr, nullptr, m, n, k, sm_count, sched));
  }
};

// CUTLASS's own compressor for the operand layout of SparseGemm<Element, ...> (every kernel of a
// library shares it): dense row-major A [M, K] holding <= 2 non-zeros per group of 4 along K ->
// values [M, K/2] and metadata. Not on any hot path: the tests check our packers against it.
template <class Element>
struct Compressor {
  using Reference = SparseGemm<Element, 128, 128, SP24_META_K, 1, 1, true, true, true>;
  using ProblemShape = Shape<int, int, int, int>;
  using LayoutA = cutlass::layout::RowMajor;
  using Kernel = cutlass::transform::kernel::StructuredSparseCompressor<
      ProblemShape, Element, LayoutA, typename Reference::SparseConfig, cutlass::arch::Sm90>;
  using Adapter = cutlass::transform::device::TransformUniversalAdapter<Kernel>;

  static typename Adapter::Arguments arguments(const void* a, void* values, void* e, int m, int k, int sm_count) {
    auto shape = make_shape(m, 1, k, 1);
    auto stride_a = cutlass::make_cute_packed_stride(cutlass::gemm::TagToStrideA_t<LayoutA>{}, make_shape(m, k, 1));
    cutlass::KernelHardwareInfo hw;
    hw.device_id = 0;
    hw.sm_count = sm_count;
    return typename Adapter::Arguments{shape, {a, stride_a, values, e}, {hw}};
  }

  static int run(const void* a, void* values, void* e, int m, int k, int sm_count, void* workspace,
                 size_t workspace_bytes, cudaStream_t stream) {
    return launch<Adapter>(arguments(a, values, e, m, k, sm_count), workspace, workspace_bytes, stream);
  }

  static size_t workspace_size(int m, int k, int sm_count) {
    return Adapter::get_workspace_size(arguments(nullptr, nullptr, nullptr, m, k, sm_count));
  }
};
}  // namespace sp24

#define SP24_DEFINE_KERNEL(NAME, ...)                                                                       \
  extern "C" int NAME##_run(const void* a, const void* e, const void* b, void* d, int m, int n, int k,    \
                            int sm_count, int sched, void* ws, size_t ws_bytes, void* stream) {            \
    return sp24::SparseGemm<__VA_ARGS__>::run(a, e, b, d, m, n, k, sm_count, sched, ws, ws_bytes,          \
                                               static_cast<cudaStream_t>(stream));                         \
  }                                                                                                        \
  extern "C" size_t NAME##_workspace(int m, int n, int k, int sm_count, int sched) {                      \
    return sp24::SparseGemm<__VA_ARGS__>::workspace_size(m, n, k, sm_count, sched);                        \
  }

#define SP24_DEFINE_COMPRESSOR(NAME, ELEMENT)                                                               \
  extern "C" int NAME##_run(const void* a, void* values, void* e, int m, int k, int sm_count, void* ws,  \
                            size_t ws_bytes, void* stream) {                                               \
    return sp24::Compressor<ELEMENT>::run(a, values, e, m, k, sm_count, ws, ws_bytes,                      \
                                          static_cast<cudaStream_t>(stream));                              \
  }                                                                                                        \
  extern "C" size_t NAME##_workspace(int m, int k, int sm_count) {                                        \
    return sp24::Compressor<ELEMENT>::workspace_size(m, k, sm_count);                                      \
  }
