// The native kernels' products (native_common.h's product): register blocks of
// accumulators, compiled once for the three cells' sources.

#include "native_common.h"

namespace rnnjax {

// z[r0 : r0+R, c0 : c0+NV*L] (+)= a[r0 : r0+R, :K] @ m[:K, c0 : c0+NV*L], the operands laid
// out as a Product's (native_common.h); added to z's values where `accumulate`.
template <int R, int NV>
void block(const float* __restrict a, int64_t ai, int64_t ak, const float* __restrict m,
           int64_t ldm, float* __restrict z, int64_t ldz, int64_t k_size, int64_t r0,
           int64_t c0, bool accumulate) {
  vec acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      acc[r][v] = accumulate ? load(z + (r0 + r) * ldz + c0 + v * L) : vec{};
  for (int64_t k = 0; k < k_size; ++k) {
    vec mv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) mv[v] = load(m + k * ldm + c0 + v * L);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float s = a[(r0 + r) * ai + k * ak];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] += s * mv[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) store(z + (r0 + r) * ldz + c0 + v * L, acc[r][v]);
}

// Columns c .. c+n*L of rows r0 .. r0+R (n <= NV vectors): one block of n vectors.
template <int R, int NV>
void last_columns(const Product& p, int64_t r0, int64_t c, int64_t n, bool accumulate) {
  if constexpr (NV > 0) {
    if (n != NV) return last_columns<R, NV - 1>(p, r0, c, n, accumulate);
    block<R, NV>(p.a, p.ai, p.ak, p.m, p.ldm, p.z, p.ldz, p.k_size, r0, c, accumulate);
  }
}

// Rows r0 .. r0+R of the product, over all its columns: blocks of kVectors vectors, then
// one block of the vectors left.
template <int R>
void columns(const Product& p, int64_t r0, bool accumulate) {
  int64_t c = 0;
  for (; p.columns - c >= kVectors * L; c += kVectors * L)
    block<R, kVectors>(p.a, p.ai, p.ak, p.m, p.ldm, p.z, p.ldz, p.k_size, r0, c, accumulate);
  last_columns<R, kVectors - 1>(p, r0, c, (p.columns - c) / L, accumulate);
}

// Rows r0 .. r0+n of the product (n <= R): one block of n rows.
template <int R>
void last_rows(const Product& p, int64_t r0, int64_t n, bool accumulate) {
  if constexpr (R > 0) {
    if (n != R) return last_rows<R - 1>(p, r0, n, accumulate);
    columns<R>(p, r0, accumulate);
  }
}

// All rows of the product: blocks of kRows rows, then one block of the rows left (each
// block shape a function of its own to compile, Accumulate a branch outside their loops:
// the library's build is mostly these).
template <bool Accumulate>
void product(const Product& p) {
  int64_t r = 0;
  for (; r + kRows <= p.rows; r += kRows) columns<kRows>(p, r, Accumulate);
  last_rows<kRows - 1>(p, r, p.rows - r, Accumulate);
}

template void product<false>(const Product& p);
template void product<true>(const Product& p);

}  // namespace rnnjax
