"""The ops on CPU (the fused C++ kernels of csrc/) against the plain-PyTorch float64
reference, for one chain and for several chains of different shapes and lengths in one call:
flow sums, penalty variants, gradients, layouts, numerics, determinism, torch.compile.

Tolerances: ffr_fast.testing.TOLERANCE (relative to the largest reference value).
"""
import itertools

import pytest
import torch

from ffr_fast.flow import ops, reference
from ffr_fast.flow.penalty import flow_penalty, flow_penalty_chains
from ffr_fast.testing import TOLERANCE, random_chain, random_chains, relative_error, upcast

VARIANTS = [dict(norm=norm, curvature=curvature, grad_weight=0.7, curv_weight=1.3, eps=eps)
            for norm, curvature in itertools.product(reference.NORMS, reference.CURVATURES)
            for eps in (1e-8, 0.5)]
# (K, shape) per chain. n = 4551 is two blocks of the C++ kernels, the last one partial.
LAYOUTS = {
    "K2": [(2, (2, 3, 37, 41))],
    "K3": [(3, (2, 3, 37, 41))],
    "K32": [(32, (2, 5, 7, 11))],
    "three_chains": [(4, (2, 3, 37, 41)), (2, (2, 6, 5)), (7, (2, 5, 7, 11))],
    "batches_differ": [(3, (3, 4, 6)), (5, (1, 9)), (2, (2, 2, 2, 2))],
}
CHAIN_WEIGHTS = (0.5, 2.0, 1.25)


@pytest.fixture(autouse=True)
def compiled_kernel():
    """Every test here must run the C++ kernel, never silently the reference fallback."""
    ops.require_compiled_cpu_kernel()


def flatten(chains):
    return [x for chain in chains for x in chain], [len(chain) for chain in chains]


def reference_sums(chains):
    return torch.cat([reference.flow_sums(upcast(chain)).reshape(-1) for chain in chains])


def reference_penalty(chains, weights, **options):
    return sum(w * reference.flow_penalty(chain, **options) for w, chain in zip(weights, chains))


def penalty_and_grads(penalty_fn, chains, **options):
    leaves = [[x.detach().clone().requires_grad_() for x in chain] for chain in chains]
    value = penalty_fn(leaves, **options)
    return value, torch.autograd.grad(value, flatten(leaves)[0])


def test_cpu_dispatch_uses_compiled_kernel():
    assert ops.has_compiled_kernel("cpu")


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_flow_sums_and_backward_match_reference(dtype, layout):
    chains = random_chains(LAYOUTS[layout], dtype)
    features, lengths = flatten(chains)
    sums = torch.ops.ffr_fast.flow_sums(features, lengths)
    expected = reference_sums(chains)
    assert sums.dtype == reference.accumulation_dtype(dtype) and sums.shape == expected.shape
    assert relative_error(sums, expected) <= TOLERANCE[dtype]

    grad_sums = torch.randn(expected.shape, generator=torch.Generator().manual_seed(5),
                            dtype=torch.float64)
    grads = torch.ops.ffr_fast.flow_sums_backward(features, lengths, grad_sums.to(sums.dtype))
    expected_grads = ops._sums_backward_reference(upcast(features), lengths, grad_sums)
    for grad, x, expected_grad in zip(grads, features, expected_grads):
        assert grad.dtype == dtype and grad.shape == x.shape
        assert relative_error(grad, expected_grad) <= TOLERANCE[dtype]


def test_single_chain_sums_have_their_shape_and_no_curvature_for_K2():
    features = random_chain(2, (2, 3, 5))
    sums = ops.flow_sums(features)
    assert sums.shape == (2, 3, 1)
    assert torch.equal(sums[:, 1:], torch.zeros_like(sums[:, 1:]))  # no curvature at K = 2


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v['norm']}-{v['curvature']}-"
                                                           f"eps{v['eps']}")
@pytest.mark.parametrize("layout", ["K3", "three_chains"])
def test_penalty_variants_and_gradients_match_reference(dtype, variant, layout):
    chains = random_chains([(K, (3, 4, 9, 7) if K == 3 else shape)
                            for K, shape in LAYOUTS[layout]], dtype, step=0.5)
    weights = CHAIN_WEIGHTS[:len(chains)]
    value, grads = penalty_and_grads(flow_penalty_chains, chains, chain_weights=weights,
                                     **variant)
    expected, expected_grads = penalty_and_grads(
        lambda cs, **o: reference_penalty(cs, weights, **o), [upcast(c) for c in chains],
        **variant)
    assert value.dim() == 0 and value.dtype == reference.accumulation_dtype(dtype)
    assert relative_error(value, expected) <= TOLERANCE[dtype]
    for grad, x, expected_grad in zip(grads, flatten(chains)[0], expected_grads):
        assert grad.dtype == dtype and grad.shape == x.shape
        assert relative_error(grad, expected_grad) <= TOLERANCE[dtype]


