"""prune() on torch.export's capture, step by step: residual branches out (aten_blocks.py;
depth.py: whole blocks out of their containers, sub_branches.py: a branch alone, a stand-in
in its module's place), then channels cut on a study of the model without them
(aten_study.py: the capture analysed and scored once, every candidate of a FLOPs search
planning on it; the cut itself in aten_cut.py), then with `fold_bn` its BatchNorms folded
(aten_fold.py), each step verified. Importance (`importance=` "l2", "l1" or "bn") is what
each channel emits (aten_importance.py), on the scale the torch.fx path uses, so a
threshold compares channels and residual blocks in one unit; a callable importance scores
the modules as on the torch.fx path (aten_scorer.py).

The result is the model's own class, a deep copy (with `inplace` the model itself, never
copied) with its branches removed, its tensors sliced and its size attributes (and a Hugging
Face config) fixed. The branches' removal is verified against the original with the removed
branches zeroed (depth.py), the channel cut against the model it cut with the removed
positions zeroed (aten_cut.py): each must agree to float32 rounding, else PrunedModelError.
In place, a block removal that fails gives the model its blocks back (the scores' choice
falls back as on a copy); any later failure raises PrunedInPlaceError, the model left
part-pruned. `prune` is the whole path, in phases: analyse and score, cut (branches, then
channels: `ChannelCut`), report and fold; a cut that fails in training mode is analysed
again on the training-mode capture.
"""
import contextlib
from typing import List, Optional

from torch import nn

from ..metrics import count_params
from ..modes import run_evaluating, training_failure
from . import aten_fold
from .aten_blocks import BlockSteps, choose_blocks
from .aten_branches import dead_branches
from .aten_cut import after_blocks, cut_channels, structure
from .aten_study import exact_emitters, study
from .emit import attach_structure
from .flops_search import search_flops
from .importance import label
from .inputs import PrunedModelError, resolve_ignored
from .report import PruneResult


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
        raise TrainingOnlyCodeError(
            f"the pruned {type(model).__name__} fails in training mode, where the "
            f"original runs: {type(failure).__name__}: {failure}. Code that runs only in "
            "training (an auxiliary head) reads channels the capture did not see") from failure


class TrainingOnlyCodeError(PrunedModelError):
    """The cut fails in training mode, where the original runs (check_training)."""


# Said in the report of a cut analysed on the training-mode capture.
TRAINING_CAPTURE_NOTE = (
    "the model runs code in training mode that eval mode does not (an auxiliary head), "
    "which read channels the eval-mode capture cut: the cut was analysed on the "
    "training-mode capture, so that code is cut with them")


def needs_fx(emit) -> List[str]:
    """The options of a prune() call that only the torch.fx path has."""
    return ["emit='graph'"] if emit == "graph" else []


def prune(model: nn.Module, inputs, kwargs: Optional[dict], *, inplace, why: str, **options
          ) -> PruneResult:
    """prune() on torch.export's capture (module docstring), its arguments as prune()'s:
    residual branches out, then channels; the options only the torch.fx path has are
    refused by name. A branch that scores at most the threshold but that no removal can
    take out (depth.py, sub_branches.py) stays, listed in the report's `kept_dead_branches`
    with a warning. With `inplace` the model itself is cut, never copied, and is the
    result's model; every step verified as on a copy (each zeroed reference computed before
    the model changes), a failure after it changed raises PrunedInPlaceError. A FLOPs search
    measures each candidate on a copy, one at a time, and cuts the chosen one in place.

    The cut is analysed on the eval-mode capture; where it then fails in training mode (code
    only training runs reads cut channels), on a copy it is analysed again on the
    training-mode capture, which holds that code, and the report says so."""
    try:  # in place the failure is a PrunedInPlaceError, which is not caught here
        return _prune(model, inputs, kwargs, inplace=inplace, why=why, training=False,
                      **options)
    except TrainingOnlyCodeError:
        pass
    result = _prune(model, inputs, kwargs, inplace=False, why=why, training=True, **options)
    result.report.warnings.insert(0, TRAINING_CAPTURE_NOTE)
    return result


