// Fused CPU kernels of the op ffr_fast::flow_sums and its backward (schemas: ffr_fast/ops.py,
// math: ffr_fast/reference.py and docs/math.md): the torch glue. The inner loops are in
// flow_sums_kernels.h.
//
// A chain is K same-shape features x_0 .. x_{K-1} of shape (B, *S), n = prod(S) elements per
// sample. Both kernels read the chain once, in one pass:
//   forward   per sample, sums[:, 0, l] = ||d_l||^2, sums[:, 1, l] = ||s_l||^2,
//             sums[:, 2, l] = <d_l, d_{l+1}>, with d_l = x_{l+1} - x_l and s_l = d_{l+1} - d_l;
//   backward  the K gradients of <grad_sums, sums>, each written once.
// The work is split into (sample, block) items of a fixed number of elements run by
// at::parallel_for. The forward writes per-item partial sums and adds them in a fixed order,
// so results are bitwise reproducible and independent of the thread count (no atomics).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "flow_sums_kernels.h"

namespace {

using ffr_fast::kBlock;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The chain as K flat sample arrays: sample b of feature k is x[k][b * n .. b * n + n).
template <typename scalar_t>
struct FlatChain {
  std::vector<const scalar_t*> x;
  int64_t batch, n;
  int64_t blocks() const { return ceil_div(n, kBlock); }
};

void check_chain(at::TensorList features) {
  TORCH_CHECK(features.size() >= 2, "ffr_fast::flow_sums: a chain needs K >= 2 features, got ",
              features.size());
  const at::Tensor& first = features[0];
  TORCH_CHECK(first.dim() >= 1 && first.size(0) >= 1,
              "ffr_fast::flow_sums: feature 0 has shape ", first.sizes(), "; expected (B, *S)");
  for (size_t k = 0; k < features.size(); ++k) {
    const at::Tensor& x = features[k];
    TORCH_CHECK(x.sizes() == first.sizes(), "ffr_fast::flow_sums: feature ", k, " has shape ",
                x.sizes(), " but feature 0 has shape ", first.sizes());
    TORCH_CHECK(x.scalar_type() == first.scalar_type(), "ffr_fast::flow_sums: feature ", k,
                " has dtype ", x.scalar_type(), " but feature 0 has ", first.scalar_type());
    TORCH_CHECK(x.device() == first.device(), "ffr_fast::flow_sums: feature ", k, " is on ",
                x.device(), " but feature 0 is on ", first.device());
  }
}

// Each sample is one dense run of n elements (contiguous, channels_last, or any other dense
// permutation of the non-batch dims). The sums do not depend on the order of the elements
// within a sample, so such a sample can be read as a flat array.
bool samples_are_dense(const at::Tensor& x) {
  const int64_t n = x.numel() / x.size(0);
  return x.is_non_overlapping_and_dense() && (x.size(0) == 1 || x.stride(0) == n);
}

// The features as the kernels read them: as they are when all share one layout in which
// samples are dense (no copy), else contiguous copies. The copies cover non-dense views
// (slices, expanded or strided tensors) and chains that mix layouts: correct, not zero-copy.
std::vector<at::Tensor> flat_readable(at::TensorList features, bool* zero_copy) {
  *zero_copy = samples_are_dense(features[0]);
  for (const at::Tensor& x : features) {
    *zero_copy = *zero_copy && x.strides() == features[0].strides();
  }
  std::vector<at::Tensor> readable;
  for (const at::Tensor& x : features) {
    readable.push_back(*zero_copy ? x : x.contiguous());
  }
  return readable;
}

template <typename scalar_t>
FlatChain<scalar_t> flat_chain(const std::vector<at::Tensor>& readable) {
  FlatChain<scalar_t> chain;
  for (const at::Tensor& x : readable) chain.x.push_back(x.const_data_ptr<scalar_t>());
  chain.batch = readable[0].size(0);
  chain.n = readable[0].numel() / chain.batch;
  return chain;
}

template <typename scalar_t>
at::Tensor flow_sums_kernel(const FlatChain<scalar_t>& chain, const at::TensorOptions& options) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = chain.x.size(), L = K - 1, blocks = chain.blocks();
  std::vector<acc_t> partial(chain.batch * blocks * 3 * L);
  at::parallel_for(0, chain.batch * blocks, 1, [&](int64_t begin, int64_t end) {
    // Lane-wise accumulators, 3 * L vectors; torch's allocator gives the vector alignment.
    using V = typename ffr_fast::Vec<acc_t>::type;
    at::Tensor scratch = at::empty({3 * L * ffr_fast::Vec<acc_t>::size}, options);
    V* acc = reinterpret_cast<V*>(scratch.mutable_data_ptr<acc_t>());
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / blocks, start = (item % blocks) * kBlock;
      ffr_fast::block_sums<scalar_t, acc_t>(chain.x.data(), K, b * chain.n + start,
                                            std::min(kBlock, chain.n - start), acc,
                                            partial.data() + item * 3 * L);
    }
  });
  // Blocks of a sample are added in block order, in double: the result is the same for any
  // thread count, and the few additions cost nothing.
  at::Tensor sums = at::empty({chain.batch, 3, L}, options);
  acc_t* out = sums.mutable_data_ptr<acc_t>();
  for (int64_t b = 0; b < chain.batch; ++b) {
    for (int64_t j = 0; j < 3 * L; ++j) {
      double total = 0;
      for (int64_t block = 0; block < blocks; ++block) {
        total += partial[(b * blocks + block) * 3 * L + j];
      }
      out[b * 3 * L + j] = static_cast<acc_t>(total);
    }
  }
  return sums;
}

