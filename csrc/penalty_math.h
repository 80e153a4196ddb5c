// The penalty of ffr_fast/flow/reference.py from a chain's per-sample flow sums, and its gradient
// with respect to those sums: the few scalar operations after the fused pass, done here so
// that one op call (and one autograd node) covers the whole flow (flow_penalty.cpp). Its
// twins: ffr_fast.flow.ops.chain_terms and chain_terms_gradient in Python, for the devices
// without a compiled kernel, and the epilogue of kernels/flow_penalty.py on CUDA. This code
// is tested against the float64 reference, its twins against this code (tests/test_op.py,
// tests/test_triton_kernels.py).
//
// The sums of one sample are a row-major (3, L) block: ||d_l||^2, ||s_l||^2, <d_l, d_{l+1}>
// (the last column of rows 1 and 2 holds no sum). Arithmetic is in double: O(B * L) values.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace ffr_fast {

struct PenaltyOptions {
  double grad_weight, curv_weight, eps, delta;
  bool l2;     // norm "l2" (else "squared")
  bool angle;  // curvature "angle" (else "diff")
};

// A term's size from its squared norm v, for n-element features, under the chosen norm; and
// the derivative of that size with respect to v.
inline double term_size(double v, double n, const PenaltyOptions& o) {
  return o.l2 ? std::sqrt(v + o.eps * o.eps) / std::sqrt(n) : v / n;
}
inline double term_size_derivative(double v, double n, const PenaltyOptions& o) {
  return o.l2 ? 0.5 / (std::sqrt(v + o.eps * o.eps) * std::sqrt(n)) : 1.0 / n;
}

// The cosine between d_l and d_{l+1} from one sample's sums s, before the clip.
struct Cosine {
  double value, norm_a, norm_b;
};
template <typename acc_t>
Cosine cosine(const acc_t* s, int64_t L, int64_t l, const PenaltyOptions& o) {
  const double norm_a = std::sqrt(double(s[l]) + o.eps * o.eps);
  const double norm_b = std::sqrt(double(s[l + 1]) + o.eps * o.eps);
  return {double(s[2 * L + l]) / (norm_a * norm_b), norm_a, norm_b};
}

// One sample's flow length G and curvature C (FFR's G_b and C_b) from its sums s.
template <typename acc_t>
void sample_terms(const acc_t* s, int64_t L, double n, const PenaltyOptions& o, double* G,
                  double* C) {
  *G = 0, *C = 0;
  for (int64_t l = 0; l < L; ++l) *G += term_size(s[l], n, o);
  for (int64_t l = 0; l + 1 < L; ++l) {  // K - 2 curvature terms
    if (o.angle) {
      *C += std::acos(std::clamp(cosine(s, L, l, o).value, -1 + o.delta, 1 - o.delta));
    } else {
      *C += term_size(s[L + l], n, o);
    }
  }
}

// The gradient of grad_scale * G + curv_scale * C with respect to one sample's sums s,
// written to grad (3, L).
template <typename acc_t>
void sample_terms_gradient(const acc_t* s, int64_t L, double n, const PenaltyOptions& o,
                           double grad_scale, double curv_scale, acc_t* grad) {
  std::fill(grad, grad + 3 * L, acc_t(0));
  for (int64_t l = 0; l < L; ++l) grad[l] = grad_scale * term_size_derivative(s[l], n, o);
  for (int64_t l = 0; l + 1 < L; ++l) {
    if (!o.angle) {
      grad[L + l] = curv_scale * term_size_derivative(s[L + l], n, o);
      continue;
    }
    const Cosine c = cosine(s, L, l, o);
    // torch.clamp passes the gradient on the closed interval, and so does this.
    if (c.value < -1 + o.delta || c.value > 1 - o.delta) continue;
    const double dtheta = -curv_scale / std::sqrt(1 - c.value * c.value);
    // c = p / (N_a N_b) with N = sqrt(||d||^2 + eps^2): dc/dp = 1 / (N_a N_b) and
    // dc/d||d_a||^2 = -c / (2 N_a^2), likewise for b.
    grad[2 * L + l] += dtheta / (c.norm_a * c.norm_b);
    grad[l] += dtheta * -c.value / (2 * c.norm_a * c.norm_a);
    grad[l + 1] += dtheta * -c.value / (2 * c.norm_b * c.norm_b);
  }
}

}  // namespace ffr_fast
