"""Depth pruning on the torch.export capture: whole residual blocks leave the nn.ModuleList
or nn.Sequential that holds them (a block held as an attribute becomes an nn.Identity), and
the model keeps its own class; a Hugging Face model keeps its config (`num_hidden_layers`,
`layer_types`) and its layers' `layer_idx` in step.

A *removable block* is a submodule whose call hands out the residual stream
(ffr_fast.flow.stream: the value of a residual block inside or equal to it) and keeps its
input's shape, holding no other such block: a decoder layer, a ViT or ConvNeXt block, a
ResNet block without downsampling. Outside a container it must be called once, with one
tensor in and one out, for an nn.Identity to stand for it. Removing it is exact when the
block with its parameters zeroed passes its input through (x + f(x) with f = 0; also
relu(x + f(x)) after a ReLU), and every removal is verified against that zeroed original on
the example inputs.

A residual branch that cannot go with its whole block (an attention beside its layer's MLP,
a block whose shortcut is a projection) leaves alone, a stand-in in its module's place
(sub_branches.py); removals() lists both kinds, remove() and cut() take both.

This is the depth half of stage 3 of docs/export-design.md: prune() (aten_pruner.py) and
residual_branches() remove branches here, and cut channels on the same capture.
"""
import copy
from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..capture import Capture, capture, flat_tensors, graph_values
from ..flow.stream import residual_units
from ..metrics import attention_fast_path_off, count_params, counting_flops, flops_of
from ..modes import evaluating, run_evaluating
from . import sub_branches
from .blocks import ResidualBranch, block_influence
from .report import PruneReport, max_abs_diff
from .sub_branches import BranchFinder, Removal, residual_adds

# The relative difference to the zeroed original above which a removal is not exact: float32
# rounding of a deep network stays far below it; a block that is not x + f(x) (a post-norm
# transformer layer) lands far above.
EXACT = 1e-4

# What save_pruned writes for a model pruned here: the blocks removed, replayed by load_pruned.
STRUCTURE_FORMAT = "ffr_fast.depth/1"

# Config fields that count the layers of a Hugging Face model's one stack of layers.
LAYER_COUNTS = ("num_hidden_layers",)


def _members(model: nn.Module) -> Dict[str, Tuple[nn.Module, int]]:
    """Every member of an nn.ModuleList or nn.Sequential: its path -> (container, index)."""
    members = {}
    for path, module in model.named_modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)):
            for index, (name, _) in enumerate(module.named_children()):
                members[f"{path}.{name}" if path else name] = (module, index)
    return members


def removable_blocks(model: nn.Module, cap: Capture) -> List[str]:
    """The removable blocks of `model` (module docstring), in forward order: members of an
    nn.ModuleList or nn.Sequential, and any other submodule called once with one tensor in
    and one out (timm's RegNet blocks are attributes of their stage), which an nn.Identity
    can stand for; a block holding another is not one (a stage of blocks)."""
    units = residual_units(model, cap)
    stream = {unit.value.name: cap.calls[unit.block].path if unit.block else ""
              for unit in units}
    members = _members(model)
    calls = Counter(call.path for call in cap.calls.values())
    found = []
    for call in cap.calls.values():
        if not call.path or call.index or not call.outputs or not call.inputs:
            continue
        if call.path not in members and (calls[call.path] > 1 or len(call.inputs) != 1
                                         or len(call.outputs) != 1):
            continue
        inner = stream.get(call.outputs[0])
        if inner is None or not (inner == call.path or inner.startswith(call.path + ".")):
            continue
        source, result = cap.nodes.get(call.inputs[0]), cap.nodes[call.outputs[0]]
        if source is not None and cap.shape(source) == cap.shape(result):
            found.append(call.path)
    return [block for block in found if not any(
        other != block and other.startswith(block + ".") for other in found)]


UNITS = ("block", "branch")


def removals(model: nn.Module, cap: Capture, unit: str = "all") -> List[Removal]:
    """What prune(remove_branches=[...]) can remove, in forward order. Per residual add of
    the capture: its removable block (with `unit` "block", or with "branch" where the block
    has this one add), else its branch alone where one of sub_branches.py's stand-ins can
    take its place. `unit` "all" lists every removable block and every branch that can
    leave alone (what a name or a score may pick)."""
    blocks = removable_blocks(model, cap)
    adds = residual_adds(cap)
    owner = {add: next((path for path in reversed([cap.calls[c].path for c in cap.call_stack(add)])
                        if path in blocks), None) for add, _ in adds}
    per_block = Counter(owner.values())
    found: Dict[str, Removal] = {block: Removal(block, "block") for block in blocks
                                 if unit == "all"}
    finder = BranchFinder(cap)
    for add, fork in adds:
        block = owner[add]
        if block is not None and (unit == "block" or per_block[block] == 1):
            found.setdefault(block, Removal(block, "block"))
            continue
        alone = finder.find(add, fork)
        if alone is not None:
            found.setdefault(alone.name, alone)
    first: Dict[str, int] = {}
    for node in cap.graph.nodes:
        for call_id in cap.call_stack(node):
            first.setdefault(cap.calls[call_id].path, cap.order[node])
    return sorted(found.values(), key=lambda r: first.get(r.name, -1))


