"""The flow-sums op on CPU (the fused C++ kernels of csrc/) against the plain-PyTorch
reference: sums, penalty variants, gradients, layouts, numerics, determinism, torch.compile.

Tolerances: ffr_fast.testing.TOLERANCE (relative to the largest reference value).
"""
import importlib.util
import itertools

import pytest
import torch

from ffr_fast import ops, reference
from ffr_fast.penalty import flow_penalty
from ffr_fast.testing import TOLERANCE, random_chain, relative_error, upcast

VARIANTS = [dict(norm=norm, curvature=curvature, grad_weight=0.7, curv_weight=1.3, eps=eps)
            for norm, curvature in itertools.product(reference.NORMS, reference.CURVATURES)
            for eps in (1e-8, 0.5)]


@pytest.fixture(autouse=True)
def compiled_kernel():
    """Every test here must run the C++ kernel, never silently the reference fallback."""
    ops.require_compiled_cpu_kernel()


def penalty_and_grads(penalty_fn, features, **options):
    leaves = [x.detach().clone().requires_grad_() for x in features]
    value = penalty_fn(leaves, **options)
    return value, torch.autograd.grad(value, leaves)


def test_cpu_dispatch_uses_compiled_kernel():
    assert ops.has_compiled_kernel("cpu")


def test_cuda_dispatch_goes_to_triton_when_installed():
    assert ops.has_compiled_kernel("cuda") == (importlib.util.find_spec("triton") is not None)


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("K", [2, 3, 32])
def test_flow_sums_and_backward_match_reference(dtype, K):
    shape = (2, 3, 37, 41) if K < 32 else (2, 5, 7, 11)  # n = 4551: two blocks, the last partial
    features = random_chain(K, shape, dtype)
    sums = ops.flow_sums(features)
    expected = reference.flow_sums(upcast(features))
    assert sums.dtype == reference.accumulation_dtype(dtype) and sums.shape == (2, 3, K - 1)
    assert relative_error(sums, expected) <= TOLERANCE[dtype]
    if K == 2:  # no curvature: the last (only) column of rows 1 and 2 holds no sum
        assert torch.equal(sums[:, 1:], torch.zeros_like(sums[:, 1:]))

    grad_sums = torch.randn(2, 3, K - 1, generator=torch.Generator().manual_seed(5),
                            dtype=torch.float64)
    grads = torch.ops.ffr_fast.flow_sums_backward(features, grad_sums.to(sums.dtype))
    expected_grads = reference.flow_sums_backward(upcast(features), grad_sums)
    for grad, expected_grad in zip(grads, expected_grads):
        assert grad.dtype == dtype and grad.shape == shape
        assert relative_error(grad, expected_grad) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v['norm']}-{v['curvature']}-"
                                                           f"eps{v['eps']}")
def test_penalty_variants_and_gradients_match_reference(dtype, variant):
    features = random_chain(4, (3, 4, 9, 7), dtype)
    value, grads = penalty_and_grads(flow_penalty, features, **variant)
    expected, expected_grads = penalty_and_grads(reference.flow_penalty, upcast(features),
                                                 **variant)
    assert value.dim() == 0 and value.dtype == reference.accumulation_dtype(dtype)
    assert relative_error(value, expected) <= TOLERANCE[dtype]
    for grad, expected_grad in zip(grads, expected_grads):
        assert grad.dtype == dtype
        assert relative_error(grad, expected_grad) <= TOLERANCE[dtype]


@pytest.mark.parametrize("variant", [dict(), dict(norm="l2", curvature="angle", eps=1e-3)])
def test_gradcheck_float64(variant):
    features = [x.requires_grad_() for x in random_chain(4, (2, 3, 5), torch.float64)]
    assert torch.autograd.gradcheck(lambda *xs: ops.flow_sums(xs), features)
    assert torch.autograd.gradcheck(lambda *xs: flow_penalty(xs, **variant), features)


def test_opcheck():
    features = random_chain(3, (2, 3, 5, 4))
    torch.library.opcheck(torch.ops.ffr_fast.flow_sums.default,
                          ([x.requires_grad_() for x in features],))
    torch.library.opcheck(torch.ops.ffr_fast.flow_sums_backward.default,
                          (random_chain(3, (2, 3, 5, 4)), torch.randn(2, 3, 2)))


