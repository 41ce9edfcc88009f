// The Elman (SimpleRNN, tanh) layer's forward and backward passes, each one XLA:CPU custom
// call through jax.ffi, for benchmarks/native_elman.py: what a native kernel saves against
// XLA's loops on the machine at hand. Built with -march=native and -DRNNJAX_LANES=8 or 16
// (floats per vector: GCC's vector extensions, lowered to what the CPU has); float32,
// row-major.
//
//   forward:  hs[t] = tanh((xs[t] @ kernel + bias) + hs[t-1] @ recurrent), hs[-1] = h0
//   backward: g = dh_last; for t = T-1 .. 0:
//               dzs[t] = (g [+ dhs[t]]) * (1 - hs[t]^2);  g = dzs[t] @ recurrent^T
//             dh0 = g; dkernel = sum_t xs[t]^T dzs[t]; drecurrent = sum_t hs[t-1]^T dzs[t];
//             dbias = the sum of dzs' rows
//
// xs [T, B, F]; hs, dzs, dhs [T, B, H]; kernel [F, H]; recurrent [H, H]; bias [H];
// h0, dh_last, dh0 [B, H]. The recurrence runs on the calling thread; the products off its
// chain (the input projection of the steps ahead, the weight gradients of the steps
// behind) on another thread of XLA's intra-op pool (ffi::ThreadPool) where it has one. Each
// product accumulates over k in order with fused multiply-adds, and tanh is the rational
// approximation XLA:CPU emits (clamped to +-7.905, x itself below 4e-4): the forward
// rounded as XLA's did on the AVX-512 EPYC this was written on; the weight gradients are
// summed in another order (the benchmark checks them against the built-in cell's).

#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

#ifndef RNNJAX_LANES
#define RNNJAX_LANES 8
#endif

