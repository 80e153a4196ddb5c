"""Channel importance on the ATen analysis (aten.py): what each channel emits, in the unit
the torch.fx scorers use (importance.py), so `threshold=0` removes exactly the dead channels.

An *emitter* is a tensor that writes a channel class: a producer's rows (a linear layer's or
convolution's output row, an embedding's column) with its bias, a batch norm's shift, a
parameter added to an activation (`x + self.bias`). Under "l2" and "l1":
- a producer's row scores its norm with its bias, [W_c, b_c]; when a batch norm is the only
  reader of the producer's output, its eval-mode map is folded in:
      row_c = [s_c * W_c, s_c * b_c + t_c]     s = weight / sqrt(var + eps), t = bias - mean * s
- an unfolded batch norm scores |t_c| (what it emits for a zero channel), an added
  parameter |p_c|, and an op that turns a zero channel into a constant (x + 1, a sigmoid, a
  hardtanh above 0) |that constant| where a producer or a norm reads it.
A class scores the maximum over its emitters, so it scores 0 exactly when every emitter
writes zeros to it. Zero-preserving ops (a layer scale, ReLU, GELU) do not count: a dead
channel stays dead through them.
Under "bn" (network slimming) a class scores |weight| of its batch norms; a class without
one is not scored, so it is kept.

A residual block scores what its branches' tails emit (aten_branches.py), in this unit.
"""
import math
from dataclasses import dataclass
from typing import Dict, List

import numpy as np
import torch
import torch.fx as fx

from ..capture import Capture
from .aten import Affine, Analysis
from .aten_layout import LAYOUT_OPS
from .aten_ops import ELEMENTWISE, PRODUCERS, REDUCTIONS, op_name

IMPORTANCES = {"l2": 2, "l1": 1, "bn": None}
BOUNDLESS = 1e30  # the score of a channel that emits an infinite constant (1 / 0)


@dataclass
class Emitter:
    layer: str  # the module path of the tensor that writes
    ids: np.ndarray  # the channel ids it writes, one per position
    scores: np.ndarray  # float64, one per position
    # what writes: the producer node, the batch norm's input node, the added parameter's
    # name, the node that reads a dead constant (aten_branches reads a branch's tail by it)
    source: str = ""


def _row_norms(rows: torch.Tensor, bias: torch.Tensor, order: int) -> np.ndarray:
    norms = torch.linalg.vector_norm(rows, ord=order, dim=1, dtype=torch.float64)
    bias = bias.double().abs()
    return (norms + bias if order == 1 else torch.sqrt(norms ** 2 + bias ** 2)).numpy()


def _scale_shift(affine: Affine, tensors, channels: int):
    """(s, t) of the batch norm's eval-mode map y = s * x + t, computed in the batch norm's
    own dtype (as it runs: a shift that cancels there scores 0), then float64."""
    present = [tensors[n].detach().cpu() for n in (affine.weight, affine.bias, affine.mean,
                                                   affine.var) if n is not None]
    dtype = present[0].dtype if present else torch.float32

    def get(name, fill):
        if name is None:
            return torch.full((channels,), fill, dtype=dtype)
        return tensors[name].detach().cpu()
    scale = get(affine.weight, 1.0) / torch.sqrt(get(affine.var, 1.0) + affine.eps)
    return scale.double(), (get(affine.bias, 0.0) - get(affine.mean, 0.0) * scale).double()


def _module(name: str) -> str:
    return name.rpartition(".")[0]


