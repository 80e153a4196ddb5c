"""Surgery: every layer and parameter that carries a removed channel is sliced to the kept ones.

What to slice is read from the rule table (rules.py): for each parameter or buffer, which of
its dimensions hold the output ("out") or input ("in") channels; the rule's `resize` then
sets the module's size attributes. Modules are sliced in place (prune() works on a copy).

Also the one definition of what removing a channel means for the *original* model
(`zero_removed`): every tensor that holds the channel as an output (producer rows, bias,
BatchNorm / LayerNorm affine, layer scales) is set to zero there, so the channel emits
exactly zero. The pruned model must match the original zeroed this way (exactly, unless a
renormalising layer such as LayerNorm lost channels: report.approximate says so).

A tensor several modules share (tied weights: an LM head that reuses its embedding's
weight) is one tensor: `tie_shared_tensors` ties its channels across every use, or pins
them where a use does not slice that dimension, and `share_sliced` gives every owner the one
sliced tensor, so that the pruned model has it once, still tied.
"""
from itertools import chain
from typing import Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from .channels import ChannelGraph, ModuleChannels
from .rules import tensor_of


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _mask(cg: ChannelGraph, removed: Set[int]) -> np.ndarray:
    """removed[root] for every id: the plan's set of removed class roots, looked up fast."""
    mask = np.zeros(cg.size, dtype=bool)
    mask[np.fromiter(removed, dtype=np.int64, count=len(removed))] = True
    return mask


def _keep(cg: ChannelGraph, ids: np.ndarray, removed: np.ndarray) -> torch.Tensor:
    """Positions of `ids` whose class stays (`removed`: a _mask)."""
    return torch.from_numpy(np.flatnonzero(~removed[cg.roots(np.asarray(ids).ravel())]))


def _gone(cg: ChannelGraph, ids, removed: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.flatnonzero(removed[cg.roots(np.asarray(ids).ravel())]))


def _tensor_roles(mc: ModuleChannels):
    """(name, dimension, role) for every parameter and buffer dimension with a role, except
    a dimension of size 1 that broadcasts over the channels (PReLU's single slope)."""
    for name, roles in mc.rule.params.items():
        tensor = tensor_of(mc.module, name)[2]
        if tensor is None:
            continue
        for dim, role in enumerate(roles):
            if role is not None and not (tensor.shape[dim] == 1 and len(_role_ids(mc, role)) > 1):
                yield name, dim, role


def _role_ids(mc: ModuleChannels, role: str) -> np.ndarray:
    return {"out": mc.out_ids, "in": mc.in_ids, "inner": mc.inner_ids,
            "head": mc.head_ids}[role]


def _positions(cg: ChannelGraph, mc: ModuleChannels, name: str, role: str,
               removed: np.ndarray, size: int) -> torch.Tensor:
    """The kept positions along a tensor dimension of `size` that holds `role` channels
    (stacked `blocks` times for attention's q, k, v; "head": the kept heads)."""
    if role == "in":
        return _in_positions(mc, _keep(cg, mc.in_ids, removed), size)
    ids = _role_ids(mc, role)
    keep = _keep(cg, ids, removed)
    blocks = mc.rule.blocks.get(name, 1) if role == "inner" else 1
    return torch.cat([keep + k * len(ids) for k in range(blocks)])


def _in_positions(mc: ModuleChannels, keep_in: torch.Tensor, size: int) -> torch.Tensor:
    """Kept input positions along a weight dimension of `size`: all of them for a depthwise
    conv (size 1), the kept positions of the first group for a grouped one."""
    if size == len(mc.in_ids):
        return keep_in
    if size == 1:
        return torch.tensor([0])
    return keep_in[keep_in < size]  # graph.py ties every group to the first one


