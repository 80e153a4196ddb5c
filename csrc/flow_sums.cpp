// Fused CPU kernels of the op ffr_fast::flow_sums and its backward (schemas: ffr_fast/flow/ops.py,
// math: docs/math.md): the torch glue. The inner loops are in flow_sums_kernels.h; the
// penalty op built on these sums is flow_penalty.cpp, and what both share is flow_chains.h.
//
// One call takes every chain of a forward, like a multi-tensor apply: `features` holds the
// chains one after the other and lengths[c] is chain c's K. A chain is K same-shape features
// x_0 .. x_{K-1} of shape (B, *S), n = prod(S) elements per sample; chains may differ in
// shape and length but share one dtype and device. Both passes read each feature once:
//   forward   per sample, ||d_l||^2, ||s_l||^2 and <d_l, d_{l+1}>, with d_l = x_{l+1} - x_l
//             and s_l = d_{l+1} - d_l: the flow sums, packed chain after chain, each chain a
//             row-major (B, 3, K-1) block;
//   backward  the K gradients of every chain, each written once.
// The work of all chains is split into (chain, sample, block) items of a fixed number of
// elements run by one at::parallel_for. The forward writes per-item partial sums and adds
// them in a fixed order, so results are bitwise reproducible and independent of the thread
// count (no atomics).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "flow_chains.h"
#include "flow_sums_kernels.h"

