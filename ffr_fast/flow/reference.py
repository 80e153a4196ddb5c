"""Plain-PyTorch Feature Flow Regularization: the math ffr_fast implements (docs/math.md
tells it in words), stated here and executed term by term.

This is the executable statement of the math: the oracle for the tests and the fallback of
the ops on devices without a compiled kernel. It favours clarity over speed and forms every
difference tensor.

FFR (Wu, Lan, Zhang, Xiang, "Feature Flow Regularization: Improving Structured Sparsity in
Deep Neural Networks", arXiv 2106.02914) penalises the gradient and the curvature of the
*feature flow*, the path a sample's features take through the network.

Chains. A chain is K >= 2 features x_0 .. x_{K-1} in forward order, one shape (B, *S), dtype
and device; n = prod(S) elements per sample. A network gives several chains (one per ResNet
stage, say); a change of shape ends a chain.

Differences, per sample b:
    d_l = x_{l+1} - x_l                        l = 0 .. K-2   (the flow's gradient)
    s_l = x_{l+2} - 2 x_{l+1} + x_l = d_{l+1} - d_l,  l = 0 .. K-3   (its curvature)
A chain of K = 2 has no curvature term (not an error).

Terms, per sample (||v||_eps = sqrt(||v||^2 + eps^2), eps = 1e-8 by default):
    norm="squared" (the default, smooth):  G_b = sum_l ||d_l||^2 / n,  C_b = sum_l ||s_l||^2 / n
    norm="l2" (the path's length):  G_b = sum_l ||d_l||_eps / sqrt(n),  C_b likewise with s_l
    curvature="angle" replaces C_b by the total turning angle of the polygonal path:
        C_b = sum_{l=0}^{K-3} arccos(clip(<d_l, d_{l+1}> / (||d_l||_eps ||d_{l+1}||_eps),
                                         -1 + delta, 1 - delta))   (delta = 1e-6 by default:
        arccos' slope is infinite at +-1; the clip passes no gradient outside the interval)

Penalty: P = sum over chains c of  w_c (grad_weight mean_b G_b + curv_weight mean_b C_b),
with chain weights w_c (1 unless given). It is accumulated in float32 (float64 for float64
features) whatever the input dtype, and returned as a 0-dim tensor of that dtype.

The fused kernels reduce a chain to its *flow sums*, a (B, 3, K-1) tensor:
    sums[:, 0, l] = ||d_l||^2
    sums[:, 1, l] = ||s_l||^2        (l <= K-3; zero in the last column)
    sums[:, 2, l] = <d_l, d_{l+1}>   (l <= K-3; zero in the last column)
Every variant of the penalty is a function of these sums (ffr_fast.flow.ops.chain_terms,
csrc/penalty_math.h and the epilogue of kernels/flow_penalty.py), and so is its gradient: the
backward is one more pass over the
features with O(B K) per-sample coefficients (flow_sums_backward below).

Numerics: differences are formed element by element from upcast values, never as
|a|^2 + |b|^2 - 2<a, b>, which cancels catastrophically for nearly equal neighbours.
"""
from typing import List, Sequence

import torch
from torch import Tensor

NORMS = ("squared", "l2")
CURVATURES = ("diff", "angle")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _flat_upcast(features: Sequence[Tensor]) -> List[Tensor]:
    acc = accumulation_dtype(features[0].dtype)
    return [x.reshape(x.shape[0], -1).to(acc) for x in features]


def _first_differences(xs: Sequence[Tensor]) -> List[Tensor]:
    return [xs[l + 1] - xs[l] for l in range(len(xs) - 1)]


def flow_sums(features: Sequence[Tensor]) -> Tensor:
    """The (B, 3, K-1) flow sums of one chain (see the module docstring)."""
    d = _first_differences(_flat_upcast(features))
    sums = d[0].new_zeros(d[0].shape[0], 3, len(d))
    for l, d_l in enumerate(d):
        sums[:, 0, l] = (d_l * d_l).sum(1)
    for l in range(len(d) - 1):
        s_l = d[l + 1] - d[l]
        sums[:, 1, l] = (s_l * s_l).sum(1)
        sums[:, 2, l] = (d[l] * d[l + 1]).sum(1)
    return sums


def flow_sums_backward(features: Sequence[Tensor], grad_sums: Tensor) -> List[Tensor]:
    """Gradients of <grad_sums, flow_sums(features)> with respect to each feature.

    With gd, gs, gp = grad_sums[:, 0], grad_sums[:, 1], grad_sums[:, 2] (per sample, per l):
        dL/dd_l = 2 gd_l d_l + gp_l d_{l+1} + gp_{l-1} d_{l-1}  =: D_l
        dL/ds_l = 2 gs_l s_l                                     =: S_l
        dL/dx_k = D_{k-1} - D_k + S_{k-2} - 2 S_{k-1} + S_k      (out-of-range terms are 0)
    """
    d = _first_differences(_flat_upcast(features))
    L = len(d)
    g = grad_sums.to(d[0].dtype)
    gd, gs, gp = g[:, 0, :, None], g[:, 1, :, None], g[:, 2, :, None]
    D = []
    for l in range(L):
        D_l = 2 * gd[:, l] * d[l]
        if l + 1 < L:
            D_l = D_l + gp[:, l] * d[l + 1]
        if l >= 1:
            D_l = D_l + gp[:, l - 1] * d[l - 1]
        D.append(D_l)
    S = [2 * gs[:, l] * (d[l + 1] - d[l]) for l in range(L - 1)]

    def term(terms, i):
        return terms[i] if 0 <= i < len(terms) else 0

    grads = []
    for k, x in enumerate(features):
        grad = (term(D, k - 1) - term(D, k)
                + term(S, k - 2) - 2 * term(S, k - 1) + term(S, k))
        grads.append(grad.reshape(x.shape).to(x.dtype))
    return grads


def flow_penalty(features: Sequence[Tensor], grad_weight: float = 1.0, curv_weight: float = 1.0,
                 norm: str = "squared", curvature: str = "diff", eps: float = 1e-8,
                 delta: float = 1e-6) -> Tensor:
    """The penalty of one chain, computed term by term as the module docstring states it.

    Differentiable by autograd; independent of the flow-sums path the op takes.
    """
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {NORMS}")
    if curvature not in CURVATURES:
        raise ValueError(f"unknown curvature {curvature!r}; choose one of {CURVATURES}")
    xs = _flat_upcast(features)
    n = xs[0].shape[1]
    d = _first_differences(xs)
    s = [d[l + 1] - d[l] for l in range(len(d) - 1)]

    def size(v: Tensor) -> Tensor:
        """A term's per-sample size under the chosen norm."""
        if norm == "squared":
            return (v * v).sum(1) / n
        return torch.sqrt((v * v).sum(1) + eps**2) / n**0.5

    zero = xs[0].new_zeros(xs[0].shape[0])
    G = sum((size(d_l) for d_l in d), zero)
    if curvature == "diff":
        C = sum((size(s_l) for s_l in s), zero)
    else:
        C = zero
        for l in range(len(d) - 1):
            a, b = d[l], d[l + 1]
            norm_a = torch.sqrt((a * a).sum(1) + eps**2)
            norm_b = torch.sqrt((b * b).sum(1) + eps**2)
            cosine = (a * b).sum(1) / (norm_a * norm_b)
            C = C + torch.arccos(torch.clamp(cosine, -1 + delta, 1 - delta))
    return grad_weight * G.mean() + curv_weight * C.mean()