def measure(model: nn.Module, cap: Capture, found: Sequence[Removal]) -> List[ResidualBranch]:
    """Each removal as a ResidualBranch: the FLOPs it saves and its Block Influence on the
    example `cap` was captured on (kept with its program): a block's between its input and
    output, a branch's between its add's shortcut and sum (read off the capture's graph)."""
    args, kwargs = cap.example
    ends: Dict[str, List[torch.Tensor]] = {}

    def watch(name):
        def hook(module, args, kwargs, output):
            ends[name] = [flat_tensors([*args, kwargs])[0], flat_tensors(output)[0]]
        return hook

    handles = [model.get_submodule(r.name).register_forward_hook(watch(r.name), with_kwargs=True)
               for r in found if r.kind == "block"]
    try:
        with counting_flops() as counter:
            run_evaluating(model, args, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    alone = [r for r in found if r.kind != "block"]
    values = graph_values(cap, {a.name for r in alone for a in cap.nodes[r.add].args[:2]}
                          | {r.add for r in alone}) if alone else {}
    for r in alone:
        add = cap.nodes[r.add]
        shortcut = next(a for a in add.args[:2] if a.name != r.branch)
        ends[r.name] = [values[shortcut.name], values[r.add]]
    counted = counter.get_flop_counts()
    prefix = type(model).__name__

    def flops(path: str) -> int:
        return int(sum(counted.get(f"{prefix}.{path}", {}).values()))

    return [ResidualBranch(
        name=r.name, influence=block_influence(*ends[r.name]), add=r.add, shortcut_arg=0,
        flops=flops(r.name) - (flops(f"{r.name}.{r.shortcut}") if r.kind == "shortcut" else 0),
        modules=(r.name,), tail=None) for r in found]


def find(model: nn.Module, args, kwargs=None, ignored: Sequence[str] = (),
         unit: str = "block") -> List[ResidualBranch]:
    """The removable blocks or branches (`unit`, as in removals()) of `model` on the example
    call outside the modules `ignored`, measured (residual_branches())."""
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    cap = capture(model, args, kwargs or {}, keep_program=True)
    return measure(model, cap, [r for r in removals(model, cap, unit)
                                if not inside(r.name, ignored)])


def inside(path: str, modules: Sequence[str]) -> bool:
    """Whether module `path` is one of `modules` or inside one."""
    return any(path == m or path.startswith(m + ".") for m in modules)


def _is_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _stack_config(model: nn.Module, container: nn.Module, old_length: int):
    """The Hugging Face config whose layer count is this container's length, or None for a
    model without one; raises where the count lives in a config this code does not keep."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    counted = [field for field in LAYER_COUNTS if getattr(config, field, None) == old_length]
    owners = [m for m in model.modules() if m is not model and getattr(m, "config", None)
              is not None and m.config is not config and container in list(m.modules())]
    if not counted or owners:
        raise ValueError(
            f"removing layers from this stack of {type(model).__name__} would leave its config "
            f"inconsistent: no field of {LAYER_COUNTS} counts its {old_length} layers"
            + (f", and its own stack config ({type(owners[0]).__name__}) is not kept in step"
               if owners else "") + ". Only models with one stack of layers counted by "
            "config.num_hidden_layers (decoder-only or encoder-only) are supported.")
    return config


def remove(model: nn.Module, args, kwargs, names: Sequence[str],
           removable: Optional[Dict[str, Removal]] = None, in_place: bool = False
           ) -> Tuple[nn.Module, PruneReport]:
    """`model` without the branches `names` (`removable`: removals(unit="all") by name, where
    the caller found them already), verified against the original with those branches'
    parameters zeroed: a copy, `model` left as it was, or with `in_place` the model itself,
    given its modules back if the removal fails (not exact, or the model fails without them)."""
    kwargs = kwargs or {}
    if removable is None:
        cap = capture(model, args, kwargs)
        removable = {r.name: r for r in removals(model, cap)}
    unknown = [name for name in names if name not in removable]
    nested = [name for name in names if inside(name, [n for n in names if n != name])]
    if unknown or nested or len(set(names)) != len(names):
        problem = ("are not removable branches" if unknown else "lie inside other branches "
                   "named" if nested else "lists a branch twice")
        raise ValueError(f"remove_branches: {unknown or nested or list(names)} {problem}; the "
                         f"removable branches of {type(model).__name__} are {list(removable)}")
    chosen = [removable[name] for name in names]
    # The zeroed original is the original called with zeros for the branches' parameters,
    # and a copy never holds the removed modules (placeholders stand in until cut() drops
    # them): the peak is the model and its pruned copy, not three models (in place: one).
    zeros = {key: value for r in chosen for key, value in sub_branches.zeroed(model, r).items()}
    with evaluating(model), torch.no_grad(), attention_fast_path_off():  # as flops_of
        reference = torch.func.functional_call(model, zeros, tuple(args), kwargs, strict=False)
    del zeros
    original, flops_before = flops_of(run_evaluating, model, args, kwargs)
    params_before = count_params(model)
    if in_place:
        pruned, restore = model, _saved(model, names)
    else:
        placeholders = {id(model.get_submodule(r.name)): nn.Identity() for r in chosen
                        if r.kind != "shortcut"}
        pruned = copy.deepcopy(model, placeholders)
    try:
        cut(pruned, names, [r for r in chosen if r.kind != "block"])
        new, flops_after = flops_of(run_evaluating, pruned, args, kwargs)
        report = PruneReport(
            settings={"remove_branches": list(names)}, params_before=params_before,
            params_after=count_params(pruned), flops_before=flops_before,
            flops_after=flops_after, channels={}, removed_classes=0, prunable_classes=0,
            removed_blocks=[{"block": r.name, "add": r.add, "shortcut": SHORTCUTS[r.kind].format(
                f"{r.name}.{r.shortcut}")} for r in chosen],
            max_abs_diff=max_abs_diff(new, reference),
            reference_max_abs=max(float(t.float().abs().max()) for t in flat_tensors(reference)),
            max_abs_diff_original=max_abs_diff(new, original))
        if not report.relative_diff <= EXACT:  # a NaN (the reference's own) fails too
            raise ValueError(
                f"removing {list(names)} is not exact: the pruned model's output differs from "
                f"the original's with those branches' parameters zeroed by "
                f"{report.relative_diff:.3g} (relative); such a block does not pass its input "
                "through when its branch is zero (a post-norm transformer layer normalises "
                "x + f(x)), so it cannot be removed whole")
    except Exception:
        if in_place:
            restore()
        raise
    if any(r.kind == "zero" for r in chosen) and hasattr(getattr(pruned, "config", None),
                                                         "to_dict"):
        report.warnings.append(
            f"{type(pruned).__name__}'s config cannot say that the branches "
            f"{[r.name for r in chosen if r.kind == 'zero']} were removed: save_pretrained/"
            "from_pretrained would rebuild them with new weights (save_pruned keeps them out)")
    return pruned, report


# What stands for a removed branch, by its kind (sub_branches.Removal), in the report.
SHORTCUTS = {"block": "identity (the block's input)",
             "zero": "the stream (the branch adds zeros)",
             "shortcut": "{} (the block's shortcut)"}


def _saved(model: nn.Module, names: Sequence[str]) -> Callable[[], None]:
    """What cut(model, names) changes, saved: the function returned puts it back (the
    modules in their places under their names, the config's counts, every `layer_idx`)."""
    members = _members(model)
    attributes = [(name, model.get_submodule(name)) for name in names if name not in members]
    containers = list({id(members[n][0]): members[n][0] for n in names if n in members}.values())
    children = [(container, list(container.named_children())) for container in containers]
    config = getattr(model, "config", None)
    fields = {field: getattr(config, field) for field in LAYER_COUNTS + ("layer_types",)
              if hasattr(config, field)}
    layer_indices = [(module, module.layer_idx) for container in containers
                     for module in container.modules()
                     if isinstance(getattr(module, "layer_idx", None), int)]

    def restore() -> None:
        for container, named in children:
            del container[:]
            for name, child in named:
                container.add_module(name, child)
        for name, module in attributes:
            model.set_submodule(name, module)
        for field, value in fields.items():
            setattr(config, field, value)
        for module, index in layer_indices:
            module.layer_idx = index
    return restore


def cut(model: nn.Module, names: Sequence[str], replaced: Sequence[Removal] = ()) -> None:
    """Remove the branches `names`, in place: those in `replaced` get their stand-ins
    (sub_branches.py), then every other, a block, leaves its container (a Hugging Face config
    and the kept layers' `layer_idx` kept in step) or becomes an nn.Identity (what remove()
    and load_pruned do)."""
    members = _members(model)
    unknown = [name for name in names if not name or not _is_submodule(model, name)]
    if unknown:
        raise ValueError(f"{unknown} are not submodules of {type(model).__name__}")
    stand_ins = {r.name: r for r in replaced}
    for name in names:  # before any container renumbers its members
        if name in stand_ins:
            sub_branches.replace(model, stand_ins[name])
    by_container: Dict[int, Tuple[nn.Module, List[int]]] = {}
    for name in names:
        if name in stand_ins:
            continue
        if name not in members:
            model.set_submodule(name, nn.Identity())
            continue
        container, index = members[name]
        by_container.setdefault(id(container), (container, []))[1].append(index)
    for container, indices in by_container.values():
        old_length = len(container)
        config = _stack_config(model, container, old_length)
        for index in sorted(indices, reverse=True):
            del container[index]  # ModuleList and Sequential renumber their members
        if config is not None:
            _update_config(config, container, old_length, indices)


def _update_config(config, container: nn.Module, old_length: int, removed: List[int]) -> None:
    """The config and every kept layer's `layer_idx` in step with the shorter stack."""
    for field in LAYER_COUNTS:
        if getattr(config, field, None) == old_length:
            setattr(config, field, len(container))
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == old_length:
        config.layer_types = [t for i, t in enumerate(layer_types) if i not in removed]
    for index, layer in enumerate(container):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = index
