// The Elman (SimpleRNN, tanh) layer's forward and backward passes, each one XLA:CPU custom
// call through jax.ffi (rnnjax/native.py: the backward 'native'); what the kernels share is
// in native_common.h.
//
//   forward:  hs[t] = tanh((xs[t] @ kernel + bias) + hs[t-1] @ recurrent), hs[-1] = h0
//   backward: g = dh_last; for t = T-1 .. 0:
//               dzs[t] = (g [+ dhs[t]]) * (1 - hs[t]^2);  g = dzs[t] @ recurrent^T
//             dh0 = g; dkernel = sum_t xs[t]^T dzs[t]; drecurrent = sum_t hs[t-1]^T dzs[t];
//             dbias = the sum of dzs' rows; dzs written only where the inputs' gradient is
//             asked for (an output of time dimension 0 where not: open_backward)
//
// xs [T, B, F] (or the batch's rows of a table [T, N, F]: native_common.h's Inputs); hs,
// dzs, dhs [T, B, H]; kernel [F, H]; recurrent [H, H]; bias [H]; h0, dh_last, dh0 [B, H]. A
// batch's rows are independent through the layer, so each call splits the batch into one
// part per thread of XLA's intra-op pool, more where a part would pass kPartRows rows
// (run_parts, parts_for), and each part runs all its steps alone: the input projection, the
// recurrence, and in the backward pass its own weight gradients' sums (in blocks of steps:
// BlockSums), added part by part at the end (PartSums: the same bits in every call of a
// process). Each product accumulates over k in order with fused multiply-adds, and tanh is
// the rational approximation XLA:CPU emits (tanh_vec: its clamp, +-7.9988 where the CPU
// has FMA, and x itself below 4e-4): the forward rounded as XLA's did on the AVX-512 EPYC
// this was written on; the weight gradients are summed in another order
// (tests/test_native.py checks them against the hand-written form's).

#include "native_common.h"

