"""The FFR penalty of a forward's chains: validate their layout once, then one call of the
fused op ffr_fast::flow_penalty for all of them (see ffr_fast.flow.ops)."""
import math
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from ffr_fast.flow import ops
from ffr_fast.flow.reference import CURVATURES, NORMS


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
        if x.layout != torch.strided:
            raise TypeError(f"{name}: feature {k} has layout {x.layout}; the flow penalty "
                            "reads dense (strided) tensors: pass x.to_dense()")
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


def _is_finite_and_at_least(value, low: float) -> bool:
    return value >= low and math.isfinite(value)


def check_options(grad_weight: float, curv_weight: float, norm: str, curvature: str,
                  eps: float, delta: float) -> None:
    # inf is refused like NaN: an infinite weight makes the penalty inf, or NaN where its
    # term is 0 (inf * 0, as the curvature of a chain of two).
    for label, value in (("grad_weight", grad_weight), ("curv_weight", curv_weight)):
        if not _is_finite_and_at_least(value, 0):
            raise ValueError(f"{label} must be a finite number >= 0, got {value}")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {NORMS}")
    if curvature not in CURVATURES:
        raise ValueError(f"unknown curvature {curvature!r}; choose one of {CURVATURES}")
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number > 0, got {eps}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def check_chain_weights(chain_weights: Sequence[float]) -> List[float]:
    """The chain weights as floats; raises unless each is a finite number >= 0."""
    weights = [float(w) for w in chain_weights]
    if not all(_is_finite_and_at_least(w, 0) for w in weights):
        raise ValueError(f"chain_weights must be finite numbers >= 0, got {weights}")
    return weights


# Layouts (each feature's shape, dtype, device and layout, strided or sparse, chain by chain)
# already validated, each with its chains grouped by (dtype, device): one op call per group,
# one in the usual case. Least recently used first: past _MAX_LAYOUTS, it is dropped.
_VALIDATED_LAYOUTS: "OrderedDict[tuple, List[List[int]]]" = OrderedDict()
_MAX_LAYOUTS = 64


def _layout_key(chains) -> Optional[tuple]:
    """What validation depends on, or None when the chains are not even lists of tensors
    (then validation runs, and names the problem)."""
    if not isinstance(chains, (list, tuple)):
        return None
    key = []
    for chain in chains:
        if not isinstance(chain, (list, tuple)):
            return None
        for x in chain:
            if not isinstance(x, Tensor):
                return None
        key.append(tuple((x.shape, x.dtype, x.device, x.layout) for x in chain))
    return tuple(key)


def _validated_groups(chains: Sequence[Sequence[Tensor]]) -> List[List[int]]:
    """Validate the chains when their layout first appears; the chain indices of each
    (dtype, device) group."""
    key = _layout_key(chains)
    groups = _VALIDATED_LAYOUTS.get(key) if key is not None else None
    if groups is not None:
        _VALIDATED_LAYOUTS.move_to_end(key)
        return groups
    if not isinstance(chains, (list, tuple)) or not chains:
        raise ValueError("expected a non-empty list of chains (each a list of K >= 2 "
                         f"tensors), got {chains!r:.80}")
    by_kind: Dict[tuple, List[int]] = {}
    for c, chain in enumerate(chains):
        check_chain(chain, "chain" if len(chains) == 1 else f"chain {c}")
        by_kind.setdefault((chain[0].dtype, chain[0].device), []).append(c)
    groups = list(by_kind.values())
    _VALIDATED_LAYOUTS[key] = groups
    if len(_VALIDATED_LAYOUTS) > _MAX_LAYOUTS:
        _VALIDATED_LAYOUTS.popitem(last=False)
    return groups


def flow_penalty_chains(chains: Sequence[Sequence[Tensor]], grad_weight: float = 1.0,
                        curv_weight: float = 1.0, norm: str = "squared",
                        curvature: str = "diff", eps: float = 1e-8, delta: float = 1e-6,
                        chain_weights: Optional[Sequence[float]] = None) -> Tensor:
    """sum_c chain_weights[c] * (the FFR penalty of chain c), for every chain of a forward
    in one op call: chains may differ in shape and length (each one shape, dtype and device
    inside). One autograd node covers them all.

    The chains' structure is validated when their layout (shapes, dtypes, devices, strided or
    sparse) first appears, not on every call. Chains of different dtypes or devices go to one
    call each.
    Returns a 0-dim tensor in float32 (float64 for float64 features).
    """
    check_options(grad_weight, curv_weight, norm, curvature, eps, delta)
    groups = _validated_groups(chains)
    if chain_weights is None:
        weights = [1.0] * len(chains)
    else:
        weights = check_chain_weights(chain_weights)
        if len(weights) != len(chains):
            raise ValueError(f"chain_weights has {len(weights)} entries for {len(chains)} "
                             "chains")
    total = None
    for group in groups:
        penalty = ops.flow_penalty(
            [x for c in group for x in chains[c]], [len(chains[c]) for c in group],
            [weights[c] for c in group], float(grad_weight), float(curv_weight), norm,
            curvature, float(eps), float(delta))
        total = penalty if total is None else total + penalty
    return total


def flow_penalty(features: Sequence[Tensor], grad_weight: float = 1.0, curv_weight: float = 1.0,
                 norm: str = "squared", curvature: str = "diff", eps: float = 1e-8,
                 delta: float = 1e-6) -> Tensor:
    """The FFR penalty of one chain of same-shape features x_0 .. x_{K-1}
    (ffr_fast.flow.reference states the math): flow_penalty_chains for a single chain.

    Returns a 0-dim tensor in float32 (float64 for float64 features), differentiable with
    respect to every feature. The features are read in place when they share one layout
    that keeps each sample dense (contiguous, channels_last): no copy is made of them. Other
    views, and chains that mix layouts, are read from contiguous copies.
    """
    if isinstance(features, Tensor) or not isinstance(features, (list, tuple)):
        raise TypeError(f"chain: expected a list of K >= 2 tensors, got "
                        f"{type(features).__name__}")
    return flow_penalty_chains([features], grad_weight, curv_weight, norm, curvature, eps,
                               delta)
