// F1 with the forward packer in its epilogue: one CUTLASS 3.x sm90 dense GEMM
//
//   Y1[M, N] = X[M, K] @ W1[N, K]^T (+ b1[N])      bf16/fp16 in, fp32 accumulation
//
// whose epilogue never writes Y1: it rounds each accumulator to the input dtype (the value a
// separate GEMM would have stored), computes relu(Y1)^2, keeps the two largest of every 4
// consecutive columns (ties to the lower column, NaN as the largest; reference.pack_forward with
// method "naive") and writes
//   values  [M, N/2]    the kept values, row-major (layout.py's Packed24 values),
//   meta                their 4-bit codes in the cuSPARSELt (LAYOUT 0) or CUTLASS (LAYOUT 1) layout,
//   counts  int32 [N+1] += kept non-zeros per column; counts[N] += non-zeros before 2:4,
// and, when y1 is given (tests), Y1 itself.
//
// The schedule is warp-specialized ping-pong: two consumer warp groups take alternate tiles, so one
// packs its tile from registers while the other runs its mainloop, and the tensor cores do not wait
// for the epilogue. The accumulator layout of sm90 wgmma decides the data movement: a thread holds,
// per 8-column chunk, columns (c, c+1) of rows r and r+8, with c = 8 * chunk + 2 * (lane % 4). Lanes
// 2i and 2i+1 together hold one 4-column group of both rows, so one shuffle gives each its own group
// (the even lane row r, the odd lane row r+8) and every group is selected by exactly one thread.
#include <cuda_runtime.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/detail.hpp"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"
#include "common.cuh"
#include "pack.cuh"

namespace sp24 {
using namespace cute;

// --- the epilogue ------------------------------------------------------------------------------------

template <class Element, int Layout>
struct PackForwardEpilogue {
  using ElementC = void;
  using ElementD = Element;
  using StrideC = Stride<int64_t, _1, int64_t>;
  using StrideD = Stride<int64_t, _1, int64_t>;
  using ThreadEpilogueOp = cutlass::epilogue::thread::LinearCombination<Element, 1, float, float>;
  using GmemTiledCopyC = void;
  using GmemTiledCopyD = void;
  struct SharedStorage {};
  using TensorStorage = SharedStorage;

  struct Arguments {
    const Element* bias = nullptr;  // [N] or null
    Element* values = nullptr;      // [M, N/2]
    uint16_t* meta = nullptr;       // metadata of [M, N] in Layout
    int* counts = nullptr;          // [N + 1], accumulated into (zero it first)
    Element* y1 = nullptr;          // [M, N] or null: also write Y1 (tests)
  };
  using Params = Arguments;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) {
    return args;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const& args) {
    // every packed output, or none (the mainloop alone, for benchmarks)
    bool packs = args.values != nullptr && args.meta != nullptr && args.counts != nullptr;
    return packs || (args.values == nullptr && args.meta == nullptr && args.y1 == nullptr);
  }

  CUTLASS_HOST_DEVICE PackForwardEpilogue(Params const& params_, SharedStorage const& = SharedStorage())
      : params(params_) {}