@pytest.mark.parametrize("shape", [(1, 3, 5, 4), (1, 7), (3, 5)], ids=["B1", "B1-n7", "n5"])
def test_small_and_single_sample_shapes(shape):
    features = random_chain(5, shape)  # n below one vector chunk, and B = 1
    value, grads = penalty_and_grads(flow_penalty, features)
    expected, expected_grads = penalty_and_grads(reference.flow_penalty, upcast(features))
    assert relative_error(value, expected) <= 1e-5
    for grad, expected_grad in zip(grads, expected_grads):
        assert relative_error(grad, expected_grad) <= 1e-5


def layouts():
    base = random_chain(4, (2, 6, 10, 12))
    channels_last = [x.to(memory_format=torch.channels_last) for x in base]
    return {
        "channels_last": channels_last,
        "sliced": [x[:, :, ::2, 1:] for x in base],
        "transposed": [x.transpose(2, 3) for x in base],
        "batch_strided": [x[::2] for x in random_chain(4, (4, 6, 10, 12))],
        "mixed": [base[0], channels_last[1], base[2], channels_last[3]],
    }


@pytest.mark.parametrize("layout", list(layouts()))
def test_memory_layouts(layout):
    features = layouts()[layout]
    sums = ops.flow_sums(features)
    assert relative_error(sums, reference.flow_sums(upcast(features))) <= 1e-5
    grad_sums = torch.randn(sums.shape, dtype=torch.float64)
    grads = torch.ops.ffr_fast.flow_sums_backward(features, grad_sums.float())
    for x, grad, expected in zip(features, grads,
                                 reference.flow_sums_backward(upcast(features), grad_sums)):
        assert grad.stride() == torch.empty_like(x).stride()  # what the fake kernel promises
        assert relative_error(grad, expected) <= 1e-5


def test_channels_last_is_read_in_place():
    """A dense layout shared by the chain is read as is: gradients keep it."""
    features = layouts()["channels_last"]
    grads = torch.ops.ffr_fast.flow_sums_backward(features, torch.ones(2, 3, 3))
    assert all(g.is_contiguous(memory_format=torch.channels_last) for g in grads)


@pytest.mark.parametrize("variant", [dict(), dict(norm="l2", curvature="angle")])
def test_nearly_equal_features(variant):
    """x_{l+1} = x_l + 1e-4 noise: differences must be formed element-wise. From
    |a|^2 + |b|^2 - 2<a, b> in float32 the squared differences would lose every digit."""
    features = [x + 3 for x in random_chain(6, (2, 8, 16, 16), seed=3, step=1e-4)]
    sums = ops.flow_sums(features)
    assert relative_error(sums, reference.flow_sums(upcast(features))) <= 1e-5
    value, grads = penalty_and_grads(flow_penalty, features, **variant)
    expected, expected_grads = penalty_and_grads(reference.flow_penalty, upcast(features),
                                                 **variant)
    assert relative_error(value, expected) <= 1e-5
    for grad, expected_grad in zip(grads, expected_grads):
        assert relative_error(grad, expected_grad) <= 1e-5


def test_results_are_bitwise_deterministic_across_runs_and_threads():
    features = random_chain(6, (3, 8, 40, 40))  # 4 blocks per sample
    grad_sums = torch.randn(3, 3, 5)
    threads = torch.get_num_threads()
    try:
        results = []
        for num_threads in (2, 2, 1):
            torch.set_num_threads(num_threads)
            results.append((ops.flow_sums(features),
                            torch.ops.ffr_fast.flow_sums_backward(features, grad_sums)))
    finally:
        torch.set_num_threads(threads)
    for sums, grads in results[1:]:
        assert torch.equal(sums, results[0][0])
        assert all(torch.equal(g, g0) for g, g0 in zip(grads, results[0][1]))


def test_torch_compile_fullgraph_matches_eager():
    def loss(features):
        return flow_penalty(features, grad_weight=0.5, curv_weight=2.0, norm="l2",
                            curvature="angle")

    features = random_chain(4, (2, 3, 6, 6))
    compiled = torch.compile(loss, fullgraph=True)
    value, grads = penalty_and_grads(compiled, features)
    expected, expected_grads = penalty_and_grads(loss, features)
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=0)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)
