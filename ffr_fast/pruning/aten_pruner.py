"""prune() on torch.export's capture: the ATen channel analysis (aten.py), the plan
(plan.py), the model's own tensors sliced by name (slicing.py), verified.

Importance (`importance="l2"` or "l1") of a channel class: the largest norm of a row of a
parameter that writes it (a producer: a linear layer's or convolution's output row, with its
bias; an embedding's column), so an attention head, whose class holds its q, k and v rows,
scores by them. Normalisation affines are not folded in.

The result is the model's own class, a deep copy with its tensors sliced and its size
attributes (and a Hugging Face config) fixed, verified on the example call against the
original with every removed position of every parameter zeroed: it must agree to float32
rounding (the analysis keeps renormalised channels whole, so it is exact), else
PrunedModelError.
"""
import copy
import time
from typing import Dict, Optional

import numpy as np
import torch
from torch import nn

from ..capture import capture, flat_tensors
from ..metrics import count_params, flops_of
from ..modes import evaluating, run_evaluating
from .aten import Analysis, analyze
from .inputs import PrunedModelError
from .plan import make_plan
from .report import PruneReport, max_abs_diff
from .slicing import Keep, fix_sizes, slice_tensors, update_config, zeroed

EXACT = 1e-4  # relative difference to the zeroed original that float32 rounding stays under
STRUCTURE_FORMAT = "ffr_fast.aten/1"
IMPORTANCES = {"l2": 2, "l1": 1}


def class_scores(analysis: Analysis, tensors: Dict[str, torch.Tensor], order: int
                 ) -> Dict[int, float]:
    """Score of every channel class a producer writes (module docstring)."""
    scores: Dict[int, float] = {}
    for producer in analysis.producers:
        weight = tensors[producer.weight].detach()
        rows = weight.movedim(producer.dim, 0).flatten(1)
        norms = torch.linalg.vector_norm(rows, ord=order, dim=1, dtype=torch.float64)
        if producer.bias is not None:
            bias = tensors[producer.bias].detach().double().abs()
            norms = norms + bias if order == 1 else torch.sqrt(norms ** 2 + bias ** 2)
        ids = analysis.tensors[producer.weight][producer.dim]
        for root, value in zip(analysis.cg.roots(ids).tolist(), norms.tolist()):
            scores[root] = max(scores.get(root, 0.0), value)
    return scores


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


def prune_on_capture(model: nn.Module, args, kwargs: Optional[dict], *, threshold, ratio,
                     importance, scope, min_channels, min_fraction, round_to, why: str):
    """prune() with the ATen analysis (pruner.py says when); returns the pruned model, its
    report and the kept positions of every cut tensor (kept_positions)."""
    start = time.perf_counter()
    if importance not in IMPORTANCES:
        raise ValueError(f"importance={importance!r} needs the torch.fx analysis, which cannot "
                         f"serve here ({why}); the torch.export analysis scores by "
                         f"{sorted(IMPORTANCES)}")
    kwargs = dict(kwargs or {})
    analysis = analyze(capture(model, args, kwargs))
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    layers = analysis.layers()
    plan = make_plan(analysis.cg, class_scores(analysis, tensors, IMPORTANCES[importance]),
                     threshold=threshold, ratio=ratio, scope=scope, min_channels=min_channels,
                     min_fraction=min_fraction, round_to=round_to, layers=layers)
    keep = kept_positions(analysis, plan.removed)
    pruned = copy.deepcopy(model)
    slice_tensors(pruned, keep)
    changed = {name.rpartition(".")[0] for name in keep}
    changed |= {path.rpartition(".")[0] for path in changed if path}  # attention, MLP blocks
    warnings = update_config(pruned, fix_sizes(pruned, changed))
    with evaluating(model), torch.no_grad():
        reference = torch.func.functional_call(model, zeroed(model, keep), tuple(args), kwargs,
                                               strict=False)
    original, flops_before = flops_of(run_evaluating, model, args, kwargs)
    try:
        new, flops_after = flops_of(run_evaluating, pruned, args, kwargs)
    except Exception as error:
        raise PrunedModelError(f"the pruned {type(model).__name__} failed on the example call "
                               f"the original ran: {type(error).__name__}: {error}. A layer's "
                               "code reads a size the slicing did not fix (register_size_rule "
                               "teaches it one); please report the model") from error
    roots = analysis.cg.roots
    channels = {}
    for name, ids in layers:
        channels[name] = (len(ids), int(np.isin(roots(ids), list(plan.removed),
                                                invert=True).sum()))
    layer_roots = set(np.concatenate([roots(ids) for _, ids in layers]).tolist()) if layers \
        else set()
    opaque = [{"op": op["op"], "reason": op["reason"]} for op in analysis.unknown_ops
              if op["ids"] and layer_roots & set(np.concatenate(
                  [roots(d) for d in op["ids"]]).tolist())]
    report = PruneReport(
        settings=dict(path="torch.export", why=why, threshold=threshold, ratio=ratio,
                      importance=importance, scope=scope, min_channels=min_channels,
                      min_fraction=min_fraction, round_to=round_to),
        params_before=count_params(model), params_after=count_params(pruned),
        flops_before=flops_before, flops_after=flops_after, channels=channels,
        removed_classes=len(plan.removed),
        prunable_classes=sum(len(g.roots) - len(g.pinned) for g in plan.groups),
        unpruned=plan.unpruned, opaque_ops=opaque, score_cutoff=plan.cutoff,
        max_abs_diff=max_abs_diff(new, reference),
        reference_max_abs=max(float(t.float().abs().max()) for t in flat_tensors(reference)),
        max_abs_diff_original=max_abs_diff(new, original), warnings=warnings)
    if report.relative_diff > EXACT:
        raise PrunedModelError(
            f"the pruned {type(model).__name__} differs from the original with the removed "
            f"channels zeroed by {report.relative_diff:.3g} (relative) on the example call: "
            "a layer's code reads a size the slicing did not fix (register_size_rule teaches "
            "it one); please report the model")
    report.seconds = time.perf_counter() - start
    return pruned, report, keep