def emitters(analysis: Analysis, cap: Capture, tensors: Dict[str, torch.Tensor],
             importance: str) -> List[Emitter]:
    """Every emitter of the captured model with its per-position scores (module docstring)."""
    order = IMPORTANCES[importance]
    if order is None:  # "bn": the batch norms' weights alone
        return [Emitter(_module(a.weight), analysis.tensors[a.weight][0],
                        tensors[a.weight].detach().double().abs().cpu().numpy(), a.input)
                for a in analysis.affines if a.weight is not None]
    sole_readers = {a.input: a for a in analysis.affines if a.sole_reader}
    folded = set()
    out = []
    for producer in analysis.producers:
        weight = tensors[producer.weight].detach()
        rows = weight.movedim(producer.dim, 0).flatten(1).cpu()
        bias = (tensors[producer.bias].detach().cpu() if producer.bias is not None
                else torch.zeros(rows.shape[0], dtype=torch.float64))
        affine = sole_readers.get(producer.output)
        if affine is not None and rows.ndim == 2:
            scale, shift = _scale_shift(affine, tensors, rows.shape[0])
            rows = rows.double() * scale[:, None]
            bias = bias.double() * scale + shift
            folded.add(id(affine))
        ids = analysis.tensors[producer.weight][producer.dim]
        out.append(Emitter(producer.layer, ids, _row_norms(rows, bias, order), producer.output))
    for affine in analysis.affines:
        channel_tensor = affine.bias or affine.mean
        if id(affine) in folded or channel_tensor is None:
            continue
        ids = analysis.tensors[channel_tensor][0]
        _, shift = _scale_shift(affine, tensors, len(ids))
        out.append(Emitter(_module(channel_tensor), ids, shift.abs().numpy(), affine.input))
    for name in dict.fromkeys(analysis.shifts):
        magnitude = tensors[name].detach().double().abs().cpu()
        for dim, ids in enumerate(analysis.tensors[name]):
            if magnitude.shape[dim] > 1:  # the dims a bias spans; a scalar shifts no class
                others = [d for d in range(magnitude.ndim) if d != dim]
                values = magnitude.amax(dim=others) if others else magnitude
                out.append(Emitter(_module(name), ids, values.numpy(), name))
    return out + _alive_at_zero(analysis, cap)


def _dead_values(cap: Capture) -> Dict[str, float]:
    """Node name -> the value a dead channel holds there, where the graph says: 0 at the
    output of a producer (a matrix product, a convolution, an embedding), then carried
    through views and reductions and computed through element-wise ops on those values
    (x + 1, a sigmoid, a hardtanh above 0 turn 0 into a constant; x * anything keeps 0).
    Values that mix in inputs or parameters are left out: their emitters count them."""
    dead: Dict[str, float] = {}
    for node in cap.graph.nodes:
        if node.op != "call_function" or not isinstance(node.meta.get("val"), torch.Tensor):
            continue
        name = op_name(node)
        operands = [arg for arg in node.all_input_nodes
                    if isinstance(arg.meta.get("val"), torch.Tensor)]
        if name in PRODUCERS:
            dead[node.name] = 0.0
        elif name in LAYOUT_OPS or name in REDUCTIONS:
            if operands and operands[0].name in dead:
                dead[node.name] = dead[operands[0].name]
        elif name in ELEMENTWISE and operands and all(a.name in dead for a in operands):
            def abstract(arg):
                return (torch.tensor(dead[arg.name], dtype=torch.float64)
                        if isinstance(arg, fx.Node) and arg.name in dead else arg)
            try:
                value = node.target(*[abstract(a) for a in node.args],
                                    **{k: abstract(v) for k, v in node.kwargs.items()})
            except Exception:  # an op that will not run on a scalar: no claim
                continue
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                dead[node.name] = float(value.double())
    return dead


def _alive_at_zero(analysis: Analysis, cap: Capture) -> List[Emitter]:
    """A channel whose value is a non-zero constant where an op reads it (`_dead_values`)
    still emits that constant when its producers' rows are zero: an emitter of |constant|
    at every op other than an element-wise or layout one that reads it."""
    dead = _dead_values(cap)
    out = []
    for node in cap.graph.nodes:
        if node.op != "call_function" or op_name(node) in ELEMENTWISE or \
                op_name(node) in LAYOUT_OPS:
            continue
        for arg in node.all_input_nodes:
            constant = dead.get(arg.name, 0.0)
            value = analysis.values.get(arg.name)
            if constant != 0.0 and isinstance(value, list):
                magnitude = abs(constant) if math.isfinite(constant) else BOUNDLESS
                out += [Emitter(cap.module_path(node), ids, np.full(len(ids), magnitude),
                                node.name) for ids in value]
    return out


def class_scores(analysis: Analysis, found: List[Emitter]) -> Dict[int, float]:
    """Score of every class an emitter writes, keyed by its union-find root."""
    scores: Dict[int, float] = {}
    for emitter in found:
        for root, value in zip(analysis.cg.roots(emitter.ids).tolist(), emitter.scores.tolist()):
            scores[root] = max(scores.get(root, 0.0), value)
    return scores
