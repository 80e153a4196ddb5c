"""prune(fold_bn=True) on the torch.export path: every convolution or linear layer whose
output only a BatchNorm reads takes that BatchNorm's eval-mode map into its weight and bias,
and the BatchNorm becomes an nn.Identity in the model's own class.

Read off the capture of the model to fold (aten.py's producers and affines): a pair folds
when the BatchNorm is the producer's only reader, each module is called once, the producer
is an nn.Conv1d/2d/3d or nn.Linear writing its output rows, and the BatchNorm is an
nn.BatchNorm1d/2d/3d itself (a subclass that does more, such as timm's BatchNormAct2d,
stays). The arithmetic is torch's own (`torch.nn.utils.fusion`).
"""
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from ..capture import Capture, capture, flat_tensors
from ..metrics import BATCH_NORMS
from ..modes import run_evaluating
from .aten import Analysis, analyze
from .report import max_abs_diff

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
EXACT = 1e-4  # relative change that float32 rounding of the fold stays under


def foldable_pairs(model: nn.Module, cap: Capture, analysis: Analysis) -> List[Tuple[str, str]]:
    """(producer path, BatchNorm path) of every pair of `model` that folds (module
    docstring), read off a capture of it (or of the model it was cut from: slicing keeps
    every module and op where it was)."""
    modules = dict(model.named_modules())
    norms = {a.input: a for a in analysis.affines if a.sole_reader and a.mean is not None}
    pairs = []
    for producer in analysis.producers:
        affine = norms.get(producer.output)
        if (affine is None or producer.piece or producer.dim != 0
                or not producer.weight.endswith(".weight")):
            continue
        conv, bn = producer.layer, affine.mean.rpartition(".")[0]
        once = all(f"{path}@1" not in cap.calls for path in (conv, bn))
        if (once and type(modules.get(bn)) in BATCH_NORMS
                and isinstance(modules.get(conv), CONVS + (nn.Linear,))):
            pairs.append((conv, bn))
    return pairs


def fold(model: nn.Module, pairs: Sequence[Tuple[str, str]]) -> None:
    """Fold each (producer, BatchNorm) pair of `model` in place: the producer takes the map,
    the BatchNorm becomes an nn.Identity."""
    for conv_path, bn_path in pairs:
        conv, bn = model.get_submodule(conv_path), model.get_submodule(bn_path)
        fuse = fuse_linear_bn_eval if isinstance(conv, nn.Linear) else fuse_conv_bn_eval
        fused = fuse(conv.eval(), bn.eval())
        conv.weight, conv.bias = fused.weight, fused.bias
        parent, _, name = bn_path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, nn.Identity())


def fold_batch_norms(model: nn.Module, args, kwargs: dict,
                     seen: Optional[Tuple[Capture, Analysis]] = None) -> List[Tuple[str, str]]:
    """Fold every foldable pair of `model` (pruned, our own copy) in place and put it in eval
    mode; returns the pairs. `seen`: a capture and analysis of the model it was cut from,
    else it is captured here. Raises if the folded model's output moved beyond rounding."""
    if seen is None:
        cap = capture(model, args, kwargs)
        seen = cap, analyze(cap)
    pairs = foldable_pairs(model, *seen)
    with torch.no_grad():
        before = run_evaluating(model, args, kwargs)
        fold(model, pairs)
        after = run_evaluating(model, args, kwargs)
    model.eval()
    scale = max(float(t.float().abs().max()) for t in flat_tensors(before))
    if not max_abs_diff(after, before) <= EXACT * max(scale, 1e-30):  # NaN fails too
        raise RuntimeError(f"folding {pairs} changed the output of {type(model).__name__} by "
                           f"{max_abs_diff(after, before):.3g}; please report the model")
    return pairs