  CUTLASS_DEVICE bool is_source_needed() { return false; }

  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine, class FrgLayout,
            class TiledMma, class ResidueMNK>
  CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_MNK,
                                 BlockCoordMNKL blk_coord_mnkl, cute::Tensor<FrgEngine, FrgLayout> const& acc,
                                 TiledMma tiled_mma, ResidueMNK, int thread_idx, char*) {
    static_assert(is_static<FrgLayout>::value, "the accumulator layout must be static");
    if (params.values == nullptr) return;  // the mainloop alone
    constexpr int BM = size<0>(BlockShapeMNK{});
    constexpr int BN = size<1>(BlockShapeMNK{});
    constexpr int NV = size(FrgLayout{});
    constexpr int CHUNKS = BN / 8;          // 8-column chunks per row pair
    static_assert(BN % 32 == 0 && NV % (4 * CHUNKS) == 0, "tile must hold whole 32-column metadata blocks");
    constexpr int ATOMS = NV / (4 * CHUNKS);  // row slabs of 16 rows a thread holds
    const int M = get<0>(problem_shape_mnkl);
    const int N = get<1>(problem_shape_mnkl);
    const int m0 = get<0>(blk_coord_mnkl) * BM;
    const int n0 = get<1>(blk_coord_mnkl) * BN;
    // the persistent scheduler rounds the grid up to whole swizzle x cluster blocks: tiles past the
    // problem are handed out too (M and N are whole tiles, so a tile is either all inside or all outside)
    if (m0 >= M || n0 >= N) return;

    auto thr_mma = tiled_mma.get_thread_slice(thread_idx);
    Tensor coord = thr_mma.partition_C(make_identity_tensor(make_shape(Int<BM>{}, Int<BN>{})));

    const int lane = thread_idx & 31;
    const int odd = lane & 1;  // 0: this lane packs row r of its group; 1: row r + 8
    int nnz_total = 0;
    uint32_t col_counts[CHUNKS];  // four byte counters per group: columns 4g .. 4g+3
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < CHUNKS; ++j) col_counts[j] = 0;
    // the bias of this lane's columns (c, c + 1) of every chunk, loaded once for all row slabs and all
    // at once, before any is needed (loaded chunk by chunk, on the epilogue's critical path, they cost
    // ~0.4 ms at 16384 x 4096 x 16384); two 16-bit loads each: a bias inside a flat parameter buffer
    // may sit at any even address
    uint32_t bias_bits[CHUNKS];
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < CHUNKS; ++j) {
      bias_bits[j] = 0;  // +0.0 twice
      if (params.bias != nullptr) {
        const uint16_t* b = reinterpret_cast<const uint16_t*>(params.bias) + n0 + get<1>(coord(4 * j));
        bias_bits[j] = uint32_t(b[0]) | (uint32_t(b[1]) << 16);
      }
    }

    CUTLASS_PRAGMA_UNROLL
    for (int a = 0; a < ATOMS; ++a) {
      int codes[CHUNKS];
      int row = 0;
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < CHUNKS; ++j) {
        const int i = 4 * (a * CHUNKS + j);
        const int r = get<0>(coord(i));
        const int c = get<1>(coord(i));  // even lanes: c % 4 == 0
        // the group: row r + 8 * odd, columns c - 2 * odd .. + 3
        float y[4];
        // selects, not acc(i + 2 * odd): a run-time index would move the accumulators to local memory
        float mine0 = odd ? acc(i + 2) : acc(i), mine1 = odd ? acc(i + 3) : acc(i + 1);  // this lane's row
        float give0 = odd ? acc(i) : acc(i + 2), give1 = odd ? acc(i + 1) : acc(i + 3);  // the partner's row
        const int gc = n0 + c - 2 * odd;  // first column of the group
        if (params.bias != nullptr) {
          uint16_t lo = uint16_t(bias_bits[j] & 0xffff), hi = uint16_t(bias_bits[j] >> 16);
          const float b0 = float(reinterpret_cast<Element&>(lo)), b1 = float(reinterpret_cast<Element&>(hi));
          mine0 += b0;
          mine1 += b1;
          give0 += b0;
          give1 += b1;
        }
        // round to the input dtype first: the packer sees what a separate GEMM would have stored
        Element e_mine0(mine0), e_mine1(mine1), e_give0(give0), e_give1(give1);
        uint32_t give_bits = uint32_t(reinterpret_cast<uint16_t&>(e_give0)) |
                             (uint32_t(reinterpret_cast<uint16_t&>(e_give1)) << 16);
        uint32_t got_bits = __shfl_xor_sync(0xffffffff, give_bits, 1);
        uint16_t g0 = uint16_t(got_bits & 0xffff), g1 = uint16_t(got_bits >> 16);
        Element e_got0 = reinterpret_cast<Element&>(g0), e_got1 = reinterpret_cast<Element&>(g1);
        if (odd) {
          y[0] = float(e_got0); y[1] = float(e_got1); y[2] = float(e_mine0); y[3] = float(e_mine1);
        } else {
          y[0] = float(e_mine0); y[1] = float(e_mine1); y[2] = float(e_got0); y[3] = float(e_got1);
        }
        const int grow = m0 + r + 8 * odd;
        row = r;
        if (params.y1 != nullptr) {
          Element* dst = params.y1 + int64_t(grow) * N + gc;
          dst[0] = Element(y[0]); dst[1] = Element(y[1]); dst[2] = Element(y[2]); dst[3] = Element(y[3]);
        }
        float x[4], key[4];
        CUTLASS_PRAGMA_UNROLL
        for (int t = 0; t < 4; ++t) {
          float rl = y[t] != y[t] ? y[t] : fmaxf(y[t], 0.0f);  // relu, NaN kept
          x[t] = rl * rl;
          key[t] = fminf(x[t], INFINITY);  // NaN -> the largest key
          nnz_total += x[t] != 0.0f;
        }
        const Top2 t2 = top2(key);
        const int idx0 = t2.idx0, idx1 = t2.idx1;
        const Element v0(t2.keep[0] ? x[0] : (t2.keep[1] ? x[1] : x[2]));  // no dynamic index
        const Element v1(t2.keep[3] ? x[3] : (t2.keep[2] ? x[2] : x[1]));
        const uint32_t vbits = uint32_t(bits(v0)) | (uint32_t(bits(v1)) << 16);
        *reinterpret_cast<uint32_t*>(params.values + int64_t(grow) * (N / 2) + gc / 2) = vbits;
        codes[j] = idx0 | (idx1 << 2);
        col_counts[j] += (float(v0) != 0.0f ? 1u << (8 * idx0) : 0u) + (float(v1) != 0.0f ? 1u << (8 * idx1) : 0u);
      }
      // metadata: this lane's codes -> its half of each word, the partner lane holds the other half
      if constexpr (Layout == 0) {
        // cuSPARSELt: a word holds rows (r, r+8) x groups (glo, glo+4) of a 64 x 32 block; chunks j and
        // j + 2 of one 32-column block hold groups glo and glo + 4
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < CHUNKS; ++j) {
          if ((j & 3) >= 2) continue;
          uint32_t half = (uint32_t(codes[j]) << (4 * odd)) | (uint32_t(codes[j + 2]) << (8 + 4 * odd));
          uint32_t word = half | __shfl_xor_sync(0xffffffff, half, 1);
          if (!odd) {
            const int i = 4 * (a * CHUNKS + j);
            const int group = (n0 + get<1>(coord(i))) >> 2;
            params.meta[cusparselt_word(m0 + row, group, N)] = uint16_t(word);
          }
        }
      } else {
        // CUTLASS: a word holds groups 4q .. 4q+3 of one row: chunks j, j + 1 of lanes (2i, 2i + 2)
        const int h = (lane >> 1) & 1;  // which group of its chunk this lane's pair holds
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < CHUNKS; j += 2) {
          uint32_t half = (uint32_t(codes[j]) << (4 * h)) | (uint32_t(codes[j + 1]) << (8 + 4 * h));
          uint32_t word = half | __shfl_xor_sync(0xffffffff, half, 2);
          if (h == 0) {
            const int i = 4 * (a * CHUNKS + j);
            const int k = n0 + get<1>(coord(i)) - 2 * odd;  // the pair's first group: a multiple of 16
            params.meta[cutlass_word(m0 + row + 8 * odd, k, M)] = uint16_t(word);
          }
        }
      }
    }
    // per-column counts: lanes (l, l^1, l^4, l^8, l^16) hold the same group; sum their byte counters
    // (at most 16 * ATOMS <= 255 per byte) and let lanes 0..3 add two columns each
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < CHUNKS; ++j) {
      uint32_t w = col_counts[j];
      w += __shfl_xor_sync(0xffffffff, w, 1);
      w += __shfl_xor_sync(0xffffffff, w, 4);
      w += __shfl_xor_sync(0xffffffff, w, 8);
      w += __shfl_xor_sync(0xffffffff, w, 16);
      if (lane < 4) {
        const int i = 4 * j;
        const int gc = n0 + get<1>(coord(i)) - 2 * odd;  // first column of the lane pair's group
        const int lo = 2 * odd;                          // even lane: columns 0, 1; odd: 2, 3
        uint32_t c0 = (w >> (8 * lo)) & 255u, c1 = (w >> (8 * lo + 8)) & 255u;
        if (c0) atomicAdd(params.counts + gc + lo, int(c0));
        if (c1) atomicAdd(params.counts + gc + lo + 1, int(c1));
      }
    }
    CUTLASS_PRAGMA_UNROLL
    for (int s = 16; s > 0; s >>= 1) nnz_total += __shfl_xor_sync(0xffffffff, nnz_total, s);
    if (lane == 0 && nnz_total) atomicAdd(params.counts + N, nnz_total);
  }

  Params params;
};

