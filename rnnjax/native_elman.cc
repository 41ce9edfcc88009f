// The Elman (SimpleRNN, tanh) layer's forward and backward passes, each one XLA:CPU custom
// call through jax.ffi (rnnjax/native.py: the backward 'native'), built with -march=native
// and -DRNNJAX_LANES=8 or 16 (floats per vector: GCC's vector extensions, lowered to what
// the CPU has); float32, row-major.
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
// behind) on another thread of XLA's intra-op pool where it has one. Each product
// accumulates over k in order with fused multiply-adds, and tanh is the rational
// approximation XLA:CPU emits (clamped to +-7.905, x itself below 4e-4): the forward
// rounded as XLA's did on the AVX-512 EPYC this was written on; the weight gradients are
// summed in another order, in two parts split by the shape alone, so every call rounds
// alike (tests/test_native.py checks them against the hand-written form's).

#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/c_api.h"  // the C API alone: ffi.h tripled the build's time

#ifndef RNNJAX_LANES
#define RNNJAX_LANES 8
#endif

namespace {

constexpr int64_t L = RNNJAX_LANES;
typedef float vec __attribute__((vector_size(L * sizeof(float))));

// Rows and vectors of one block of a product's accumulators, held in registers: 4 x 7 of 8
// lanes (or 4 x 4 of 16) where there are 32 vector registers (AVX-512), 2 x 7 of 8 where
// there are 16 (AVX2).
#if defined(__AVX512F__)
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

// Rows r0 .. r0+R of the product, over all its columns: blocks of kVectors vectors, then
// one vector at a time (few block shapes: each is a function of its own to compile).
template <int R, bool Accumulate>
void columns(const Product& p, int64_t r0) {
  int64_t c = 0;
  for (; p.columns - c >= kVectors * L; c += kVectors * L)
    block<R, kVectors, Accumulate>(p.a, p.ai, p.ak, p.m, p.ldm, p.z, p.ldz, p.k_size, r0, c);
  for (; c < p.columns; c += L)
    block<R, 1, Accumulate>(p.a, p.ai, p.ak, p.m, p.ldm, p.z, p.ldz, p.k_size, r0, c);
}

// All rows of the product: blocks of kRows rows, then one row at a time.
template <bool Accumulate>
void product(const Product& p) {
  int64_t r = 0;
  for (; r + kRows <= p.rows; r += kRows) columns<kRows, Accumulate>(p, r);
  for (; r < p.rows; ++r) columns<1, Accumulate>(p, r);
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

// XLA's intra-op thread pool, as the call's execution context gives it.
struct Pool {
  const XLA_FFI_Api* api;
  XLA_FFI_ExecutionContext* ctx;

  int64_t num_threads() const {
    int64_t n = 0;
    XLA_FFI_ThreadPool_NumThreads_Args args{XLA_FFI_ThreadPool_NumThreads_Args_STRUCT_SIZE,
                                            nullptr, ctx, &n};
    if (XLA_FFI_Error* error = api->XLA_FFI_ThreadPool_NumThreads(&args)) {
      destroy(error);
      return 0;
    }
    return n;
  }

  // Whether task(data) was handed to the pool.
  bool schedule(XLA_FFI_Task* task, void* data) const {
    XLA_FFI_ThreadPool_Schedule_Args args{XLA_FFI_ThreadPool_Schedule_Args_STRUCT_SIZE,
                                          nullptr, ctx, task, data};
    if (XLA_FFI_Error* error = api->XLA_FFI_ThreadPool_Schedule(&args)) {
      destroy(error);
      return false;
    }
    return true;
  }

  void destroy(XLA_FFI_Error* error) const {
    XLA_FFI_Error_Destroy_Args args{XLA_FFI_Error_Destroy_Args_STRUCT_SIZE, nullptr, error};
    api->XLA_FFI_Error_Destroy(&args);
  }
};

// A job for another thread of XLA's intra-op pool, off the recurrence's chain: the input
// projection of the steps ahead of the forward loop, the weight gradients of the steps
// behind the backward loop. Whichever thread claims it first runs it: the pool's other
// thread, or this one when it needs the job done and the pool has not begun it (a pool of
// one thread, or one busy with another op). The same sums either way.
class Offload {
 public:
  Offload(const Pool& pool, std::function<void()> job)
      : job_(std::move(job)), shared_(std::make_shared<Shared>()) {
    if (pool.num_threads() >= 2) {
      auto* task = new Task{shared_, &job_};
      if (!pool.schedule(&Offload::run, task)) delete task;
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
  struct Task {
    std::shared_ptr<Shared> shared;  // outlives the call where the pool runs the task late
    std::function<void()>* job;      // the call's: it waits for the job once claimed
  };

  static void run(void* data) {
    std::unique_ptr<Task> task(static_cast<Task*>(data));
    if (!task->shared->claimed.exchange(true)) {
      (*task->job)();
      task->shared->finished.value.store(1, std::memory_order_release);
    }
  }

  std::function<void()> job_;
  std::shared_ptr<Shared> shared_;
  bool ran_here_ = false;
};

// hs[t] = tanh((xs[t] @ kernel + bias) + hs[t-1] @ recurrent), hs[-1] = h0. The projected
// steps (us, [T, B, np]) come from another thread ahead of the loop, or from this one.
void forward(const Pool& pool, const float* xs, const float* kernel, const float* bias,
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
void backward(const Pool& pool, const float* xs, const float* hs, const float* dhs,
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

// The calls' glue, on XLA's FFI C API: each handler answers XLA's query for its API
// version, checks its operands (float32 arrays of the ranks it reads), then runs.

XLA_FFI_Error* error(const XLA_FFI_Api* api, const char* message) {
  XLA_FFI_Error_Create_Args args{XLA_FFI_Error_Create_Args_STRUCT_SIZE, nullptr, message,
                                 XLA_FFI_Error_Code_INVALID_ARGUMENT};
  return api->XLA_FFI_Error_Create(&args);
}

// Null, with buffers[] the call's args then its results, where the call is to run; else
// the version metadata XLA asked for (done), or an error (done and failed).
struct Frame {
  XLA_FFI_Error* status = nullptr;
  bool run = false;
  float* buffers[12] = {};
  int64_t* dims[12] = {};
};

Frame open(XLA_FFI_CallFrame* call, int args, int rets, const int* ranks) {
  Frame frame;
  if (call->extension_start != nullptr &&
      call->extension_start->type == XLA_FFI_Extension_Metadata) {
    auto* metadata = reinterpret_cast<XLA_FFI_Metadata_Extension*>(call->extension_start);
    metadata->metadata->api_version = XLA_FFI_Api_Version{
        XLA_FFI_Api_Version_STRUCT_SIZE, nullptr, XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR};
    metadata->metadata->traits = 0;
    return frame;
  }
  if (call->stage != XLA_FFI_ExecutionStage_EXECUTE) {
    frame.status = error(call->api, "rnnjax native Elman: called outside the execute stage");
    return frame;
  }
  if (call->args.size != args || call->rets.size != rets) {
    frame.status = error(call->api, "rnnjax native Elman: wrong number of operands");
    return frame;
  }
  for (int i = 0; i < args + rets; ++i) {
    const bool arg = i < args;
    if (arg ? call->args.types[i] != XLA_FFI_ArgType_BUFFER
            : call->rets.types[i - args] != XLA_FFI_RetType_BUFFER) {
      frame.status = error(call->api, "rnnjax native Elman: operands must be arrays");
      return frame;
    }
    auto* buffer = static_cast<XLA_FFI_Buffer*>(arg ? call->args.args[i]
                                                    : call->rets.rets[i - args]);
    if (buffer->dtype != XLA_FFI_DataType_F32 || buffer->rank != ranks[i]) {
      frame.status = error(call->api, "rnnjax native Elman: operands must be float32 arrays "
                                      "of the ranks it reads");
      return frame;
    }
    frame.buffers[i] = static_cast<float*>(buffer->data);
    frame.dims[i] = buffer->dims;
  }
  frame.run = true;
  return frame;
}

// (xs [T, B, F], kernel [F, H], bias [H], recurrent [H, H], h0 [B, H]) -> hs [T, B, H]
XLA_FFI_Error* Forward(XLA_FFI_CallFrame* call) {
  static constexpr int kRanks[] = {3, 2, 1, 2, 2, 3};
  Frame f = open(call, 5, 1, kRanks);
  if (!f.run) return f.status;
  float* const* b = f.buffers;
  forward(Pool{call->api, call->ctx}, b[0], b[1], b[2], b[3], b[4], b[5], f.dims[0][0],
          f.dims[0][1], f.dims[0][2], f.dims[4][1]);
  return nullptr;
}

// (xs, hs, h0, recurrent, dh_last) -> (dzs, dh0, dkernel, drecurrent, dbias); with dhs
// after hs where the outputs have a gradient.
XLA_FFI_Error* backward_call(XLA_FFI_CallFrame* call, bool outputs) {
  static constexpr int kRanks[] = {3, 3, 2, 2, 2, 3, 2, 2, 2, 1};
  static constexpr int kRanksWithOutputs[] = {3, 3, 3, 2, 2, 2, 3, 2, 2, 2, 1};
  Frame f = open(call, outputs ? 6 : 5, 5, outputs ? kRanksWithOutputs : kRanks);
  if (!f.run) return f.status;
  float* const* b = f.buffers;
  const int o = outputs ? 1 : 0;  // the operands after hs move one along
  backward(Pool{call->api, call->ctx}, b[0], b[1], outputs ? b[2] : nullptr, b[2 + o],
           b[3 + o], b[4 + o], b[5 + o], b[6 + o], b[7 + o], b[8 + o], b[9 + o],
           f.dims[0][0], f.dims[0][1], f.dims[0][2], f.dims[2 + o][1]);
  return nullptr;
}

XLA_FFI_Error* Backward(XLA_FFI_CallFrame* call) { return backward_call(call, false); }

XLA_FFI_Error* BackwardWithOutputs(XLA_FFI_CallFrame* call) {
  return backward_call(call, true);
}

}  // namespace

extern "C" {
XLA_FFI_Error* RnnjaxElmanForward(XLA_FFI_CallFrame* call) { return Forward(call); }
XLA_FFI_Error* RnnjaxElmanBackward(XLA_FFI_CallFrame* call) { return Backward(call); }
XLA_FFI_Error* RnnjaxElmanBackwardWithOutputs(XLA_FFI_CallFrame* call) {
  return BackwardWithOutputs(call);
}
}
