"""Dependency-aware structured pruning: channels, attention heads and whole residual
branches leave the model, which comes back compact and verified.

    result = ffr_fast.prune(model, torch.randn(1, 3, 32, 32), threshold=0.0)
    result.model      # compact: the model's own class (a GraphModule if branches left)
    print(result.report)
    residual_branches(model, x)              # names, FLOPs, Block Influence of each branch
    prune(model, x, remove_branches=["layer2.1"])   # depth pruning by name
    prune(model, x, flops_target=0.5)        # a FLOPs budget

Modules, the torch.export path (the default): aten, aten_ops and aten_layout (the channel
analysis on the ATen graph), aten_importance (what each channel emits), aten_scorer (a
callable importance), aten_branches (what a residual branch emits), aten_norms (cut norms
verified), aten_liveness (channels the output never sees), aten_study (a model captured,
analysed and scored once), aten_blocks (which blocks go), depth (whole blocks out of their
containers), aten_cut (the channel cut, verified), slicing (tensors cut by name, size
attributes fixed; register_size_rule), aten_fold (BatchNorm folding) and aten_pruner (that
path of prune(), step by step).
The torch.fx path (being retired): fx_pruner (that path of prune()), rules (the one table
of layer types and functions; register_rule), tracing (torch.fx), graph (channel
dependencies), layout (ids through ops that move dimensions), channels (what it produces),
blocks (residual branches: found, measured, removed), surgery (slicing), attention (head-
pruned attention layers), fold (BN folding), emit (the model's own class or the
GraphModule), inplace (residual adds written in place in an emitted GraphModule). Both:
multihead (nn.MultiheadAttention cut by heads), importance (scores), plan (what goes),
flops_search (the search behind flops_target), inputs (checks of what the caller passes),
report, serialize, recalibrate (BatchNorm statistics after pruning), pruner (prune() and
residual_branches()).
"""
from .aten_pruner import PrunedInPlaceError
from .blocks import ResidualBranch
from .flops_search import FlopsTargetWarning
from .inputs import ExampleInputError, PrunedModelError
from .pruner import PruneResult, prune, residual_branches
from .recalibrate import recalibrate_bn
from .report import PruneReport
from .rules import Rule, register_rule
from .serialize import load_pruned, save_pruned
from .slicing import register_size_rule
from .tracing import UntraceableModelError

__all__ = ["prune", "PruneResult", "PruneReport", "residual_branches", "ResidualBranch",
           "save_pruned", "load_pruned", "recalibrate_bn", "UntraceableModelError",
           "ExampleInputError", "PrunedModelError", "PrunedInPlaceError", "FlopsTargetWarning",
           "Rule", "register_rule", "register_size_rule"]
