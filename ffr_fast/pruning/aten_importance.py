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

An emitter counts only where what it writes can reach the output (`_gated`): the product
of two activations in which a class is a batch dim of both operands (a head's logits
q_h @ k_h^T, its output attn_h @ v_h) is zero for that class where either operand is, and
an attention's output is zero for a head whose values are, whatever its logits. So a
position bias added to a head's logits (Swin V2's MLP, a mask) does not keep alive a head
whose values are zero; every other emitter counts as before.

A residual block scores what its branches' tails emit (aten_branches.py), in this unit.
"""
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Set, Tuple

import numpy as np
import torch
import torch.fx as fx

from ..capture import Capture
from .aten import Affine, Analysis
from .aten_layout import LAYOUT_OPS
from .aten_ops import ELEMENTWISE, PRODUCERS, REDUCTIONS, _arg, op_name

IMPORTANCES = {"l2": 2, "l1": 1, "bn": None}
BOUNDLESS = 1e30  # the score of a channel that emits an infinite constant (1 / 0)


@dataclass
class Emitter:
    layer: str  # the module path of the tensor that writes
    ids: np.ndarray  # the channel ids it writes, one per position
    scores: np.ndarray  # float64, one per position
    nodes: Tuple[str, ...] = ()  # the nodes whose values it writes (none: it always counts)


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
        return _gated(analysis, cap, tensors, [
            Emitter(_module(a.weight), analysis.tensors[a.weight][0],
                    tensors[a.weight].detach().double().abs().cpu().numpy(),
                    readers(cap, a.weight)) for a in analysis.affines if a.weight is not None])
    sole_readers = {a.input: a for a in analysis.affines if a.sole_reader}
    folded = set()
    out = []
    for producer in analysis.producers:
        weight = tensors[producer.weight].detach()
        rows = weight.movedim(producer.dim, 0).flatten(1).cpu()
        bias = (tensors[producer.bias].detach().cpu() if producer.bias is not None
                else torch.zeros(rows.shape[0], dtype=torch.float64))
        affine = None if producer.piece else sole_readers.get(producer.output)
        if affine is not None and rows.ndim == 2:
            scale, shift = _scale_shift(affine, tensors, rows.shape[0])
            rows = rows.double() * scale[:, None]
            bias = bias.double() * scale + shift
            folded.add(id(affine))
        ids = analysis.tensors[producer.weight][producer.dim]
        out.append(Emitter(producer.layer, ids, _row_norms(rows, bias, order),
                           (producer.output,)))
    for affine in analysis.affines:
        channel_tensor = affine.bias or affine.mean
        if id(affine) in folded or channel_tensor is None:
            continue
        ids = analysis.tensors[channel_tensor][0]
        _, shift = _scale_shift(affine, tensors, len(ids))
        out.append(Emitter(_module(channel_tensor), ids, shift.abs().numpy(),
                           readers(cap, channel_tensor)))
    for name in dict.fromkeys(analysis.shifts):
        magnitude = tensors[name].detach().double().abs().cpu()
        for dim, ids in enumerate(analysis.tensors[name]):
            if magnitude.shape[dim] > 1:  # the dims a bias spans; a scalar shifts no class
                others = [d for d in range(magnitude.ndim) if d != dim]
                values = magnitude.amax(dim=others) if others else magnitude
                out.append(Emitter(_module(name), ids, values.numpy(), readers(cap, name)))
    return _gated(analysis, cap, tensors, out + _alive_at_zero(analysis, cap))


def readers(cap: Capture, tensor: str) -> Tuple[str, ...]:
    """The nodes that read the parameter or buffer named `tensor`."""
    return tuple(user.name for node in cap.graph.nodes if node.op == "placeholder" and tensor in (
        cap.parameters.get(node.name), cap.buffers.get(node.name)) for user in node.users)


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
                                (arg.name,)) for ids in value]
    return out


@dataclass
class Gate:
    """A product whose output is zero, for each of `classes`, where one of the operands
    `required` (indexes into `operands`, node names) is zero for it."""
    operands: List[str]
    required: List[int]
    classes: Set[int]


def _root_set(analysis: Analysis, dims) -> Set[int]:
    return set(np.concatenate([analysis.cg.roots(d) for d in dims]).tolist()) if dims else set()


def _gate(analysis: Analysis, node: fx.Node) -> Optional[Gate]:
    """The gate of `node` (Gate), or None: a matmul, bmm or two-operand einsum of two
    activations gates the classes of the batch dims both operands carry; an attention
    (scaled_dot_product_attention) gates its values' batch and head classes."""
    name, values = op_name(node), analysis.values
    if name == "scaled_dot_product_attention":
        operands = [a for a in node.args[:4] if isinstance(a, fx.Node)]
        v = values.get(node.args[2].name) if isinstance(node.args[2], fx.Node) else None
        if not isinstance(v, list):
            return None
        return Gate([a.name for a in operands], [2], _root_set(analysis, v[:-2]))
    if name == "einsum" and len(node.args[1]) == 2:
        operands, (inputs, _, output) = node.args[1], node.args[0].replace(" ", "").partition(
            "->")
        letters = inputs.split(",")
        shared = [c for c in output if all(c in word for word in letters)]
        batch = [[values.get(t.name)[word.index(c)] for c in shared]
                 for t, word in zip(operands, letters) if isinstance(values.get(t.name), list)]
    elif name in ("matmul", "bmm") and all(isinstance(a, fx.Node) for a in node.args[:2]):
        operands = node.args[:2]
        dims = [values.get(a.name) for a in operands]
        if not all(isinstance(d, list) and len(d) >= 3 for d in dims):
            return None
        lead = min(len(d) for d in dims) - 2
        batch = [d[len(d) - 2 - lead:-2] for d in dims]
    else:
        return None
    if len(batch) != 2 or any(a.op == "placeholder" for a in operands):
        return None
    return Gate([a.name for a in operands], [0, 1],
                _root_set(analysis, batch[0]) & _root_set(analysis, batch[1]))


