"""prune() on the torch.fx trace (`analysis="fx"`, and where "auto" falls back to it):
trace with module types as leaves (tracing.py, rules.py), remove residual branches from the
graph (blocks.py), plan (graph.py, plan.py), cut the modules (surgery.py), optionally fold
BN (fold.py), emit the model's own class or the GraphModule (emit.py), verify. This is the
path being retired in favour of torch.export's (aten_pruner.py); docs/fx-probe.md lists
what still reaches it.
"""
import copy
from typing import List, Optional

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..capture import flat_tensors
from ..metrics import count_params
from ..modes import restore_training_flags, training_flags
from .blocks import ResidualBranch, branch_score, find_branches, select_branches
from .blocks import remove_branches as remove_from_graph
from .emit import adopt, attach_structure, own_forward, own_training_forward_fails
from .fold import fold_batchnorms, foldable_pairs
from .graph import analyze
from .importance import class_scores, label, scorer_for
from .inplace import adds_in_place
from .inputs import run_checked
from .plan import make_plan
from .report import PruneReport, PruneResult, max_abs_diff
from .surgery import (
    apply_plan,
    renormalized_layers,
    resize_views,
    set_submodule,
    share_sliced,
    tie_shared_tensors,
    zero_removed,
)
from .tracing import trace

STRUCTURE_FORMAT = "ffr_fast.pruned/4"  # 4: the model's own class or a GraphModule

TRAINING_FLAG_NOTE = (
    "the model's traced forward reads self.training (torch.fx keeps the value it had when "
    "traced, eval): the pruned model runs eval-mode code there even in training mode; make "
    "such a module a leaf (ignored=[...] or register_rule) to keep its training behaviour")


def prune_once(model: nn.Module, inputs, threshold, ratio, inplace, *, importance, scope,
                min_channels, min_fraction, round_to, remove_blocks, remove_branches, fold_bn,
                ignored, emit, trains_differently) -> PruneResult:
    flags = training_flags(model)
    work = model if inplace else copy.deepcopy(model)
    work.eval()
    try:
        with torch.no_grad():
            gm = trace(work, ignored)
            params_before = count_params(gm)
            # One pass records shapes for the analysis, the original output and its FLOPs.
            original, flops_before = run_checked(gm, inputs, ShapeProp(gm).propagate)
            modules = dict(gm.named_modules())
            branches = find_branches(gm, ignored)
            chosen = select_branches(branches, remove_branches)
            if remove_blocks:  # without a threshold: the branches that emit exactly zero
                exact = threshold is None
                scorer = scorer_for("l2" if exact else importance)
                tol = 0.0 if exact else threshold
                chosen += [b for b in branches if b not in chosen
                           and _at_most(branch_score(b, scorer, modules), tol)]
            chosen.sort(key=branches.index)
            blocks = remove_from_graph(gm.graph, chosen, modules)
            gm.delete_all_unused_submodules()
            gm.recompile()
            cg = analyze(gm, ignored)
            shared = tie_shared_tensors(cg, work)
            plan = make_plan(cg, class_scores(cg, importance), threshold=threshold,
                             ratio=ratio, scope=scope, min_channels=min_channels,
                             min_fraction=min_fraction, round_to=round_to)
            # The reference: the graph without the removed branches, every removed channel
            # zeroed in the very modules it runs (the surgery below replaces them).
            zero_removed(cg, plan.removed, gm)
            reference, _ = run_checked(gm, inputs, count_flops=False, pruned=True)
            approximate = renormalized_layers(cg, plan.removed)
            channels = apply_plan(gm, cg, plan.removed)
            share_sliced(shared, (gm, work))
            view_sizes = resize_views(gm, cg, plan.removed)
            folded_pairs = foldable_pairs(gm) if fold_bn else []
            folded = fold_batchnorms(gm, folded_pairs) if fold_bn else []
            gm.recompile()
            out, emit_note, run = _emitted(work, gm, folded, inputs, emit, chosen, view_sizes,
                                           trains_differently)
            in_place = []
            if out is gm:
                in_place = adds_in_place(gm)
                gm.recompile()
                run = run_checked(gm, inputs, pruned=True)
            pruned, flops_after = run
            if inplace and out is gm:  # the caller's module tree gets the new modules too
                kept = dict(gm.named_modules())
                for path in channels.keys() & kept.keys():
                    set_submodule(model, path, kept[path])
    finally:
        if inplace:
            restore_training_flags(model, flags)
    if fold_bn:
        out.eval()
    else:
        restore_training_flags(out, flags)  # module paths are kept by the surgery
    structure = {"format": STRUCTURE_FORMAT, "emitted": "graph" if out is gm else "module",
                 "ignored": list(ignored),
                 "removed_blocks": [[b.add, b.shortcut_arg] for b in chosen],
                 "folded_bn": [list(p) for p in folded_pairs],
                 "adds_in_place": [list(a) for a in in_place], "view_sizes": view_sizes}
    attach_structure(out, structure)
    report = PruneReport(
        settings=dict(path="torch.fx", threshold=threshold, ratio=ratio,
                      importance=label(importance),
                      scope=scope, min_channels=min_channels, min_fraction=min_fraction,
                      round_to=round_to,
                      remove_blocks=remove_blocks, remove_branches=list(remove_branches),
                      fold_bn=fold_bn, ignored=list(ignored)),
        params_before=params_before, params_after=count_params(gm),
        flops_before=flops_before, flops_after=flops_after,
        channels=channels, removed_classes=len(plan.removed),
        prunable_classes=sum(len(g.roots) - len(g.pinned) for g in plan.groups),
        removed_blocks=blocks, unpruned=plan.unpruned, opaque_ops=cg.unknown_ops,
        approximate=approximate,
        folded_bn=folded,
        score_cutoff=plan.cutoff, max_abs_diff=max_abs_diff(pruned, reference),
        warnings=[emit_note] if emit_note else [],
        reference_max_abs=max(float(t.abs().max()) for t in flat_tensors(reference)),
        max_abs_diff_original=max_abs_diff(pruned, original))
    return PruneResult(out, report, structure)


def _emitted(work: nn.Module, gm: fx.GraphModule, folded, inputs, emit: str,
             removed_branches: List[ResidualBranch], view_sizes: List[list],
             trains_differently: bool):
    """(the model to hand back, a note for the report or None, and its output and FLOPs on
    `inputs` where they were measured here, else None): `work` given the pruned layers
    (emit.py) or the GraphModule."""
    if emit == "graph":
        return gm, None, None
    graph_only = [f"residual branch {b.name}" for b in removed_branches]
    graph_only += [f"the size a view is given at node {name}" for name, _, _ in view_sizes]
    if graph_only:
        if emit == "module":
            raise ValueError(
                "emit='module' cannot express what only the pruned graph holds: "
                f"{graph_only}; pass emit='auto' or 'graph' (or remove_blocks=False)")
        return gm, None, None
    adopt(work, gm, folded)
    graph_output, flops = run_checked(gm, inputs, pruned=True)  # the same ops, so the same FLOPs
    output, why = own_forward(work, graph_output, inputs)
    if why is None and trains_differently:
        why = own_training_forward_fails(work, inputs)
    if why is None:
        return work, None, (output, flops)
    message = f"the model's own forward cannot serve as the pruned model: {why}"
    if emit == "module":
        raise ValueError(f"emit='module': {message}; pass emit='auto' or 'graph'")
    return gm, f"{message}; a torch.fx.GraphModule was emitted instead", None


def _at_most(score: Optional[float], threshold: float) -> bool:
    return score is not None and score <= threshold
