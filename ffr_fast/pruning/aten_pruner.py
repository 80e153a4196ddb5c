"""prune() on torch.export's capture: residual blocks out of their containers (depth.py),
then channels cut by the ATen analysis (aten.py) and its plan (plan.py), the model's own
tensors sliced by name (slicing.py), each step verified.

The model is captured and analysed once per step (a *Study*): every candidate of a FLOPs
search plans on the same study. Importance (`importance=` "l2", "l1" or "bn") is what each
channel emits (aten_importance.py), on the scale the torch.fx path uses, so a threshold
compares channels and residual blocks in one unit.

The result is the model's own class, a deep copy (with `inplace` the model itself, never
copied) with its blocks removed, its tensors sliced and its size attributes (and a Hugging
Face config) fixed, with `fold_bn` its BatchNorms folded (aten_fold.py). The blocks'
removal is verified against the original with the removed blocks zeroed (depth.py); the
channel cut against the model it cut with every removed position of every parameter zeroed
and every cut LayerNorm normalising over its kept channels (KeptChannelNorms): it must
agree to float32 rounding, else PrunedModelError. In place, a block removal that fails gives
the model its blocks back (the scores' choice falls back as on a copy); any later failure
raises PrunedInPlaceError, the model left part-pruned. `prune` at the end of this file is
the whole path, step by step.
"""
import contextlib
import copy
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..capture import Capture, capture, flat_tensors
from ..metrics import count_params, flops_of
from ..modes import run_evaluating, training_failure
from . import aten_fold, depth
from .aten import Analysis, analyze
from .aten_branches import block_score, dead_branches
from .aten_importance import Emitter, class_scores, emitters
from .aten_norms import KeptChannelNorms, cut_norms
from .emit import attach_structure
from .flops_search import search_flops
from .inputs import PrunedModelError, resolve_ignored, run_checked
from .plan import make_plan
from .report import PruneReport, PruneResult, max_abs_diff
from .slicing import (
    Keep,
    fix_sizes,
    rescale_rms_norms,
    rms_norm_eps,
    rms_norm_paths,
    slice_tensors,
    update_config,
    zero_removed,
)

EXACT = 1e-4  # relative difference to the zeroed original that float32 rounding stays under
STRUCTURE_FORMAT = "ffr_fast.aten/1"


class PrunedInPlaceError(PrunedModelError):
    """prune(inplace=True) failed after it began changing the model: blocks removed, tensors
    zeroed or sliced. The model is left in that state; the failure is chained as the cause."""


@contextlib.contextmanager
def changing(model: nn.Module, in_place: bool):
    """With `in_place` (the caller's model is being pruned), a failure inside says that the
    model is left part-pruned."""
    try:
        yield
    except Exception as error:
        if not in_place or isinstance(error, PrunedInPlaceError):
            raise
        raise PrunedInPlaceError(
            f"pruning failed ({type(error).__name__}: {error}) after it began changing the "
            f"{type(model).__name__}: the model was pruned in place and is now in an "
            "inconsistent state (blocks removed, channels zeroed or sliced); load it again, "
            "and prune a copy or use inplace=False") from error


class NotABlockError(ValueError):
    """remove_branches names a branch that is not a whole removable block of the capture (a
    sub-branch of a block, a block with a projection shortcut): only the torch.fx path's
    rewired graph can remove it."""


@dataclass
class Study:
    """One capture of a model, analysed and scored once."""
    model: nn.Module
    args: tuple
    kwargs: dict
    capture: Capture
    analysis: Analysis
    emitters: List[Emitter]
    scores: Dict[int, float]  # channel class root -> importance
    output: object  # the model's output on the example call, eval mode
    flops: int  # and its FLOPs


def study(model: nn.Module, args, kwargs: dict, importance: str, ignored: Sequence[str]
          ) -> Study:
    """The model captured on the example call, its channel classes (the channels of every
    module in `ignored` pinned) and their scores; its output and FLOPs (what every candidate
    cut of the model is measured against)."""
    cap = capture(model, args, kwargs)
    analysis = analyze(cap, rms_norm_paths(model))
    _pin_ignored(analysis, cap, ignored)
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    found = emitters(analysis, cap, tensors, importance)
    # the inputs' fault named as such (the capture runs on fake tensors, which miss some)
    output, flops = run_checked(model, args, lambda *a: run_evaluating(model, a, kwargs))
    return Study(model, tuple(args), kwargs, cap, analysis, found,
                 class_scores(analysis, found), output, flops)


