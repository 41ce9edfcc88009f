// What the native kernels share (native_elman.cc, native_gru.cc, native_lstm.cc, and
// native_products.cc, where the products are compiled once; rnnjax/native.py builds them
// into one library with -march=native and -DRNNJAX_LANES=8 or 16): vectors of L floats
// (GCC's vector extensions, lowered to what the CPU has), register-blocked products, tanh
// (XLA:CPU's approximation) and the logistic sigmoid, a batch's parts run on XLA's
// intra-op thread pool and their weight gradients' sums, and the FFI glue on XLA's C API.
// float32, row-major.

#ifndef RNNJAX_NATIVE_COMMON_H_
#define RNNJAX_NATIVE_COMMON_H_

#include <algorithm>
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

namespace rnnjax {

constexpr int64_t L = RNNJAX_LANES;
typedef float vec __attribute__((vector_size(L * sizeof(float))));
typedef int32_t ivec __attribute__((vector_size(L * sizeof(int32_t))));

// Rows and vectors of one block of a product's accumulators, held in registers with the
// block's vectors of the right operand and a broadcast left element: 7 vectors of 8 lanes
// (a hidden size of 50 in one block) or 4 of 16, in as many rows as fit the registers.
// Where there are 32 (AVX-512): 3 x 7 of 8 (29 registers) or 6 x 4 of 16 (29). At 4 x 7
// (36) the compiler spilled: the rows 4096 SimpleRNN's passes, on one core of a 2-vCPU
// AVX-512 Xeon in turns, ran the forward 1.12-1.20x and the backward 1.13-1.22x faster at
// 3 x 7; at 16 lanes, 6 x 4 against 4 x 4, the backward 1.06x faster and the forward
// level. Where there are 16 (AVX2): 2 x 7, which ran (compiled for AVX2, on the same CPU)
// level with or faster than 1 x 7, 2 x 4, 2 x 5 and 3 x 3.
constexpr int kVectors = L == 16 ? 4 : 7;
#if defined(__AVX512F__)
constexpr int kRows = L == 16 ? 6 : 3;
#else
constexpr int kRows = 2;
#endif

inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof v); }

inline vec splat(float s) { return s - vec{}; }  // s - 0 is s for every s, so this folds away