// --- the GEMM ----------------------------------------------------------------------------------------

template <class Element, int Layout, int TM, int TN, int TK, int CM, int CN>
struct F1PackGemm {
  static_assert(sizeof(Element) == 2, "16-bit inputs");
  static constexpr int kAlign = 8;
  using Tile = Shape<Int<TM>, Int<TN>, Int<TK>>;
  using Cluster = Shape<Int<CM>, Int<CN>, _1>;
  using EpilogueOp = PackForwardEpilogue<Element, Layout>;
  using Epilogue = cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<EpilogueOp>;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      Element, cutlass::layout::RowMajor, kAlign,     // X [M, K]
      Element, cutlass::layout::ColumnMajor, kAlign,  // W1 [N, K]: K-major B
      float, Tile, Cluster, cutlass::gemm::collective::StageCountAuto,
      cutlass::gemm::KernelTmaWarpSpecializedPingpong>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Gemm::Arguments arguments(const void* x, const void* w1, const void* b1, void* values, void* meta,
                                            int* counts, void* y1, int m, int n, int k, int sm_count, int sched) {
    auto shape = make_shape(m, n, k, 1);
    auto stride_a = cutlass::make_cute_packed_stride(typename Kernel::StrideA{}, make_shape(m, k, 1));
    auto stride_b = cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, make_shape(n, k, 1));
    cutlass::KernelHardwareInfo hw;
    hw.device_id = 0;
    hw.sm_count = sm_count;
    typename EpilogueOp::Arguments epi{static_cast<const Element*>(b1), static_cast<Element*>(values),
                                       static_cast<uint16_t*>(meta), counts, static_cast<Element*>(y1)};
    return typename Gemm::Arguments{cutlass::gemm::GemmUniversalMode::kGemm, shape,
                                    {static_cast<const Element*>(x), stride_a, static_cast<const Element*>(w1),
                                     stride_b},
                                    epi, hw, scheduler_arguments<Kernel>(sched)};
  }

  // Return codes: common.cuh's launch.
  static int run(const void* x, const void* w1, const void* b1, void* values, void* meta, int* counts, void* y1,
                 int m, int n, int k, int sm_count, int sched, void* workspace, size_t workspace_bytes,
                 cudaStream_t stream) {
    if (m % TM != 0 || n % TN != 0) return 1;  // the epilogue writes whole tiles
    return launch<Gemm>(arguments(x, w1, b1, values, meta, counts, y1, m, n, k, sm_count, sched), workspace,
                        workspace_bytes, stream);
  }

  static size_t workspace_size(int m, int n, int k, int sm_count, int sched) {
    return Gemm::get_workspace_size(arguments(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, m, n, k,
                                              sm_count, sched));
  }
};
}  // namespace sp24

#define SP24_DEFINE_F1_PACK(NAME, ...)                                                                      \
  extern "C" int NAME##_run(const void* x, const void* w1, const void* b1, void* values, void* meta,       \
                            void* counts, void* y1, int m, int n, int k, int sm_count, int sched, void* ws,  \
                            size_t ws_bytes, void* stream) {                                                 \
    return sp24::F1PackGemm<__VA_ARGS__>::run(x, w1, b1, values, meta, static_cast<int*>(counts), y1, m, n, \
                                              k, sm_count, sched, ws, ws_bytes,                              \
                                              static_cast<cudaStream_t>(stream));                            \
  }                                                                                                        \
  extern "C" size_t NAME##_workspace(int m, int n, int k, int sm_count, int sched) {                      \
    return sp24::F1PackGemm<__VA_ARGS__>::workspace_size(m, n, k, sm_count, sched);                        \
  }