def _pin_ignored(analysis: Analysis, cap: Capture, ignored: Sequence[str]) -> None:
    """Keep every channel a module of `ignored` holds, reads or writes (what the torch.fx
    path does by tracing it as a leaf)."""
    if not ignored:
        return
    reason = "read or written by an ignored module"
    for name, ids in analysis.tensors.items():
        if depth.inside(name.rpartition(".")[0], ignored):
            for dim in ids:
                analysis.cg.pin(dim, reason)
    for node in cap.graph.nodes:
        if not any(depth.inside(cap.calls[call].path, ignored) for call in cap.call_stack(node)):
            continue
        for value in [analysis.values.get(node.name)] + [
                analysis.values.get(arg.name) for arg in node.all_input_nodes]:
            for ids in (value if isinstance(value, list) else []):
                analysis.cg.pin(ids, reason)


def removable_blocks(work: Study, ignored: Sequence[str]) -> Dict[str, Optional[float]]:
    """Every block depth.py can remove (outside `ignored`), in forward order, with its score:
    the largest that its branches' tails emit into the stream (None: nothing scores it)."""
    return {block: block_score(work.capture, work.analysis, work.emitters, block)
            for block in depth.removable_blocks(work.model, work.capture)
            if not depth.inside(block, ignored)}


def kept_positions(analysis: Analysis, removed: set) -> Keep:
    """For every tensor that loses positions: the kept positions of each of its dims (None
    for a dim that keeps all)."""
    mask = np.zeros(analysis.cg.size, dtype=bool)
    mask[list(removed)] = True
    keep: Keep = {}
    for name, dims in analysis.tensors.items():
        kept = [np.flatnonzero(~mask[analysis.cg.roots(ids)]) for ids in dims]
        if any(len(k) < len(ids) for k, ids in zip(kept, dims)):
            keep[name] = [torch.from_numpy(k) if len(k) < len(ids) else None
                          for k, ids in zip(kept, dims)]
    return keep


def apply_keep(model: nn.Module, keep: Keep) -> List[str]:
    """Slice `model`'s tensors to `keep` in place and fix the sizes its modules (and a Hugging
    Face config) state; returns the config warnings (what pruning and load_pruned both do)."""
    rescale_rms_norms(model, keep)
    slice_tensors(model, keep)
    changed = {name.rpartition(".")[0] for name in keep}
    changed |= {path.rpartition(".")[0] for path in changed if path}  # attention, MLP blocks
    return update_config(model, {**fix_sizes(model, changed), **rms_norm_eps(model)})


def cut_channels(work: Study, *, threshold, ratio, scope, min_channels, min_fraction,
                 round_to, in_place: bool = False) -> Tuple[nn.Module, PruneReport, Keep]:
    """The studied model with the planned channel classes cut, verified: a copy, or with
    `in_place` the study's own model (a copy prune() made and needs no more, so that the peak
    memory is two models, not three; or the caller's model, with prune(inplace=True))."""
    model, args, kwargs, analysis = work.model, work.args, work.kwargs, work.analysis
    layers = analysis.layers()
    plan = make_plan(analysis.cg, work.scores, threshold=threshold, ratio=ratio, scope=scope,
                     min_channels=min_channels, min_fraction=min_fraction, round_to=round_to,
                     layers=layers)
    keep = kept_positions(analysis, plan.removed)
    params_before = count_params(model)
    original, flops_before = work.output, work.flops
    pruned = model if in_place else copy.deepcopy(model)
    zero_removed(pruned, keep)  # slicing drops exactly the zeroed positions
    renormalised = cut_norms(analysis, plan.removed)
    with KeptChannelNorms(pruned, renormalised):
        reference = run_evaluating(pruned, args, kwargs)
    warnings = apply_keep(pruned, keep)
    try:
        new, flops_after = flops_of(run_evaluating, pruned, args, kwargs)
    except Exception as error:
        raise PrunedModelError(f"the pruned {type(model).__name__} failed on the example call "
                               f"the original ran: {type(error).__name__}: {error}. A layer's "
                               "code reads a size the slicing did not fix (register_size_rule "
                               "teaches it one); please report the model") from error
    roots = analysis.cg.roots
    channels = {name: (len(ids), int(np.isin(roots(ids), list(plan.removed), invert=True).sum()))
                for name, ids in layers}
    layer_roots = set(np.concatenate([roots(ids) for _, ids in layers]).tolist()) if layers \
        else set()
    opaque = [{"op": op["op"], "reason": op["reason"]} for op in analysis.unknown_ops
              if op["ids"] and layer_roots & set(np.concatenate(
                  [roots(d) for d in op["ids"]]).tolist())]
    report = PruneReport(
        settings={}, params_before=params_before, params_after=count_params(pruned),
        flops_before=flops_before, flops_after=flops_after, channels=channels,
        removed_classes=len(plan.removed),
        prunable_classes=sum(len(g.roots) - len(g.pinned) for g in plan.groups),
        unpruned=plan.unpruned, opaque_ops=opaque, score_cutoff=plan.cutoff,
        approximate=sorted({layer for layer, _, _ in renormalised}),
        max_abs_diff=max_abs_diff(new, reference),
        reference_max_abs=max(float(t.float().abs().max()) for t in flat_tensors(reference)),
        max_abs_diff_original=max_abs_diff(new, original), warnings=warnings)
    if report.relative_diff > EXACT:
        raise PrunedModelError(
            f"the pruned {type(model).__name__} differs from the original with the removed "
            f"channels zeroed by {report.relative_diff:.3g} (relative) on the example call: "
            "a layer's code reads a size the slicing did not fix (register_size_rule teaches "
            "it one); please report the model")
    return pruned, report, keep


