"""Saving a pruned model as a state dict plus a structure description, and rebuilding it.

The file holds plain data only (loadable with `torch.load(weights_only=True)`): what was
emitted (the model's own class or a GraphModule: emit.py), the trace settings (`ignored`),
the residual adds that were replaced by their shortcut, the folded conv/BN node pairs, the
adds rewritten in place, the sizes given to views that shrank with the channels, every
module's training flag and the state dict. `load_pruned`
copies the original architecture (and, for a GraphModule, re-traces it and replays those
edits), gives every tensor the saved shape (each layer's rule then sets its size
attributes: rules.py) and loads the weights strictly. (Pickling the whole model with
`torch.save(model)` works too; this format survives code changes to the pruner.)
"""
import copy
from typing import Callable, Tuple, Union

import torch
from torch import nn

from ..modes import restore_training_flags, training_flags
from . import aten_fold, depth
from .aten_cut import STRUCTURE_FORMAT as EXPORT_FORMAT
from .aten_cut import apply_keep
from .blocks import ResidualBranch, remove_branches
from .emit import attach_structure, structure_of
from .fold import bypass_batchnorm
from .fx_pruner import STRUCTURE_FORMAT
from .inplace import replay_adds_in_place
from .report import PruneResult
from .rules import resize_from_tensors
from .sub_branches import Removal
from .surgery import replay_view_sizes, set_submodule
from .tracing import trace


def _resize_to(gm: nn.Module, state_dict: dict) -> None:
    """Give every tensor of `gm` the shape it has in `state_dict` (new tensors where the
    pruned model gained one, e.g. the bias a folded BatchNorm left in its conv), then let
    the rule of each layer that holds one (directly or in a submodule) set its size
    attributes from them."""
    resized = set()
    for key, value in state_dict.items():
        owner_path, _, name = key.rpartition(".")
        owner = gm.get_submodule(owner_path)
        old = getattr(owner, name, None)
        if old is not None and old.shape == value.shape:
            continue
        empty = torch.empty(value.shape, dtype=value.dtype)
        if name in dict(owner.named_buffers(recurse=False)):
            setattr(owner, name, empty)  # nn.Module keeps it a buffer, persistence too
        else:
            grad = old.requires_grad if old is not None else True
            setattr(owner, name, nn.Parameter(empty, requires_grad=grad))
        parts = owner_path.split(".") if owner_path else []
        # The owner and the modules above it: an attention whose output projection shrank
        # sets its own sizes too.
        resized.update(".".join(parts[:i]) for i in range(len(parts) + 1))
    for path in sorted(resized, key=lambda p: -p.count(".") - bool(p)):  # innermost first
        resize_from_tensors(gm.get_submodule(path))


def save_pruned(result_or_model: Union[PruneResult, nn.Module], path) -> None:
    model = result_or_model.model if isinstance(result_or_model, PruneResult) else result_or_model
    structure = structure_of(model)
    if structure is None:
        raise ValueError("save_pruned needs a PruneResult or the model prune() returned; "
                         f"got a {type(model).__name__} without pruning structure")
    structure = dict(structure, training=training_flags(model))
    torch.save({"structure": structure, "state_dict": model.state_dict()}, path)


def record_source(result_or_model: Union[PruneResult, nn.Module], source: nn.Module) -> None:
    """Record that a pruned model was pruned from `source`. When `source` was itself pruned
    (prune()'s output or a model load_pruned rebuilt), the structure prune() attached names
    the nodes of `source`'s trace; with `source`'s own structure kept as its base,
    save_pruned's file rebuilds from the original architecture. Nothing to record for a
    source that was never pruned."""
    model = result_or_model.model if isinstance(result_or_model, PruneResult) else result_or_model
    structure, base = structure_of(model), structure_of(source)
    if structure is None:
        raise ValueError("record_source needs a PruneResult or the model prune() returned; "
                         f"got a {type(model).__name__} without pruning structure")
    if base is None:
        return
    structure = dict(structure, base=base)
    attach_structure(model, structure)
    if isinstance(result_or_model, PruneResult):
        result_or_model.structure = structure


# Pruned on the torch.export capture: blocks removed, then tensors sliced by name (the
# depth-only format of earlier releases is still read).
CAPTURE_FORMATS = (EXPORT_FORMAT, depth.STRUCTURE_FORMAT)
FORMAT_3 = "ffr_fast.pruned/3"  # still read: a GraphModule with these same fields
REPLAY_FIELDS = ("format", "emitted", "ignored", "removed_blocks", "folded_bn",
                 "adds_in_place", "view_sizes")


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
    if isinstance(structure, dict) and structure.get("format") == FORMAT_3:
        structure = dict(structure, format=STRUCTURE_FORMAT, emitted="graph",  # a GraphModule
                         view_sizes=[])
    _check(structure, path, top=True)
    base = structure.get("base")
    while base is not None:  # what the pruned model was pruned from, replayed first
        _check(base, path, top=False)
        base = base.get("base")
    return structure, payload["state_dict"]


