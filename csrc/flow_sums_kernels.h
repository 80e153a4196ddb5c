// The inner loops of the fused flow-sums kernels: one (sample, block) work item at a time,
// on raw pointers. The torch glue (checks, layouts, threads, registration) is flow_sums.cpp.
//
// Features are read in chunks of two vectors (32 bytes each: 8 floats or 4 doubles). Each
// element is upcast on load (float for half, bfloat16 and float; double for double), and the
// differences are formed element-wise from the upcast values, never as |a|^2 + |b|^2 - 2<a,b>,
// which cancels catastrophically for nearly equal neighbours. Walking k = 0 .. K-1 over one
// chunk keeps a sliding window of the chain in registers, so each element of each feature is
// read once, and each gradient element written once.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace ffr_fast {

// GCC/Clang vector extensions: portable C++ that compiles to SSE2 by default; on x86-64 each
// kernel is also cloned for AVX2+FMA (x86-64-v3), picked once at load time by the CPU it runs
// on (an ifunc), so one wheel is both portable and fast.
#if defined(__x86_64__) && defined(__GLIBC__) && (defined(__GNUC__) || defined(__clang__))
#define FFR_FAST_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FFR_FAST_VECTOR_CLONES
#endif
// Helpers that take or return vectors are always inlined into each clone: a call between
// code built for different targets would pass 32-byte vectors under different ABIs.
#define FFR_FAST_INLINE inline __attribute__((always_inline))

template <typename acc_t>
struct Vec {
  typedef acc_t type __attribute__((vector_size(32)));
  static constexpr int64_t size = 32 / sizeof(acc_t);
};

// Elements per work item: fixed, so that results never depend on the thread count; a
// multiple of every chunk size, so only a sample's last block has a partial chunk.
constexpr int64_t kBlock = 4096;

// Loads p[0 .. count) upcast into a vector; lanes past count are zero and add nothing.
// A full vector of the accumulation type is one unaligned vector load; half and bfloat16
// convert lane by lane.
template <typename acc_t, typename scalar_t>
FFR_FAST_INLINE typename Vec<acc_t>::type load(const scalar_t* p, int64_t count) {
  typename Vec<acc_t>::type v;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (count >= Vec<acc_t>::size) {
      std::memcpy(&v, p, sizeof v);
      return v;
    }
  }
  for (int64_t i = 0; i < Vec<acc_t>::size; ++i) {
    v[i] = i < count ? static_cast<acc_t>(p[i]) : acc_t(0);
  }
  return v;
}

template <typename acc_t, typename scalar_t>
FFR_FAST_INLINE void store(scalar_t* p, typename Vec<acc_t>::type v, int64_t count) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (count >= Vec<acc_t>::size) {
      std::memcpy(p, &v, sizeof v);
      return;
    }
  }
  for (int64_t i = 0; i < std::min(count, Vec<acc_t>::size); ++i) {
    p[i] = static_cast<scalar_t>(v[i]);
  }
}

// Like store, but a whole float or double vector at a 16-byte aligned address bypasses the
// cache (non-temporal stores, SSE2: part of every x86-64): gradients are written once and
// not read back by this pass, so fetching their lines first (a normal store's
// read-for-ownership) would add a third of the backward's memory traffic. The caller ends
// its writes with fence_streaming_stores().
template <typename acc_t, typename scalar_t>
FFR_FAST_INLINE void store_streaming(scalar_t* p, typename Vec<acc_t>::type v, int64_t count) {
#if defined(__SSE2__)
  if constexpr (std::is_same_v<scalar_t, acc_t> &&
                (std::is_same_v<acc_t, float> || std::is_same_v<acc_t, double>)) {
    if (count >= Vec<acc_t>::size && reinterpret_cast<std::uintptr_t>(p) % 16 == 0) {
      constexpr int64_t half = Vec<acc_t>::size / 2;
      if constexpr (std::is_same_v<acc_t, float>) {
        __m128 lo, hi;
        std::memcpy(&lo, &v, 16);
        std::memcpy(&hi, reinterpret_cast<const char*>(&v) + 16, 16);
        _mm_stream_ps(p, lo);
        _mm_stream_ps(p + half, hi);
      } else {
        __m128d lo, hi;
        std::memcpy(&lo, &v, 16);
        std::memcpy(&hi, reinterpret_cast<const char*>(&v) + 16, 16);
        _mm_stream_pd(p, lo);
        _mm_stream_pd(p + half, hi);
      }
      return;
    }
  }
#endif
  store<acc_t>(p, v, count);
}