def gated_classes(analysis: Analysis, cap: Capture) -> Tuple[Dict[str, Gate], Set[int]]:
    """Every Gate of the capture by node name, and the unpinned classes they gate: the
    attention heads (a product's pinned batch dims are no class a cut can remove)."""
    gates = {node.name: gate for node in cap.graph.nodes
             for gate in [_gate(analysis, node)] if gate is not None}
    pins = set(analysis.cg.pinned_roots())
    return gates, set().union(*(g.classes for g in gates.values())) - pins if gates else set()


# Ops whose output is zero for a class wherever all their tensor operands are (besides the
# layout ops and the products): sums, means and extrema of zeros, pooling of zeros.
ZERO_PRESERVING = ("sum", "mean", "amax", "amin", "max", "min", "getitem", "einsum",
                   "scaled_dot_product_attention") + PRODUCERS + REDUCTIONS


def _nonzero_classes(analysis: Analysis, tensors: Dict[str, torch.Tensor],
                     name: str, gated: Set[int]) -> Set[int]:
    """The gated classes in which the parameter or buffer `name` has a non-zero entry."""
    tensor = tensors[name].detach()
    out = set()
    for dim, ids in enumerate(analysis.tensors[name]):
        nonzero = tensor.ne(0).movedim(dim, 0).reshape(len(ids), -1).any(1).cpu().numpy()
        out |= set(analysis.cg.roots(ids[nonzero]).tolist()) & gated
    return out


def _elementwise_zero(node: fx.Node, zero: Set[str], operands: List[fx.Node]) -> bool:
    """Whether element-wise `node` writes 0 where the operands named in `zero` are 0 (the
    others unknown): a product or quotient of a zero, or an op that maps all-zero operands to
    0 (computed on scalar zeros, as the op runs)."""
    name = op_name(node)
    if name == "mul" and zero:
        return True
    if name in ("div", "true_divide") and node.args[0] in operands:
        return node.args[0].name in zero and not (
            isinstance(node.args[1], fx.Node) and node.args[1].name in zero)  # 0 / 0 is NaN
    if any(a.name not in zero for a in operands):
        return False

    def zeroed(arg):
        return torch.zeros((), dtype=torch.float64) if isinstance(arg, fx.Node) else arg
    try:
        value = node.target(*[zeroed(a) for a in node.args],
                            **{k: zeroed(v) for k, v in node.kwargs.items()})
    except Exception:  # an op that will not run on a scalar: no claim
        return False
    return isinstance(value, torch.Tensor) and value.numel() == 1 and float(value) == 0.0


