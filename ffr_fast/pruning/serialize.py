"""Saving a pruned model as a state dict plus a structure description, and rebuilding it.

The file holds plain data only (loadable with `torch.load(weights_only=True)`): the trace
settings (`ignored`), the residual adds that were replaced by their shortcut, the folded
conv/BN node pairs, the adds rewritten in place and the constructor arguments of every Conv2d / BatchNorm2d / Linear.
`load_pruned` re-traces the original architecture, replays those edits, builds empty
modules of the saved sizes and loads the weights strictly. (Pickling the whole GraphModule
with `torch.save(model)` works too; this format survives code changes to the pruner.)
"""
import copy
from typing import Callable, Tuple, Union

import torch
import torch.fx as fx
from torch import nn

from .blocks import ResidualBranch, remove_branches
from .fold import bypass_batchnorm
from .graph import trace
from .inplace import replay_adds_in_place
from .inputs import restore_training_flags, training_flags
from .pruner import STRUCTURE_FORMAT, STRUCTURE_KEY, PruneResult
from .surgery import set_submodule


def module_spec(module: nn.Module) -> dict:
    dtype = str(next(module.parameters(), torch.empty(0)).dtype).removeprefix("torch.")
    if isinstance(module, nn.Conv2d):
        return dict(type="Conv2d", in_channels=module.in_channels,
                    out_channels=module.out_channels, kernel_size=module.kernel_size,
                    stride=module.stride, padding=module.padding, dilation=module.dilation,
                    groups=module.groups, bias=module.bias is not None,
                    padding_mode=module.padding_mode, dtype=dtype)
    if isinstance(module, nn.BatchNorm2d):
        return dict(type="BatchNorm2d", num_features=module.num_features, eps=module.eps,
                    momentum=module.momentum, affine=module.affine,
                    track_running_stats=module.track_running_stats, dtype=dtype)
    return dict(type="Linear", in_features=module.in_features,
                out_features=module.out_features, bias=module.bias is not None, dtype=dtype)


def build_module(spec: dict) -> nn.Module:
    spec = dict(spec)
    kind, dtype = spec.pop("type"), getattr(torch, spec.pop("dtype"))
    return getattr(nn, kind)(**spec).to(dtype)


def save_pruned(result_or_model: Union[PruneResult, fx.GraphModule], path) -> None:
    model = result_or_model.model if isinstance(result_or_model, PruneResult) else result_or_model
    structure = getattr(model, "meta", {}).get(STRUCTURE_KEY)
    if structure is None:
        raise ValueError("save_pruned needs a PruneResult or the model prune() returned; "
                         f"got a {type(model).__name__} without pruning structure")
    modules = {name: module_spec(m) for name, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))}
    structure = dict(structure, modules=modules, training=training_flags(model))
    torch.save({"structure": structure, "state_dict": model.state_dict()}, path)


STRUCTURE_FIELDS = ("format", "ignored", "removed_blocks", "folded_bn", "adds_in_place", "modules",
                    "training")


def _read(path) -> Tuple[dict, dict]:
    """The structure and state dict of a save_pruned file; any other file is a ValueError
    naming the file and what is wrong with it."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # truncated, empty, not a torch file, unsafe pickle
        raise ValueError(f"{path} cannot be read as a file written by save_pruned "
                         f"({type(error).__name__}: {error}); it may be truncated or "
                         "corrupted") from error
    if not isinstance(payload, dict) or not {"structure", "state_dict"} <= payload.keys():
        what = (f"a dict with keys {sorted(payload)}" if isinstance(payload, dict)
                else f"a {type(payload).__name__}")
        raise ValueError(f"{path} is not a file written by save_pruned: it holds {what}, not "
                         "{'structure': ..., 'state_dict': ...}")
    structure = payload["structure"]
    if not isinstance(structure, dict) or structure.get("format") != STRUCTURE_FORMAT:
        found = structure.get("format") if isinstance(structure, dict) else structure
        raise ValueError(f"{path} is not a file written by save_pruned (format {found!r}, "
                         f"expected {STRUCTURE_FORMAT!r})")
    missing = [key for key in STRUCTURE_FIELDS if key not in structure]
    if missing:
        raise ValueError(f"{path} is incomplete: its structure lacks {missing}")
    return structure, payload["state_dict"]


def load_pruned(path, original: Union[nn.Module, Callable[[], nn.Module]]) -> fx.GraphModule:
    """Rebuild a pruned model from `path` and the original architecture.

    `original` is an instance of the unpruned model (it is copied, not modified) or a
    zero-argument factory that builds one."""
    structure, state_dict = _read(path)
    model = copy.deepcopy(original) if isinstance(original, nn.Module) else original()
    gm = fx.GraphModule(model, trace(model, structure["ignored"]))
    nodes = {n.name: n for n in gm.graph.nodes}
    needed = [name for name, _ in structure["removed_blocks"]]
    needed += [name for pair in structure["folded_bn"] for name in pair]
    needed += [name for name, _ in structure["adds_in_place"]]
    missing = [name for name in needed if name not in nodes]
    if missing:
        raise ValueError(f"{path} does not match the architecture of {type(model).__name__}: "
                         f"graph nodes {missing} not found")
    remove_branches(gm.graph, [ResidualBranch(add, 0, 0.0, add, arg, (), None)
                               for add, arg in structure["removed_blocks"]],
                    dict(gm.named_modules()))
    for conv, bn in structure["folded_bn"]:
        bypass_batchnorm(gm, nodes[conv], nodes[bn])
    replay_adds_in_place(gm, structure["adds_in_place"])
    gm.delete_all_unused_submodules()
    for name, spec in structure["modules"].items():
        set_submodule(gm, name, build_module(spec))
    gm.recompile()
    try:
        gm.load_state_dict(state_dict)
    except RuntimeError as error:
        raise ValueError(f"{path} does not match the architecture of {type(model).__name__}: "
                         f"{error}") from error
    gm.meta[STRUCTURE_KEY] = {k: v for k, v in structure.items()
                              if k not in ("modules", "training")}
    restore_training_flags(gm, structure["training"])
    return gm
