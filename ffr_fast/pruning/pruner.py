"""prune(): trace, remove dead residual branches, plan, cut, optionally fold BN, verify."""
import copy
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils._pytree import tree_leaves

from ..metrics import count_params, flops_of
from .blocks import find_dead_branches, remove_branches
from .inplace import adds_in_place
from .fold import fold_batchnorms, foldable_pairs
from .graph import analyze, trace
from .importance import IMPORTANCES, class_scores
from .plan import make_plan
from .report import PruneReport
from .surgery import apply_plan, set_submodule, zero_channels, zero_removed

SCOPES = ("global", "layer")
STRUCTURE_FORMAT = "ffr_fast.pruned/2"
STRUCTURE_KEY = "ffr_fast.structure"  # where the pruned GraphModule keeps it, in .meta


class ExampleInputError(ValueError):
    """The model failed on the example inputs; the message names their shapes and the module."""


@dataclass
class PruneResult:
    model: fx.GraphModule
    report: PruneReport
    structure: dict  # what save_pruned stores to rebuild `model` from the original architecture

    def __str__(self) -> str:
        return str(self.report)


def prune(model: nn.Module, example_inputs: Union[torch.Tensor, Sequence[torch.Tensor]], *,
          threshold: Optional[float] = None, ratio: Optional[float] = None,
          importance: str = "l2", scope: str = "global", min_channels: int = 1,
          round_to: Optional[int] = None, remove_blocks: bool = True, fold_bn: bool = False,
          ignored: Sequence[Any] = (), inplace: bool = False) -> PruneResult:
    """Remove filters (and dead residual blocks) from `model`; return a new compact model.

    Exactly one of `threshold` (remove every channel class whose importance score is
    <= threshold, see importance.py; 0 removes exactly the all-zero filters) or `ratio`
    (fraction of prunable channel classes to remove, `scope` "global" or per "layer") is
    given. `ignored` lists modules (names, instances or classes) that are traced as opaque
    leaves and whose channels are kept. The result's model is a torch.fx.GraphModule in the
    original's training mode (eval mode with `fold_bn`). With `inplace=True` the model is
    not copied: its modules are replaced and reused, and only `result.model` should be used
    afterwards (its own forward may still call removed blocks).
    """
    start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"prune() needs an nn.Module, got {type(model).__name__}")
    _check_settings(threshold, ratio, importance, scope, min_channels, round_to)
    inputs = _as_inputs(example_inputs)
    ignored = resolve_ignored(model, ignored)
    was_training = model.training
    work = model if inplace else copy.deepcopy(model)
    work.eval()
    with torch.no_grad():
        gm = fx.GraphModule(work, trace(work, ignored))
        params_before = count_params(gm)
        # One pass records shapes for the analysis, the original output and its FLOPs.
        original, flops_before = run_checked(gm, inputs, ShapeProp(gm).propagate)
        dead = (find_dead_branches(gm, threshold or 0.0, importance, ignored)
                if remove_blocks else [])
        blocks = remove_branches(gm.graph, dead, dict(gm.named_modules()))
        gm.delete_all_unused_submodules()
        cg = analyze(gm, ignored)
        plan = make_plan(cg, class_scores(cg, importance), threshold=threshold, ratio=ratio,
                         scope=scope, min_channels=min_channels, round_to=round_to)
        # The reference: the original graph with what goes zeroed (modules are shared).
        zero_removed(cg, plan.removed)
        for branch in dead:
            for path in branch.tail:
                module = work.get_submodule(path)
                zero_channels(module, range(_out_channels(module)))
        reference, _ = run_checked(work, inputs)
        channels = apply_plan(gm, cg, plan.removed)
        folded_pairs = foldable_pairs(gm) if fold_bn else []
        folded = fold_batchnorms(gm, folded_pairs) if fold_bn else []
        in_place = adds_in_place(gm)
        gm.recompile()
        pruned, flops_after = run_checked(gm, inputs)
        if inplace:  # the caller's module tree gets the new modules too
            kept = dict(gm.named_modules())
            for path in channels.keys() & kept.keys():
                set_submodule(model, path, kept[path])
        structure = {"format": STRUCTURE_FORMAT, "ignored": list(ignored),
                     "removed_blocks": [[b.add, b.shortcut_arg] for b in dead],
                     "folded_bn": [list(p) for p in folded_pairs],
                     "adds_in_place": [list(a) for a in in_place]}
        gm.meta[STRUCTURE_KEY] = structure
        report = PruneReport(
            settings=dict(threshold=threshold, ratio=ratio, importance=importance, scope=scope,
                          min_channels=min_channels, round_to=round_to,
                          remove_blocks=remove_blocks, fold_bn=fold_bn, ignored=list(ignored)),
            params_before=params_before, params_after=count_params(gm),
            flops_before=flops_before, flops_after=flops_after,
            channels=channels, removed_classes=len(plan.removed),
            prunable_classes=sum(len(g.roots) - len(g.pinned) for g in plan.groups),
            removed_blocks=blocks, unpruned=plan.unpruned, opaque_ops=cg.unknown_ops,
            folded_bn=folded,
            score_cutoff=plan.cutoff, max_abs_diff=_max_diff(pruned, reference),
            reference_max_abs=max(float(t.abs().max()) for t in _tensors(reference)),
            max_abs_diff_original=_max_diff(pruned, original))
    gm.train(was_training and not fold_bn)
    model.train(was_training)  # only the copy (or, with inplace=True, the model) was in eval
    report.seconds = time.perf_counter() - start
    return PruneResult(gm, report, structure)


