"""The sparsity regularizers the training loop compares, behind one small protocol:

    regularizer = build(model, "ffr", weight=1e-3)
    out = model(x)                      # FFR's hooks capture the features here
    loss = task_loss + regularizer()    # a 0-dim tensor; zero for "none"
    regularizer.remove()                # detach hooks when training ends

"none"      no penalty (the baseline arm)
"slimming"  Network Slimming (Liu et al., 2017): weight * sum of |gamma| over every BatchNorm
"ffr"       Feature Flow Regularization through ffr_fast.FFRLoss with
            grad_weight = weight and curv_weight = weight * curv_ratio
"""
import torch
from torch import nn

from ffr_fast import metrics

REGULARIZERS = ("none", "slimming", "ffr")


class NoPenalty:
    def __call__(self) -> torch.Tensor:
        return torch.zeros(())

    def remove(self) -> None:
        pass

    def describe(self) -> str:
        return "no regularizer"


class BatchNormL1:
    """Network Slimming's penalty: the L1 norm of the BatchNorm scales, summed (not averaged)
    over layers as in the paper, so its weight is comparable with the published 1e-5..1e-4."""

    def __init__(self, model: nn.Module, weight: float):
        self.scales = list(metrics.batchnorm_scales(model).values())
        if not self.scales:
            raise ValueError("slimming needs BatchNorm layers with affine scales; the model "
                             "has none")
        self.weight = weight

    def __call__(self) -> torch.Tensor:
        return self.weight * sum(gamma.abs().sum() for gamma in self.scales)

    def remove(self) -> None:
        pass

    def describe(self) -> str:
        return (f"Network Slimming: {self.weight:g} * sum |gamma| over {len(self.scales)} "
                "BatchNorm layers")


def build(model: nn.Module, name: str, weight: float = 0.0, norm: str = "squared",
          curvature: str = "diff", curv_ratio: float = 1.0):
    """The regularizer `name` (one of REGULARIZERS) attached to `model`."""
    if name not in REGULARIZERS:
        raise ValueError(f"unknown regularizer {name!r}; choose one of {REGULARIZERS}")
    if not weight >= 0:
        raise ValueError(f"the regularizer weight must be >= 0, got {weight}")
    if name == "none":
        return NoPenalty()
    if name == "slimming":
        return BatchNormL1(model, weight)
    from ffr_fast.loss import FFRLoss  # imported late: its hooks machinery is FFR-only

    return FFRLoss(model, grad_weight=weight, curv_weight=weight * curv_ratio, norm=norm,
                   curvature=curvature)
