"""prune() on torch.export's capture, step by step: residual blocks out of their containers
(depth.py), then channels cut on a study of the model without them (aten_study.py: the
capture analysed and scored once, every candidate of a FLOPs search planning on it; the cut
itself in aten_cut.py), then with `fold_bn` its BatchNorms folded (aten_fold.py), each step
verified. Importance (`importance=` "l2", "l1" or "bn") is what each channel emits
(aten_importance.py), on the scale the torch.fx path uses, so a threshold compares channels
and residual blocks in one unit; a callable importance scores the modules as on the torch.fx
path (aten_scorer.py).

The result is the model's own class, a deep copy (with `inplace` the model itself, never
copied) with its blocks removed, its tensors sliced and its size attributes (and a Hugging
Face config) fixed. The blocks' removal is verified against the original with the removed
blocks zeroed (depth.py), the channel cut against the model it cut with the removed
positions zeroed (aten_cut.py): each must agree to float32 rounding, else PrunedModelError.
In place, a block removal that fails gives the model its blocks back (the scores' choice
falls back as on a copy); any later failure raises PrunedInPlaceError, the model left
part-pruned. `prune` at the end of this file is the whole path.
"""
import contextlib
from typing import Dict, List, Optional, Sequence, Tuple

from torch import nn

from ..metrics import count_params
from ..modes import run_evaluating, training_failure
from . import aten_fold, depth
from .aten_branches import block_score, dead_branches
from .aten_cut import after_blocks, cut_channels, structure
from .aten_importance import Emitter
from .aten_study import Study, exact_emitters, study
from .emit import attach_structure
from .flops_search import search_flops
from .importance import label
from .inputs import PrunedModelError, resolve_ignored
from .report import PruneResult, max_abs_diff


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


def removable_blocks(work: Study, ignored: Sequence[str], scored: List[Emitter]
                     ) -> Dict[str, Optional[float]]:
    """Every block depth.py can remove (outside `ignored`), in forward order, with its score:
    the largest that its branches' tails emit into the stream by the emitters `scored`
    (None: nothing scores it)."""
    return {block: block_score(work.capture, work.analysis, scored, block)
            for block in depth.removable_blocks(work.model, work.capture)
            if not depth.inside(block, ignored)}


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


def needs_fx(emit) -> List[str]:
    """The options of a prune() call that only the torch.fx path has."""
    return ["emit='graph'"] if emit == "graph" else []


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
    fx_only = needs_fx(emit)
    if fx_only:
        raise ValueError(f"{fx_only} need the torch.fx analysis, which cannot serve here "
                         f"({why})")
    kwargs = dict(kwargs or {})
    ignored = resolve_ignored(model, ignored)
    first = study(model, inputs, kwargs, importance, ignored)
    notes: List[str] = []
    # a threshold (given, or tried by a FLOPs search) compares blocks in the importance's
    # unit; without one a block goes only if it emits exactly zero
    thresholded = threshold is not None or (flops_target is not None
                                            and flops_search == "threshold")
    scored = first.emitters if thresholded or importance == "l2" else exact_emitters(first)
    blocks = removable_blocks(first, ignored, scored) if remove_branches or remove_blocks \
        else {}
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
    stranded = dead_branches(first.capture, first.analysis, scored, limit,
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
        importance=label(importance),
        scope=scope, min_channels=min_channels, min_fraction=min_fraction, round_to=round_to,
        remove_blocks=bool(remove_blocks), remove_branches=list(remove_branches),
        ignored=list(ignored))
    attach_structure(result.model, result.structure)
    return result