// Orders this thread's streaming stores before whatever follows (another thread's reads).
FFR_FAST_INLINE void fence_streaming_stores() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// Adds the flow sums of the 2 * n elements at `start` (the first `left` of them, when fewer
// are left) to the lane-wise accumulators dd, ss and dp (L vectors each).
template <typename acc_t, typename scalar_t, typename V = typename Vec<acc_t>::type>
FFR_FAST_INLINE void accumulate_chunk(const scalar_t* const* x, int64_t K, int64_t start,
                                      int64_t left, V* dd, V* ss, V* dp) {
  constexpr int64_t n = Vec<acc_t>::size;
  // Two independent halves (a, b) per chunk halve the accumulator updates.
  V xa = load<acc_t>(x[0] + start, left), xb = load<acc_t>(x[0] + start + n, left - n);
  V da{}, db{};  // d_{k-2}
  for (int64_t k = 1; k < K; ++k) {
    const V ya = load<acc_t>(x[k] + start, left), yb = load<acc_t>(x[k] + start + n, left - n);
    const V ea = ya - xa, eb = yb - xb;  // d_{k-1}
    dd[k - 1] += ea * ea + eb * eb;
    if (k >= 2) {
      const V sa = ea - da, sb = eb - db;  // s_{k-2}
      ss[k - 2] += sa * sa + sb * sb;
      dp[k - 2] += da * ea + db * eb;
    }
    xa = ya, xb = yb, da = ea, db = eb;
  }
}

// The flow sums of elements [offset, offset + count) of each sample array x[0 .. K), written
// to out[3 * L] as row-major (3, L): ||d_l||^2, ||s_l||^2 and <d_l, d_{l+1}>.
// `acc` is scratch for 3 * L vectors of lane-wise partial sums.
template <typename scalar_t, typename acc_t>
FFR_FAST_VECTOR_CLONES void block_sums(const scalar_t* const* x, int64_t K, int64_t offset,
                                       int64_t count, typename Vec<acc_t>::type* acc,
                                       acc_t* out) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t chunk = 2 * Vec<acc_t>::size;
  const int64_t L = K - 1, end = offset + count;
  for (int64_t row = 0; row < 3 * L; ++row) acc[row] = V{};
  int64_t start = offset;
  for (; start + chunk <= end; start += chunk) {  // a constant `left`: no per-lane checks
    accumulate_chunk<acc_t>(x, K, start, chunk, acc, acc + L, acc + 2 * L);
  }
  if (start < end) accumulate_chunk<acc_t>(x, K, start, end - start, acc, acc + L, acc + 2 * L);
  for (int64_t row = 0; row < 3 * L; ++row) {
    acc_t total = 0;
    for (int64_t i = 0; i < Vec<acc_t>::size; ++i) total += acc[row][i];
    out[row] = total;
  }
}

// The backward is linear in the first differences: with gd, gs, gp = grad_sums[b, 0|1|2, :],
//   dL/dx_k = D_{k-1} - D_k + S_{k-2} - 2 S_{k-1} + S_k,
//   D_l = 2 gd_l d_l + gp_l d_{l+1} + gp_{l-1} d_{l-1},   S_l = 2 gs_l (d_{l+1} - d_l)
// (reference.flow_sums_backward; out-of-range terms are 0), so
//   dL/dx_k = q[k][0] d_{k-2} + q[k][1] d_{k-1} + q[k][2] d_k + q[k][3] d_{k+1}
// with per-sample coefficients q. Applying q to differences formed element-wise keeps the
// gradient accurate for nearly equal neighbours, where a stencil on x itself would cancel.
// g points at one sample's (3, L) grad_sums; returns q as K rows of 4.
template <typename acc_t>
std::vector<acc_t> gradient_coefficients(const acc_t* g, int64_t L) {
  const int64_t K = L + 1;
  // The last columns of rows 1 and 2 hold no sum (there is no s_{L-1}), so no gradient.
  auto gd = [&](int64_t l) { return g[l]; };
  auto gs = [&](int64_t l) { return 0 <= l && l + 1 < L ? g[L + l] : acc_t(0); };
  auto gp = [&](int64_t l) { return 0 <= l && l + 1 < L ? g[2 * L + l] : acc_t(0); };
  std::vector<acc_t> q(K * 4, acc_t(0));
  auto add = [&](int64_t k, int64_t l, acc_t value) {  // value * d_l into dL/dx_k
    if (0 <= l && l < L) q[k * 4 + (l - k + 2)] += value;
  };
  for (int64_t k = 0; k < K; ++k) {
    for (const int64_t m : {k - 1, k}) {  // + D_{k-1} - D_k
      if (m < 0 || m >= L) continue;
      const acc_t sign = m == k ? -1 : 1;
      add(k, m, sign * 2 * gd(m));
      add(k, m + 1, sign * gp(m));
      add(k, m - 1, sign * gp(m - 1));
    }
    const int64_t ms[3] = {k - 2, k - 1, k};  // + S_{k-2} - 2 S_{k-1} + S_k
    const acc_t weights[3] = {1, -2, 1};
    for (int j = 0; j < 3; ++j) {
      const acc_t c = 2 * gs(ms[j]) * weights[j];
      add(k, ms[j] + 1, c);
      add(k, ms[j], -c);
    }
  }
  return q;
}

