// The GRU layer's forward and backward passes (Keras reset_after=True: gates z, r, n), each
// one XLA:CPU custom call through jax.ffi (rnnjax/native.py: the backward 'native' of
// rnnjax.cells.gru); what the kernels share is in native_common.h.
//
//   forward:  u = xs[t] @ kernel + bias, v = hs[t-1] @ recurrent + recurrent_bias ([B, 3H])
//             z = sigmoid(u_z + v_z), r = sigmoid(u_r + v_r), n = tanh(u_n + r * v_n)
//             hs[t] = z * hs[t-1] + (1 - z) * n;  gates[t] = [z, r, n, v_n]
//   backward: g = dh_last; for t = T-1 .. 0, dh = g [+ dhs[t]], a = (1 - z)(1 - n^2):
//               du = dh * [(h_prev - n) z (1 - z), a v_n r (1 - r), a]  (of u, bias in)
//               dv = [du_z, du_r, dh a r]                              (of v, bias in)
//               g = dh * z + dv @ recurrent^T
//             dh0 = g; dkernel = sum_t xs[t]^T du_t; drecurrent = sum_t hs[t-1]^T dv_t;
//             dbias, drecurrent_bias = the sums of du's and dv's rows
//
// xs [T, B, F] (or the batch's rows of a table [T, N, F]: native_common.h's Inputs); hs,
// dhs [T, B, H]; gates [T, B, 4 np]; dus [T, B, 3 np]; kernel [F, 3H]; bias and
// recurrent_bias [3H]; recurrent [H, 3H]; h0, dh_last, dh0 [B, H]. The same structure as
// native_elman.cc: the batch in parts (parts_for) on XLA's pool, each part's steps alone.
// Each gate's block of columns is padded to whole vectors (np = padded(H)). The sigmoid
// is 1 / (1 + exp(-x)), as XLA:CPU computes it, with Cephes' exp; tanh is XLA:CPU's
// approximation: the results differ from XLA's by float32 rounding (tests/test_native.py
// checks them against the hand-written form's).

#include "native_common.h"