def _replace(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, attr, old = tensor_of(module, name)
    if isinstance(old, nn.Parameter):
        setattr(owner, attr, nn.Parameter(value, requires_grad=old.requires_grad))
    else:  # a buffer stays registered (nn.Module's setattr), a plain tensor stays plain
        setattr(owner, attr, value)


def zero_removed(cg: ChannelGraph, removed: Set[int], root: nn.Module) -> None:
    """Zero, in the modules and parameters the graph points at, every tensor slice that
    holds a removed channel as an output (or, in attention, a removed head's q, k, v rows,
    the output projection's columns that read it and its per-head entries: with its values
    zero a head adds exactly zero, whatever its attention weights)."""
    removed = _mask(cg, removed)
    with torch.no_grad():
        for mc in cg.modules.values():
            for name, dim, role in _tensor_roles(mc):
                if role == "in":
                    continue
                tensor = tensor_of(mc.module, name)[2]
                kept = _positions(cg, mc, name, role, removed, tensor.shape[dim])
                gone = torch.from_numpy(np.setdiff1d(np.arange(tensor.shape[dim]), kept.numpy()))
                if len(gone):
                    tensor.index_fill_(dim, gone, 0)
        for pc in cg.params:
            gone = _gone(cg, pc.ids, removed)
            if len(gone):
                tensor_of(root, pc.path)[2].index_fill_(pc.dim, gone, 0)


def apply_plan(root: nn.Module, cg: ChannelGraph, removed: Set[int]
               ) -> Dict[str, Tuple[int, int]]:
    """Slice every affected module and parameter under `root`; returns
    {layer name: (channels before, after)} for the channels each layer creates."""
    removed = _mask(cg, removed)
    channels = {}
    with torch.no_grad():
        for mc in cg.modules.values():
            sizes = {}
            for name, ids in mc.written():
                channels[name] = sizes[name] = (len(ids), len(_keep(cg, ids, removed)))
            shrinks = any(after < before for before, after in sizes.values()) or (
                mc.in_ids is not None and len(_keep(cg, mc.in_ids, removed)) < len(mc.in_ids))
            if not shrinks:
                continue
            for name, dim, role in _tensor_roles(mc):
                tensor = tensor_of(mc.module, name)[2]
                index = _positions(cg, mc, name, role, removed, tensor.shape[dim])
                _replace(mc.module, name, tensor.index_select(dim, index))
            mc.rule.resize(mc.module)
        for pc in cg.params:
            keep = _keep(cg, pc.ids, removed)
            if len(keep) == len(pc.ids):
                continue
            _replace(root, pc.path, tensor_of(root, pc.path)[2].index_select(pc.dim, keep))
    return channels


def resize_views(gm: fx.GraphModule, cg: ChannelGraph, removed: Set[int]) -> List[list]:
    """Shrink the constant sizes views are given where channels land (ViT's
    `x.reshape(n, 768, -1)`); returns [node name, size index, new size] per rewrite, for
    replay_view_sizes. Call gm.recompile() afterwards."""
    removed = _mask(cg, removed)
    rewritten = []
    for view in cg.view_sizes:
        kept = len(_keep(cg, view.ids, removed))
        if kept < len(view.ids):
            rewritten.append([view.node, view.index, kept])
    replay_view_sizes(gm, rewritten)
    return rewritten


def replay_view_sizes(gm: fx.GraphModule, rewritten) -> None:
    """Give each view node its new size: the sizes follow the tensor (x.view(a, b) or
    x.view((a, b)); torch.reshape(x, (a, b)))."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for name, index, size in rewritten:
        node = nodes[name]
        args = list(node.args)
        if node.target is torch.reshape or isinstance(args[1], (tuple, list)):
            sizes = list(args[1])
            sizes[index] = size
            args[1] = type(node.args[1])(sizes)
        else:
            args[1 + index] = size
        node.args = tuple(args)


def renormalized_layers(cg: ChannelGraph, removed: Set[int]) -> List[str]:
    """The renormalising layers (LayerNorm, GroupNorm) that lose channels: the statistics
    of their other channels change, so the pruned model is close to, not equal to, the
    zeroed original there."""
    removed = _mask(cg, removed)
    return sorted({name for ids, name in cg.renormalized if len(_gone(cg, ids, removed))})


def _owner(root: nn.Module, name: str) -> Optional[Tuple[nn.Module, str]]:
    """(module, attribute) holding the tensor `name` under `root`, or None where `root` has
    no such module (a GraphModule drops the submodules its graph does not call)."""
    path, _, attr = name.rpartition(".")
    try:
        return (root.get_submodule(path) if path else root), attr
    except AttributeError:
        return None


def tie_shared_tensors(cg: ChannelGraph, root: nn.Module) -> List[List[str]]:
    """Tie, dimension by dimension, the channels of every use of a tensor that several
    modules of `root` (the model `cg` was traced from) share; a dimension that some use
    does not slice (an embedding the analysis does not follow, a row count it keeps) is
    pinned in every use that would. Returns the names of each shared tensor (share_sliced)."""
    names_of: Dict[int, List[str]] = {}
    uses = set()  # (id(owner), attribute): one module reached under two names is one use
    for name, tensor in chain(root.named_parameters(remove_duplicate=False),
                              root.named_buffers(remove_duplicate=False)):
        owner, attr = _owner(root, name)
        if (id(owner), attr) not in uses:
            uses.add((id(owner), attr))
            names_of.setdefault(id(tensor), []).append(name)
    shared = [names for names in names_of.values() if len(names) > 1]
    if not shared:
        return shared
    sliced: Dict[Tuple[int, str], Dict[int, np.ndarray]] = {}  # use -> {dimension: ids}
    for mc in cg.modules.values():
        for name, dim, role in _tensor_roles(mc):
            owner, attr, _ = tensor_of(mc.module, name)
            sliced.setdefault((id(owner), attr), {})[dim] = _role_ids(mc, role)
    for pc in cg.params:
        owner, attr = _owner(root, pc.path) or (None, pc.path)  # None: a constant of the trace
        sliced.setdefault((id(owner), attr), {})[pc.dim] = pc.ids
    for names in shared:
        by_use = [sliced.get((id(owner), attr), {})
                  for owner, attr in (_owner(root, name) for name in names)]
        for dim, size in enumerate(tensor_of(root, names[0])[2].shape):
            ids = [use.get(dim) for use in by_use]
            tracked = [i for i in ids if i is not None]
            if len(tracked) == len(ids) and all(len(i) == size for i in ids):
                for other in ids[1:]:
                    cg.union(ids[0], other)
                continue
            reason = (f"tensor '{names[0]}' is shared with {names[1:]} (tied weights) and "
                      f"not every use slices its dimension {dim}")
            for i in tracked:
                cg.pin(i, reason)
    return shared


def share_sliced(shared: List[List[str]], roots: Sequence[nn.Module]) -> None:
    """After apply_plan: every name of each shared tensor, under every root that has it
    (the GraphModule and the model it was traced from), holds the one sliced tensor. The
    ties of tie_shared_tensors sliced every use alike."""
    for names in shared:
        owners = [o for root in roots for o in (_owner(root, n) for n in names) if o is not None]
        tensors = {id(t): t for t in (getattr(owner, attr) for owner, attr in owners)}
        if len(tensors) == 1:
            continue
        shapes = {tuple(t.shape) for t in tensors.values()}
        if len(shapes) > 1:
            raise RuntimeError(f"internal: the shared tensor {names} was sliced to different "
                               f"shapes {sorted(shapes)}")
        one = next(iter(tensors.values()))
        for owner, attr in owners:
            setattr(owner, attr, one)
