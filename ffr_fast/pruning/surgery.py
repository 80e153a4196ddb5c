"""Surgery: new plain Conv2d / BatchNorm2d / Linear modules holding the kept channels only.

Also the one definition of what removing a channel means for the *original* model
(`zero_channels`): its producer rows, bias and BatchNorm gamma/beta/mean set to zero, so the
channel emits exactly zero. The pruned model must match the original zeroed this way.
"""
from typing import Dict, Sequence, Set, Tuple

import torch
from torch import nn
from torch.nn.utils import skip_init

from .graph import ChannelGraph

Index = Sequence[int]


def _like(new: nn.Module, old: nn.Module) -> nn.Module:
    param = next(old.parameters(), None)
    if param is not None:
        new = new.to(device=param.device, dtype=param.dtype)
        new.requires_grad_(param.requires_grad)
    return new.train(old.training)


def slice_conv(conv: nn.Conv2d, in_keep: Index, out_keep: Index) -> nn.Conv2d:
    """A Conv2d with the kept output channels and input channels (for every group)."""
    groups = conv.groups
    in_keep, out_keep = torch.as_tensor(in_keep), torch.as_tensor(out_keep)
    if groups == conv.in_channels and groups > 1:  # depthwise: one group per kept channel
        new_groups, weight_in = len(in_keep), torch.tensor([0])
    else:  # grouped: the kept positions are the same in every group (graph.py ties them)
        per_group = conv.in_channels // groups
        new_groups, weight_in = groups, in_keep[in_keep < per_group]
        if len(weight_in) * groups != len(in_keep):
            raise RuntimeError(f"internal: uneven input channels kept in grouped conv {conv}")
    new = skip_init(nn.Conv2d, len(in_keep), len(out_keep), conv.kernel_size, conv.stride,
                    conv.padding, conv.dilation, new_groups, conv.bias is not None,
                    conv.padding_mode)
    with torch.no_grad():
        new.weight.copy_(conv.weight[out_keep][:, weight_in])
        if conv.bias is not None:
            new.bias.copy_(conv.bias[out_keep])
    return _like(new, conv)


def slice_bn(bn: nn.BatchNorm2d, keep: Index) -> nn.BatchNorm2d:
    keep = torch.as_tensor(keep)
    new = skip_init(nn.BatchNorm2d, len(keep), bn.eps, bn.momentum, bn.affine,
                    bn.track_running_stats)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            if getattr(bn, name) is not None:
                getattr(new, name).copy_(getattr(bn, name)[keep])
        if bn.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    return _like(new, bn)


def slice_linear(linear: nn.Linear, in_keep: Index, out_keep: Index) -> nn.Linear:
    in_keep, out_keep = torch.as_tensor(in_keep), torch.as_tensor(out_keep)
    new = skip_init(nn.Linear, len(in_keep), len(out_keep), linear.bias is not None)
    with torch.no_grad():
        new.weight.copy_(linear.weight[out_keep][:, in_keep])
        if linear.bias is not None:
            new.bias.copy_(linear.bias[out_keep])
    return _like(new, linear)


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _keep(cg: ChannelGraph, ids, removed: Set[int]):
    return [i for i, r in enumerate(cg.roots(ids).tolist()) if r not in removed]


def zero_channels(module: nn.Module, positions: Index) -> None:
    """Make output channels `positions` of a Conv2d / Linear / BatchNorm2d emit zero."""
    with torch.no_grad():
        index = torch.as_tensor(positions, dtype=torch.long)
        for name in ("weight", "bias", "running_mean"):
            tensor = getattr(module, name, None)
            if tensor is not None:
                tensor[index] = 0


def zero_removed(cg: ChannelGraph, removed: Set[int]) -> None:
    """Zero, in the modules the graph points at, every channel of the removed classes."""
    for mc in cg.modules.values():
        gone = sorted(set(range(len(mc.out_ids))) - set(_keep(cg, mc.out_ids, removed)))
        if gone:
            zero_channels(mc.module, gone)


def apply_plan(root: nn.Module, cg: ChannelGraph, removed: Set[int]
               ) -> Dict[str, Tuple[int, int]]:
    """Replace every affected module under `root`; returns {path: (channels before, after)}."""
    channels = {}
    for path, mc in cg.modules.items():
        out_keep = _keep(cg, mc.out_ids, removed)
        in_keep = _keep(cg, mc.in_ids, removed) if mc.in_ids is not None else None
        channels[path] = (len(mc.out_ids), len(out_keep))
        if len(out_keep) == len(mc.out_ids) and (in_keep is None or len(in_keep) == len(mc.in_ids)):
            continue
        if isinstance(mc.module, nn.Conv2d):
            new = slice_conv(mc.module, in_keep, out_keep)
        elif isinstance(mc.module, nn.Linear):
            new = slice_linear(mc.module, in_keep, out_keep)
        else:
            new = slice_bn(mc.module, out_keep)
        set_submodule(root, path, new)
    return channels
