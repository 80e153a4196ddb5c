"""The sparsity regularizers the training loop compares, behind one small protocol:

    regularizer = build(model, "ffr", weight=1e-3)
    out = model(x)                      # FFR's hooks capture the features here
    loss = task_loss + regularizer()    # a 0-dim tensor; zero for "none"
    regularizer.remove()                # detach hooks when training ends

"none"      no penalty (the baseline arm)
"slimming"  Network Slimming (Liu et al., 2017): weight * sum of |gamma| over every BatchNorm
"ffr"       Feature Flow Regularization through ffr_fast.FFRLoss with
            grad_weight = weight and curv_weight = weight * curv_ratio
"layerdrop" LayerDrop (Fan et al., 2019; stochastic depth, Huang et al., 2016): no penalty;
            in training mode each residual block is skipped with probability `weight`
"""
from typing import Dict

import torch
from torch import nn

from ffr_fast import metrics
from ffr_fast.flow.stream import residual_blocks

REGULARIZERS = ("none", "slimming", "ffr", "layerdrop")


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


class LayerDrop:
    """LayerDrop: during training, each residual block (ffr_fast.flow.stream.residual_blocks: a
    ResNet's blocks, a ViT's encoder blocks, found on the first forward's call) is skipped, its
    output replaced by its input,
    with probability `rate`, drawn per block and per batch from torch's generator (so a
    seeded run drops the same blocks). A block that runs is not rescaled: this is fairseq's
    LayerDrop (Fan et al.'s own code), not stochastic depth's 1 / (1 - rate) scaling. The
    whole network in eval mode then sees every residual at full size, so its unpruned
    accuracy falls at large rates; the model is meant to be cut, and after removal and
    BatchNorm recalibration the unscaled variant did better in the sweep than a scaled one
    we tried (ResNet-20, validation split: 98.9% straight after removal at rate 0.5 against
    at most 97.4% at any rate with scaling).
    A block whose output shape differs from its input's
    (a ResNet's downsampling block) cannot be skipped and always runs; describe() says how
    many blocks that left droppable. Nothing is dropped in eval mode: the trained network is
    used whole, and then pruned. The blocks still compute when dropped (a hook replaces
    their output), so no parameter of a dropped block gets a gradient from that batch."""

    def __init__(self, model: nn.Module, rate: float):
        if not 0 <= rate < 1:
            raise ValueError(f"the LayerDrop rate is a probability in [0, 1), got {rate}")
        self.rate = rate
        self.blocks: Dict[str, nn.Module] = {}
        self.shape_keeping = {}  # block name -> whether its output has its input's shape
        self.handles = [model.register_forward_pre_hook(self._find_blocks, with_kwargs=True)]

    def _find_blocks(self, model: nn.Module, args, kwargs) -> None:
        if self.blocks or getattr(self, "_finding", False):
            return
        self._finding = True  # finding them exports the model, which calls it again
        try:
            names = residual_blocks(model, args, kwargs)
        finally:
            self._finding = False
        if not names:
            raise ValueError(f"LayerDrop needs residual blocks; {type(model).__name__} has none")
        self.blocks = dict(zip(names, map(model.get_submodule, names)))
        for handle in self.handles:
            handle.remove()
        self.handles = [block.register_forward_hook(self._hook(name))
                        for name, block in self.blocks.items()]

    def _hook(self, name):
        def maybe_skip(block, inputs, output):
            same_shape = inputs[0].shape == output.shape
            self.shape_keeping[name] = same_shape
            if block.training and same_shape and float(torch.rand(())) < self.rate:
                return inputs[0]
            return None
        return maybe_skip

    def __call__(self) -> torch.Tensor:
        return torch.zeros(())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def describe(self) -> str:
        droppable = sum(self.shape_keeping.values())
        return (f"LayerDrop: rate {self.rate:g} over {len(self.blocks)} residual blocks "
                f"({droppable} of them keep their input's shape and can be skipped; known "
                "after the first forward)")


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
    if name == "layerdrop":
        return LayerDrop(model, weight)
    from ffr_fast.flow.loss import FFRLoss  # imported late: its hooks machinery is FFR-only

    return FFRLoss(model, grad_weight=weight, curv_weight=weight * curv_ratio, norm=norm,
                   curvature=curvature)