namespace {

namespace ffi = xla::ffi;

constexpr int64_t L = RNNJAX_LANES;
typedef float vec __attribute__((vector_size(L * sizeof(float))));

// Rows and vectors of one block of a product's accumulators, held in registers: 4 x 7 of 8
// lanes (or 4 x 4 of 16) where there are 32 vector registers (AVX-512), 2 x 7 of 8 where
// there are 16 (AVX2).
#if defined(RNNJAX_ROWS)
constexpr int kRows = RNNJAX_ROWS;
#elif defined(__AVX512F__)
constexpr int kRows = 4;
#else
constexpr int kRows = 2;
#endif
constexpr int kVectors = L == 16 ? 4 : 7;

vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

void store(float* p, vec v) { std::memcpy(p, &v, sizeof v); }

vec splat(float s) { return s - vec{}; }  // s - 0 is s for every s, so this folds away

vec tanh_vec(vec x) {
  const vec c = splat(7.90531110763549805f);
  vec xc = x < -c ? -c : x;
  xc = xc > c ? c : xc;
  const vec x2 = xc * xc;
  vec p = x2 * -2.76076847742355e-16f + 2.00018790482477e-13f;
  p = p * x2 + -8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  p = p * xc;
  vec q = x2 * 1.19825839466702e-06f + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  const vec ax = x < 0 ? -x : x;
  return ax < 0.0004f ? x : p / q;
}

float tanh_scalar(float x) { return tanh_vec(splat(x))[0]; }

int64_t padded(int64_t n) { return (n + L - 1) / L * L; }

// z[r0 : r0+R, c0 : c0+NV*L] (+)= a[r0 : r0+R, :K] @ m[:K, c0 : c0+NV*L]. a's element
// (i, k) lies at a[i * ai + k * ak] (ak = 1: rows; ai = 1: a transposed); m's and z's rows
// are ldm and ldz apart, each a multiple of L.
template <int R, int NV, bool Accumulate>
void block(const float* __restrict a, int64_t ai, int64_t ak, const float* __restrict m,
           int64_t ldm, float* __restrict z, int64_t ldz, int64_t k_size, int64_t r0,
           int64_t c0) {
  vec acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      acc[r][v] = Accumulate ? load(z + (r0 + r) * ldz + c0 + v * L) : vec{};
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

// A product's operands: a [rows, k_size] as above, m [k_size, columns], z [rows, columns];
// columns a multiple of L.
struct Product {
  const float* a;
  int64_t ai, ak;
  const float* m;
  int64_t ldm;
  float* z;
  int64_t ldz, rows, k_size, columns;
};

// Rows r0 .. r0+R of the product, over all its columns, in blocks of NV vectors and fewer.
template <int R, bool Accumulate, int NV = kVectors>
void columns(const Product& p, int64_t r0, int64_t c0) {
  if constexpr (NV > 0) {
    for (; p.columns - c0 >= NV * L; c0 += NV * L)
      block<R, NV, Accumulate>(p.a, p.ai, p.ak, p.m, p.ldm, p.z, p.ldz, p.k_size, r0, c0);
    columns<R, Accumulate, NV - 1>(p, r0, c0);
  }
}

template <bool Accumulate, int R = kRows>
void product(const Product& p, int64_t r0 = 0) {
  if constexpr (R > 0) {
    for (; r0 + R <= p.rows; r0 += R) columns<R, Accumulate>(p, r0, 0);
    product<Accumulate, R - 1>(p, r0);
  }
}

// m [k, n] (transposed from [n, k] when asked) with its columns padded with zeros to a
// multiple of L.
std::vector<float> padded_matrix(const float* m, int64_t k, int64_t n, bool transpose) {
  const int64_t np = padded(n);
  std::vector<float> out(k * np, 0.f);
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < n; ++j) out[i * np + j] = transpose ? m[j * k + i] : m[i * n + j];
  return out;
}

// n (at most L) floats from p, zeros after them.
vec load_part(const float* p, int64_t n) {
  if (n == L) return load(p);
  float part[L] = {};
  std::memcpy(part, p, n * sizeof(float));
  return load(part);
}

void pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// A counter one thread raises and another waits on, alone on its cache line: the waiting
// thread's reads would otherwise take the line from the raising thread's other data at
// every access.
struct alignas(64) Counter {
  std::atomic<int64_t> value{0};
};

// Spins until counter reaches at least value (yielding the CPU now and then, for a
// process with more threads than CPUs).
void await(const Counter& counter, int64_t value) {
  for (int64_t spins = 1; counter.value.load(std::memory_order_acquire) < value; ++spins) {
    pause();
    if (spins % 4096 == 0) std::this_thread::yield();
  }
}

// A job for another thread of XLA's intra-op pool, off the recurrence's chain: the input
// projection of the steps ahead of the forward loop, the weight gradients of the steps
// behind the backward loop. Whichever thread claims it first runs it: the pool's other
// thread, or this one when it needs the job done and the pool has not begun it (a pool of
// one thread, or one busy with another op). The same sums either way.
class Offload {
 public:
  Offload(ffi::ThreadPool& pool, std::function<void()> job)
      : job_(std::move(job)), shared_(std::make_shared<Shared>()) {
    if (pool.num_threads() >= 2) {
      pool.Schedule([shared = shared_, job = &job_] {
        if (!shared->claimed.exchange(true)) {  // job (this call's) lives until finished
          (*job)();
          shared->finished.value.store(1, std::memory_order_release);
        }
      });
    }
  }

  Offload(const Offload&) = delete;
  Offload& operator=(const Offload&) = delete;
  ~Offload() { join(); }

  // Runs the job here unless another thread has claimed it, then waits for it to end.
  void join() {
    if (ran_here_) return;
    if (!shared_->claimed.exchange(true)) {
      job_();
      ran_here_ = true;
      return;
    }
    await(shared_->finished, 1);
  }