// tanh as XLA:CPU computes it (and Eigen): x itself below 4e-4, else a rational function
// of x clamped to +-c. Where the CPU fuses products with sums (FMA), c is 7.9988, where the
// function rounds to 1: from 7.9988 on the result is +-1, as XLA's. (At 7.9053, the clamp
// for CPUs without FMA, it was 0.99999976 for every larger x, where XLA's was 1.)
inline vec tanh_vec(vec x) {
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
  const vec c = splat(7.99881172180175781f);
#else
  const vec c = splat(7.90531110763549805f);
#endif
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

// exp(x) for x clamped to [-87.3, 88.3] (the normal floats' range), as 2^n * p(r):
// x = n ln2 + r, |r| <= ln2 / 2, p Cephes' degree-6 polynomial (within 2 units in the last
// place).
inline vec exp_vec(vec x) {
  x = x < -87.3f ? splat(-87.3f) : x;
  x = x > 88.3f ? splat(88.3f) : x;
  const vec t = x * 1.44269504088896341f;
  const ivec ni = __builtin_convertvector(t + (t < 0 ? splat(-0.5f) : splat(0.5f)), ivec);
  const vec n = __builtin_convertvector(ni, vec);
  const vec r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  vec p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const ivec bits = (ni + 127) << 23;
  vec scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// The logistic sigmoid 1 / (1 + exp(-x)).
inline vec sigmoid_vec(vec x) { return 1.f / (1.f + exp_vec(-x)); }

inline float tanh_scalar(float x) { return tanh_vec(splat(x))[0]; }

inline int64_t padded(int64_t n) { return (n + L - 1) / L * L; }

// n floats, zeroed, the first on a 64-byte boundary: a cache line, so that no vector of
// 16 floats (or 8, from an even index) is loaded across two; a std::vector's are 16 bytes
// apart at worst. Every buffer of the kernels' own that vectors are loaded from is one (not
// InputRows' gathered rows, read a float at a time). In turns, one process each, on a
// 2-vCPU AVX-512 Xeon (the native train steps, 16 lanes, against std::vector buffers):
// rows batch 50 LSTM 4-15% and GRU 3-6% faster, SimpleRNN level; pixels batch 50 LSTM
// 3-15% and GRU 9-11% faster.
class Floats {
 public:
  explicit Floats(int64_t n) : size_(n), storage_(n + kLine / sizeof(float), 0.f) {
    const auto at = reinterpret_cast<uintptr_t>(storage_.data());
    data_ = storage_.data() + (kLine - at % kLine) % kLine / sizeof(float);
  }
  Floats(Floats&&) = default;  // the vector's floats stay where they are
  Floats(const Floats&) = delete;
  Floats& operator=(const Floats&) = delete;

  float* data() { return data_; }
  const float* data() const { return data_; }
  int64_t size() const { return size_; }

 private:
  static constexpr uintptr_t kLine = 64;
  int64_t size_;
  std::vector<float> storage_;
  float* data_;
};

// A product's operands: a [rows, k_size], its element (i, k) at a[i * ai + k * ak] (ak = 1:
// rows; ai = 1: a transposed); m [k_size, columns] and z [rows, columns], their rows ldm and
// ldz apart; columns, ldm and ldz multiples of L.
struct Product {
  const float* a;
  int64_t ai, ak;
  const float* m;
  int64_t ldm;
  float* z;
  int64_t ldz, rows, k_size, columns;
};

// z (+)= a @ m, in blocks of kRows rows by kVectors vectors of accumulators, then one block
// of the rows and one of the vectors left (native_products.cc, compiled once for the three
// cells: its blocks are most of the library's build).
template <bool Accumulate>
void product(const Product& p);
extern template void product<false>(const Product& p);
extern template void product<true>(const Product& p);

// m [k, gates * n] with each gate's block of n columns padded with zeros to np =
// padded(n): [k, gates * np].
inline Floats padded_gates(const float* m, int64_t k, int64_t n, int64_t gates) {
  const int64_t np = padded(n);
  Floats out(k * gates * np);
  for (int64_t i = 0; i < k; ++i)
    for (int64_t g = 0; g < gates; ++g)
      std::memcpy(out.data() + (i * gates + g) * np, m + (i * gates + g) * n, n * sizeof(float));
  return out;
}

// The transpose of m [n, gates * n], its rows and columns padded: [gates * np, np], row
// g * np + j the column g * n + j of m (zero rows where j >= n).
inline Floats padded_gates_transposed(const float* m, int64_t n, int64_t gates) {
  const int64_t np = padded(n);
  Floats out(gates * np * np);
  for (int64_t g = 0; g < gates; ++g)
    for (int64_t j = 0; j < n; ++j)
      for (int64_t i = 0; i < n; ++i)
        out.data()[(g * np + j) * np + i] = m[i * gates * n + g * n + j];
  return out;
}

// padded_gates undone: from [rows, gates * np] to [rows, gates * n].
inline void unpad_gates(const float* from, int64_t rows, int64_t n, int64_t gates, float* to) {
  const int64_t np = padded(n);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t g = 0; g < gates; ++g)
      std::memcpy(to + (i * gates + g) * n, from + (i * gates + g) * np, n * sizeof(float));
}

// Each gate's padding in m [rows, gates * np] (np = padded(hidden): its lanes from hidden
// on) set to zero. The padding of xs[t] @ kernel (the kernel's padded with zeros) is
// x * 0: NaN in a row where an input is +-inf. The backward's products run over the gates'
// padded blocks, so NaN there would reach every gradient of the row's; XLA's forms give
// NaN in the kernel's gradient alone (its row of the input that was +-inf).
inline void zero_padding(float* m, int64_t rows, int64_t hidden, int64_t gates) {
  const int64_t np = padded(hidden), n = hidden - (np - L);
  if (n == L) return;
  ivec lane;
  for (int64_t i = 0; i < L; ++i) lane[i] = static_cast<int32_t>(i);
  const ivec keep = lane < static_cast<int32_t>(n);
  for (float* last = m + np - L; last < m + rows * gates * np; last += np)
    store(last, keep ? load(last) : vec{});
}

// to[:n] += from[:n] (n a multiple of L).
inline void add(float* to, const float* from, int64_t n) {
  for (int64_t i = 0; i < n; i += L) store(to + i, load(to + i) + load(from + i));
}

// to[:n] += the sum of m's rows [rows, n] (ld apart; n a multiple of L): the rows summed
// first, then added to `to`, a block's sums of many steps (BlockSums). Four vectors at a
// time, four chains of additions in flight: one at a time, the chain's latency made the
// rows batch 50 LSTM's train step 5-13% slower.
inline void add_row_sums(float* to, const float* m, int64_t rows, int64_t ld, int64_t n) {
  constexpr int64_t kAtOnce = 4;
  int64_t c = 0;
  for (; c + kAtOnce * L <= n; c += kAtOnce * L) {
    vec sum[kAtOnce] = {};
    for (int64_t r = 0; r < rows; ++r)
#pragma GCC unroll 4
      for (int64_t v = 0; v < kAtOnce; ++v) sum[v] += load(m + r * ld + c + v * L);
#pragma GCC unroll 4
    for (int64_t v = 0; v < kAtOnce; ++v)
      store(to + c + v * L, load(to + c + v * L) + sum[v]);
  }
  for (; c < n; c += L) {
    vec sum{};
    for (int64_t r = 0; r < rows; ++r) sum += load(m + r * ld + c);
    store(to + c, load(to + c) + sum);
  }
}

// n (at most L) floats from p, zeros after them.
inline vec load_part(const float* p, int64_t n) {
  if (n == L) return load(p);
  vec v{};
  for (int64_t i = 0; i < n; ++i) v[i] = p[i];
  return v;
}

// The first n (at most L) lanes of v to p.
inline void store_part(float* p, vec v, int64_t n) {
  if (n == L) return store(p, v);
  for (int64_t i = 0; i < n; ++i) p[i] = v[i];
}

inline void pause() {
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
inline void await(const Counter& counter, int64_t value) {
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

// Runs part(p, first, last) for the parts p of [0, parts) of rows [0, rows): `parts`
// contiguous ranges as even as whole rows allow. Each part is run by whichever thread
// claims it first: one of the tasks handed to XLA's intra-op pool, or the calling thread,
// which then waits for the rest. A batch's rows are independent through a recurrent layer,
// so the parts share nothing but the weights, and each sums its own weight gradients.
inline void run_parts(const Pool& pool, int64_t parts, int64_t rows,
                      const std::function<void(int64_t, int64_t, int64_t)>& part) {
  struct Shared {
    std::atomic<int64_t> next{0};
    Counter done;
    int64_t parts, rows;
    const std::function<void(int64_t, int64_t, int64_t)>* part;
    // Claims and runs parts until none is left; the pool may start a task after the call
    // has returned, when there is none (so `part`, the call's, is not read).
    void work() {
      for (int64_t p; (p = next.fetch_add(1, std::memory_order_acq_rel)) < parts;) {
        (*part)(p, rows * p / parts, rows * (p + 1) / parts);
        done.value.fetch_add(1, std::memory_order_acq_rel);
      }
    }
  };
  auto shared = std::make_shared<Shared>();
  shared->parts = parts;
  shared->rows = rows;
  shared->part = &part;
  struct Task {
    std::shared_ptr<Shared> shared;  // outlives the call where the pool runs the task late
  };
  auto run = [](void* data) {
    std::unique_ptr<Task> task(static_cast<Task*>(data));
    task->shared->work();
  };
  for (int64_t i = 1; i < parts; ++i) {
    auto* task = new Task{shared};
    if (!pool.schedule(run, task)) {
      delete task;
      break;
    }
  }
  shared->work();
  await(shared->done, parts);
}

// How many parts a call splits its batch into: one per thread of XLA's pool, each of at
// least kRows rows (one block of a product), and more where parts would exceed kPartRows
// rows, so that a part's buffers of a step stay in the first-level cache (64 rows of 56
// floats: 14 KB; the rows 4096 SimpleRNN's train step, in turns against XLA's fastest
// form on a 2-core AVX-512 EPYC: 0.87x, 0.92x and 0.93x at 32, 64 and 128 rows, 0.86x in
// two parts).
constexpr int64_t kPartRows = 64;
inline int64_t parts_for(const Pool& pool, int64_t batch) {
  return std::max<int64_t>({1, std::min(pool.num_threads(), batch / kRows),
                            (batch + kPartRows - 1) / kPartRows});
}

// A layer's inputs: row b of the batch's step t is xs[t, rows[b]] of a table xs [T, N, F]
// (rows clamped into [0, N), as rnnjax.model.gather_sequences clamps them for XLA's
// gather), or xs[t, b] where rows is null (N = B). The table is a whole set's sequences
// where rnnjax.model hands the first layer its batch's indices: the kernels read the
// batch's rows where they are, and XLA writes no gathered [T, B, F] copy of them before
// the call.
struct Inputs {
  const float* xs;
  const int32_t* rows;  // [B], or null
  int64_t time;         // T
  int64_t count;        // N
  int64_t features;     // F

  int64_t row(int64_t b) const {
    return rows == nullptr ? b : std::clamp<int64_t>(rows[b], 0, count - 1);
  }
};

// One part's rows [first, last) of the inputs, step by step: at(t, next) is step t's
// [last - first, F], its rows F apart; in the table where the part's rows are consecutive
// there (always where rows is null, and in a batch of consecutive examples), else copied
// to a buffer of the part's own.
class InputRows {
 public:
  InputRows(const Inputs& in, int64_t first, int64_t last) : in_(in), rows_(last - first) {
    for (int64_t b = first; b < last; ++b) starts_.push_back(in.row(b) * in.features);
    for (size_t r = 1; r < starts_.size() && consecutive_; ++r)
      consecutive_ = starts_[r] == starts_[r - 1] + in.features;
    if (consecutive_)
      starts_.resize(1);  // one run of the part's rows
    else
      buffer_.resize(rows_ * in.features);
  }

  // Step t's rows; the CPU is asked to fetch step next's (the step read after t, none
  // outside [0, T)) into its caches meanwhile: they are spread over the table, where a
  // gathered batch had been one array just written.
  const float* at(int64_t t, int64_t next) {
    if (0 <= next && next < in_.time) prefetch(next);
    const float* step = in_.xs + t * in_.count * in_.features;
    if (consecutive_) return step + starts_[0];
    const int64_t f = in_.features;
    for (size_t r = 0; r < starts_.size(); ++r)
      std::memcpy(buffer_.data() + r * f, step + starts_[r], f * sizeof(float));
    return buffer_.data();
  }

 private:
  // Every cache line of step t's rows: one run of them where they are consecutive.
  void prefetch(int64_t t) const {
    const float* step = in_.xs + t * in_.count * in_.features;
    const int64_t floats = (consecutive_ ? rows_ : 1) * in_.features;
    for (const int64_t start : starts_) {
      const auto at = reinterpret_cast<uintptr_t>(step + start);
      const uintptr_t end = at + floats * sizeof(float);
      for (uintptr_t line = at & ~uintptr_t{63}; line < end; line += 64)
        __builtin_prefetch(reinterpret_cast<const char*>(line));
    }
  }

  Inputs in_;
  int64_t rows_;
  std::vector<int64_t> starts_;  // each row's offset in a step (the run's, if consecutive)
  bool consecutive_ = true;
  std::vector<float> buffer_;
};

// The forward pass's frame, shared by the cells: the kernel [F, gates * H] and recurrent
// [H, gates * H] matrices padded per gate, the batch in parts (run_parts), and for each
// part and step t, us = xs[t] @ kernel (its padding zeroed) and v = h_{t-1} @ recurrent
// over the part's rows ([rows, gates * np] each), then step(t, at, before, first, rows,
// us, v, previous), the cell's gates, which writes hs[t]'s rows (at: the part's first row
// of step t in the results, in [T, B] order; before: step t-1's, where t > 0; previous:
// h_{t-1}'s rows, hidden apart, h0's at t = 0). With `kept` 1 (not `time`: the call's
// results hold the last step alone, forward_steps) every step is written over the last
// (at and before: the part's first row, `first`), each row's h_{t-1} read before its h_t
// is written: an evaluation's forward, which writes no [T, B, ...] arrays for a backward
// pass.
template <class Step>
void forward_parts(const Pool& pool, const Inputs& xs, const float* kernel,
                   const float* recurrent, const float* h0, const float* hs, int64_t gates,
                   int64_t time, int64_t kept, int64_t batch, int64_t hidden, Step step) {
  const int64_t width = gates * padded(hidden), features = xs.features;
  const Floats u = padded_gates(recurrent, hidden, hidden, gates);
  const Floats w = padded_gates(kernel, features, hidden, gates);
  run_parts(pool, parts_for(pool, batch), batch, [&](int64_t, int64_t first, int64_t last) {
    const int64_t rows = last - first;
    Floats us(rows * width), v(rows * width);
    InputRows x(xs, first, last);
    const float* previous = h0 + first * hidden;
    for (int64_t t = 0, before = first; t < time; ++t) {
      const int64_t at = (kept == 1 ? 0 : t) * batch + first;
      product<false>({x.at(t, t + 1), features, 1, w.data(), width, us.data(), width, rows,
                      features, width});
      // (Not the Elman cell's: its step reads none of the padding, and its backward's
      // products run over the H columns alone. Zeroed there too, its rows batch 50 train
      // step ran 5-10% slower, in turns on a 2-vCPU AVX-512 Xeon.)
      if (gates > 1) zero_padding(us.data(), rows, hidden, gates);
      product<false>({previous, hidden, 1, u.data(), width, v.data(), width, rows, hidden,
                      width});
      // An infinite h0 (a caller's) would make the padding inf * 0 = NaN, which the
      // backward's products over whole vectors spread into every gradient. A later h is
      // the cell's own: finite, or NaN where XLA's is, its row's gradients NaN in both.
      if (gates > 1 && t == 0) zero_padding(v.data(), rows, hidden, gates);
      step(t, at, before, first, rows, static_cast<const float*>(us.data()),
           static_cast<const float*>(v.data()), previous);
      previous = hs + at * hidden;
      before = at;
    }
  });
}

// One part's weight gradients over its steps, summed in blocks of k steps (block(), zeroed
// after each), each block's sums then added to the part's. A float32 sum's rounding error
// grows with the number of terms summed one after another: T x rows of them in one run
// (pixels, 784 x 25) gave the LSTM's and GRU's bias gradients 6-8x the error of XLA's
// blocked products against float64. In blocks they are k x rows, then T / k, fewest at
// k = sqrt(T / rows) (6 x 25 + 131): the pixel LSTM's bias gradient then as close to
// float64's as XLA's (3.4e-7 relative). A block has at least kBlockRows rows, so that
// adding it to the part's is about 1/128 of its products' work (the rows' 28 steps: 5
// blocks of 6 at batch 50).
class BlockSums {
 public:
  static constexpr int64_t kBlockRows = 128;

  BlockSums(float* to, int64_t size, int64_t steps, int64_t rows)
      : to_(to), steps_(steps), every_(block_steps(steps, rows)), block_(size) {}

  float* block() { return block_.data(); }

  // After each step: at the end of a block, and of the steps, the block's sums added to the
  // part's.
  void step_done() {
    if (++done_ % every_ != 0 && done_ != steps_) return;
    float* block = block_.data();
    add(to_, block, block_.size());
    std::fill(block, block + block_.size(), 0.f);
  }

 private:
  // The least k with k * k * rows >= steps (the fewest additions one after another) and
  // k * rows >= kBlockRows.
  static int64_t block_steps(int64_t steps, int64_t rows) {
    int64_t k = (kBlockRows + rows - 1) / rows;
    while (k * k * rows < steps) ++k;
    return k;
  }

  float* to_;
  int64_t steps_, every_, done_ = 0;
  Floats block_;
};

// The weight gradients' sums of each part of a call ([parts, size], each part's summed by
// the thread that runs it, in blocks of steps: BlockSums), added in the order of the parts:
// the same bits whichever thread ran which part.
class PartSums {
 public:
  PartSums(int64_t parts, int64_t size) : size_(size), sums_(parts * size) {}

  // Part p's sums over ``steps`` steps of ``rows`` rows, in blocks.
  BlockSums part(int64_t p, int64_t steps, int64_t rows) {
    return BlockSums(sums_.data() + p * size_, size_, steps, rows);
  }

  // Part 0's sums, with every other part's added to them (size a multiple of L).
  const float* total() {
    for (int64_t p = 1; p * size_ < sums_.size(); ++p)
      add(sums_.data(), sums_.data() + p * size_, size_);
    return sums_.data();
  }

 private:
  int64_t size_;
  Floats sums_;
};

// The calls' glue, on XLA's FFI C API: each handler answers XLA's query for its API
// version, checks its operands (float32 arrays of the ranks it reads, the last the rows,
// int32: Inputs), then runs.

inline XLA_FFI_Error* error(const XLA_FFI_Api* api, const char* message) {
  XLA_FFI_Error_Create_Args args{XLA_FFI_Error_Create_Args_STRUCT_SIZE, nullptr, message,
                                 XLA_FFI_Error_Code_INVALID_ARGUMENT};
  return api->XLA_FFI_Error_Create(&args);
}

// Null, with buffers[] the call's args then its results, where the call is to run; else
// the version metadata XLA asked for (done), or an error (done and failed). The last arg
// is the batch's rows of the inputs (int32 [B], or [0]: Inputs); the others are float32.
struct Frame {
  XLA_FFI_Error* status = nullptr;
  bool run = false;
  float* buffers[20] = {};
  int64_t* dims[20] = {};
  const int32_t* rows = nullptr;  // the last argument's data, null where it is empty
  int64_t row_count = 0;
};

inline Frame open(XLA_FFI_CallFrame* call, int args, int rets, const int* ranks) {
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
    frame.status = error(call->api, "rnnjax native kernel: called outside the execute stage");
    return frame;
  }
  if (call->args.size != args || call->rets.size != rets) {
    frame.status = error(call->api, "rnnjax native kernel: wrong number of operands");
    return frame;
  }
  for (int i = 0; i < args + rets; ++i) {
    const bool arg = i < args;
    if (arg ? call->args.types[i] != XLA_FFI_ArgType_BUFFER
            : call->rets.types[i - args] != XLA_FFI_RetType_BUFFER) {
      frame.status = error(call->api, "rnnjax native kernel: operands must be arrays");
      return frame;
    }
    auto* buffer = static_cast<XLA_FFI_Buffer*>(arg ? call->args.args[i]
                                                    : call->rets.rets[i - args]);
    const bool rows = i == args - 1;
    if (buffer->dtype != (rows ? XLA_FFI_DataType_S32 : XLA_FFI_DataType_F32) ||
        buffer->rank != ranks[i]) {
      frame.status = error(call->api, "rnnjax native kernel: operands must be float32 arrays "
                                      "(the rows int32) of the ranks it reads");
      return frame;
    }
    frame.buffers[i] = static_cast<float*>(buffer->data);
    frame.dims[i] = buffer->dims;
    if (rows && buffer->dims[0] > 0) {
      frame.rows = static_cast<const int32_t*>(buffer->data);
      frame.row_count = buffer->dims[0];
    }
  }
  frame.run = true;
  return frame;
}

// The call's inputs, xs (its first operand, [T, N, F]) and rows (its last argument), for a
// batch of `batch` rows; where rows is empty the batch is xs's own (N = B). Where they
// disagree, an error in the frame's status and run false.
inline Inputs inputs(XLA_FFI_CallFrame* call, Frame& frame, int64_t batch) {
  const Inputs in{frame.buffers[0], frame.rows, frame.dims[0][0], frame.dims[0][1],
                  frame.dims[0][2]};
  if (frame.rows == nullptr ? in.count != batch
                            : frame.row_count != batch || in.count == 0) {
    frame.status = error(call->api, "rnnjax native kernel: the batch's rows (int32 [B], or "
                                    "[0] where xs is [T, B, F]) disagree with xs and h0");
    frame.run = false;
  }
  return in;
}

// The steps a forward call's results [K, B, ...] (the `results` after its `args` in the
// frame) hold: every step (K = T, xs's) or the last (K = 1, forward_parts' `kept`). Else
// an error in the frame's status and run false.
inline int64_t forward_steps(XLA_FFI_CallFrame* call, Frame& frame, int args, int results) {
  const int64_t time = frame.dims[0][0], kept = frame.dims[args][0];
  bool ok = kept == time || kept == 1;
  for (int i = args + 1; i < args + results; ++i) ok = ok && frame.dims[i][0] == kept;
  if (!ok) {
    frame.status = error(call->api, "rnnjax native kernel: a forward's results hold every "
                                    "step (T) or the last (1), all alike");
    frame.run = false;
  }
  return kept;
}

// A backward call's frame: operands (xs, hs, [dhs,] the rest: args of them without dhs)
// and rets results, ranks those of the operands without dhs then of the results; dhs is
// there where `outputs` (the layer's outputs have a gradient). The buffers are laid out as
// if dhs were always there, null where it is not, so a handler reads them alike. The first
// result, the [T, B, ...] gradient XLA turns into the inputs' (dzs, dus), is null too where
// its time dimension is 0: no gradient of the inputs was asked for, and the kernel writes
// none (at rows batch 4096 it was a [28, 4096, 50] array written for nothing).
inline Frame open_backward(XLA_FFI_CallFrame* call, bool outputs, int args, int rets,
                           const int* ranks) {
  int with_dhs[20] = {ranks[0], ranks[1], ranks[1]};
  for (int i = 2; i < args + rets; ++i) with_dhs[i + 1] = ranks[i];
  Frame frame = open(call, outputs ? args + 1 : args, rets, outputs ? with_dhs : ranks);
  if (frame.run && !outputs) {
    for (int i = args + rets; i > 2; --i) {
      frame.buffers[i] = frame.buffers[i - 1];
      frame.dims[i] = frame.dims[i - 1];
    }
    frame.buffers[2] = nullptr;
    frame.dims[2] = nullptr;
  }
  if (frame.run && frame.dims[args + 1][0] == 0) frame.buffers[args + 1] = nullptr;
  return frame;
}

}  // namespace rnnjax

// A cell's three exported handlers, Rnnjax<Name>Forward, Rnnjax<Name>Backward (the layer's
// outputs without a gradient) and Rnnjax<Name>BackwardWithOutputs, over its file's
// rnnjax::Forward(call) and rnnjax::backward_call(call, outputs).
#define RNNJAX_EXPORT_CELL(Name)                                                         \
  extern "C" XLA_FFI_Error* Rnnjax##Name##Forward(XLA_FFI_CallFrame* call) {              \
    return rnnjax::Forward(call);                                                          \
  }                                                                                        \
  extern "C" XLA_FFI_Error* Rnnjax##Name##Backward(XLA_FFI_CallFrame* call) {             \
    return rnnjax::backward_call(call, false);                                             \
  }                                                                                        \
  extern "C" XLA_FFI_Error* Rnnjax##Name##BackwardWithOutputs(XLA_FFI_CallFrame* call) {  \
    return rnnjax::backward_call(call, true);                                              \
  }

#endif  // RNNJAX_NATIVE_COMMON_H_