def test_single_chain_flow_penalty_matches_reference():
    """flow_penalty, the thin single-chain case, with its options given by position."""
    chain = random_chain(4, (2, 3, 5, 5), torch.float64, step=0.5)
    value, grads = penalty_and_grads(lambda cs, **o: flow_penalty(cs[0], 0.5, 2.0, "l2", "angle"),
                                     [chain])
    expected, expected_grads = penalty_and_grads(
        lambda cs, **o: reference.flow_penalty(cs[0], 0.5, 2.0, "l2", "angle"), [chain])
    assert relative_error(value, expected) <= TOLERANCE[torch.float64]
    for grad, want in zip(grads, expected_grads):
        assert relative_error(grad, want) <= TOLERANCE[torch.float64]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v['norm']}-{v['curvature']}-"
                                                           f"eps{v['eps']}")
def test_composite_path_matches_the_cpu_kernels(variant):
    """The penalty as the kernel-less fallback computes it (the flow-sums op plus
    ops.chain_terms and its gradient) against the C++ penalty, forward and backward."""
    chains = random_chains(LAYOUTS["three_chains"], torch.float64, step=0.5)
    features, lengths = flatten(chains)
    options = (list(CHAIN_WEIGHTS), variant["grad_weight"], variant["curv_weight"],
               variant["norm"], variant["curvature"], variant["eps"], 1e-6)
    penalty, sums = torch.ops.ffr_fast.flow_penalty(features, lengths, *options)
    composite, composite_sums = ops._penalty_composite(features, lengths, *options)
    torch.testing.assert_close(composite, penalty, rtol=1e-12, atol=0)
    torch.testing.assert_close(composite_sums, sums, rtol=1e-12, atol=0)
    grad = torch.tensor(1.7, dtype=torch.float64)
    grads = torch.ops.ffr_fast.flow_penalty_backward(features, lengths, sums, grad, *options)
    composite_grads = ops._penalty_backward_composite(features, lengths, sums, grad, *options)
    for got, want in zip(composite_grads, grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)


def test_angle_at_the_clip_has_the_gradient_of_torch_clamp():
    """Parallel neighbours (cosine 1, clipped) give no angle gradient, like torch.clamp."""
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    chain = [x, 2 * x, 3 * x, 5 * x + 0.1 * torch.randn_like(x)]
    value, grads = penalty_and_grads(flow_penalty_chains, [chain], grad_weight=0.0,
                                     curvature="angle")
    expected, expected_grads = penalty_and_grads(
        lambda cs, **o: reference.flow_penalty(cs[0], **o), [chain], grad_weight=0.0,
        curvature="angle")
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=0)
    for grad, want in zip(grads, expected_grads):
        torch.testing.assert_close(grad, want, rtol=1e-8, atol=1e-12)


def through_torch_ops(chains, chain_weights=None, grad_weight=1.0, curv_weight=1.0,
                      norm="squared", curvature="diff", eps=1e-8, delta=1e-6):
    """flow_penalty_chains' penalty as a torch.ops caller gets it: its gradient through the
    autograd registered on the op, not ffr_fast.flow.penalty's entry point."""
    features, lengths = flatten(chains)
    weights = [1.0] * len(chains) if chain_weights is None else list(chain_weights)
    penalty, _ = torch.ops.ffr_fast.flow_penalty(features, lengths, weights, grad_weight,
                                                 curv_weight, norm, curvature, eps, delta)
    return penalty


@pytest.mark.parametrize("variant", [dict(), dict(norm="l2", curvature="angle", eps=1e-3)])
def test_gradcheck_float64(variant):
    chains = random_chains([(4, (2, 3, 5)), (3, (1, 4)), (2, (2, 2, 2))], torch.float64)
    features, lengths = flatten([[x.requires_grad_() for x in chain] for chain in chains])

    assert torch.autograd.gradcheck(lambda *xs: torch.ops.ffr_fast.flow_sums(xs, lengths),
                                    features)
    for penalty_fn in (flow_penalty_chains, through_torch_ops):
        assert torch.autograd.gradcheck(
            lambda *xs, penalty_fn=penalty_fn: penalty_fn(
                ops.split_chains(xs, lengths), chain_weights=[1.0, 0.5, 2.0], **variant),
            features)


