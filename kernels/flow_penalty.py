"""Triton kernels of the op ffr_fast::flow_penalty and its backward: the penalty of every
chain of a forward from its flow sums (kernels/flow_sums.py), the variant math (norm,
curvature, weights, eps, delta, the batch mean; ffr_fast.flow.ops.chain_terms states it) done in
one epilogue launch over every sample, so that a forward is one sums launch, one epilogue
launch and a sum (plus an arccos for curvature="angle"), and a backward one epilogue launch
and one gradient launch.
"""
import functools
from typing import List, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from .flow_sums import chain_entry, chain_layout, flow_sums_backward, partial_sums


@triton.jit
def _sample_sums(sums_ptr, L, j):
    """One sample's (3, L) flow sums as vectors over l = j, plus ||d_{l+1}||^2 and, at l,
    the terms of the pair (l-1, l): ||d_{l-1}||^2 and <d_{l-1}, d_l>. Zero out of range."""
    inside = j < L
    dd = tl.load(sums_ptr + j, mask=inside, other=0.0)
    ss = tl.load(sums_ptr + L + j, mask=inside, other=0.0)
    dp = tl.load(sums_ptr + 2 * L + j, mask=inside, other=0.0)
    dd_next = tl.load(sums_ptr + j + 1, mask=j + 1 < L, other=0.0)
    dd_prev = tl.load(sums_ptr + j - 1, mask=(j >= 1) & inside, other=0.0)
    dp_prev = tl.load(sums_ptr + 2 * L + j - 1, mask=(j >= 1) & inside, other=0.0)
    return dd, ss, dp, dd_next, dd_prev, dp_prev


@triton.jit
def _epilogue_sample(chains_ptr, samples_ptr, weights_ptr):
    """This program's chain and sample, its chain's K, n (as a float), offset of its packed
    sums and the sample's share w_c / B_c of the batch mean."""
    p = tl.program_id(0).to(tl.int64)
    chain = tl.load(samples_ptr + 2 * p)
    sample = tl.load(samples_ptr + 2 * p + 1)
    K = chain_entry(chains_ptr, chain, 0)
    n = chain_entry(chains_ptr, chain, 1)
    sums_offset = chain_entry(chains_ptr, chain, 6) + sample * 3 * (K - 1)
    share = tl.load(weights_ptr + chain) / chain_entry(chains_ptr, chain, 7).to(tl.float64)
    return p, chain, sample, K, n.to(tl.float64), sums_offset, share


@triton.jit
def _penalty_epilogue_kernel(partials_ptr, chains_ptr, samples_ptr, weights_ptr, sums_ptr,
                             terms_ptr, cosines_ptr, grad_weight, curv_weight, eps, delta,
                             L_BLOCK: tl.constexpr, L2: tl.constexpr, ANGLE: tl.constexpr):
    # One program per sample of every chain: sums its blocks' partials (in block order) into
    # the packed sums, and writes its weighted share of the penalty to terms; with ANGLE, the
    # clipped cosines (padded with 1, whose arccos is 0) go to cosines, for the caller's
    # arccos (Triton's interpreter has none).
    acc_dtype = sums_ptr.dtype.element_ty
    p, chain, sample, K, n, sums_offset, share = _epilogue_sample(chains_ptr, samples_ptr,
                                                                 weights_ptr)
    L = K - 1
    n_blocks = chain_entry(chains_ptr, chain, 5)
    j = tl.arange(0, L_BLOCK)
    dd = tl.zeros([L_BLOCK], dtype=acc_dtype)
    ss = tl.zeros([L_BLOCK], dtype=acc_dtype)
    dp = tl.zeros([L_BLOCK], dtype=acc_dtype)
    partial = partials_ptr + chain_entry(chains_ptr, chain, 4) + sample * n_blocks * 3 * L
    for block in range(0, n_blocks):
        row = partial + block * 3 * L
        dd += tl.load(row + j, mask=j < L, other=0.0)
        ss += tl.load(row + L + j, mask=j < L, other=0.0)
        dp += tl.load(row + 2 * L + j, mask=j < L, other=0.0)
    out = sums_ptr + sums_offset
    tl.store(out + j, dd, mask=j < L)
    tl.store(out + L + j, ss, mask=j < L)
    tl.store(out + 2 * L + j, dp, mask=j < L)
    tl.debug_barrier()  # the sums are read back below, by other threads of the program
    dd, ss, dp, dd_next, _, _ = _sample_sums(out, L, j)
    curvature = j < L - 1
    if L2:
        G = tl.sum(tl.where(j < L, tl.sqrt(dd + eps * eps), 0.0), axis=0) / tl.sqrt(n)
        C = tl.sum(tl.where(curvature, tl.sqrt(ss + eps * eps), 0.0), axis=0) / tl.sqrt(n)
    else:
        G = tl.sum(dd, axis=0) / n
        C = tl.sum(tl.where(curvature, ss, 0.0), axis=0) / n
    if ANGLE:
        cosine = dp / (tl.sqrt(dd + eps * eps) * tl.sqrt(dd_next + eps * eps))
        cosine = tl.minimum(tl.maximum(cosine, -1 + delta), 1 - delta)
        tl.store(cosines_ptr + p * L_BLOCK + j, tl.where(curvature, cosine, 1.0))
        C = 0.0
    tl.store(terms_ptr + p, share * (grad_weight * G + curv_weight * C))