namespace ffr_fast {

// Validates the call's structure; the ffr_fast.flow.penalty front end gives the friendlier errors
// once per layout, these keep a direct call through torch.ops memory-safe.
Chains check_chains(const char* op, at::TensorList features, at::IntArrayRef lengths) {
  Chains chains{features, lengths.vec(), {}};
  TORCH_CHECK(!lengths.empty(), op, ": no chain given (lengths is empty)");
  int64_t next = 0;
  for (size_t c = 0; c < lengths.size(); ++c) {
    TORCH_CHECK(lengths[c] >= 2, op, ": chain ", c, " has ", lengths[c],
                " features; a chain needs K >= 2 features");
    chains.start.push_back(next);
    next += lengths[c];
  }
  TORCH_CHECK(next == static_cast<int64_t>(features.size()), op, ": lengths add up to ", next,
              " features but ", features.size(), " were given");
  const at::Tensor& first = features[0];
  for (size_t c = 0; c < chains.size(); ++c) {
    const at::TensorList chain = chains.chain(c);
    const at::Tensor& head = chain[0];
    TORCH_CHECK(head.dim() >= 2 && head.size(0) >= 1 && head.numel() > 0, op, ": chain ", c,
                " feature 0 has shape ", head.sizes(), "; expected (B, *S), B >= 1, S non-empty");
    for (size_t k = 0; k < chain.size(); ++k) {
      const at::Tensor& x = chain[k];
      TORCH_CHECK(x.sizes() == head.sizes(), op, ": chain ", c, " feature ", k, " has shape ",
                  x.sizes(), " but feature 0 has shape ", head.sizes());
      TORCH_CHECK(x.scalar_type() == first.scalar_type(), op, ": chain ", c, " feature ", k,
                  " has dtype ", x.scalar_type(), " but the first feature has ",
                  first.scalar_type(), "; one call takes one dtype");
      TORCH_CHECK(x.device() == first.device(), op, ": chain ", c, " feature ", k, " is on ",
                  x.device(), " but the first feature is on ", first.device());
    }
  }
  return chains;
}

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Each sample is one dense run of n elements (contiguous, channels_last, or any other dense
// permutation of the non-batch dims). The sums do not depend on the order of the elements
// within a sample, so such a sample can be read as a flat array.
bool samples_are_dense(const at::Tensor& x) {
  const int64_t n = x.numel() / x.size(0);
  return x.is_non_overlapping_and_dense() && (x.size(0) == 1 || x.stride(0) == n);
}

// A chain's features as the kernels read them: as they are when all share one layout in
// which samples are dense (no copy), else contiguous copies. The copies cover non-dense views
// (slices, expanded or strided tensors) and chains that mix layouts: correct, not zero-copy.
struct Readable {
  std::vector<at::Tensor> features;  // every chain's, in call order
  std::vector<bool> zero_copy;       // per chain
};

Readable readable_chains(const Chains& chains) {
  Readable readable;
  for (size_t c = 0; c < chains.size(); ++c) {
    const at::TensorList chain = chains.chain(c);
    bool zero_copy = samples_are_dense(chain[0]);
    for (const at::Tensor& x : chain) zero_copy = zero_copy && x.strides() == chain[0].strides();
    for (const at::Tensor& x : chain) readable.features.push_back(zero_copy ? x : x.contiguous());
    readable.zero_copy.push_back(zero_copy);
  }
  return readable;
}

// One chain as K flat sample arrays (sample b of feature k is x[k][b * n .. b * n + n)),
// with where its work items, partial sums, packed sums and gradient coefficients start.
template <typename scalar_t>
struct FlatChain {
  std::vector<const scalar_t*> x;
  int64_t batch, n, blocks;
  int64_t first_item, partial_offset, sums_offset, q_offset;
  int64_t K() const { return x.size(); }
  int64_t L() const { return K() - 1; }
};

template <typename scalar_t>
struct FlatChains {
  std::vector<FlatChain<scalar_t>> chains;
  int64_t items = 0, partial_size = 0, sums_size = 0, q_size = 0;

  // The chain that work item `item` belongs to (chains are few: a linear scan).
  const FlatChain<scalar_t>& of_item(int64_t item) const {
    size_t c = 0;
    while (c + 1 < chains.size() && chains[c + 1].first_item <= item) ++c;
    return chains[c];
  }
};

// Work items per task of at::parallel_for: enough that a task reads about kTaskElements
// elements, so that a small call (batch 2, say) runs on the calling thread instead of paying
// for waking the others (which, on a loaded machine, costs a scheduler time slice).
constexpr int64_t kTaskElements = int64_t(1) << 18;

// Gradients of a call of at least this size are written with streaming stores: they would not
// stay in a last-level cache (tens of MB) until autograd reads them, and streaming saves the
// read-for-ownership of every line. Below it, the cache keeps them for that read.
constexpr int64_t kStreamingBytes = int64_t(16) << 20;

template <typename scalar_t>
int64_t grain_size(const FlatChains<scalar_t>& flat) {
  int64_t elements = 0;
  for (const auto& chain : flat.chains) elements += chain.K() * chain.batch * chain.n;
  return std::max<int64_t>(1, kTaskElements * flat.items / std::max<int64_t>(1, elements));
}

template <typename scalar_t>
FlatChains<scalar_t> flat_chains(const Chains& chains, const Readable& readable) {
  FlatChains<scalar_t> flat;
  for (size_t c = 0; c < chains.size(); ++c) {
    FlatChain<scalar_t> chain;
    for (int64_t k = 0; k < chains.lengths[c]; ++k) {
      chain.x.push_back(readable.features[chains.start[c] + k].const_data_ptr<scalar_t>());
    }
    const at::Tensor& head = readable.features[chains.start[c]];
    chain.batch = head.size(0);
    chain.n = head.numel() / chain.batch;
    chain.blocks = ceil_div(chain.n, kBlock);
    chain.first_item = flat.items;
    chain.partial_offset = flat.partial_size;
    chain.sums_offset = flat.sums_size;
    chain.q_offset = flat.q_size;
    const int64_t items = chain.batch * chain.blocks;
    flat.items += items;
    flat.partial_size += items * 3 * chain.L();
    flat.sums_size += chain.batch * 3 * chain.L();
    flat.q_size += chain.batch * chain.K() * 4;
    flat.chains.push_back(std::move(chain));
  }
  return flat;
}

template <typename scalar_t>
at::Tensor flow_sums_kernel(const FlatChains<scalar_t>& flat, const at::TensorOptions& options) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = typename Vec<acc_t>::type;
  int64_t max_L = 0;
  for (const auto& chain : flat.chains) max_L = std::max(max_L, chain.L());
  std::vector<acc_t> partial(flat.partial_size);
  at::parallel_for(0, flat.items, grain_size(flat), [&](int64_t begin, int64_t end) {
    // Lane-wise accumulators, 3 * L vectors, aligned by hand: std::vector<V> would not
    // align them (a template argument drops V's alignment attribute), and a scratch tensor
    // would be one more allocation through torch per call.
    std::vector<acc_t> scratch((3 * max_L + 1) * Vec<acc_t>::size);
    void* start = scratch.data();
    size_t space = scratch.size() * sizeof(acc_t);
    V* acc = static_cast<V*>(std::align(sizeof(V), 3 * max_L * sizeof(V), start, space));
    for (int64_t item = begin; item < end; ++item) {
      const FlatChain<scalar_t>& chain = flat.of_item(item);
      const int64_t local = item - chain.first_item, L = chain.L();
      const int64_t b = local / chain.blocks, start = (local % chain.blocks) * kBlock;
      ffr_fast::block_sums<scalar_t, acc_t>(chain.x.data(), chain.K(), b * chain.n + start,
                                            std::min(kBlock, chain.n - start), acc,
                                            partial.data() + chain.partial_offset +
                                                local * 3 * L);
    }
  });
  // Blocks of a sample are added in block order, in double: the result is the same for any
  // thread count, and the few additions cost nothing.
  at::Tensor sums = at::empty({flat.sums_size}, options);
  acc_t* out = sums.mutable_data_ptr<acc_t>();
  for (const auto& chain : flat.chains) {
    const int64_t L = chain.L();
    const acc_t* p = partial.data() + chain.partial_offset;
    for (int64_t b = 0; b < chain.batch; ++b) {
      for (int64_t j = 0; j < 3 * L; ++j) {
        double total = 0;
        for (int64_t block = 0; block < chain.blocks; ++block) {
          total += p[(b * chain.blocks + block) * 3 * L + j];
        }
        out[chain.sums_offset + b * 3 * L + j] = static_cast<acc_t>(total);
      }
    }
  }
  return sums;
}

// g: the packed gradient with respect to the sums, in the accumulation type.
template <typename scalar_t>
void flow_sums_backward_kernel(const FlatChains<scalar_t>& flat,
                               const at::opmath_type<scalar_t>* g,
                               const std::vector<scalar_t*>& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> q(flat.q_size);
  std::vector<scalar_t* const*> chain_grads;
  int64_t first_feature = 0;
  for (const auto& chain : flat.chains) {
    const int64_t K = chain.K(), L = chain.L();
    for (int64_t b = 0; b < chain.batch; ++b) {
      const std::vector<acc_t> qb =
          ffr_fast::gradient_coefficients(g + chain.sums_offset + b * 3 * L, L);
      std::copy(qb.begin(), qb.end(), q.begin() + chain.q_offset + b * K * 4);
    }
    chain_grads.push_back(grad.data() + first_feature);
    first_feature += K;
  }
  int64_t gradient_bytes = 0;
  for (const auto& chain : flat.chains) {
    gradient_bytes += chain.K() * chain.batch * chain.n * int64_t(sizeof(scalar_t));
  }
  const bool stream = gradient_bytes >= kStreamingBytes;
  at::parallel_for(0, flat.items, grain_size(flat), [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const FlatChain<scalar_t>& chain = flat.of_item(item);
      const size_t c = &chain - flat.chains.data();
      const int64_t local = item - chain.first_item;
      const int64_t b = local / chain.blocks, start = (local % chain.blocks) * kBlock;
      const acc_t* qb = q.data() + chain.q_offset + b * chain.K() * 4;
      const int64_t offset = b * chain.n + start, count = std::min(kBlock, chain.n - start);
      if (stream) {
        ffr_fast::block_gradients<true>(chain.x.data(), chain_grads[c], chain.K(), qb, offset,
                                        count);
      } else {
        ffr_fast::block_gradients<false>(chain.x.data(), chain_grads[c], chain.K(), qb, offset,
                                         count);
      }
    }
  });
}

}  // namespace