def test_every_caller_of_the_penalty_op_runs_its_one_backward(monkeypatch):
    """ffr_fast.flow.penalty and torch.ops callers reach the same backward function (a change to
    the backward is one edit), and get bitwise the same gradients from it."""
    calls = []
    backward = ops._penalty_feature_gradients
    monkeypatch.setattr(ops, "_penalty_feature_gradients",
                        lambda ctx, grad: calls.append(grad) or backward(ctx, grad))
    chains = random_chains(LAYOUTS["three_chains"], torch.float64, step=0.5)
    options = dict(chain_weights=CHAIN_WEIGHTS, norm="l2", curvature="angle")
    value, grads = penalty_and_grads(flow_penalty_chains, chains, **options)
    assert len(calls) == 1
    op_value, op_grads = penalty_and_grads(through_torch_ops, chains, **options)
    assert len(calls) == 2
    assert torch.equal(op_value, value)
    assert all(torch.equal(got, want) for got, want in zip(op_grads, grads))


def test_second_backward_through_a_torch_ops_call_raises():
    chains = [[x.requires_grad_() for x in chain]
              for chain in random_chains(LAYOUTS["three_chains"], torch.float64)]
    leaves = flatten(chains)[0]
    grads = torch.autograd.grad(through_torch_ops(chains), leaves, create_graph=True)
    with pytest.raises(RuntimeError, match=ops.HIGHER_ORDER_MESSAGE[:40]):
        sum((g * g).sum() for g in grads).backward()


def test_opcheck():
    chains = random_chains([(3, (2, 3, 5, 4)), (2, (3, 4))])
    features, lengths = flatten(chains)
    options = ([1.0, 0.5], 0.7, 1.3, "l2", "angle", 1e-8, 1e-6)
    leaves = [x.requires_grad_() for x in features]
    torch.library.opcheck(torch.ops.ffr_fast.flow_sums.default, (leaves, lengths))
    torch.library.opcheck(torch.ops.ffr_fast.flow_penalty.default, (leaves, lengths, *options))
    plain = [x.detach() for x in features]
    torch.library.opcheck(torch.ops.ffr_fast.flow_sums_backward.default,
                          (plain, lengths, torch.randn(2 * 3 * 2 + 3 * 3 * 1)))
    _, sums = torch.ops.ffr_fast.flow_penalty(plain, lengths, *options)
    torch.library.opcheck(torch.ops.ffr_fast.flow_penalty_backward.default,
                          (plain, lengths, sums, torch.tensor(1.5), *options))


@pytest.mark.parametrize("shape", [(1, 3, 5, 4), (1, 7), (3, 5)], ids=["B1", "B1-n7", "n5"])
def test_small_and_single_sample_shapes(shape):
    chains = [random_chain(5, shape), random_chain(3, (2, 3))]  # below one vector chunk
    value, grads = penalty_and_grads(flow_penalty_chains, chains)
    expected, expected_grads = penalty_and_grads(
        lambda cs, **o: reference_penalty(cs, [1, 1], **o), [upcast(c) for c in chains])
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
    """Each layout as the middle chain of three: copied or read in place per chain."""
    chains = [random_chain(3, (2, 4, 5)), layouts()[layout], random_chain(2, (2, 7))]
    features, lengths = flatten(chains)
    sums = torch.ops.ffr_fast.flow_sums(features, lengths)
    assert relative_error(sums, reference_sums(chains)) <= 1e-5
    grad_sums = torch.randn(sums.shape, dtype=torch.float64)
    grads = torch.ops.ffr_fast.flow_sums_backward(features, lengths, grad_sums.float())
    expected = ops._sums_backward_reference(upcast(features), lengths, grad_sums)
    for x, grad, want in zip(features, grads, expected):
        assert grad.stride() == torch.empty_like(x).stride()  # what the fake kernel promises
        assert relative_error(grad, want) <= 1e-5


def test_channels_last_is_read_in_place():
    """A dense layout shared by the chain is read as is: gradients keep it."""
    features = layouts()["channels_last"]
    grads = torch.ops.ffr_fast.flow_sums_backward(features, [4], torch.ones(2 * 3 * 3))
    assert all(g.is_contiguous(memory_format=torch.channels_last) for g in grads)


@pytest.mark.parametrize("variant", [dict(), dict(norm="l2", curvature="angle")])
def test_nearly_equal_features(variant):
    """x_{l+1} = x_l + 1e-4 noise: differences must be formed element-wise. From
    |a|^2 + |b|^2 - 2<a, b> in float32 the squared differences would lose every digit."""
    chains = [[x + 3 for x in chain]
              for chain in random_chains([(6, (2, 8, 16, 16)), (4, (2, 16, 8, 8))], seed=3,
                                         step=1e-4)]
    features, lengths = flatten(chains)
    sums = torch.ops.ffr_fast.flow_sums(features, lengths)
    assert relative_error(sums, reference_sums(chains)) <= 1e-5
    value, grads = penalty_and_grads(flow_penalty_chains, chains, **variant)
    expected, expected_grads = penalty_and_grads(
        lambda cs, **o: reference_penalty(cs, [1, 1], **o), [upcast(c) for c in chains],
        **variant)
    assert relative_error(value, expected) <= 1e-5
    for grad, expected_grad in zip(grads, expected_grads):
        assert relative_error(grad, expected_grad) <= 1e-5


