// The LSTM layer's forward and backward passes (Keras gate order i, f, g, o), each one
// XLA:CPU custom call through jax.ffi (rnnjax/native.py: the backward 'native' of
// rnnjax.cells.lstm); what the kernels share is in native_common.h.
//
//   forward:  z = (xs[t] @ kernel + bias) + hs[t-1] @ recurrent  ([B, 4H])
//             i, f, o = sigmoid(z_i, z_f, z_o), g = tanh(z_g)
//             c_t = f * c_{t-1} + i * g, hs[t] = o * tanh(c_t)
//             gates[t] = [i, f, g, o, c_t, tanh(c_t)]
//   backward: dh = dh_last, dc = dc_last; for t = T-1 .. 0, dh [+= dhs[t]]:
//               dc += dh * o (1 - tanh(c_t)^2)
//               dz = [dc g i (1 - i), dc c_{t-1} f (1 - f), dc i (1 - g^2),
//                     dh tanh(c_t) o (1 - o)]
//               dc = dc * f;  dh = dz @ recurrent^T
//             dh0 = dh, dc0 = dc; dkernel = sum_t xs[t]^T dz_t;
//             drecurrent = sum_t hs[t-1]^T dz_t; dbias = the sum of dz's rows
//
// xs [T, B, F] (or the batch's rows of a table [T, N, F]: native_common.h's Inputs); hs,
// dhs [T, B, H]; gates [T, B, 6 np]; dzs [T, B, 4 np]; kernel [F, 4H]; bias [4H];
// recurrent [H, 4H]; h0, c0, dh_last, dc_last, dh0, dc0 [B, H]. The same structure as
// native_gru.cc (the batch in parts on XLA's pool; each gate's block padded to whole
// vectors, np = padded(H)); its results differ from XLA's by float32 rounding
// (tests/test_native.py checks them against the hand-written form's).

#include "native_common.h"

