"""Dependency-aware structured pruning: filters and dead residual blocks leave the model.

    result = ffr_fast.prune(model, torch.randn(1, 3, 32, 32), threshold=0.0)
    result.model      # a compact torch.fx.GraphModule of plain Conv2d / BatchNorm2d / Linear
    print(result.report)

Modules: graph (channel dependencies from torch.fx), importance (scores), plan (what goes),
blocks (residual branches: found, measured, removed), surgery (slicing), fold (BN folding), inplace (residual
adds written in place, as the eager model did), report, serialize.
"""
from .blocks import ResidualBranch
from .graph import UntraceableModelError
from .inputs import ExampleInputError
from .pruner import FlopsTargetWarning, PruneResult, prune, residual_branches
from .recalibrate import recalibrate_bn
from .report import PruneReport
from .rules import Rule, register_rule
from .serialize import load_pruned, save_pruned

__all__ = ["prune", "PruneResult", "PruneReport", "residual_branches", "ResidualBranch",
           "save_pruned", "load_pruned", "recalibrate_bn", "UntraceableModelError",
           "ExampleInputError", "FlopsTargetWarning", "Rule", "register_rule"]