template <typename scalar_t>
void flow_sums_backward_kernel(const FlatChain<scalar_t>& chain, const at::Tensor& grad_sums,
                               const std::vector<scalar_t*>& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = chain.x.size(), L = K - 1, blocks = chain.blocks();
  const acc_t* g = grad_sums.const_data_ptr<acc_t>();
  std::vector<acc_t> q(chain.batch * K * 4);
  for (int64_t b = 0; b < chain.batch; ++b) {
    const std::vector<acc_t> qb = ffr_fast::gradient_coefficients(g + b * 3 * L, L);
    std::copy(qb.begin(), qb.end(), q.begin() + b * K * 4);
  }
  at::parallel_for(0, chain.batch * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / blocks, start = (item % blocks) * kBlock;
      ffr_fast::block_gradients<scalar_t, acc_t>(chain.x.data(), grad.data(), K,
                                                 q.data() + b * K * 4, b * chain.n + start,
                                                 std::min(kBlock, chain.n - start));
    }
  });
}

at::Tensor flow_sums_cpu(at::TensorList features) {
  check_chain(features);
  bool zero_copy;
  const std::vector<at::Tensor> readable = flat_readable(features, &zero_copy);
  at::Tensor sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features[0].scalar_type(),
                                  "ffr_fast::flow_sums", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    sums = flow_sums_kernel(flat_chain<scalar_t>(readable),
                            features[0].options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  });
  return sums;
}

std::vector<at::Tensor> flow_sums_backward_cpu(at::TensorList features,
                                               const at::Tensor& grad_sums) {
  check_chain(features);
  const int64_t B = features[0].size(0), L = features.size() - 1;
  TORCH_CHECK(grad_sums.sizes() == at::IntArrayRef({B, 3, L}),
              "ffr_fast::flow_sums_backward: grad_sums has shape ", grad_sums.sizes(),
              "; expected (", B, ", 3, ", L, ")");
  bool zero_copy;
  const std::vector<at::Tensor> readable = flat_readable(features, &zero_copy);
  std::vector<at::Tensor> grads;
  for (const at::Tensor& x : readable) grads.push_back(at::empty_like(x));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features[0].scalar_type(),
                                  "ffr_fast::flow_sums_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Autograd may hand over an expanded or lower-precision grad_sums; it is (B, 3, K-1).
    const at::Tensor g =
        grad_sums.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    std::vector<scalar_t*> out;
    for (at::Tensor& grad : grads) out.push_back(grad.mutable_data_ptr<scalar_t>());
    flow_sums_backward_kernel(flat_chain<scalar_t>(readable), g, out);
  });
  if (!zero_copy) {  // give each gradient its feature's layout, as the fake kernel promises
    for (size_t k = 0; k < grads.size(); ++k) {
      grads[k] = at::empty_like(features[k]).copy_(grads[k]);
    }
  }
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(ffr_fast, CPU, m) {
  m.impl("flow_sums", &flow_sums_cpu);
  m.impl("flow_sums_backward", &flow_sums_backward_cpu);
}

// Importing ffr_fast._C loads this library, which registers the kernels above; the module
// itself exposes nothing.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