def _prune(model: nn.Module, inputs, kwargs: Optional[dict], *, threshold, ratio,
           flops_target, flops_search, flops_tolerance, flops_search_steps, importance, scope,
           min_channels, min_fraction, round_to, remove_blocks, remove_branches, fold_bn,
           ignored, inplace, emit, why: str, training: bool) -> PruneResult:
    fx_only = needs_fx(emit)
    if fx_only:
        raise ValueError(f"{fx_only} need the torch.fx analysis, which cannot serve here "
                         f"({why})")
    kwargs = dict(kwargs or {})
    ignored = resolve_ignored(model, ignored)
    # analyse and score
    first = study(model, inputs, kwargs, importance, ignored, training)
    # a threshold (given, or tried by a FLOPs search) compares blocks in the importance's
    # unit; without one a block goes only if it emits exactly zero
    thresholded = threshold is not None or (flops_target is not None
                                            and flops_search == "threshold")
    scored = first.emitters if thresholded or importance == "l2" else exact_emitters(first)
    choice = choose_blocks(first, ignored, scored, remove_branches, remove_blocks)
    limit = threshold or 0.0  # without a threshold: the blocks that emit exactly zero
    going = choice.at(limit)
    stranded = dead_branches(first.capture, first.analysis, scored, limit,
                             [n for n in going if choice.removals[n].kind == "block"]
                             + list(ignored),
                             {choice.removals[n].add for n in going}) if remove_blocks else []
    steps = BlockSteps(model, inputs, kwargs, choice, first, importance, ignored)
    # cut: the blocks, then (if asked) the channels, each verified
    if threshold is None and ratio is None and flops_target is None:
        step = steps.without(choice.at(limit), inplace)
        result = PruneResult(step.model, step.report,
                             structure(step.removed, {}, choice.replaced(step.removed)))
        result.report.warnings[:0] = step.notes
    else:
        cut = ChannelCut(model, inputs, kwargs, steps, dict(
            scope=scope, min_channels=min_channels, min_fraction=min_fraction,
            round_to=round_to, remove_dead=bool(remove_blocks)), single=flops_target is None)
        if flops_target is None:
            result = cut(model, inputs, threshold, ratio, inplace)
        else:
            result = search_flops(cut, model, inputs, flops_target, flops_search,
                                  flops_tolerance, flops_search_steps, inplace, {})
        with changing(model, inplace):  # once, on the cut chosen
            check_training(model, result.model, inputs, kwargs, cut.model_trains)
    # report, fold, record
    if stranded:
        result.report.warnings.insert(0, (
            f"residual branches added in {stranded} emit at most the threshold but stay: no "
            "stand-in can take their place (docs/export-design.md, \"Residual branches that "
            "leave alone\"); their interiors the output never sees are cut"))
    result.report.kept_dead_branches = list(stranded)
    if fold_bn:
        # the study the result was cut from; None: a search's last try removed other blocks,
        # so the folding captures the result itself
        work = steps.studied(tuple(result.structure["removed_blocks"]))
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


class ChannelCut:
    """The channels cut at a threshold or a ratio after the blocks the choice picks under
    that threshold (a FLOPs search on the threshold removes more blocks as it goes), verified:
    a callable with the signature search_flops calls (its `model` and `inputs` are the ones
    given here)."""

    def __init__(self, model: nn.Module, inputs, kwargs: dict, steps: BlockSteps,
                 plan_options: dict, single: bool):
        self.model, self.inputs, self.kwargs, self.steps = model, inputs, kwargs, steps
        self.plan_options, self.single = plan_options, single
        # the original's output, what the report's difference to the original is taken to
        self.original = run_evaluating(model, inputs, kwargs) if steps.choice.scores \
            else None
        # whether the original runs in training mode, asked while it is still there: in
        # place it is gone by the time the cut is run in training mode (None: ask then)
        self.model_trains: Optional[bool] = None

    def __call__(self, _model, _inputs, threshold, ratio, inplace) -> PruneResult:
        if inplace and self.model_trains is None:
            self.model_trains = training_failure(self.model, self.inputs, self.kwargs) is None
        step = self.steps.without(self.steps.choice.at(threshold or 0.0), inplace)
        with changing(self.model, inplace):
            pruned, report, keep = cut_channels(
                self.steps.study(step), threshold=threshold, ratio=ratio, **self.plan_options,
                # a search's candidates share the blocks' copy; a single cut consumes it
                in_place=inplace or (bool(step.removed) and self.single),
                original=self.original if step.removed else None)
            if step.removed:
                after_blocks(report, step.report)
        report.warnings[:0] = step.notes
        return PruneResult(pruned, report, structure(step.removed, keep,
                                                     self.steps.choice.replaced(step.removed)))
