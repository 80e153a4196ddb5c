"""Channel importance: what a channel emits, measured so that a dead channel scores zero.

For every output channel of a Conv2d or Linear (a *producer*) the emitted map is its filter
and bias, with the BatchNorm that directly follows it folded in (eval-mode affine map):
    row_c = [ s_c * W_c , s_c * b_c + t_c ]     s = gamma / sqrt(var + eps), t = beta - mean * s
A BatchNorm that follows no producer (e.g. after a concat or an add) emits t_c for a zero
input, so it contributes the row [t_c]. A channel's output is identically zero exactly when
all its rows are zero.

`importance="l2"` / `"l1"`: a row's score is its L2 / L1 norm. `importance="bn"`: the score
is |gamma_c| of the channel's BatchNorms (network slimming); classes without a BatchNorm
are not pruned under "bn".
The score of a channel class (channels tied by the dependency graph) is the MAX over all
rows of all its members, so `threshold=t` removes a class only when every member filter is
at most t: with t = 0 exactly the dead (all-zero) filters go. Consumers' input weights are
deliberately not counted: a dead filter is dead whatever reads it.
"""
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .graph import ChannelGraph, ModuleChannels

IMPORTANCES = ("l2", "l1", "bn")


def bn_affine(bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """The eval-mode per-channel map y = scale * x + shift of a BatchNorm."""
    ones = torch.ones(bn.num_features, device=_device(bn))
    mean = bn.running_mean if bn.running_mean is not None else torch.zeros_like(ones)
    var = bn.running_var if bn.running_var is not None else ones
    gamma = bn.weight if bn.affine else ones
    beta = bn.bias if bn.affine else torch.zeros_like(ones)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale.detach().double(), (beta - mean * scale).detach().double()


def _device(module: nn.Module) -> torch.device:
    return next(iter(module.buffers()), torch.empty(0)).device


def emitted_rows(producer: nn.Module, bn: Optional[nn.BatchNorm2d]) -> torch.Tensor:
    """(out_channels, D) float64: each output channel's filter and bias, BN folded in."""
    weight = producer.weight.detach().double().flatten(1)
    bias = (producer.bias.detach().double() if producer.bias is not None
            else torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device))
    if bn is not None:
        scale, shift = bn_affine(bn)
        weight, bias = weight * scale[:, None], bias * scale + shift
    return torch.cat([weight, bias[:, None]], dim=1)


def row_norm(rows: torch.Tensor, importance: str) -> torch.Tensor:
    return rows.abs().sum(1) if importance == "l1" else rows.norm(dim=1)


def following_bn(cg: ChannelGraph, producer: ModuleChannels) -> Optional[ModuleChannels]:
    """The BatchNorm that is the only reader of `producer`'s output, if any."""
    users = list(producer.node.users)
    if len(users) != 1 or users[0].op != "call_module":
        return None
    bn = cg.modules.get(users[0].target)
    if bn is None or not isinstance(bn.module, nn.BatchNorm2d) or bn.node is not users[0]:
        return None
    return bn


def class_scores(cg: ChannelGraph, importance: str) -> Dict[int, float]:
    """Score of every channel class (keyed by its union-find root) that has a member."""
    if importance not in IMPORTANCES:
        raise ValueError(f"importance must be one of {IMPORTANCES}, got {importance!r}")
    scores: Dict[int, float] = {}

    def add(ids, values):
        for root, value in zip(cg.roots(ids).tolist(), values.tolist()):
            scores[root] = max(scores.get(root, 0.0), value)

    folded = set()
    for mc in cg.modules.values():
        if isinstance(mc.module, nn.BatchNorm2d):
            continue
        bn = following_bn(cg, mc)
        if bn is not None:
            folded.add(bn.path)
        if importance != "bn":
            add(mc.out_ids, row_norm(emitted_rows(mc.module, bn and bn.module), importance))
    for mc in cg.modules.values():
        if not isinstance(mc.module, nn.BatchNorm2d):
            continue
        if importance == "bn":
            gamma = mc.module.weight if mc.module.affine else torch.ones(len(mc.out_ids))
            add(mc.out_ids, gamma.detach().abs().double())
        elif mc.path not in folded:
            add(mc.out_ids, bn_affine(mc.module)[1].abs())
    return scores
