// The chains of one call of the CPU ops, shared by flow_sums.cpp (the fused pass over the
// features) and flow_penalty.cpp (the penalty computed from its sums).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace ffr_fast {

// The chains of one call: chain c is features[start[c] .. start[c] + lengths[c]).
struct Chains {
  at::TensorList features;
  std::vector<int64_t> lengths, start;
  size_t size() const { return lengths.size(); }
  at::TensorList chain(size_t c) const { return features.slice(start[c], lengths[c]); }
};

// Validates the call's structure; the ffr_fast.flow.penalty front end gives the friendlier errors
// once per layout, these keep a direct call through torch.ops memory-safe.
Chains check_chains(const char* op, at::TensorList features, at::IntArrayRef lengths);

// The type the sums and their gradients are accumulated in: double for double, else float.
at::ScalarType accumulation_type(const at::Tensor& x);

// The packed flow sums of checked chains: chain after chain, each a row-major (B, 3, K-1) block.
at::Tensor packed_sums(const Chains& chains);

// The number of values packed_sums returns.
int64_t packed_sums_size(const Chains& chains);

// The gradients of <g, sums> for the packed g (a contiguous tensor of the accumulation type),
// each in its feature's layout.
std::vector<at::Tensor> gradients_of_sums(const Chains& chains, const at::Tensor& g);

}  // namespace ffr_fast