def check_training(model: nn.Module, pruned: nn.Module, args, kwargs: dict,
                   model_trains: Optional[bool] = None) -> None:
    """PrunedModelError if `pruned`, cut from `model`, fails in training mode where `model`
    runs: code that runs only in training (an auxiliary head) reads channels the eval-mode
    capture did not see. `model` is run in training mode only when `pruned` fails there,
    unless `model_trains` says already (pruned in place, the original is gone)."""
    failure = training_failure(pruned, args, kwargs)
    if failure is None:
        return
    if model_trains is None:
        model_trains = training_failure(model, args, kwargs) is None
    if model_trains:
        raise PrunedModelError(
            f"the pruned {type(model).__name__} fails in training mode, where the "
            f"original runs: {type(failure).__name__}: {failure}. Code that runs only in "
            "training (an auxiliary head) reads channels the eval-mode capture did not see "
            "(analysis='fx' can emit the pruned graph instead)") from failure


def after_blocks(channel_report: PruneReport, block_report: PruneReport,
                 diff_to_original: float) -> PruneReport:
    """The channel cut's report on a model whose blocks were removed first, counted from the
    original: its parameters, FLOPs, blocks and the output's max difference to it."""
    channel_report.params_before = block_report.params_before
    channel_report.flops_before = block_report.flops_before
    channel_report.removed_blocks = block_report.removed_blocks
    channel_report.max_abs_diff_original = diff_to_original
    return channel_report


def structure(removed_blocks: Sequence[str], keep: Keep) -> dict:
    """What save_pruned stores: the blocks removed, then per cut tensor and per dim the
    positions kept, then the BatchNorms folded (fold_bn fills them in; load_pruned replays
    all three on the original architecture)."""
    return {"format": STRUCTURE_FORMAT, "removed_blocks": list(removed_blocks), "folded_bn": [],
            "kept": {name: [None if index is None else index.tolist() for index in dims]
                     for name, dims in keep.items()}}


def needs_fx(emit, importance) -> List[str]:
    """The options of a prune() call that only the torch.fx path has."""
    return [name for name, asked in (
        ("emit='graph'", emit == "graph"),
        ("a callable importance", callable(importance))) if asked]


