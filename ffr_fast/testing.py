"""Helpers shared by ffr_fast's tests and benchmarks: one home for the tolerances of the op
against the float64 reference, for random chains, and for random models that look trained
(and FFR-sparsified) for the pruner.

Tolerances are relative to the largest reference value (relative_error): float64 1e-10,
float32 1e-5, float16/bfloat16 1e-2 against the float64 reference of the upcast inputs.
"""
from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2,
             torch.bfloat16: 1e-2}


def random_chain(K: int, shape: Sequence[int], dtype: torch.dtype = torch.float32,
                 device="cpu", seed: int = 0, step: Optional[float] = None) -> List[Tensor]:
    """K random features of one shape, drawn in float64 and then cast (so every dtype sees
    the same values). step=None: independent features; step=s: a feature flow, each feature
    the previous one plus s * noise (s = 1e-4 makes nearly equal neighbours)."""
    generator = torch.Generator(device).manual_seed(seed)

    def noise():
        return torch.randn(tuple(shape), generator=generator, dtype=torch.float64,
                           device=device)

    chain = [noise()]
    for _ in range(K - 1):
        chain.append(noise() if step is None else chain[-1] + step * noise())
    return [x.to(dtype) for x in chain]


def random_chains(layout: Sequence[Sequence], dtype: torch.dtype = torch.float32, device="cpu",
                  seed: int = 0, step: Optional[float] = None) -> List[List[Tensor]]:
    """One random chain per (K, shape) of layout, each from its own seed."""
    return [random_chain(K, shape, dtype, device, seed + i, step)
            for i, (K, shape) in enumerate(layout)]


def upcast(features: Sequence[Tensor]) -> List[Tensor]:
    """Detached float64 copies: what the reference is evaluated on."""
    return [x.detach().double() for x in features]


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64."""
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


# -- models for the pruner's tests and benchmarks: random, but looking trained ----------
def look_trained(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN affine parameters and running statistics, as after training; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return model.eval()


def kill_channels(model: nn.Module, path: str, channels: Sequence[int],
                  bn_path: Optional[str] = None) -> None:
    """Make output `channels` of layer `path` (and of its BN) exactly zero."""
    with torch.no_grad():
        for p in (path, bn_path):
            if p is not None:
                m = model.get_submodule(p)
                m.weight[channels] = 0
                if m.bias is not None:
                    m.bias[channels] = 0
