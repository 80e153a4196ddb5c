"""prune(): its settings checked, then the torch.export path (aten_pruner.py) or the torch.fx
path (fx_pruner.py), "auto" choosing between them; and residual_branches(): the branches
prune() can remove, measured on the example inputs."""
import time
from typing import Any, List, Optional, Sequence, Union

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..capture import UncapturableModelError
from ..modes import evaluating
from . import aten_pruner, depth, fx_pruner
from .blocks import ResidualBranch, find_branches, measure_branches
from .emit import EMITS
from .flops_search import search_flops
from .importance import Scorer, scorer_for
from .inputs import PrunedModelError, as_inputs, check_model, resolve_ignored, run_checked
from .report import PruneResult
from .tracing import UntraceableModelError, reads_training_flag, trace

SCOPES = ("global", "layer")
ANALYSES = ("auto", "fx", "export")
FLOPS_SEARCHES = ("threshold", "ratio")


def residual_branches(model: nn.Module, example_inputs, ignored: Sequence[Any] = (), *,
                      unit: str = "block", analysis: str = "auto",
                      example_kwargs: Optional[dict] = None) -> List[ResidualBranch]:
    """The residual branches of `model` that prune(remove_branches=[...]) can remove, in
    forward order, each with its stable `name` (a module path), the `flops` removing it
    saves and its Block Influence (ShortGPT) on `example_inputs` (blocks.ResidualBranch).

    `unit="block"` lists whole blocks (a decoder layer, a ResNet block), and a block that is
    no identity without its branch (a projection shortcut) by its branch; `unit="branch"`
    lists every residual add's branch on its own: a transformer layer's attention and MLP
    apart (depth.removals). prune() removes names of either list. `analysis` and
    `example_kwargs` as in prune(): "auto" is torch.export's capture; "fx" lists the torch.fx
    trace's branches (unit="branch" only). The model runs in eval mode and is left exactly
    as it was (every submodule's training flag included)."""
    check_model(model, "residual_branches")
    if analysis not in ANALYSES:
        raise ValueError(f"analysis must be one of {ANALYSES}, got {analysis!r}")
    if unit not in depth.UNITS:
        raise ValueError(f"unit must be one of {depth.UNITS}, got {unit!r}")
    inputs = as_inputs(example_inputs)
    ignored = resolve_ignored(model, ignored)
    if analysis != "fx":
        return depth.find(model, inputs, example_kwargs, ignored, unit)
    if example_kwargs or unit != "branch":
        raise ValueError("analysis='fx' traces the model with positional inputs and lists "
                         "each residual add's branch: pass unit='branch' and no "
                         "example_kwargs, or use the torch.export analysis")
    with evaluating(model), torch.no_grad():
        gm = trace(model, ignored)
        run_checked(gm, inputs, ShapeProp(gm).propagate)
        branches = find_branches(gm, ignored)
        measure_branches(gm, inputs, branches)
    return branches


