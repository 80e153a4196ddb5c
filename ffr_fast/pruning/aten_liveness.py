"""Channel liveness on the ATen analysis (aten.py): the channel classes whose values the
model's output never sees, because every path from them to the output passes through a
producer whose weights from them are zero. A residual branch whose tail is dead (its last
batch norm's scale zero, its output projection zero) kills its whole interior so: the
channels inside a downsampling bottleneck, the hidden units of an MLP sub-branch. Removing a
dead class is exact (the verification checks it), so prune() cuts them where it cannot
remove the branch itself, which only a whole block can leave its container.

A class is *live* when an op the rule below does not follow reads it (the model output, a
reduction, a norm over channels, a product of two activations, attention, an op outside the
analysis' table), or when a producer (a linear layer or an ungrouped convolution, its
sole-reader batch norm folded in) has a non-zero weight from it to a live output channel.
Element-wise ops, layout ops and batch norms carry a class through unchanged, so their
readers decide. The rule is conservative: a producer it does not follow (a grouped or
transposed convolution, a packed projection's piece, an embedding, a weight read other than
by rows) makes every class it reads live.
"""
import operator
from typing import Dict, Set

import numpy as np
import torch

from ..capture import Capture
from .aten import Analysis, Producer
from .aten_importance import _scale_shift
from .aten_layout import LAYOUT_OPS
from .aten_ops import ELEMENTWISE, EVAL_BATCH_NORMS, _arg, op_name

CARRIERS = set(ELEMENTWISE) | set(LAYOUT_OPS) | set(EVAL_BATCH_NORMS)  # per channel, as is
CONVOLUTIONS = {"convolution": 8, "conv1d": 6, "conv2d": 6, "conv3d": 6}  # groups' position


def dead_classes(analysis: Analysis, cap: Capture, tensors: Dict[str, torch.Tensor]
                 ) -> Set[int]:
    """The roots of the producers' output classes that are not live (module docstring)."""
    roots = analysis.cg.roots
    followed = {p.output: p for p in analysis.producers if _followed(p, cap, tensors)}
    live = np.zeros(analysis.cg.size, dtype=bool)  # by class root
    for node in cap.graph.nodes:
        if node.op == "placeholder" or node.target is operator.getitem or (
                node.op == "call_function" and (op_name(node) in CARRIERS
                                                or node.name in followed)):
            continue
        for arg in node.all_input_nodes:
            for ids in _dims(analysis.values.get(arg.name)):
                live[roots(ids)] = True
    reach = [(_reach(p, analysis, tensors), roots(analysis.tensors[p.weight][1]))
             for p in followed.values()]
    changed = True
    while changed:  # backwards through the producers, to a fixpoint
        changed = False
        for (weights, out_roots), in_roots in reach:
            rows = live[out_roots]
            if rows.any():
                fed = in_roots[weights[rows].any(axis=0)]
                if not live[fed].all():
                    live[fed] = True
                    changed = True
    outputs = {r for p in analysis.producers
               for r in roots(analysis.tensors[p.weight][p.dim]).tolist()}
    return {r for r in outputs if not live[r]}


def _dims(value):
    """The per-dim id arrays of an analysed value (a tensor's list, or a tuple of them)."""
    if isinstance(value, tuple):
        return [ids for item in value for ids in _dims(item)]
    return value if isinstance(value, list) else []


def _followed(p: Producer, cap: Capture, tensors) -> bool:
    """Whether the rule follows `p`: a linear layer (a 2-D weight, channels on its rows) or
    an ungrouped, untransposed convolution, reading the whole weight."""
    node = cap.nodes.get(p.output)
    if p.dim != 0 or p.piece or node is None or tensors[p.weight].dim() < 2:
        return False
    name = op_name(node)
    if name in CONVOLUTIONS:
        transposed = name == "convolution" and _arg(node, 6, "transposed")
        return not transposed and _arg(node, CONVOLUTIONS[name], "groups") in (1, None)
    return name in ("linear", "mm", "matmul") and tensors[p.weight].dim() == 2


def _reach(p: Producer, analysis: Analysis, tensors):
    """(out x in booleans: which input channel has a non-zero weight to which output
    channel, an output whose folded batch norm scale is zero reaching none; the output
    channels' roots)."""
    weight = tensors[p.weight].detach()
    nonzero = weight.flatten(2).abs().amax(2) if weight.dim() > 2 else weight.abs()
    nonzero = (nonzero > 0).cpu().numpy()
    affine = next((a for a in analysis.affines if a.sole_reader and a.input == p.output), None)
    if affine is not None:
        scale, _ = _scale_shift(affine, tensors, weight.shape[0])
        nonzero &= (scale != 0).numpy()[:, None]
    return nonzero, analysis.cg.roots(analysis.tensors[p.weight][0])
