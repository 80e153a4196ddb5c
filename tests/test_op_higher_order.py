"""Derivatives the op does not implement fail loudly: a second backward through the op
(create_graph=True) and forward-mode AD used to give silently wrong numbers (w.grad off by
2x, a jvp of exactly 0). The float64 reference shows what the right answer
would be, so these tests also prove the op's first-order gradients still match under
create_graph=True."""
import pytest
import torch
import torch.autograd.forward_ad as forward_ad

from ffr_fast.flow import ops, reference
from ffr_fast.flow.penalty import flow_penalty, flow_penalty_chains
from ffr_fast.testing import random_chain, random_chains

REFUSAL = "first-order reverse-mode gradients only"
SHAPE = (2, 3, 4, 4)


def test_first_order_gradients_under_create_graph_match_reference():
    leaves = [x.requires_grad_() for x in random_chain(4, SHAPE, torch.float64)]
    grads = torch.autograd.grad(flow_penalty(leaves), leaves, create_graph=True)
    expected = torch.autograd.grad(reference.flow_penalty(leaves), leaves)
    for grad, want in zip(grads, expected):
        torch.testing.assert_close(grad, want, rtol=1e-10, atol=0)


def test_second_backward_raises_a_clear_error():
    leaves = [x.requires_grad_() for x in random_chain(4, SHAPE, torch.float64)]
    grads = torch.autograd.grad(flow_penalty(leaves), leaves, create_graph=True)
    gradient_penalty = sum((g * g).sum() for g in grads)
    with pytest.raises(RuntimeError, match=REFUSAL):
        gradient_penalty.backward()
    assert all(x.grad is None for x in leaves)


def test_second_backward_of_the_raw_op_raises():
    leaves = [x.requires_grad_() for x in random_chain(4, SHAPE, torch.float64)]
    sums = ops.flow_sums(leaves)
    grads = torch.autograd.grad(sums.sum(), leaves, create_graph=True)
    with pytest.raises(RuntimeError, match=REFUSAL):
        grads[0].sum().backward()


def test_torch_func_jvp_raises_where_it_returned_zero():
    features = random_chain(4, SHAPE, torch.float64)
    tangents = [torch.randn_like(x) for x in features]
    # The reference shows a non-zero directional derivative: zero would be wrong.
    _, expected = torch.func.jvp(lambda *xs: reference.flow_penalty(xs), tuple(features),
                                 tuple(tangents))
    assert expected.abs() > 1e-3
    with pytest.raises(RuntimeError, match=REFUSAL):
        torch.func.jvp(lambda *xs: flow_penalty(list(xs)), tuple(features), tuple(tangents))


def test_forward_ad_dual_tensors_raise():
    features = random_chain(4, SHAPE, torch.float64)
    with forward_ad.dual_level():
        duals = [forward_ad.make_dual(x, torch.randn_like(x)) for x in features]
        with pytest.raises(RuntimeError, match=REFUSAL):
            flow_penalty(duals)
        with pytest.raises(RuntimeError, match=REFUSAL):
            ops.flow_sums(duals)


def test_second_backward_through_several_chains_raises():
    chains = random_chains([(4, SHAPE), (3, (3, 5))], torch.float64)
    leaves = [x.requires_grad_() for c in chains for x in c]
    grads = torch.autograd.grad(flow_penalty_chains(chains, chain_weights=[1.0, 2.0]), leaves,
                                create_graph=True)
    with pytest.raises(RuntimeError, match=REFUSAL):
        sum((g * g).sum() for g in grads).backward()