def prune(model: nn.Module, example_inputs: Union[torch.Tensor, Sequence[torch.Tensor]], *,
          threshold: Optional[float] = None, ratio: Optional[float] = None,
          flops_target: Optional[float] = None, flops_search: str = "threshold",
          flops_tolerance: float = 0.02, flops_search_steps: int = 24,
          importance: Union[str, Scorer] = "l2",
          scope: str = "global", min_channels: int = 1, min_fraction: float = 0.1,
          round_to: Optional[int] = None,
          remove_blocks: Optional[bool] = None, remove_branches: Sequence[str] = (),
          fold_bn: bool = False, ignored: Sequence[Any] = (), inplace: bool = False,
          emit: str = "auto", analysis: str = "auto",
          example_kwargs: Optional[dict] = None) -> PruneResult:
    """Remove filters and residual branches from `model`; return a new compact model.

    What goes, at most one of:
    - `threshold=t`: every channel class whose importance score is <= t (importance.py;
      0 removes exactly the all-zero filters) and, with `remove_blocks`, every residual
      branch whose last layer's channels all score <= t (the same unit; without a
      threshold, the branches whose last layer emits exactly zero);
    - `ratio=r`: that fraction of the channel classes rounded up (ceil(r * n) of n: 3 heads
      at r=0.5 lose 2, as under Torch-Pruning), per "layer" (`scope`) or "global"ly: ranked
      across layers by their scores relative to their layer's mean (raw norms are not
      comparable across layers), every layer keeping at least the fraction `min_fraction`
      of its channels (0 turns that floor off);
    - `flops_target=f`: the smallest pruning (a search on `flops_search`, "threshold" or
      "ratio") that keeps at most the fraction f of the FLOPs, accepted within
      `flops_tolerance` below f, in at most `flops_search_steps` prunings; when the search
      cannot land there (a threshold removes whole blocks at once) it warns
      (FlopsTargetWarning) and the report's `warnings` say what it kept;
    - none of them, with `remove_branches` only.
    `remove_branches` lists residual branches by name (see residual_branches()) to remove
    whatever their scores. `remove_blocks` says whether the removable branches (above: under
    the threshold, or emitting exactly zero) go too: None (the default) means yes unless
    `remove_branches` names some, and then only the named ones go; True removes them as
    well as the named ones; False, only the named ones. `importance` is "l2", "l1", "bn" or a
    callable (module, following_bn) -> one score per output channel (importance.py).
    `ignored` lists modules (names, instances or classes) whose channels are kept.

    The result's model is, with `emit="auto"`, the model's own class with its layers and
    parameters sliced when that is all pruning changed, and a torch.fx.GraphModule when
    residual branches were removed (emit.py says why; "module" or "graph" ask for one).
    Its submodules have the training flags of the original's (all eval with `fold_bn`);
    the output is verified on the example inputs (report.relative_diff). With
    `inplace=False` the model is not modified at all; with `inplace=True` it is not copied:
    its modules are sliced and reused, and only `result.model` should be used afterwards
    (on the export path it is the model itself, `result.model is model`; on torch.fx, where
    a GraphModule was emitted, the model's own forward may still call removed branches).
    In place, the export path raises PrunedInPlaceError (a PrunedModelError) when a step
    fails after the model began to change, and the model is then part-pruned; a
    `flops_target` search measures its candidates on copies, one at a time, and cuts the
    chosen one in place; "auto" does not go on to torch.fx from a model pruned in place.

    `analysis` says which capture the analysis reads: "export" (torch.export's ATen graph,
    aten_pruner.py: every op seen, so functional layers such as timm's BatchNormAct2d and
    every Hugging Face transformer are cut; all of the above except `emit="graph"`, which
    it refuses by name; a residual branch, named by module path as residual_branches()
    lists it, is a whole block that leaves its nn.ModuleList or nn.Sequential, or a branch
    that leaves alone, a stand-in module in its place (sub_branches.py: an attention, an MLP,
    a block that becomes its projection shortcut); the result is always the model's own
    class, a Hugging Face config in step), "fx" (the
    torch.fx trace and its rule table) or "auto": "export", falling back to "fx" where the
    export path cannot serve and torch.fx traces the model (docs/export-design.md lists the
    cases; the report's warnings say which).
    `example_kwargs` (attention_mask=..., use_cache=False) are passed to the model with the
    example inputs, by the "export" analysis only (with them "auto" is "export"). The
    report's settings["path"] says which path ran.
    """
    start = time.perf_counter()
    check_model(model, "prune")
    _check_settings(threshold, ratio, flops_target, flops_search, flops_tolerance,
                    flops_search_steps, importance, scope, min_channels, min_fraction,
                    round_to, remove_blocks, remove_branches, emit)
    if analysis not in ANALYSES:
        raise ValueError(f"analysis must be one of {ANALYSES}, got {analysis!r}")
    inputs = as_inputs(example_inputs)
    if remove_blocks is None:  # a user who names branches means those branches
        remove_blocks = not remove_branches
    on_export = dict(threshold=threshold, ratio=ratio, flops_target=flops_target,
                     flops_search=flops_search, flops_tolerance=flops_tolerance,
                     flops_search_steps=flops_search_steps, importance=importance, scope=scope,
                     min_channels=min_channels, min_fraction=min_fraction, round_to=round_to,
                     remove_blocks=remove_blocks, remove_branches=remove_branches,
                     fold_bn=fold_bn, ignored=ignored, inplace=inplace, emit=emit)
    if example_kwargs and analysis == "fx":
        raise ValueError("example_kwargs are passed by the torch.export analysis only; "
                         "analysis='fx' traces the model with positional inputs")
    fx_only = aten_pruner.needs_fx(emit)
    if analysis == "export" or example_kwargs:
        why = "analysis='export'" if analysis == "export" else \
            "example_kwargs are passed to the model"
        return _timed(aten_pruner.prune(model, inputs, example_kwargs, **on_export, why=why),
                      start)
    export_failure = None  # why the torch.export path could not serve "auto"
    if analysis == "auto" and not fx_only:
        try:
            return _timed(aten_pruner.prune(model, inputs, None, **on_export,
                                            why="analysis='auto'"), start)
        except aten_pruner.PrunedInPlaceError:
            raise  # the model is changed: torch.fx cannot start from it
        except (PrunedModelError, UncapturableModelError) as error:
            export_failure = error
    options = dict(importance=importance, scope=scope, min_channels=min_channels,
                   min_fraction=min_fraction, round_to=round_to, remove_blocks=remove_blocks,
                   remove_branches=list(remove_branches), fold_bn=fold_bn,
                   ignored=resolve_ignored(model, ignored), emit=emit)
    # Traced twice more (train and eval code): once per call, not per step of a FLOPs search,
    # and before an in-place prune changes the model.
    try:
        reads_flag = reads_training_flag(model, options["ignored"])
    except UntraceableModelError as error:
        if isinstance(export_failure, UncapturableModelError):
            raise UntraceableModelError(f"{error}; torch.export cannot capture it either: "
                                        f"{export_failure}") from export_failure
        if export_failure is not None:
            raise export_failure from error
        if analysis == "fx":
            raise
        try:  # fx-only options asked: the export path refuses them by name
            return _timed(aten_pruner.prune(model, inputs, None, **on_export,
                                           why=f"torch.fx cannot trace the model: {error}"),
                          start)
        except UncapturableModelError as export_error:
            raise UntraceableModelError(f"{error}; torch.export cannot capture it either: "
                                        f"{export_error}") from export_error
    options["trains_differently"] = reads_flag
    if flops_target is None:
        result = fx_pruner.prune_once(model, inputs, threshold, ratio, inplace, **options)
    else:
        result = search_flops(fx_pruner.prune_once, model, inputs, flops_target, flops_search,
                              flops_tolerance, flops_search_steps, inplace, options)
    if reads_flag and isinstance(result.model, fx.GraphModule):
        result.report.warnings.insert(0, fx_pruner.TRAINING_FLAG_NOTE)
    if export_failure is not None:
        result.report.warnings.insert(0, (
            f"the torch.export analysis could not prune this model "
            f"({type(export_failure).__name__}: {export_failure}); the torch.fx analysis did"))
    return _timed(result, start)


