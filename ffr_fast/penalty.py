"""The FFR penalty of one chain: validate the chain, reduce it to flow sums with the fused
op, then apply the chosen norm and curvature to those (B, 3, K-1) sums."""
from typing import Sequence

import torch
from torch import Tensor

from ffr_fast import ops
from ffr_fast.reference import CURVATURES, NORMS


def check_chain(features: Sequence[Tensor], name: str = "chain") -> None:
    """Raise a ValueError/TypeError naming what is wrong with a chain; never mutates it."""
    if isinstance(features, Tensor) or not isinstance(features, (list, tuple)):
        raise TypeError(f"{name}: expected a list of K >= 2 tensors, got {type(features).__name__}")
    if len(features) < 2:
        raise ValueError(f"{name}: a chain needs K >= 2 features to form a difference, "
                         f"got {len(features)}")
    first = features[0]
    for k, x in enumerate(features):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: feature {k} is a {type(x).__name__}, not a tensor")
        if not x.is_floating_point():
            raise TypeError(f"{name}: feature {k} has dtype {x.dtype}; the flow penalty needs "
                            "floating-point features (float16, bfloat16, float32 or float64)")
        if x.dim() < 2 or x.shape[0] == 0 or x[0].numel() == 0:
            raise ValueError(f"{name}: feature {k} has shape {tuple(x.shape)}; expected "
                             "(B, *S) with B >= 1 and a non-empty S")
        if x.shape != first.shape:
            raise ValueError(f"{name}: feature {k} has shape {tuple(x.shape)} but feature 0 "
                             f"has shape {tuple(first.shape)}; a chain needs equal shapes")
        if x.dtype != first.dtype:
            raise TypeError(f"{name}: feature {k} has dtype {x.dtype} but feature 0 has "
                            f"{first.dtype}; a chain needs one dtype")
        if x.device != first.device:
            raise ValueError(f"{name}: feature {k} is on {x.device} but feature 0 is on "
                             f"{first.device}; a chain needs one device")


def check_options(grad_weight: float, curv_weight: float, norm: str, curvature: str,
                  eps: float, delta: float) -> None:
    for label, value in (("grad_weight", grad_weight), ("curv_weight", curv_weight)):
        if not value >= 0:
            raise ValueError(f"{label} must be >= 0, got {value}")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {NORMS}")
    if curvature not in CURVATURES:
        raise ValueError(f"unknown curvature {curvature!r}; choose one of {CURVATURES}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def penalty_from_sums(sums: Tensor, n: int, grad_weight: float, curv_weight: float,
                      norm: str, curvature: str, eps: float, delta: float) -> Tensor:
    """The penalty (docs/math.md) from the (B, 3, K-1) flow sums of n-element features."""
    squared_d = sums[:, 0, :]
    squared_s, dots = sums[:, 1, :-1], sums[:, 2, :-1]  # K-2 curvature terms
    if norm == "squared":
        G = squared_d.sum(1) / n
        C = squared_s.sum(1) / n
    else:
        G = torch.sqrt(squared_d + eps**2).sum(1) / n**0.5
        C = torch.sqrt(squared_s + eps**2).sum(1) / n**0.5
    if curvature == "angle":
        norm_d = torch.sqrt(squared_d + eps**2)
        cosine = dots / (norm_d[:, :-1] * norm_d[:, 1:])
        C = torch.arccos(torch.clamp(cosine, -1 + delta, 1 - delta)).sum(1)
    return grad_weight * G.mean() + curv_weight * C.mean()


def flow_penalty(features: Sequence[Tensor], grad_weight: float = 1.0, curv_weight: float = 1.0,
                 norm: str = "squared", curvature: str = "diff", eps: float = 1e-8,
                 delta: float = 1e-6) -> Tensor:
    """The FFR penalty of one chain of same-shape features x_0 .. x_{K-1} (docs/math.md).

    Returns a 0-dim tensor in float32 (float64 for float64 features), differentiable with
    respect to every feature. The features are read in place: no copy is made of a
    contiguous or channels_last feature.
    """
    check_chain(features)
    check_options(grad_weight, curv_weight, norm, curvature, eps, delta)
    sums = ops.flow_sums(features)
    n = features[0][0].numel()
    return penalty_from_sums(sums, n, grad_weight, curv_weight, norm, curvature, eps, delta)