def _check(structure, path, top: bool) -> None:
    """A ValueError naming what is wrong unless `structure` is one save_pruned writes (`top`)
    or one it records as a base (no training flags)."""
    whose = "its structure" if top else "the structure it was pruned from"
    formats = (STRUCTURE_FORMAT,) + CAPTURE_FORMATS
    if not isinstance(structure, dict) or structure.get("format") not in formats:
        found = structure.get("format") if isinstance(structure, dict) else type(structure)
        raise ValueError(f"{path} is not a file written by save_pruned: {whose} has format "
                         f"{found!r}, expected one of {formats}")
    if structure["format"] in CAPTURE_FORMATS:
        fields = ["removed_blocks"] + (["kept"] if structure["format"] == EXPORT_FORMAT else [])
    else:
        fields = list(REPLAY_FIELDS)
    missing = [key for key in fields + (["training"] if top else []) if key not in structure]
    if missing:
        raise ValueError(f"{path} is incomplete: {whose} lacks {missing}")
    if not isinstance(structure["removed_blocks"], list) or not isinstance(
            structure.get("kept", {}), dict):
        raise ValueError(f"{path} is damaged: {whose} holds removed blocks or kept positions "
                         "of the wrong type")


def _replay(structure: dict, model: nn.Module, path, architecture: str) -> nn.Module:
    """`model` with the edits `structure` records (its base's first), its tensors still of
    the shapes they had."""
    if structure.get("base") is not None:
        model = _replay(structure["base"], model, path, architecture)
    if structure["format"] in CAPTURE_FORMATS:  # blocks out of their containers, then slices
        kept = {name: [None if index is None else torch.tensor(index, dtype=torch.long)
                       for index in dims] for name, dims in structure.get("kept", {}).items()}
        try:
            depth.cut(model, structure["removed_blocks"],
                      [Removal.read(record) for record in structure.get("replaced", [])])
            apply_keep(model, kept)
            aten_fold.fold(model, structure.get("folded_bn", []))
        except (ValueError, AttributeError, IndexError, RuntimeError) as error:
            raise ValueError(f"{path} does not match the architecture of {architecture}: "
                             f"{type(error).__name__}: {error}") from error
        return model
    gm = trace(model, structure["ignored"])
    nodes = {n.name: n for n in gm.graph.nodes}
    needed = [name for name, _ in structure["removed_blocks"]]
    needed += [name for pair in structure["folded_bn"] for name in pair]
    needed += [name for name, _ in structure["adds_in_place"]]
    needed += [name for name, _, _ in structure["view_sizes"]]
    missing = [name for name in needed if name not in nodes]
    if missing:
        raise ValueError(f"{path} does not match the architecture of {architecture}: "
                         f"graph nodes {missing} not found")
    if structure["emitted"] == "module":
        for _, bn in structure["folded_bn"]:
            set_submodule(model, nodes[bn].target, nn.Identity())
        return model
    remove_branches(gm.graph, [ResidualBranch(add, 0, 0.0, add, arg, (), None)
                               for add, arg in structure["removed_blocks"]],
                    dict(gm.named_modules()))
    for conv, bn in structure["folded_bn"]:
        bypass_batchnorm(gm, nodes[conv], nodes[bn])
    replay_adds_in_place(gm, structure["adds_in_place"])
    replay_view_sizes(gm, structure["view_sizes"])
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def load_pruned(path, original: Union[nn.Module, Callable[[], nn.Module]]) -> nn.Module:
    """Rebuild a pruned model from `path` and the original architecture: the original's
    class or a GraphModule, as prune() emitted it.

    `original` is an instance of the unpruned model (it is copied, not modified) or a
    zero-argument factory that builds one."""
    structure, state_dict = _read(path)
    model = copy.deepcopy(original) if isinstance(original, nn.Module) else original()
    architecture = type(model).__name__
    pruned = _replay(structure, model, path, architecture)
    _resize_to(pruned, state_dict)
    try:
        pruned.load_state_dict(state_dict)
    except RuntimeError as error:
        raise ValueError(f"{path} does not match the architecture of {architecture}: "
                         f"{error}") from error
    attach_structure(pruned, {k: v for k, v in structure.items() if k != "training"})
    restore_training_flags(pruned, structure["training"])
    return pruned