namespace rnnjax {
namespace {

constexpr int64_t kGates = 3;

// The recurrence, the gates stored for the backward pass; the batch in parts
// (forward_parts; `kept` 1: each step written over the last, the gates too).
void forward(const Pool& pool, const Inputs& xs, const float* kernel, const float* bias,
             const float* recurrent, const float* recurrent_bias, const float* h0, float* hs,
             float* gates, int64_t time, int64_t kept, int64_t batch, int64_t hidden) {
  const int64_t np = padded(hidden), width = kGates * np, stored = 4 * np;
  const Floats b = padded_gates(bias, 1, hidden, kGates);
  const Floats rb = padded_gates(recurrent_bias, 1, hidden, kGates);
  forward_parts(pool, xs, kernel, recurrent, h0, hs, kGates, time, kept, batch, hidden,
                [&](int64_t, int64_t at, int64_t, int64_t, int64_t rows, const float* us,
                    const float* v, const float* previous) {
    float* ht = hs + at * hidden;
    float* gt = gates + at * stored;
    // In two passes over the rows, each a short loop whose vectors the CPU overlaps: the
    // gates z and r (one sigmoid over both blocks), then the candidate and h.
    for (int64_t r = 0; r < rows; ++r) {
      const float* ur = us + r * width;
      const float* vr = v + r * width;
      float* gr = gt + r * stored;
      for (int64_t c = 0; c < 2 * np; c += L)
        store(gr + c, sigmoid_vec((load(ur + c) + load(b.data() + c)) +
                                  (load(vr + c) + load(rb.data() + c))));
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float* ur = us + r * width + 2 * np;
      const float* vr = v + r * width + 2 * np;
      float* gr = gt + r * stored;
      for (int64_t c = 0; c < np; c += L) {
        const int64_t n = hidden - c < L ? hidden - c : L;
        const vec z = load(gr + c), vn = load(vr + c) + load(rb.data() + 2 * np + c);
        const vec cand = tanh_vec((load(ur + c) + load(b.data() + 2 * np + c)) +
                                  load(gr + np + c) * vn);
        const vec h = load_part(previous + r * hidden + c, n);
        store_part(ht + r * hidden + c, z * h + (1.f - z) * cand, n);
        store(gr + 2 * np + c, cand);
        store(gr + 3 * np + c, vn);
      }
    }
  });
}

// The gradients; the batch in parts (run_parts), each summing its own weight gradients in
// blocks of steps (BlockSums). du is written padded ([T, B, 3np], the call's output: XLA's
// dxs = dus @ kernel^T reads it with the kernel's gate blocks padded alike; into one step's
// rows of the part's own where the inputs' gradient is not asked for, dus null), and dv's n
// block beside it (dv_n, [rows, np]): dv = [du_z, du_r, dv_n].
void backward(const Pool& pool, const Inputs& xs, const float* hs, const float* dhs,
              const float* h0, const float* gates, const float* recurrent,
              const float* dh_last, float* dus, float* dh0, float* dkernel, float* dbias,
              float* drecurrent, float* drecurrent_bias, int64_t time, int64_t batch,
              int64_t hidden) {
  const int64_t np = padded(hidden), width = kGates * np, stored = 4 * np;
  const int64_t features = xs.features;
  const Floats ut = padded_gates_transposed(recurrent, hidden, kGates);
  const int64_t parts = parts_for(pool, batch);
  // dk [F, 3np], dr [H, 3np], db [3np], and drb_n [np]: the recurrent bias's n block (its
  // z and r blocks are du's, as db's: copied from dbias at the end, not summed twice)
  PartSums sums(parts, (features + hidden + 1) * width + np);
  run_parts(pool, parts, batch, [&](int64_t p, int64_t first, int64_t last) {
    const int64_t rows = last - first;
    Floats g(rows * np), dvn(rows * np), carried(rows * np);  // carried: dh * z
    Floats step_du(dus == nullptr ? rows * width : 0);  // where dus is not asked
    InputRows x(xs, first, last);
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy(g.data() + r * np, dh_last + (first + r) * hidden, hidden * sizeof(float));
    BlockSums step_sums = sums.part(p, time, rows);
    float* dk = step_sums.block();
    float* dr = dk + features * width;
    float* db = dr + hidden * width;
    float* drb_n = db + width;
    for (int64_t t = time - 1; t >= 0; --t) {
      const int64_t at = t * batch + first;
      const float* gt = gates + at * stored;
      const float* previous = t == 0 ? h0 + first * hidden : hs + (at - batch) * hidden;
      const float* dht = dhs == nullptr ? nullptr : dhs + at * hidden;
      float* dut = dus == nullptr ? step_du.data() : dus + at * width;
      for (int64_t r = 0; r < rows; ++r) {
        const float* gr = gt + r * stored;
        float* dgr = g.data() + r * np;
        float* dur = dut + r * width;
        for (int64_t c = 0; c < np; c += L) {
          const int64_t n = hidden - c < L ? hidden - c : L;
          const vec dh = dht == nullptr ? load(dgr + c)
                                        : load_part(dht + r * hidden + c, n) + load(dgr + c);
          const vec z = load(gr + c), rg = load(gr + np + c), cand = load(gr + 2 * np + c);
          const vec vn = load(gr + 3 * np + c);
          const vec h = load_part(previous + r * hidden + c, n);
          const vec a = (1.f - z) * (1.f - cand * cand);
          store(dur + c, dh * ((h - cand) * z * (1.f - z)));
          store(dur + np + c, dh * (a * vn * rg * (1.f - rg)));
          store(dur + 2 * np + c, dh * a);
          store(dvn.data() + r * np + c, dh * (a * rg));
          store(carried.data() + r * np + c, dh * z);
        }
      }
      // g = dv @ recurrent^T + dh * z, dv's z and r blocks du's: the product's terms summed
      // first, then dh * z added, as XLA's form sums them. Where z is near 1, dh * z is most
      // of g; the product's terms added to it one by one each lost their low bits, and the
      // pixels GRU's first kernel gradients (the cotangent at the last step alone) were 2.2x
      // (recurrent) and 3.6x (input) as far from a float64 autodiff's as the hand-written
      // form's.
      product<false>({dut, width, 1, ut.data(), np, g.data(), np, rows, 2 * np, np});
      product<true>({dvn.data(), np, 1, ut.data() + 2 * np * np, np, g.data(), np, rows, np,
                     np});
      add(g.data(), carried.data(), rows * np);
      product<true>({x.at(t, t - 1), 1, features, dut, width, dk, width, features, rows,
                     width});
      product<true>({previous, 1, hidden, dut, width, dr, width, hidden, rows, 2 * np});
      product<true>({previous, 1, hidden, dvn.data(), np, dr + 2 * np, width, hidden, rows,
                     np});
      add_row_sums(db, dut, rows, width, width);
      add_row_sums(drb_n, dvn.data(), rows, np, np);
      step_sums.step_done();
    }
    unpad_gates(g.data(), rows, hidden, 1, dh0 + first * hidden);
  });
  const float* dk = sums.total();
  const float* dr = dk + features * width;
  const float* db = dr + hidden * width;
  unpad_gates(dk, features, hidden, kGates, dkernel);
  unpad_gates(dr, hidden, hidden, kGates, drecurrent);
  unpad_gates(db, 1, hidden, kGates, dbias);
  std::memcpy(drecurrent_bias, dbias, 2 * hidden * sizeof(float));
  unpad_gates(db + width, 1, hidden, 1, drecurrent_bias + 2 * hidden);
}

// (xs [T, N, F], kernel [F, 3H], bias [3H], recurrent [H, 3H], recurrent_bias [3H],
// h0 [B, H], rows [B] or [0]) -> (hs [T, B, H], gates [T, B, 4 np]: each gate padded to
// whole vectors), or both [1, B, ...]: the last step's alone (forward_steps)
XLA_FFI_Error* Forward(XLA_FFI_CallFrame* call) {
  static constexpr int kRanks[] = {3, 2, 1, 2, 1, 2, 1, 3, 3};
  Frame f = open(call, 7, 2, kRanks);
  if (!f.run) return f.status;
  float* const* b = f.buffers;
  const Inputs xs = inputs(call, f, f.dims[5][0]);
  const int64_t kept = forward_steps(call, f, 7, 2);
  if (!f.run) return f.status;
  forward(Pool{call->api, call->ctx}, xs, b[1], b[2], b[3], b[4], b[5], b[7], b[8],
          f.dims[0][0], kept, f.dims[5][0], f.dims[5][1]);
  return nullptr;
}

// (xs, hs, h0, gates, recurrent, dh_last, rows) -> (dus, dh0, dkernel, dbias, drecurrent,
// drecurrent_bias); with dhs after hs where the outputs have a gradient.
XLA_FFI_Error* backward_call(XLA_FFI_CallFrame* call, bool outputs) {
  static constexpr int kRanks[] = {3, 3, 2, 3, 2, 2, 1, 3, 2, 2, 1, 2, 1};
  Frame f = open_backward(call, outputs, 7, 6, kRanks);
  if (!f.run) return f.status;
  float* const* b = f.buffers;
  const Inputs xs = inputs(call, f, f.dims[3][0]);
  if (!f.run) return f.status;
  backward(Pool{call->api, call->ctx}, xs, b[1], b[2], b[3], b[4], b[5], b[6], b[8], b[9],
           b[10], b[11], b[12], b[13], f.dims[0][0], f.dims[3][0], f.dims[3][1]);
  return nullptr;
}

}  // namespace
}  // namespace rnnjax

RNNJAX_EXPORT_CELL(Gru)
