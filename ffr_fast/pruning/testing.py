"""Helpers that make a random model look like a trained, FFR-sparsified one: for the tests
and benchmarks of the pruner, and for anyone checking the pruner on their own model."""
from typing import Optional, Sequence

import torch
from torch import nn


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