def _possibly_nonzero(analysis: Analysis, cap: Capture, tensors: Dict[str, torch.Tensor],
                      gates: Dict[str, "Gate"], present: Dict[str, Set[int]]
                      ) -> Dict[str, Set[int]]:
    """Node -> the gated classes its value may be non-zero in; a class left out is proven
    zero there: every parameter entry of it is zero, or a Gate zeroes it, and the ops on the
    way keep zeros zero."""
    gated = set().union(*present.values())
    live: Dict[str, Set[int]] = {}
    for node in cap.graph.nodes:
        if node.name not in present:
            continue
        name = cap.parameters.get(node.name) or cap.buffers.get(node.name)
        if node.op == "placeholder":
            live[node.name] = (_nonzero_classes(analysis, tensors, name, gated)
                               if name in analysis.tensors else present[node.name])
            continue
        operands = [a for a in node.all_input_nodes if a.name in present]
        reached = set().union(*(live[a.name] for a in operands)) if operands else set()
        gate, op = gates.get(node.name), op_name(node)
        pad_value = {"constant_pad_nd": 2, "pad": 3}.get(op)
        if pad_value is not None and _arg(node, pad_value, "value"):
            here = set(present[node.name])  # padded with a constant other than 0
        elif op in ELEMENTWISE:  # an operand that does not carry the class is unknown
            here = {c for c in present[node.name] if not _elementwise_zero(node, {
                a.name for a in operands if c in present[a.name] and c not in live[a.name]},
                operands)}
        elif op in LAYOUT_OPS or op in ZERO_PRESERVING:
            here = reached & present[node.name]
        else:  # softmax, a norm, an op outside the table: a zero may come out non-zero
            here = set(present[node.name])
        if gate is not None:
            here -= {c for c in gate.classes
                     if any(c not in live.get(gate.operands[i], ()) for i in gate.required)}
        live[node.name] = here
    return live


def _gated(analysis: Analysis, cap: Capture, tensors: Dict[str, torch.Tensor],
           found: List[Emitter]) -> List[Emitter]:
    """`found` with the score of every position zeroed that cannot reach the output: every
    path from where the emitter writes it passes a Gate closed for its class, one whose other
    required operand is proven zero for it (_possibly_nonzero)."""
    gates, gated = gated_classes(analysis, cap)
    if not gated:
        return found
    present = {}  # node name -> the gated classes its value carries
    for name, value in analysis.values.items():
        items = value if isinstance(value, tuple) else (value,)
        present[name] = _root_set(analysis, [d for v in items if isinstance(v, list)
                                             for d in v]) & gated
    live = _possibly_nonzero(analysis, cap, tensors, gates, present)
    observed: Dict[str, Set[int]] = {}  # node -> the gated classes the output sees there
    for node in reversed(cap.graph.nodes):
        if node.name not in present:
            continue
        if not node.users:
            observed[node.name] = present[node.name]
            continue
        seen = set()
        for user in node.users:
            gate = gates.get(user.name)
            for c in present[node.name]:
                if c in present.get(user.name, ()) and c not in observed.get(user.name, ()):
                    continue  # the user passes it on, and the output does not see it there
                if gate and c in gate.classes and node.name in gate.operands and any(
                        c not in live.get(gate.operands[i], ())
                        for i in gate.required if gate.operands[i] != node.name):
                    continue  # the other operand is zero for it: so is the product
                seen.add(c)
        observed[node.name] = seen
    out = []
    for emitter in found:
        seen = set().union(*(observed.get(n, gated) for n in emitter.nodes)) \
            if emitter.nodes else gated
        blocked = np.isin(analysis.cg.roots(emitter.ids), list(gated - seen))
        out.append(Emitter(emitter.layer, emitter.ids, np.where(blocked, 0.0, emitter.scores),
                           emitter.nodes))
    return out


def class_scores(analysis: Analysis, found: List[Emitter]) -> Dict[int, float]:
    """Score of every class an emitter writes, keyed by its union-find root."""
    scores: Dict[int, float] = {}
    for emitter in found:
        for root, value in zip(analysis.cg.roots(emitter.ids).tolist(), emitter.scores.tolist()):
            scores[root] = max(scores.get(root, 0.0), value)
    return scores
