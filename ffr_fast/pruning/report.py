"""What prune() did, verified on the example inputs: a dataclass, JSON-able and readable."""
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..capture import flat_tensors


def max_abs_diff(a, b) -> float:
    """Max |a - b| over the tensors of two outputs of one model (verification). Positions
    that hold the same value (a NaN in both, an infinity of one sign) agree; a NaN where the
    other holds a number differs infinitely (as a NaN it would pass every check)."""
    worst = 0.0
    for x, y in zip(flat_tensors(a), flat_tensors(b)):
        x, y = x.double(), y.double()
        same = (x == y) | (x.isnan() & y.isnan())
        diff = torch.where(same, 0.0, (x - y).abs().nan_to_num(nan=math.inf, posinf=math.inf))
        worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
    return worst


@dataclass
class PruneReport:
    settings: dict
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    channels: Dict[str, Tuple[int, int]]  # layer path -> (channels before, after)
    removed_classes: int  # channel classes removed (a class = channels removed together)
    prunable_classes: int
    removed_blocks: List[dict] = field(default_factory=list)
    unpruned: List[dict] = field(default_factory=list)  # groups kept (partly) and why
    opaque_ops: List[dict] = field(default_factory=list)  # ops the analysis did not understand
    # Renormalising layers (LayerNorm, GroupNorm) that lost channels: the rest of their
    # channels are normalised over fewer, so max_abs_diff measures an approximation there.
    approximate: List[str] = field(default_factory=list)
    folded_bn: List[Tuple[str, str]] = field(default_factory=list)
    # Residual branches (where they are added) that emit at most the threshold but stay:
    # no whole block the export path can remove (torch.fx's rewired graph can).
    kept_dead_branches: List[str] = field(default_factory=list)
    score_cutoff: Optional[float] = None  # largest importance score removed
    # Max |new - reference| where the reference is the original (eval mode) with every
    # removed channel and dead branch zeroed: float rounding when the surgery is exact.
    max_abs_diff: float = 0.0
    reference_max_abs: float = 0.0  # max |reference output|, the scale of max_abs_diff
    max_abs_diff_original: float = 0.0  # max |new - untouched original|
    seconds: float = 0.0
    warnings: List[str] = field(default_factory=list)  # e.g. a FLOPs target not reached

    @property
    def param_ratio(self) -> float:
        return self.params_before / max(self.params_after, 1)

    @property
    def flop_ratio(self) -> float:
        return self.flops_before / max(self.flops_after, 1)

    @property
    def relative_diff(self) -> float:
        return self.max_abs_diff / max(self.reference_max_abs, 1e-30)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(param_ratio=self.param_ratio, flop_ratio=self.flop_ratio,
                   relative_diff=self.relative_diff)
        return out

    def to_markdown(self) -> str:
        lines = [
            "## Pruning report",
            f"settings: {self.settings}",
            "",
            "| | before | after | ratio |",
            "|---|---:|---:|---:|",
            f"| params | {self.params_before:,} | {self.params_after:,} "
            f"| {self.param_ratio:.2f}x |",
            f"| FLOPs | {self.flops_before:,} | {self.flops_after:,} | {self.flop_ratio:.2f}x |",
            "",
            f"channel classes removed: {self.removed_classes} of {self.prunable_classes} "
            f"prunable; score cutoff {self.score_cutoff}",
            f"max |new - zeroed original| = {self.max_abs_diff:.3g} (relative "
            f"{self.relative_diff:.3g}); max |new - original| = {self.max_abs_diff_original:.3g}",
            f"pruning took {self.seconds:.3f} s",
        ]
        lines += [f"WARNING: {w}" for w in self.warnings]
        if self.removed_blocks:
            lines += ["", "### Removed blocks"]
            lines += [f"- {b['block']} (add `{b['add']}`): replaced by its {b['shortcut']}"
                      if b["add"] else f"- {b['block']}: removed from its container"
                      for b in self.removed_blocks]
        if self.approximate:
            lines += ["", "Renormalising layers that lost channels (the output is close to, "
                      f"not equal to, the zeroed original's): {', '.join(self.approximate)}"]
        if self.folded_bn:
            lines += ["", f"BatchNorms folded into their convs: {len(self.folded_bn)}"]
        if self.unpruned:
            lines += ["", "### Groups kept (fully or partly) and why"]
            lines += [f"- {', '.join(u['layers'][:4])}{' ...' if len(u['layers']) > 4 else ''}: "
                      f"{u['kept_channels']} of {u['of']} channels kept: {'; '.join(u['reasons'])}"
                      for u in self.unpruned]
        if self.opaque_ops:
            lines += ["", "### Ops kept opaque (their channels are not pruned)"]
            lines += [f"- {o['op']}: {o['reason']}" for o in self.opaque_ops]
        changed = {k: v for k, v in self.channels.items() if v[0] != v[1]}
        lines += ["", "### Channels per layer (changed layers)", "", "| layer | before | after |",
                  "|---|---:|---:|"]
        lines += [f"| {k} | {b} | {a} |" for k, (b, a) in changed.items()]
        return "\n".join(lines)

    __str__ = to_markdown


@dataclass
class PruneResult:
    model: Any  # the model's own class, or a torch.fx.GraphModule (emit.py)
    report: PruneReport
    structure: dict  # what save_pruned stores to rebuild `model` from the original architecture

    def __str__(self) -> str:
        return str(self.report)