def test_results_are_bitwise_deterministic_across_runs_and_threads():
    chains = random_chains([(6, (3, 8, 40, 40)), (3, (2, 16, 20, 20))])  # several blocks each
    leaves = [[x.requires_grad_() for x in chain] for chain in chains]
    threads = torch.get_num_threads()
    try:
        results = []
        for num_threads in (2, 2, 1):
            torch.set_num_threads(num_threads)
            value = flow_penalty_chains(leaves, norm="l2", curvature="angle")
            results.append((value, torch.autograd.grad(value, flatten(leaves)[0])))
    finally:
        torch.set_num_threads(threads)
    for value, grads in results[1:]:
        assert torch.equal(value, results[0][0])
        assert all(torch.equal(g, g0) for g, g0 in zip(grads, results[0][1]))


def test_torch_compile_fullgraph_matches_eager():
    def loss(chains):
        return flow_penalty_chains(chains, grad_weight=0.5, curv_weight=2.0, norm="l2",
                                   curvature="angle", chain_weights=[1.0, 0.5])

    chains = random_chains([(4, (2, 3, 6, 6)), (3, (2, 5, 3))])
    compiled = torch.compile(loss, fullgraph=True)
    value, grads = penalty_and_grads(compiled, chains)
    expected, expected_grads = penalty_and_grads(loss, chains)
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=0)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)


def test_one_autograd_node_for_all_chains():
    chains = [[x.requires_grad_() for x in chain]
              for chain in random_chains(LAYOUTS["three_chains"])]
    value = flow_penalty_chains(chains)
    assert "flowpenalty" in type(value.grad_fn).__name__.lower()
    assert value.grad_fn.next_functions and all(
        fn is None or type(fn).__name__ == "AccumulateGrad"
        for fn, _ in value.grad_fn.next_functions)


def test_ffrloss_hands_every_chain_to_one_op_call():
    from ffr_fast import FFRLoss, models

    torch.manual_seed(0)
    model = models.resnet20().train()
    ffr = FFRLoss(model, grad_weight=0.3, curv_weight=0.2, chain_weights=[1.0, 0.5, 2.0])
    received = []
    oracle = FFRLoss(model, grad_weight=0.3, curv_weight=0.2, chain_weights=[1.0, 0.5, 2.0],
                     penalty_fn=lambda features, **o: received.append(features) or
                     reference.flow_penalty([f.detach().double() for f in features], **o))
    model(torch.randn(2, 3, 16, 16))
    value, expected = ffr(), oracle()
    assert len(received) == 3
    assert "flowpenalty" in type(value.grad_fn).__name__.lower()  # one node: the op's
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=0)


def test_steady_state_allocates_only_the_outputs():
    """After the first step, a step allocates through torch only what the ops return: the
    penalty and the packed sums forward, the gradient of the sums and the K gradients
    backward; no scratch or table tensor per call."""
    chains = [[x.requires_grad_() for x in chain]
              for chain in random_chains([(4, (2, 3, 64, 64)), (3, (2, 5, 9))])]
    leaves = flatten(chains)[0]

    def step():
        return torch.autograd.grad(flow_penalty_chains(chains), leaves)

    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        step()

    def inside(event):
        while event is not None and not event.name.startswith("ffr_fast::"):
            event = event.cpu_parent
        return event.name if event is not None else None

    allocations = [inside(e) for e in profile.events()
                   if e.name in ("aten::empty", "aten::empty_strided", "aten::scalar_tensor")]
    assert allocations.count("ffr_fast::flow_penalty") == 2
    assert allocations.count("ffr_fast::flow_penalty_backward") == 1 + len(leaves)


@pytest.mark.parametrize("shape", [(2, 4, 512, 512), (2, 3, 511, 1367)],
                         ids=["aligned", "odd_n"])
def test_gradients_past_the_cache_size_match_reference(shape):
    """Above 16 MiB of gradients the CPU backward writes them with streaming stores (and
    with plain ones where a sample starts off a 16-byte boundary, as for odd n)."""
    chains = random_chains([(3, shape)])
    assert sum(x.numel() * x.element_size() for x in chains[0]) >= 16 << 20
    features, lengths = flatten(chains)
    grad_sums = torch.randn(2 * 3 * 2, generator=torch.Generator().manual_seed(7),
                            dtype=torch.float64)
    grads = torch.ops.ffr_fast.flow_sums_backward(features, lengths, grad_sums.float())
    expected = ops._sums_backward_reference(upcast(features), lengths, grad_sums)
    for grad, want in zip(grads, expected):
        assert relative_error(grad, want) <= 1e-5
