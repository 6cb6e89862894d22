// Device helpers the packing epilogues share: the two metadata layouts (kernels/layout.py) and the
// top-2-of-4 selection of reference.top2_keep.
#pragma once

#include <cstdint>

#include "cutlass/cutlass.h"

namespace sp24 {

// Index of the 16-bit cuSPARSELt metadata word holding (row, group) of a matrix with n_cols columns;
// the code sits at bit 4 * ((row % 16) / 8) + 8 * ((group % 8) / 4) of it.
CUTLASS_DEVICE int64_t cusparselt_word(int64_t row, int group, int n_cols) {
  const int blocks_per_row = (n_cols + 31) / 32;
  const int rr = int(row & 63);
  return (row >> 6) * (blocks_per_row * 128) + (group >> 3) * 128 + (rr >> 4) * 32 + (rr & 7) * 4 + (group & 3);
}

// Index of the 16-bit CUTLASS metadata word holding columns k .. k + 15 (k % 16 == 0) of row `row`
// of a matrix with n_rows rows; group g of those columns sits at bit 4 * (g % 4).
CUTLASS_DEVICE int64_t cutlass_word(int64_t row, int64_t k, int n_rows) {
  const int kk = int(k & 127), mm = int(row & 63);
  const int64_t atom = (k >> 7) * ((n_rows + 63) >> 6) + (row >> 6);
  const int word = ((mm >> 3) & 1) + ((kk >> 5) << 1) + ((mm & 7) << 3) + (((kk >> 4) & 1) << 6) + ((mm >> 4) << 7);
  return (atom << 9) + word;
}

// The two largest of 4 keys, ties to the lower index (map NaN to +inf first: fminf(key, INFINITY)):
// idx0 < idx1 the kept positions, keep[t] whether position t is kept.
struct Top2 {
  int idx0, idx1;
  bool keep[4];
};

CUTLASS_DEVICE Top2 top2(const float key[4]) {
  // an element is kept unless two others beat it
  const int p01 = key[1] > key[0], p02 = key[2] > key[0], p03 = key[3] > key[0];
  const int p12 = key[2] > key[1], p13 = key[3] > key[1], p23 = key[3] > key[2];
  Top2 t;
  t.keep[0] = p01 + p02 + p03 < 2;
  t.keep[1] = p12 + p13 - p01 < 1;
  t.keep[2] = p23 - p02 - p12 < 0;
  t.keep[3] = p03 + p13 + p23 > 1;
  t.idx0 = t.keep[0] ? 0 : (t.keep[1] ? 1 : 2);
  t.idx1 = t.keep[3] ? 3 : (t.keep[2] ? 2 : 1);
  return t;
}

template <class Element>
CUTLASS_DEVICE uint16_t bits(Element e) {
  return reinterpret_cast<uint16_t&>(e);
}

}  // namespace sp24