namespace rnnjax {
namespace {

// hs[t] = tanh((xs[t] @ kernel + bias) + hs[t-1] @ recurrent), hs[-1] = h0, the batch in
// parts (forward_parts; `kept` 1: each step written over the last).
void forward(const Pool& pool, const Inputs& xs, const float* kernel, const float* bias,
             const float* recurrent, const float* h0, float* hs, int64_t time, int64_t kept,
             int64_t batch, int64_t hidden) {
  const int64_t np = padded(hidden), full = hidden / L * L;
  forward_parts(pool, xs, kernel, recurrent, h0, hs, 1, time, kept, batch, hidden,
                [&](int64_t, int64_t at, int64_t, int64_t, int64_t rows, const float* us,
                    const float* z, const float*) {
    float* ht = hs + at * hidden;
    for (int64_t r = 0; r < rows; ++r) {
      const float* zr = z + r * np;
      const float* ur = us + r * np;
      float* hr = ht + r * hidden;
      int64_t c = 0;
      for (; c < full; c += L)
        store(hr + c, tanh_vec((load(ur + c) + load(bias + c)) + load(zr + c)));
      for (; c < hidden; ++c) hr[c] = tanh_scalar((ur[c] + bias[c]) + zr[c]);
    }
  });
}

// g = dh_last; for t = T-1 .. 0: dzs[t] = (g [+ dhs[t]]) * (1 - hs[t]^2),
// g = dzs[t] @ recurrent^T; dh0 = g. The batch in parts (run_parts), each summing its own
// weight gradients in blocks of steps (BlockSums: dkernel += xs[t]^T dzs[t], drecurrent +=
// hs[t-1]^T dzs[t], dbias += the rows of dzs[t]).
void backward(const Pool& pool, const Inputs& xs, const float* hs, const float* dhs,
              const float* h0, const float* recurrent, const float* dh_last, float* dzs,
              float* dh0, float* dkernel, float* drecurrent, float* dbias, int64_t time,
              int64_t batch, int64_t hidden) {
  const int64_t np = padded(hidden), features = xs.features;
  const Floats ut = padded_gates_transposed(recurrent, hidden, 1);
  const int64_t parts = parts_for(pool, batch);
  PartSums sums(parts, (features + hidden + 1) * np);  // dk [F, np], dr [H, np], db [np]
  run_parts(pool, parts, batch, [&](int64_t p, int64_t first, int64_t last) {
    const int64_t rows = last - first;
    Floats g(rows * np), dz(rows * np);  // dz: dzs[t]'s rows, padded
    InputRows x(xs, first, last);
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy(g.data() + r * np, dh_last + (first + r) * hidden, hidden * sizeof(float));
    BlockSums step_sums = sums.part(p, time, rows);
    float* dk = step_sums.block();
    float* dr = dk + features * np;
    float* db = dr + hidden * np;
    for (int64_t t = time - 1; t >= 0; --t) {
      const int64_t at = t * batch + first;
      const float* ht = hs + at * hidden;
      const float* dht = dhs == nullptr ? nullptr : dhs + at * hidden;
      for (int64_t r = 0; r < rows; ++r) {
        const float* gr = g.data() + r * np;
        const int64_t row = r * hidden;
        for (int64_t c = 0; c < np; c += L) {
          const int64_t n = hidden - c < L ? hidden - c : L;
          const vec h = load_part(ht + row + c, n);
          const vec d = dht == nullptr ? load(gr + c)
                                       : load_part(dht + row + c, n) + load(gr + c);
          store(dz.data() + r * np + c, d * (1.f - h * h));
        }
        if (dzs != nullptr)
          std::memcpy(dzs + at * hidden + row, dz.data() + r * np, hidden * sizeof(float));
      }
      product<false>({dz.data(), np, 1, ut.data(), np, g.data(), np, rows, hidden, np});
      const float* previous = t == 0 ? h0 + first * hidden : ht - batch * hidden;
      product<true>({x.at(t, t - 1), 1, features, dz.data(), np, dk, np, features, rows,
                     np});
      product<true>({previous, 1, hidden, dz.data(), np, dr, np, hidden, rows, np});
      add_row_sums(db, dz.data(), rows, np, np);
      step_sums.step_done();
    }
    unpad_gates(g.data(), rows, hidden, 1, dh0 + first * hidden);
  });
  const float* dk = sums.total();
  unpad_gates(dk, features, hidden, 1, dkernel);
  unpad_gates(dk + features * np, hidden, hidden, 1, drecurrent);
  unpad_gates(dk + (features + hidden) * np, 1, hidden, 1, dbias);
}

// The calls' handlers (native_common.h's glue).

// (xs [T, N, F], kernel [F, H], bias [H], recurrent [H, H], h0 [B, H], rows [B] or [0])
// -> hs [T, B, H], or [1, B, H]: the last step's alone (forward_steps)
XLA_FFI_Error* Forward(XLA_FFI_CallFrame* call) {
  static constexpr int kRanks[] = {3, 2, 1, 2, 2, 1, 3};
  Frame f = open(call, 6, 1, kRanks);
  if (!f.run) return f.status;
  float* const* b = f.buffers;
  const Inputs xs = inputs(call, f, f.dims[4][0]);
  const int64_t kept = forward_steps(call, f, 6, 1);
  if (!f.run) return f.status;
  forward(Pool{call->api, call->ctx}, xs, b[1], b[2], b[3], b[4], b[6], f.dims[0][0], kept,
          f.dims[4][0], f.dims[4][1]);
  return nullptr;
}

// (xs, hs, h0, recurrent, dh_last, rows) -> (dzs, dh0, dkernel, drecurrent, dbias); with
// dhs after hs where the outputs have a gradient.
XLA_FFI_Error* backward_call(XLA_FFI_CallFrame* call, bool outputs) {
  static constexpr int kRanks[] = {3, 3, 2, 2, 2, 1, 3, 2, 2, 2, 1};
  Frame f = open_backward(call, outputs, 6, 5, kRanks);
  if (!f.run) return f.status;
  float* const* b = f.buffers;
  const Inputs xs = inputs(call, f, f.dims[3][0]);
  if (!f.run) return f.status;
  backward(Pool{call->api, call->ctx}, xs, b[1], b[2], b[3], b[4], b[5], b[7], b[8], b[9],
           b[10], b[11], f.dims[0][0], f.dims[3][0], f.dims[3][1]);
  return nullptr;
}

}  // namespace
}  // namespace rnnjax

RNNJAX_EXPORT_CELL(Elman)
