// The fused CPU op ffr_fast::flow_penalty and its backward (schemas: ffr_fast/flow/ops.py, math:
// docs/math.md): the flow sums of every chain in one pass (flow_sums.cpp), then the
// per-sample penalty terms of penalty_math.h, weighted per chain and averaged over the batch.
// The backward turns the penalty's gradient into the gradient of the sums and hands it to
// the same single pass over the features that flow_sums_backward uses.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "flow_chains.h"
#include "penalty_math.h"

namespace ffr_fast {
namespace {

PenaltyOptions penalty_options(double grad_weight, double curv_weight, c10::string_view norm,
                               c10::string_view curvature, double eps, double delta) {
  TORCH_CHECK(norm == "squared" || norm == "l2", "ffr_fast::flow_penalty: unknown norm '",
              std::string(norm), "'; choose 'squared' or 'l2'");
  TORCH_CHECK(curvature == "diff" || curvature == "angle",
              "ffr_fast::flow_penalty: unknown curvature '", std::string(curvature),
              "'; choose 'diff' or 'angle'");
  return {grad_weight, curv_weight, eps, delta, norm == "l2", curvature == "angle"};
}

void check_chain_weights(const Chains& chains, at::ArrayRef<double> chain_weights) {
  TORCH_CHECK(chain_weights.size() == chains.size(), "ffr_fast::flow_penalty: ",
              chain_weights.size(), " chain weights for ", chains.size(), " chains");
}

// sum_c w_c (grad_weight mean_b G_b + curv_weight mean_b C_b) from the packed sums.
std::tuple<at::Tensor, at::Tensor> flow_penalty_cpu(
    at::TensorList features, at::IntArrayRef lengths, at::ArrayRef<double> chain_weights,
    double grad_weight, double curv_weight, c10::string_view norm, c10::string_view curvature,
    double eps, double delta) {
  const PenaltyOptions options =
      penalty_options(grad_weight, curv_weight, norm, curvature, eps, delta);
  const Chains chains = check_chains("ffr_fast::flow_penalty", features, lengths);
  check_chain_weights(chains, chain_weights);
  const at::Tensor sums = packed_sums(chains);
  double penalty = 0;
  AT_DISPATCH_FLOATING_TYPES(sums.scalar_type(), "ffr_fast::flow_penalty", [&] {
    const scalar_t* s = sums.const_data_ptr<scalar_t>();
    for (size_t c = 0; c < chains.size(); ++c) {
      const at::Tensor& head = chains.chain(c)[0];
      const int64_t B = head.size(0), L = chains.lengths[c] - 1;
      double G = 0, C = 0;
      for (int64_t b = 0; b < B; ++b, s += 3 * L) {
        double G_b, C_b;
        sample_terms(s, L, double(head.numel() / B), options, &G_b, &C_b);
        G += G_b, C += C_b;
      }
      penalty += chain_weights[c] * (grad_weight * G + curv_weight * C) / B;
    }
  });
  return {at::scalar_tensor(penalty, sums.options()), sums};
}

std::vector<at::Tensor> flow_penalty_backward_cpu(
    at::TensorList features, at::IntArrayRef lengths, const at::Tensor& sums,
    const at::Tensor& grad, at::ArrayRef<double> chain_weights, double grad_weight,
    double curv_weight, c10::string_view norm, c10::string_view curvature, double eps,
    double delta) {
  const PenaltyOptions options =
      penalty_options(grad_weight, curv_weight, norm, curvature, eps, delta);
  const Chains chains = check_chains("ffr_fast::flow_penalty_backward", features, lengths);
  check_chain_weights(chains, chain_weights);
  TORCH_CHECK(sums.dim() == 1 && sums.size(0) == packed_sums_size(chains) &&
                  sums.scalar_type() == accumulation_type(features[0]),
              "ffr_fast::flow_penalty_backward: sums must be the flow_penalty's second output");
  TORCH_CHECK(grad.numel() == 1, "ffr_fast::flow_penalty_backward: grad has shape ",
              grad.sizes(), "; the penalty is a scalar");
  const double g = grad.item<double>();
  const at::Tensor dense_sums = sums.contiguous();
  at::Tensor grad_sums = at::empty_like(dense_sums);
  AT_DISPATCH_FLOATING_TYPES(sums.scalar_type(), "ffr_fast::flow_penalty_backward", [&] {
    const scalar_t* s = dense_sums.const_data_ptr<scalar_t>();
    scalar_t* out = grad_sums.mutable_data_ptr<scalar_t>();
    for (size_t c = 0; c < chains.size(); ++c) {
      const at::Tensor& head = chains.chain(c)[0];
      const int64_t B = head.size(0), L = chains.lengths[c] - 1;
      const double scale = g * chain_weights[c] / B;
      for (int64_t b = 0; b < B; ++b, s += 3 * L, out += 3 * L) {
        sample_terms_gradient(s, L, double(head.numel() / B), options, scale * grad_weight,
                              scale * curv_weight, out);
      }
    }
  });
  return gradients_of_sums(chains, grad_sums);
}

}  // namespace
}  // namespace ffr_fast

TORCH_LIBRARY_IMPL(ffr_fast, CPU, m) {
  m.impl("flow_penalty", &ffr_fast::flow_penalty_cpu);
  m.impl("flow_penalty_backward", &ffr_fast::flow_penalty_backward_cpu);
}