namespace rnnjax {
namespace {

constexpr int64_t kGates = 4;

// The recurrence, the gates, c_t and tanh(c_t) stored for the backward pass (and c_T read
// from them); the batch in parts (forward_parts; `kept` 1: each step written over the
// last).
void forward(const Pool& pool, const Inputs& xs, const float* kernel, const float* bias,
             const float* recurrent, const float* h0, const float* c0, float* hs,
             float* gates, int64_t time, int64_t kept, int64_t batch, int64_t hidden) {
  const int64_t np = padded(hidden), width = kGates * np, stored = 6 * np;
  const Floats b = padded_gates(bias, 1, hidden, kGates);
  forward_parts(pool, xs, kernel, recurrent, h0, hs, kGates, time, kept, batch, hidden,
                [&](int64_t t, int64_t at, int64_t before, int64_t first, int64_t rows,
                    const float* us, const float* v, const float*) {
    float* ht = hs + at * hidden;
    float* gt = gates + at * stored;
    // In two passes over the rows (as the GRU's): the gates, then c and h.
    for (int64_t r = 0; r < rows; ++r) {
      const float* ur = us + r * width;
      const float* vr = v + r * width;
      float* gr = gt + r * stored;
      auto z = [&](int64_t c) { return (load(ur + c) + load(b.data() + c)) + load(vr + c); };
      for (int64_t c = 0; c < 2 * np; c += L) store(gr + c, sigmoid_vec(z(c)));
      for (int64_t c = 2 * np; c < 3 * np; c += L) store(gr + c, tanh_vec(z(c)));
      for (int64_t c = 3 * np; c < width; c += L) store(gr + c, sigmoid_vec(z(c)));
    }
    for (int64_t r = 0; r < rows; ++r) {
      float* gr = gt + r * stored;
      // c_{t-1}, in the step before's gates (these, where each step is written over the
      // last: read before this step's c is written)
      const float* cr = t == 0 ? nullptr : gates + (before + r) * stored + 4 * np;
      for (int64_t c = 0; c < np; c += L) {
        const int64_t n = hidden - c < L ? hidden - c : L;
        const vec c_prev = cr == nullptr ? load_part(c0 + (first + r) * hidden + c, n)
                                         : load(cr + c);
        const vec cell = load(gr + np + c) * c_prev + load(gr + c) * load(gr + 2 * np + c);
        const vec tanh_c = tanh_vec(cell);
        store_part(ht + r * hidden + c, load(gr + 3 * np + c) * tanh_c, n);
        store(gr + 4 * np + c, cell);
        store(gr + 5 * np + c, tanh_c);
      }
    }
  });
}

// The gradients; the batch in parts (run_parts), each summing its own weight gradients in
// blocks of steps (BlockSums). dz is written padded ([T, B, 4np], the call's output: XLA's
// dxs = dzs @ kernel^T reads it with the kernel's gate blocks padded alike; into one step's
// rows of the part's own where the inputs' gradient is not asked for, dzs null).
void backward(const Pool& pool, const Inputs& xs, const float* hs, const float* dhs,
              const float* h0, const float* c0, const float* gates, const float* recurrent,
              const float* dh_last, const float* dc_last, float* dzs, float* dh0, float* dc0,
              float* dkernel, float* drecurrent, float* dbias, int64_t time, int64_t batch,
              int64_t hidden) {
  const int64_t np = padded(hidden), width = kGates * np, stored = 6 * np;
  const int64_t features = xs.features;
  const Floats ut = padded_gates_transposed(recurrent, hidden, kGates);
  const int64_t parts = parts_for(pool, batch);
  PartSums sums(parts, (features + hidden + 1) * width);  // dk [F, 4np], dr [H, 4np], db
  run_parts(pool, parts, batch, [&](int64_t p, int64_t first, int64_t last) {
    const int64_t rows = last - first;
    Floats g(rows * np), dc(rows * np);
    Floats step_dz(dzs == nullptr ? rows * width : 0);  // where dzs is not asked
    InputRows x(xs, first, last);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t row = (first + r) * hidden;
      std::memcpy(g.data() + r * np, dh_last + row, hidden * sizeof(float));
      std::memcpy(dc.data() + r * np, dc_last + row, hidden * sizeof(float));
    }
    BlockSums step_sums = sums.part(p, time, rows);
    float* dk = step_sums.block();
    float* dr = dk + features * width;
    float* db = dr + hidden * width;
    for (int64_t t = time - 1; t >= 0; --t) {
      const int64_t at = t * batch + first;
      const float* gt = gates + at * stored;
      const float* dht = dhs == nullptr ? nullptr : dhs + at * hidden;
      float* dzt = dzs == nullptr ? step_dz.data() : dzs + at * width;
      for (int64_t r = 0; r < rows; ++r) {
        const float* gr = gt + r * stored;
        const float* cr = t == 0 ? nullptr : gr - batch * stored + 4 * np;
        float* dgr = g.data() + r * np;
        float* dcr = dc.data() + r * np;
        float* dzr = dzt + r * width;
        for (int64_t c = 0; c < np; c += L) {
          const int64_t n = hidden - c < L ? hidden - c : L;
          const vec dh = dht == nullptr ? load(dgr + c)
                                        : load_part(dht + r * hidden + c, n) + load(dgr + c);
          const vec i = load(gr + c), f = load(gr + np + c), gg = load(gr + 2 * np + c);
          const vec o = load(gr + 3 * np + c), tanh_c = load(gr + 5 * np + c);
          const vec c_prev = cr == nullptr ? load_part(c0 + (first + r) * hidden + c, n)
                                           : load(cr + c);
          const vec dcell = load(dcr + c) + dh * (o * (1.f - tanh_c * tanh_c));
          store(dzr + c, dcell * (gg * i * (1.f - i)));
          store(dzr + np + c, dcell * (c_prev * f * (1.f - f)));
          store(dzr + 2 * np + c, dcell * (i * (1.f - gg * gg)));
          store(dzr + 3 * np + c, dh * (tanh_c * o * (1.f - o)));
          store(dcr + c, dcell * f);
        }
      }
      product<false>({dzt, width, 1, ut.data(), np, g.data(), np, rows, width, np});
      const float* previous = t == 0 ? h0 + first * hidden : hs + (at - batch) * hidden;
      product<true>({x.at(t, t - 1), 1, features, dzt, width, dk, width, features, rows,
                     width});
      product<true>({previous, 1, hidden, dzt, width, dr, width, hidden, rows, width});
      add_row_sums(db, dzt, rows, width, width);
      step_sums.step_done();
    }
    unpad_gates(g.data(), rows, hidden, 1, dh0 + first * hidden);
    unpad_gates(dc.data(), rows, hidden, 1, dc0 + first * hidden);
  });
  const float* dk = sums.total();
  const float* dr = dk + features * width;
  unpad_gates(dk, features, hidden, kGates, dkernel);
  unpad_gates(dr, hidden, hidden, kGates, drecurrent);
  unpad_gates(dr + hidden * width, 1, hidden, kGates, dbias);
}

// (xs [T, N, F], kernel [F, 4H], bias [4H], recurrent [H, 4H], h0 [B, H], c0 [B, H],
// rows [B] or [0]) -> (hs [T, B, H], gates [T, B, 6 np]: i, f, g, o, c, tanh(c), each
// padded to whole vectors), or both [1, B, ...]: the last step's alone (forward_steps)
XLA_FFI_Error* Forward(XLA_FFI_CallFrame* call) {
  static constexpr int kRanks[] = {3, 2, 1, 2, 2, 2, 1, 3, 3};
  Frame f = open(call, 7, 2, kRanks);
  if (!f.run) return f.status;
  float* const* b = f.buffers;
  const Inputs xs = inputs(call, f, f.dims[4][0]);
  const int64_t kept = forward_steps(call, f, 7, 2);
  if (!f.run) return f.status;
  forward(Pool{call->api, call->ctx}, xs, b[1], b[2], b[3], b[4], b[5], b[7], b[8],
          f.dims[0][0], kept, f.dims[4][0], f.dims[4][1]);
  return nullptr;
}

// (xs, hs, h0, c0, gates, recurrent, dh_last, dc_last, rows) -> (dzs, dh0, dc0, dkernel,
// drecurrent, dbias); with dhs after hs where the outputs have a gradient.
XLA_FFI_Error* backward_call(XLA_FFI_CallFrame* call, bool outputs) {
  static constexpr int kRanks[] = {3, 3, 2, 2, 3, 2, 2, 2, 1, 3, 2, 2, 2, 2, 1};
  Frame f = open_backward(call, outputs, 9, 6, kRanks);
  if (!f.run) return f.status;
  float* const* b = f.buffers;
  const Inputs xs = inputs(call, f, f.dims[3][0]);
  if (!f.run) return f.status;
  backward(Pool{call->api, call->ctx}, xs, b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8],
           b[10], b[11], b[12], b[13], b[14], b[15], f.dims[0][0], f.dims[3][0],
           f.dims[3][1]);
  return nullptr;
}

}  // namespace
}  // namespace rnnjax

RNNJAX_EXPORT_CELL(Lstm)