@triton.jit
def _penalty_epilogue_backward_kernel(sums_ptr, grad_ptr, chains_ptr, samples_ptr, weights_ptr,
                                      grad_sums_ptr, grad_weight, curv_weight, eps, delta,
                                      L_BLOCK: tl.constexpr, L2: tl.constexpr,
                                      ANGLE: tl.constexpr):
    # One program per sample: the gradient of the penalty with respect to its flow sums
    # (the derivative of ffr_fast.flow.ops.chain_terms, as ops.chain_terms_gradient writes it).
    p, chain, sample, K, n, sums_offset, share = _epilogue_sample(chains_ptr, samples_ptr,
                                                                 weights_ptr)
    L = K - 1
    j = tl.arange(0, L_BLOCK)
    dd, ss, dp, dd_next, dd_prev, dp_prev = _sample_sums(sums_ptr + sums_offset, L, j)
    scale = tl.load(grad_ptr) * share
    grad_scale, curv_scale = scale * grad_weight, scale * curv_weight
    curvature = j < L - 1
    norm_d = tl.sqrt(dd + eps * eps)
    if L2:
        g_dd = grad_scale * 0.5 / (norm_d * tl.sqrt(n))
        g_ss = tl.where(curvature, curv_scale * 0.5 / (tl.sqrt(ss + eps * eps) * tl.sqrt(n)),
                        0.0)
    else:
        g_dd = grad_scale / n + 0.0 * dd
        g_ss = tl.where(curvature, curv_scale / n, 0.0)
    g_dp = 0.0 * dp
    if ANGLE:
        g_ss = 0.0 * ss
        # The pair (l, l+1) at l: d cos / d<d_l, d_{l+1}>, d cos / d||d_l||^2.
        norm_next = tl.sqrt(dd_next + eps * eps)
        cosine = dp / (norm_d * norm_next)
        inside = curvature & (cosine >= -1 + delta) & (cosine <= 1 - delta)
        dtheta = tl.where(inside, -curv_scale / tl.sqrt(tl.maximum(1 - cosine * cosine, 1e-30)),
                          0.0)
        g_dp = dtheta / (norm_d * norm_next)
        g_dd -= dtheta * cosine / (2 * (dd + eps * eps))
        # The pair (l-1, l) at l: d cos / d||d_l||^2 from the other side.
        norm_prev = tl.sqrt(dd_prev + eps * eps)
        cosine_prev = dp_prev / (norm_prev * norm_d)
        inside_prev = ((j >= 1) & (j < L) & (cosine_prev >= -1 + delta)
                       & (cosine_prev <= 1 - delta))
        dtheta_prev = tl.where(
            inside_prev, -curv_scale / tl.sqrt(tl.maximum(1 - cosine_prev * cosine_prev, 1e-30)),
            0.0)
        g_dd -= dtheta_prev * cosine_prev / (2 * (dd + eps * eps))
    out = grad_sums_ptr + sums_offset
    acc_dtype = grad_sums_ptr.dtype.element_ty
    tl.store(out + j, g_dd.to(acc_dtype), mask=j < L)
    tl.store(out + L + j, g_ss.to(acc_dtype), mask=j < L)
    tl.store(out + 2 * L + j, g_dp.to(acc_dtype), mask=j < L)