def prune(model: nn.Module, inputs, kwargs: Optional[dict], *, threshold, ratio,
                     flops_target, flops_search, flops_tolerance, flops_search_steps,
                     importance, scope, min_channels, min_fraction, round_to, remove_blocks,
                     remove_branches, fold_bn, ignored, inplace, emit, why: str
                     ) -> PruneResult:
    """prune() on torch.export's capture (module docstring), its arguments as prune()'s:
    residual blocks out of their containers, then channels; the options only the torch.fx
    path has are refused by name. A branch that scores at most the threshold but is no
    whole block (an attention sub-branch, a downsampling block) stays, listed in the
    report's `kept_dead_branches` with a warning (torch.fx's rewired graph can remove it).
    With `inplace` the model itself is cut, never copied, and is the result's model; every
    step verified as on a copy (each zeroed reference computed before the model changes), a
    failure after it changed raises PrunedInPlaceError. A FLOPs search measures each
    candidate on a copy, one at a time, and cuts the chosen one in place."""
    fx_only = needs_fx(emit, importance)
    if fx_only:
        raise ValueError(f"{fx_only} need the torch.fx analysis, which cannot serve here "
                         f"({why})")
    kwargs = dict(kwargs or {})
    ignored = resolve_ignored(model, ignored)
    first = study(model, inputs, kwargs, importance, ignored)
    notes: List[str] = []
    blocks = removable_blocks(first, ignored) if remove_branches or remove_blocks else {}
    unknown = [name for name in remove_branches if name not in blocks]
    if unknown:
        raise NotABlockError(f"remove_branches: no residual branch named {unknown}; the "
                             f"model's branches are {list(blocks)}")

    def chosen_at(limit: float) -> Tuple[str, ...]:
        """The named blocks and, with remove_blocks, those scoring at most `limit`."""
        named = list(remove_branches)
        scored = [b for b, score in blocks.items() if remove_blocks and b not in named
                  and score is not None and score <= limit]
        return tuple(sorted(named + scored, key=list(blocks).index))

    limit = threshold or 0.0  # without a threshold: the blocks that emit exactly zero
    stranded = dead_branches(first.capture, first.analysis, first.emitters, limit,
                             list(chosen_at(limit)) + list(ignored)) if remove_blocks else []
    if stranded:
        notes.append(f"residual branches added in {stranded} emit at most the threshold "
                     "but are no whole removable blocks, so they stay")
    steps: Dict[tuple, tuple] = {}  # the last block step, by the blocks it chose and in_place
    studies: Dict[Tuple[str, ...], Study] = {}  # the last study, by the blocks its model lacks

    def without(chosen: Tuple[str, ...], in_place: bool):
        """(blocks removed, the model without them, their report, notes), verified: a copy,
        or with `in_place` the model itself (given its blocks back if they stay)."""
        if (chosen, in_place) not in steps:
            steps.clear()  # one model copy at a time, its study included
            studies.clear()
            removed, work_model, report, said = chosen, model, None, []
            if chosen:
                try:
                    work_model, report = depth.remove(model, inputs, kwargs, chosen,
                                                      list(blocks), in_place)
                except ValueError as error:  # a block the scores chose is no identity
                    scored = [b for b in chosen if b not in remove_branches]
                    if not scored:
                        raise
                    said.append(f"the blocks {scored} score at most the threshold but stay: "
                                f"{error}")
                    removed = tuple(remove_branches)
                    if removed:
                        work_model, report = depth.remove(model, inputs, kwargs, removed,
                                                          list(blocks), in_place)
                    else:
                        work_model = model
            steps[(chosen, in_place)] = (removed, work_model, report, said)
        return steps[(chosen, in_place)]

    work = None

    def studied(removed, work_model) -> Study:
        """The study of `work_model`, the model without the blocks `removed` (the model
        itself, removed in place, is studied again)."""
        if removed not in studies or studies[removed].model is not work_model:
            studies.clear()
            studies[removed] = study(work_model, inputs, kwargs, importance, ignored) \
                if removed else first
        return studies[removed]

    if threshold is None and ratio is None and flops_target is None:
        removed, work_model, block_report, said = without(chosen_at(limit), inplace)
        notes += said
        result = PruneResult(work_model, block_report, structure(removed, {}))
    else:
        original = run_evaluating(model, inputs, kwargs) if blocks else None
        # in place, the original is gone by the time the cut is run in training mode
        model_trains = training_failure(model, inputs, kwargs) is None if inplace else None

        def cut(_model, _inputs, threshold, ratio, inplace):
            """The channels cut at `threshold` or `ratio`, after the blocks scoring at most
            that threshold (a FLOPs search on the threshold removes more blocks as it goes):
            on a copy, or with `inplace` on the model itself."""
            removed, work_model, block_report, said = without(chosen_at(threshold or 0.0),
                                                              inplace)
            with changing(model, inplace):
                pruned, report, keep = cut_channels(
                    studied(removed, work_model), threshold=threshold, ratio=ratio,
                    scope=scope, min_channels=min_channels, min_fraction=min_fraction,
                    round_to=round_to,
                    # a search's candidates share the blocks' copy; a single cut consumes it
                    in_place=inplace or (bool(removed) and flops_target is None))
                if removed:
                    after_blocks(report, block_report, max_abs_diff(
                        run_evaluating(pruned, inputs, kwargs), original))
            report.warnings[:0] = said
            return PruneResult(pruned, report, structure(removed, keep))

        if flops_target is None:
            result = cut(model, inputs, threshold, ratio, inplace)
        else:
            result = search_flops(cut, model, inputs, flops_target, flops_search,
                                  flops_tolerance, flops_search_steps, inplace, {})
        # the study the result was cut from (None: the search's last try removed other
        # blocks, so the folding captures the result itself)
        work = studies.get(tuple(result.structure["removed_blocks"]))
        with changing(model, inplace):  # once, on the cut chosen
            check_training(model, result.model, inputs, kwargs, model_trains)
    result.report.warnings[:0] = notes
    result.report.kept_dead_branches = list(stranded)
    if fold_bn:
        with changing(model, inplace):
            result.report.folded_bn = aten_fold.fold_batch_norms(
                result.model, inputs, kwargs,
                None if work is None else (work.capture, work.analysis))
        result.structure["folded_bn"] = [list(pair) for pair in result.report.folded_bn]
        result.report.params_after = count_params(result.model)  # the BatchNorms' are gone
    result.report.settings.update(
        path="torch.export", why=why, fold_bn=fold_bn, threshold=threshold, ratio=ratio,
        importance=importance,
        scope=scope, min_channels=min_channels, min_fraction=min_fraction, round_to=round_to,
        remove_blocks=bool(remove_blocks), remove_branches=list(remove_branches),
        ignored=list(ignored))
    attach_structure(result.model, result.structure)
    return result