def _check_settings(threshold, ratio, importance, scope, min_channels, round_to) -> None:
    if (threshold is None) == (ratio is None):
        raise ValueError("prune() needs exactly one of threshold= or ratio=, got "
                         f"threshold={threshold!r} and ratio={ratio!r}")
    if ratio is not None and not 0 <= ratio < 1:
        raise ValueError(f"ratio must be in [0, 1) (the fraction of channels removed), got {ratio!r}")
    if threshold is not None and not threshold >= 0:
        raise ValueError(f"threshold must be >= 0, got {threshold!r}")
    if importance not in IMPORTANCES:
        raise ValueError(f"importance must be one of {IMPORTANCES}, got {importance!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if not isinstance(min_channels, int) or min_channels < 1:
        raise ValueError(f"min_channels must be an int >= 1, got {min_channels!r} (a branch "
                         "that should vanish entirely is removed by remove_blocks instead)")
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to must be None or an int >= 1, got {round_to!r}")


def _as_inputs(example_inputs) -> Tuple[torch.Tensor, ...]:
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"example_inputs[{i}] must be a torch.Tensor, got {type(x).__name__}")
    return inputs


def resolve_ignored(model: nn.Module, ignored) -> Tuple[str, ...]:
    """Module names for `ignored` given as names, module instances or module classes."""
    names = []
    by_id = {id(m): name for name, m in model.named_modules()}
    for item in ignored:
        if isinstance(item, str):
            try:
                model.get_submodule(item)
            except AttributeError:
                raise ValueError(f"ignored: {type(model).__name__} has no submodule {item!r}") from None
            names.append(item)
        elif isinstance(item, type):
            names += [name for name, m in model.named_modules() if isinstance(m, item) and name]
        elif id(item) in by_id:
            names.append(by_id[id(item)])
        else:
            raise ValueError(f"ignored: {item!r} is not a submodule name, submodule or class of "
                             f"{type(model).__name__}")
    return tuple(dict.fromkeys(names))


def run_checked(model: nn.Module, inputs, run=None):
    """`run(*inputs)` (default: the model) and its FLOPs; a failure is re-raised naming the
    input shapes and the innermost module of `model` that was running."""
    stack, handles = [], []

    def enter(name):
        return lambda module, args: stack.append(name)  # returns None: inputs unchanged

    def leave(module, args, output):
        stack.pop()  # returns None: output unchanged

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    try:
        return flops_of(run or model, *inputs)
    except Exception as error:
        path = stack[-1] if stack else ""
        kind = type(model.get_submodule(path)).__name__
        shapes = ", ".join(str(tuple(x.shape)) for x in inputs)
        raise ExampleInputError(f"the model failed on example inputs of shape {shapes} in "
                                f"module '{path or '(root)'}' ({kind}): {error}") from error
    finally:
        for handle in handles:
            handle.remove()


def _out_channels(module: nn.Module) -> int:
    return module.weight.shape[0] if module.weight is not None else module.num_features


def _tensors(output):
    return [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)]


def _max_diff(a, b) -> float:
    return max(float((x.double() - y.double()).abs().max()) for x, y in
               zip(_tensors(a), _tensors(b)))