at::ScalarType accumulation_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The packed flow sums of checked chains.
at::Tensor packed_sums(const Chains& chains) {
  const Readable readable = readable_chains(chains);
  const at::Tensor& first = chains.features[0];
  at::Tensor sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(),
                                  "ffr_fast::flow_sums", [&] {
    sums = flow_sums_kernel(flat_chains<scalar_t>(chains, readable),
                            first.options().dtype(accumulation_type(first)));
  });
  return sums;
}

// The gradients of <g, sums> for the packed g (a contiguous tensor of the accumulation type).
std::vector<at::Tensor> gradients_of_sums(const Chains& chains, const at::Tensor& g) {
  const Readable readable = readable_chains(chains);
  std::vector<at::Tensor> grads;
  for (const at::Tensor& x : readable.features) grads.push_back(at::empty_like(x));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, chains.features[0].scalar_type(),
                                  "ffr_fast::flow_sums_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<scalar_t*> out;
    for (at::Tensor& grad : grads) out.push_back(grad.mutable_data_ptr<scalar_t>());
    flow_sums_backward_kernel(flat_chains<scalar_t>(chains, readable),
                              g.const_data_ptr<acc_t>(), out);
  });
  for (size_t c = 0; c < chains.size(); ++c) {
    if (readable.zero_copy[c]) continue;
    // Give each gradient its feature's layout, as the fake kernel promises.
    for (int64_t k = chains.start[c]; k < chains.start[c] + chains.lengths[c]; ++k) {
      grads[k] = at::empty_like(chains.features[k]).copy_(grads[k]);
    }
  }
  return grads;
}

int64_t packed_sums_size(const Chains& chains) {
  int64_t size = 0;
  for (size_t c = 0; c < chains.size(); ++c) {
    size += chains.chain(c)[0].size(0) * 3 * (chains.lengths[c] - 1);
  }
  return size;
}

namespace {

at::Tensor flow_sums_cpu(at::TensorList features, at::IntArrayRef lengths) {
  return packed_sums(check_chains("ffr_fast::flow_sums", features, lengths));
}

std::vector<at::Tensor> flow_sums_backward_cpu(at::TensorList features, at::IntArrayRef lengths,
                                               const at::Tensor& grad_sums) {
  const Chains chains = check_chains("ffr_fast::flow_sums_backward", features, lengths);
  const int64_t size = packed_sums_size(chains);
  TORCH_CHECK(grad_sums.dim() == 1 && grad_sums.size(0) == size,
              "ffr_fast::flow_sums_backward: grad_sums has shape ", grad_sums.sizes(),
              "; expected (", size, "), the packed (B, 3, K-1) blocks of the chains");
  // Autograd may hand over an expanded or lower-precision grad_sums.
  return gradients_of_sums(chains, grad_sums.to(accumulation_type(features[0])).contiguous());
}

}  // namespace
}  // namespace ffr_fast

TORCH_LIBRARY_IMPL(ffr_fast, CPU, m) {
  m.impl("flow_sums", &ffr_fast::flow_sums_cpu);
  m.impl("flow_sums_backward", &ffr_fast::flow_sums_backward_cpu);
}

// Importing ffr_fast._C loads this library, which registers the kernels of this file and of
// flow_penalty.cpp; the module itself exposes nothing.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