 private:
  struct Shared {
    std::atomic<bool> claimed{false};
    Counter finished;
  };
  std::function<void()> job_;
  std::shared_ptr<Shared> shared_;  // outlives this call where the pool runs its task late
  bool ran_here_ = false;
};

// hs[t] = tanh((xs[t] @ kernel + bias) + hs[t-1] @ recurrent), hs[-1] = h0. The projected
// steps (us, [T, B, np]) come from another thread ahead of the loop, or from this one.
void forward(ffi::ThreadPool& pool, const float* xs, const float* kernel, const float* bias,
             const float* recurrent, const float* h0, float* hs, int64_t time, int64_t batch,
             int64_t features, int64_t hidden) {
  const int64_t np = padded(hidden), full = hidden / L * L, size = batch * hidden;
  const std::vector<float> u = padded_matrix(recurrent, hidden, hidden, false);
  const std::vector<float> w = padded_matrix(kernel, features, hidden, false);
  std::vector<float> us(time * batch * np), z(batch * np);
  // Steps are projected in order, each by the thread that claims it (next): another
  // thread ahead of the loop, and this one whenever the step it needs is not yet done.
  Counter next;
  std::unique_ptr<std::atomic<bool>[]> ready(new std::atomic<bool>[time]);
  for (int64_t t = 0; t < time; ++t) ready[t].store(false, std::memory_order_relaxed);
  auto project_next = [&] {
    const int64_t t = next.value.fetch_add(1, std::memory_order_acq_rel);
    if (t >= time) return false;
    product<false>({xs + t * batch * features, features, 1, w.data(), np,
                    us.data() + t * batch * np, np, batch, features, np});
    ready[t].store(true, std::memory_order_release);
    return true;
  };
  Offload offload(pool, [&] {
    while (project_next()) {
    }
  });
  const float* previous = h0;
  for (int64_t t = 0; t < time; ++t) {
    product<false>({previous, hidden, 1, u.data(), np, z.data(), np, batch, hidden, np});
    while (!ready[t].load(std::memory_order_acquire)) {
      if (!project_next()) pause();
    }
    const float* ut = us.data() + t * batch * np;
    float* ht = hs + t * size;
    for (int64_t r = 0; r < batch; ++r) {
      const float* zr = z.data() + r * np;
      const float* ur = ut + r * np;
      const int64_t row = r * hidden;
      int64_t c = 0;
      for (; c < full; c += L)
        store(ht + row + c, tanh_vec((load(ur + c) + load(bias + c)) + load(zr + c)));
      for (; c < hidden; ++c) ht[row + c] = tanh_scalar((ur[c] + bias[c]) + zr[c]);
    }
    previous = ht;
  }
  offload.join();
}

// g = dh_last; for t = T-1 .. 0: dzs[t] = (g [+ dhs[t]]) * (1 - hs[t]^2),
// g = dzs[t] @ recurrent^T; dh0 = g. The weight gradients (dkernel += xs[t]^T dzs[t],
// drecurrent += hs[t-1]^T dzs[t], dbias += the rows of dzs[t]) are summed step by step
// behind the loop, in two parts.
void backward(ffi::ThreadPool& pool, const float* xs, const float* hs, const float* dhs,
              const float* h0,
              const float* recurrent, const float* dh_last, float* dzs, float* dh0,
              float* dkernel, float* drecurrent, float* dbias, int64_t time, int64_t batch,
              int64_t features, int64_t hidden) {
  const int64_t np = padded(hidden), size = batch * hidden;
  const std::vector<float> ut = padded_matrix(recurrent, hidden, hidden, true);
  std::vector<float> g(batch * np), dz(time * batch * np);  // dz: dzs, rows padded
  for (int64_t r = 0; r < batch; ++r)
    std::memcpy(g.data() + r * np, dh_last + r * hidden, hidden * sizeof(float));
  Counter done;  // steps whose dz is written, from the last
  // The weight gradients of steps s = T-1-t in [first, last), summed into sums' dk [F, np],
  // dr [H, np] and db [np], step by step as each dz is written.
  auto sum = [&](int64_t first, int64_t last, std::vector<float>& sums) {
    float* dk = sums.data();
    float* dr = dk + features * np;
    float* db = dr + hidden * np;
    for (int64_t s = first; s < last; ++s) {
      const int64_t t = time - 1 - s;
      await(done, s + 1);
      const float* dzt = dz.data() + t * batch * np;
      const float* previous = t == 0 ? h0 : hs + (t - 1) * size;
      product<true>({xs + t * batch * features, 1, features, dzt, np, dk, np, features, batch,
                     np});
      product<true>({previous, 1, hidden, dzt, np, dr, np, hidden, batch, np});
      for (int64_t r = 0; r < batch; ++r)
        for (int64_t c = 0; c < np; c += L) store(db + c, load(db + c) + load(dzt + r * np + c));
    }
  };
  // Another thread sums the steps behind the loop but the last fifth, which this one sums
  // once the loop ends (each step's sums take about 1.5x a step of the loop): a split
  // fixed by the shape, whichever thread runs each part, so the sums round alike in every
  // call.
  const int64_t split = time - time / 5;
  const int64_t sums_size = (features + hidden + 1) * np;
  std::vector<float> mine(sums_size, 0.f), others(sums_size, 0.f);
  Offload offload(pool, [&] { sum(0, split, others); });
  for (int64_t t = time - 1; t >= 0; --t) {
    const float* ht = hs + t * size;
    const float* dht = dhs == nullptr ? nullptr : dhs + t * size;
    float* dzt = dz.data() + t * batch * np;
    for (int64_t r = 0; r < batch; ++r) {
      const float* gr = g.data() + r * np;
      const int64_t row = r * hidden;
      for (int64_t c = 0; c < np; c += L) {
        const int64_t n = hidden - c < L ? hidden - c : L;
        const vec h = load_part(ht + row + c, n);
        const vec d = dht == nullptr ? load(gr + c) : load_part(dht + row + c, n) + load(gr + c);
        store(dzt + r * np + c, d * (1.f - h * h));
      }
      std::memcpy(dzs + t * size + row, dzt + r * np, hidden * sizeof(float));
    }
    done.value.store(time - t, std::memory_order_release);
    product<false>({dzt, np, 1, ut.data(), np, g.data(), np, batch, hidden, np});
  }
  sum(split, time, mine);
  offload.join();
  for (int64_t i = 0; i < sums_size; i += L)
    store(mine.data() + i, load(others.data() + i) + load(mine.data() + i));
  const float* dk = mine.data();
  const float* dr = dk + features * np;
  const float* db = dr + hidden * np;
  for (int64_t r = 0; r < batch; ++r)
    std::memcpy(dh0 + r * hidden, g.data() + r * np, hidden * sizeof(float));
  for (int64_t i = 0; i < features; ++i)
    std::memcpy(dkernel + i * hidden, dk + i * np, hidden * sizeof(float));
  for (int64_t i = 0; i < hidden; ++i)
    std::memcpy(drecurrent + i * hidden, dr + i * np, hidden * sizeof(float));
  std::memcpy(dbias, db, hidden * sizeof(float));
}

using F32 = ffi::Buffer<ffi::F32>;
using Out = ffi::ResultBuffer<ffi::F32>;

ffi::Error Forward(ffi::ThreadPool pool, F32 xs, F32 kernel, F32 bias, F32 recurrent, F32 h0, Out hs) {
  const auto d = xs.dimensions();
  forward(pool, xs.typed_data(), kernel.typed_data(), bias.typed_data(), recurrent.typed_data(),
          h0.typed_data(), hs->typed_data(), d[0], d[1], d[2], h0.dimensions()[1]);
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, F32 xs, F32 hs, F32 h0, F32 recurrent, F32 dh_last, Out dzs, Out dh0,
                    Out dkernel, Out drecurrent, Out dbias) {
  const auto d = xs.dimensions();
  backward(pool, xs.typed_data(), hs.typed_data(), nullptr, h0.typed_data(), recurrent.typed_data(),
           dh_last.typed_data(), dzs->typed_data(), dh0->typed_data(), dkernel->typed_data(),
           drecurrent->typed_data(), dbias->typed_data(), d[0], d[1], d[2],
           h0.dimensions()[1]);
  return ffi::Error::Success();
}

ffi::Error BackwardWithOutputs(ffi::ThreadPool pool, F32 xs, F32 hs, F32 dhs, F32 h0, F32 recurrent, F32 dh_last,
                               Out dzs, Out dh0, Out dkernel, Out drecurrent, Out dbias) {
  const auto d = xs.dimensions();
  backward(pool, xs.typed_data(), hs.typed_data(), dhs.typed_data(), h0.typed_data(),
           recurrent.typed_data(), dh_last.typed_data(), dzs->typed_data(), dh0->typed_data(),
           dkernel->typed_data(), drecurrent->typed_data(), dbias->typed_data(), d[0], d[1],
           d[2], h0.dimensions()[1]);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnjaxElmanForward, Forward,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>()
                                  .Arg<F32>().Ret<F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnjaxElmanBackward, Backward,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>()
                                  .Arg<F32>().Ret<F32>().Ret<F32>().Ret<F32>().Ret<F32>()
                                  .Ret<F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnjaxElmanBackwardWithOutputs, BackwardWithOutputs,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>()
                                  .Arg<F32>().Arg<F32>().Ret<F32>().Ret<F32>().Ret<F32>()
                                  .Ret<F32>().Ret<F32>());