// d_l = x_{l+1} - x_l over the n elements at `start`, given x_l in `last`, which then holds
// x_{l+1}; zero past the chain's end.
template <typename acc_t, typename scalar_t, typename V = typename Vec<acc_t>::type>
FFR_FAST_INLINE V next_difference(const scalar_t* const* x, int64_t K, int64_t l, int64_t start,
                                  int64_t left, V& last) {
  if (l + 1 >= K) return V{};
  const V y = load<acc_t>(x[l + 1] + start, left);
  const V d = y - last;
  last = y;
  return d;
}

// Stores a gradient vector: streaming (past the cache) or not, as the caller chose.
template <bool kStream, typename acc_t, typename scalar_t>
FFR_FAST_INLINE void store_gradient(scalar_t* p, typename Vec<acc_t>::type v, int64_t count) {
  if constexpr (kStream) {
    store_streaming<acc_t>(p, v, count);
  } else {
    store<acc_t>(p, v, count);
  }
}

// Writes the gradients of the 2 * n elements at `start` (the first `left` of them, when fewer
// are left) of every feature, walking k with the window d_{k-2}, d_{k-1}, d_k, d_{k+1} in
// registers: each x_k is loaded once (for step k - 2, whose window ends with d_{k-1}) and
// each gradient stored once. Like the
// forward, two halves (a, b) per chunk: a whole 64-byte cache line of every stream per step.
template <bool kStream, typename acc_t, typename scalar_t,
          typename V = typename Vec<acc_t>::type>
FFR_FAST_INLINE void gradient_chunk(const scalar_t* const* x, scalar_t* const* grad,
                                    int64_t K, const acc_t* q, int64_t start, int64_t left) {
  constexpr int64_t n = Vec<acc_t>::size;
  V last_a = load<acc_t>(x[0] + start, left), last_b = load<acc_t>(x[0] + start + n, left - n);
  V a0{}, a1{}, b0{}, b1{};
  V a2 = next_difference<acc_t>(x, K, 0, start, left, last_a);
  V b2 = next_difference<acc_t>(x, K, 0, start + n, left - n, last_b);
  V a3 = next_difference<acc_t>(x, K, 1, start, left, last_a);
  V b3 = next_difference<acc_t>(x, K, 1, start + n, left - n, last_b);
  for (int64_t k = 0; k < K; ++k) {
    const acc_t* qk = q + 4 * k;
    store_gradient<kStream, acc_t>(grad[k] + start,
                                   qk[0] * a0 + qk[1] * a1 + qk[2] * a2 + qk[3] * a3, left);
    store_gradient<kStream, acc_t>(grad[k] + start + n,
                                   qk[0] * b0 + qk[1] * b1 + qk[2] * b2 + qk[3] * b3, left - n);
    a0 = a1, a1 = a2, a2 = a3, b0 = b1, b1 = b2, b2 = b3;
    a3 = next_difference<acc_t>(x, K, k + 2, start, left, last_a);
    b3 = next_difference<acc_t>(x, K, k + 2, start + n, left - n, last_b);
  }
}

// Writes grad[k][offset .. offset + count) for every k, from one sample's coefficients q.
// kStream: with streaming stores, for gradients too large to stay in cache until autograd
// reads them; smaller ones are better written through the cache.
template <bool kStream, typename scalar_t, typename acc_t>
FFR_FAST_VECTOR_CLONES void block_gradients(const scalar_t* const* x, scalar_t* const* grad,
                                            int64_t K, const acc_t* q, int64_t offset,
                                            int64_t count) {
  constexpr int64_t chunk = 2 * Vec<acc_t>::size;
  const int64_t end = offset + count;
  int64_t start = offset;
  for (; start + chunk <= end; start += chunk) {  // a constant `left`: no per-lane checks
    gradient_chunk<kStream, acc_t>(x, grad, K, q, start, chunk);
  }
  if (start < end) gradient_chunk<kStream, acc_t>(x, grad, K, q, start, end - start);
  if constexpr (kStream) fence_streaming_stores();
}

}  // namespace ffr_fast
