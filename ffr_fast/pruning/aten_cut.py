"""The channel step of prune() on torch.export's capture: a study's plan turned into the
positions each tensor keeps, the model's tensors sliced to them by name (slicing.py), the
sizes its modules and a Hugging Face config state fixed, and the result verified against
the model with every removed position zeroed and every cut LayerNorm normalising over its
kept channels (KeptChannelNorms). What save_pruned stores of a cut is written here too.
"""
import copy
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..capture import flat_tensors
from ..metrics import attention_fast_path_off, count_params, flops_of
from ..modes import run_evaluating
from .aten import Analysis
from .aten_norms import KeptChannelNorms, cut_norms
from .aten_study import Study
from .inputs import PrunedModelError
from .plan import make_plan
from .report import PruneReport, max_abs_diff
from .slicing import (
    Keep,
    fix_sizes,
    rescale_rms_norms,
    rms_norm_eps,
    slice_tensors,
    update_config,
    zero_removed,
)

EXACT = 1e-4  # relative difference to the zeroed original that float32 rounding stays under
STRUCTURE_FORMAT = "ffr_fast.aten/1"


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


def narrowing(work: Study, removed: set) -> Callable[[object], List[torch.Tensor]]:
    """The tensors of an output of the studied model (flattened), each of the outputs the cut
    may narrow (Study.free_outputs) narrowed to the positions it keeps: what the pruned
    model's output is compared with."""
    mask = np.zeros(work.analysis.cg.size, dtype=bool)
    mask[list(removed)] = True
    kept: Dict[int, List[torch.Tensor]] = {}
    for index, node in enumerate(work.capture.output_names):
        dims = work.analysis.values.get(node) if node in work.free_outputs else None
        if isinstance(dims, list):
            kept[index] = [torch.from_numpy(np.flatnonzero(~mask[work.analysis.cg.roots(ids)]))
                           for ids in dims]

    def narrow(output) -> List[torch.Tensor]:
        tensors = flat_tensors(output)
        for index, dims in kept.items():
            for dim, positions in enumerate(dims):
                tensors[index] = tensors[index].index_select(dim, positions)
        return tensors
    return narrow


def cut_channels(work: Study, *, threshold, ratio, scope, min_channels, min_fraction,
                 round_to, remove_dead: bool, in_place: bool = False, original=None
                 ) -> Tuple[nn.Module, PruneReport, Keep]:
    """The studied model with the planned channel classes cut (with `remove_dead` also the
    classes the output never sees), verified: a copy, or with `in_place` the study's own
    model (a copy prune() made and needs no more, so that the peak memory is two models, not
    three; or the caller's model, with prune(inplace=True)). The report's difference to the
    original is taken to `original` (an output of the same structure; the study's own by
    default)."""
    model, args, kwargs, analysis = work.model, work.args, work.kwargs, work.analysis
    layers = analysis.layers()
    plan = make_plan(analysis.cg, work.scores, threshold=threshold, ratio=ratio, scope=scope,
                     min_channels=min_channels, min_fraction=min_fraction, round_to=round_to,
                     layers=layers, dead=work.dead if remove_dead else frozenset())
    keep = kept_positions(analysis, plan.removed)
    narrow = narrowing(work, plan.removed)
    params_before = count_params(model)
    original, flops_before = work.output if original is None else original, work.flops
    pruned = model if in_place else copy.deepcopy(model)
    zero_removed(pruned, keep)  # slicing drops exactly the zeroed positions
    renormalised = cut_norms(analysis, plan.removed)
    with KeptChannelNorms(pruned, renormalised), attention_fast_path_off():  # as flops_of
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
    removed = np.zeros(analysis.cg.size, dtype=bool)  # one mask, not a search per layer
    removed[list(plan.removed)] = True
    channels = {name: (len(ids), int((~removed[roots(ids)]).sum())) for name, ids in layers}
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
        max_abs_diff=max_abs_diff(new, narrow(reference)),
        reference_max_abs=max(float(t.float().abs().max()) for t in flat_tensors(reference)),
        max_abs_diff_original=max_abs_diff(new, narrow(original)), warnings=warnings)
    narrowed = {field: (full.shape[-1], cut.shape[-1]) for field, full, cut in zip(
        work.capture.output_names.values(), flat_tensors(reference), flat_tensors(new))
        if field in work.free_outputs.values() and full.shape != cut.shape}
    if narrowed:
        report.warnings.append(
            f"the model's outputs {narrowed} (channels before, after) are narrower: hidden "
            "states handed out beside the model's first output do not keep their channels "
            "(the first output does)")
    if not report.relative_diff <= EXACT:  # a NaN (the reference's own) fails too
        raise PrunedModelError(
            f"the pruned {type(model).__name__} differs from the original with the removed "
            f"channels zeroed by {report.relative_diff:.3g} (relative) on the example call: "
            "a layer's code reads a size the slicing did not fix (register_size_rule teaches "
            "it one); please report the model")
    return pruned, report, keep


def after_blocks(channel_report: PruneReport, block_report: PruneReport) -> PruneReport:
    """The channel cut's report on a model whose blocks were removed first, counted from the
    original: its parameters, FLOPs and blocks."""
    channel_report.params_before = block_report.params_before
    channel_report.flops_before = block_report.flops_before
    channel_report.removed_blocks = block_report.removed_blocks
    return channel_report


def structure(removed_blocks: Sequence[str], keep: Keep, replaced: Sequence[dict] = ()
              ) -> dict:
    """What save_pruned stores: the branches removed (`replaced`: how those that left alone
    did, sub_branches.Removal.record), then per cut tensor and per dim the positions kept,
    then the BatchNorms folded (fold_bn fills them in; load_pruned replays all of it on the
    original architecture)."""
    return {"format": STRUCTURE_FORMAT, "removed_blocks": list(removed_blocks),
            "replaced": list(replaced), "folded_bn": [],
            "kept": {name: [None if index is None else index.tolist() for index in dims]
                     for name, dims in keep.items()}}