def _timed(result: PruneResult, start: float) -> PruneResult:
    result.report.seconds = time.perf_counter() - start
    return result


def _check_settings(threshold, ratio, flops_target, flops_search, flops_tolerance,
                    flops_search_steps, importance, scope, min_channels, min_fraction,
                    round_to, remove_blocks, remove_branches, emit) -> None:
    given = [name for name, value in (("threshold", threshold), ("ratio", ratio),
                                      ("flops_target", flops_target)) if value is not None]
    if len(given) > 1 or (not given and not remove_branches):
        raise ValueError("prune() needs exactly one of threshold=, ratio= or flops_target= "
                         f"(or only remove_branches=), got threshold={threshold!r}, "
                         f"ratio={ratio!r} and flops_target={flops_target!r}")
    if ratio is not None and not 0 <= ratio < 1:
        raise ValueError(
            f"ratio must be in [0, 1) (the fraction of channels removed), got {ratio!r}")
    if threshold is not None and not threshold >= 0:
        raise ValueError(f"threshold must be >= 0, got {threshold!r}")
    if flops_target is not None and not 0 < flops_target < 1:
        raise ValueError(f"flops_target must be in (0, 1) (the fraction of the FLOPs kept), "
                         f"got {flops_target!r}")
    if flops_search not in FLOPS_SEARCHES:
        raise ValueError(f"flops_search must be one of {FLOPS_SEARCHES}, got {flops_search!r}")
    if not 0 <= flops_tolerance < 1:
        raise ValueError(f"flops_tolerance must be in [0, 1), got {flops_tolerance!r}")
    if not isinstance(flops_search_steps, int) or flops_search_steps < 1:
        raise ValueError(f"flops_search_steps must be an int >= 1, got {flops_search_steps!r}")
    scorer_for(importance)  # raises for an unknown name
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if not isinstance(min_channels, int) or min_channels < 1:
        raise ValueError(f"min_channels must be an int >= 1, got {min_channels!r} (a branch "
                         "that should vanish entirely is removed by remove_blocks instead)")
    if isinstance(min_fraction, bool) or not isinstance(min_fraction, (int, float)) or not (
            0 <= min_fraction <= 1):
        raise ValueError(f"min_fraction must be a number in [0, 1] (the fraction of each "
                         f"layer's channels a global ratio keeps), got {min_fraction!r}")
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to must be None or an int >= 1, got {round_to!r}")
    if emit not in EMITS:
        raise ValueError(f"emit must be one of {EMITS}, got {emit!r}")
    if remove_blocks is not None and not isinstance(remove_blocks, bool):
        raise TypeError(f"remove_blocks must be None, True or False, got {remove_blocks!r}")
    if isinstance(remove_branches, str):
        raise TypeError(f"remove_branches must be a list of branch names, got the string "
                        f"{remove_branches!r}; write remove_branches=[{remove_branches!r}]")