@functools.lru_cache(maxsize=None)
def _chain_weights_table(weights: Tuple[float, ...], device: torch.device) -> Tensor:
    """The chain weights on the device, cached by value (FFRLoss passes the same ones every
    step): no host table per call; never evicted, so a CUDA graph that reads them stays
    valid."""
    return torch.tensor(weights, dtype=torch.float64, device=device)


def _epilogue_options(norm: str, curvature: str, grad_weight: float, curv_weight: float,
                      eps: float, delta: float) -> dict:
    return dict(grad_weight=grad_weight, curv_weight=curv_weight, eps=eps, delta=delta,
                L2=norm == "l2", ANGLE=curvature == "angle")


def flow_penalty(features: Sequence[Tensor], lengths: Sequence[int],
                 chain_weights: Sequence[float], grad_weight: float, curv_weight: float,
                 norm: str, curvature: str, eps: float, delta: float,
                 block_size: int = 1024) -> Tuple[Tensor, Tensor]:
    """The op ffr_fast::flow_penalty on the device: (penalty, packed sums), from one launch
    over every chain, one epilogue launch over every sample and a sum (plus an arccos for
    curvature="angle")."""
    layout, features = chain_layout(features, lengths, block_size)
    partials = partial_sums(features, layout, block_size)
    samples = layout.sample_table.shape[0]
    sums = partials.new_empty(layout.sums_size)
    terms = partials.new_empty(samples)
    cosines = partials.new_empty((samples, layout.l_block) if curvature == "angle" else 1)
    weights = _chain_weights_table(tuple(chain_weights), partials.device)
    wrap_triton(_penalty_epilogue_kernel)[(samples,)](
        partials, layout.chain_table, layout.sample_table, weights, sums, terms, cosines,
        L_BLOCK=layout.l_block,
        **_epilogue_options(norm, curvature, grad_weight, curv_weight, eps, delta))
    penalty = terms.sum()
    if curvature == "angle":  # each sample's arccos terms carry its w_c / B_c and curv_weight
        share = weights.to(terms.dtype)[layout.sample_table[:, 0]] / layout.chain_table[
            layout.sample_table[:, 0], 7].to(terms.dtype)
        penalty = penalty + curv_weight * (torch.arccos(cosines).sum(1) * share).sum()
    return penalty, sums


def flow_penalty_backward(features: Sequence[Tensor], lengths: Sequence[int], sums: Tensor,
                          grad: Tensor, chain_weights: Sequence[float], grad_weight: float,
                          curv_weight: float, norm: str, curvature: str, eps: float,
                          delta: float, block_size: int = 1024) -> List[Tensor]:
    """The op ffr_fast::flow_penalty_backward on the device: one epilogue launch for the
    gradient of the penalty with respect to the sums, one launch for the features'."""
    layout, readable = chain_layout(features, lengths, block_size)
    grad_sums = torch.empty_like(sums)
    weights = _chain_weights_table(tuple(chain_weights), sums.device)
    wrap_triton(_penalty_epilogue_backward_kernel)[(layout.sample_table.shape[0],)](
        sums, grad.to(sums.dtype).reshape(1), layout.chain_table, layout.sample_table, weights,
        grad_sums, L_BLOCK=layout.l_block,
        **_epilogue_options(norm, curvature, grad_weight, curv_weight, eps, delta))
    return flow_sums_backward(features, lengths, grad_sums, block_size)
