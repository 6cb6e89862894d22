// Prints CUTLASS's sm90 2:4 metadata layout (bf16 A, K-major) as CUTLASS itself defines it
// (Sm90GemmSparseConfig::fill_layoutE), for checking our packers' CUTLASS layout. Host code only:
//   pip download nvidia-cutlass --no-deps && unzip it; INC=<unzipped>/cutlass_library/source/include
//   nvcc -std=c++17 -I$INC -DSP24_META_K=128 -o probe tools/cutlass_metadata_probe.cu && ./probe
// SP24_META_K is min(K tile, 128) of the kernels (32 gives the smallest atom; our library uses 128).
// Output lines "m k offset": offset in logical A elements (1 metadata bit each: byte = offset / 8,
// high nibble if offset % 8 >= 4) for a 128 x 256 (M x K) problem.
#include <cstdio>
#ifndef SP24_META_K
#define SP24_META_K 32
#endif
#include "cute/tensor.hpp"
#include "cutlass/gemm/collective/builders/sm90_sparse_config.inl"
using namespace cute;
int main() {
  using ElemA = cute::sparse_elem<2, cutlass::bfloat16_t>;
  using ElemE = cute::sparse_elem<8, uint8_t>;
  using Cfg = cutlass::Sm90GemmSparseConfig<ElemA, cute::GMMA::Major::K, ElemE, cute::Int<SP24_META_K>>;
  auto atom = typename Cfg::TensorEAtom{};
  printf("atom shape "); print(shape(atom)); printf(" stride "); print(stride(atom)); printf(" cosize %d\n", int(cosize(atom)));
  // whole-problem layout for M=128, K=256 (logical), L=1
  auto ps = make_shape(128, 64, 256, 1);  // M, N, K, L
  auto lE = Cfg::fill_layoutE(ps);
  printf("layoutE "); print(lE); printf("\n");
  for (int m = 0; m < 128; ++m)
    for (int k = 0; k < 256; k += 4)
      printf("%d %d %d\n", m, k, int(lE(m, k, 0)));
  return 0;
}
