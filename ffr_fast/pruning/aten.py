"""Channel classes on torch.export's ATen graph (stage 2 of docs/export-design.md).

Every dimension of every tensor in the graph (activations, parameters, buffers) carries one
channel id per position. An op ties the ids of the dimensions it maps onto each other
(ChannelGraph's union-find), so a parameter's dimensions get their roles from the ops that
read it and no layer needs a rule: a class of ids is a set of positions, across tensors,
that are removed together. Ids that must stay are *pinned* (with the reason): the model's
inputs and outputs, spatial and sequence dimensions, what an op outside the table touches.

How ids flow, each op described once in OPS below:
- linear / addmm / mm / matmul / bmm: the contracted dimensions are tied; the output takes the
  row dims of the first operand and the column dim of the second (GPT-2's Conv1D is
  addmm(b, x, W): W is (in, out)); a contraction between two activations also pins it.
  A weight that is one of the equal pieces of a parameter (q, k and v of a packed
  projection, each applied to its own input) makes the parameter a producer.
- convolution: the input's channels tie to the weight's dim 1 (depthwise: output c*m+j to
  input c; grouped: position p of every group tied across groups), the output's channels
  are the weight's dim 0 (dim 1 transposed); spatial dims fresh and pinned.
- embedding: the output's last dim is the weight's dim 1; the rows (vocabulary) are pinned.
- batch_norm: its parameters and running statistics tie to the channel dim.
- layer_norm over the last dim with a weight: its channels tie to the weight and bias and
  may be cut; the cut model renormalises over the kept channels, an approximation of the
  original that the report names (report.approximate).
- group_norm with a weight: position p of every group is tied across the groups (each
  group loses as many, the group count stays); cut, each group renormalised over its kept
  channels (report.approximate, like a LayerNorm); without a weight its channels are whole.
- other norms, reductions and softmax / cumsum over a dim: the
  normalised or reduced dims are *whole*: their ids form one class, pinned (a removed
  channel would change the statistics of the others: RMSNorm's pow/mean/rsqrt/mul chain
  is a mean over the channels), so the result stays exact. The exception is an RMS norm
  module the slicing knows (slicing.RMS_NORMS: Llama's, Qwen's, T5's, torch's): its
  channels are cut, and its weight and eps rescaled so that it stays exact.
- zeros / ones / full: one value at every position, so their dims take the ids they meet,
  unpinned (T5's zero position bias of a cross-attention follows its heads); arange, empty
  and random tensors are pinned (created inside the model).
- element-wise ops (and prelu, whose per-channel slope ties to dim 1) broadcast: dims of
  equal size are tied (an RMSNorm weight, a layer-scale gamma or a bias takes the ids of
  the dims it broadcasts against); scalars are ignored.
- view / reshape / flatten: dims are matched by their sizes, through the finer shape both
  shapes are merges of where one exists ((N, H*D) -> (N*H, D) is (N, H, D): the batch
  nn.MultiheadAttention folds into its heads stays apart from them); merged dims keep one
  carrier (the first whose ids are not pinned, the others pinned: (H, D) -> H*D repeats
  the head ids), and a merge split back into its dims gets their ids again; a split
  C -> (H, D) gives head ids, each head owning its D channels, D pinned, unless H is
  merged back later as an inner dim (a shuffle: view (G, C/G), transpose, view) or picked
  by a constant index (a packed q, k, v projection viewed to (3, E)): then position i of
  every group is one class and G stays (aten_layout.Split).
  permute / transpose / unsqueeze / squeeze / expand move ids (expanded dims fresh, pinned:
  GQA's expand + reshape of the KV heads ties each query head to its KV head).
- cat concatenates ids; split / chunk into equal pieces ties the pieces position by
  position; select, slice (other than whole), unbind, flip, roll, index pin the dim.
- the capture the pruner analyses runs, in every nn.MultiheadAttention it can cut by heads,
  the forward of the head-pruned layer it becomes (multihead.py: self- and cross-attention,
  masks, weights); a plain nn.MultiheadAttention in the graph is one it cannot cut (separate
  q, k, v projections, key / value biases, a zero attention) and keeps every dim.
- scaled_dot_product_attention ties q, k, v heads (grouped: each query head to its KV
  group) and batch dims; head dims and the key length are pinned.
Any other op pins every id it reads and writes and is named (analysis.unknown_ops).
A reduction or norm whose result no output depends on mixes nothing that matters, so it keeps
no dim whole (the attention weights an nn.MultiheadAttention averages over its heads, where
the caller drops them).

The result is exact by construction against the original with every removed position of
every parameter zeroed, and every cut LayerNorm (GroupNorm: every group) normalising over
its kept channels only: every op computes a kept position from kept positions only, or
from removed ones through a zeroed parameter (a linear layer's zeroed columns).
"""
import operator
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch
import torch.fx as fx

from ..capture import Capture
from .aten_layout import LAYOUT_OPS, Split
from .aten_ops import OPS as COMPUTE_OPS
from .aten_ops import Ids, _arg, op_name, shape_of
from .channels import ChannelGraph


@dataclass
class Producer:
    """A parameter that writes channels: `dim` of `weight` holds them (a linear layer's rows),
    `bias` (or None) adds to them. `layer` names it in the report and the plan; `output` is
    the node it writes (a batch norm that alone reads it folds into its scores)."""
    layer: str
    weight: str
    dim: int
    bias: Optional[str]
    output: str
    # it reads one of equal pieces of `weight` (and of `bias`), such as the q rows of a packed
    # projection: scored with all the tensor's rows, no batch norm folds into it
    piece: bool = False


@dataclass
class Affine:
    """An eval-mode batch norm, y = (x - mean) / sqrt(var + eps) * weight + bias, on the
    channels of its `input` node (`sole_reader`: the only op that reads that node). Any of
    the tensor names may be None (affine=False, track_running_stats=False)."""
    input: str
    sole_reader: bool
    weight: Optional[str]
    bias: Optional[str]
    mean: Optional[str]
    var: Optional[str]
    eps: float


@dataclass
class Analysis:
    cg: ChannelGraph
    tensors: Dict[str, Ids]  # parameter or buffer name -> ids of its dims
    producers: List[Producer] = field(default_factory=list)
    affines: List[Affine] = field(default_factory=list)
    shifts: List[str] = field(default_factory=list)  # parameters added to activations
    # LayerNorms whose channels may be cut: (layer, weight name, ids of its channels)
    renormalised: List[Tuple[str, str, np.ndarray]] = field(default_factory=list)
    values: Dict[str, object] = field(default_factory=dict)  # node name -> ids of its value
    unknown_ops: List[dict] = field(default_factory=list)

    def layers(self) -> List[Tuple[str, np.ndarray]]:
        """(layer, ids) of every producer: the layers the plan keeps floors for."""
        return [(p.layer, self.tensors[p.weight][p.dim]) for p in self.producers]


OPS = {**COMPUTE_OPS, **LAYOUT_OPS}  # op name -> rule(analyzer, node) -> the output's ids
# Why an op outside the table is, where it is one of ffr_fast's own.
UNKNOWN_REASONS = {"opaque_module": "an ignored module the capture runs as one op (export "
                                    "cannot capture it): the channels it reads and writes "
                                    "are kept"}


class _Analyzer:
    def __init__(self, cap: Capture, rms_norms: Sequence[str], free_outputs: Set[str]):
        self.cap, self.cg = cap, ChannelGraph()
        self.rms_norms, self.free_outputs = set(rms_norms), set(free_outputs)
        self.values: Dict[fx.Node, object] = {}  # Ids, a tuple of Ids, or None
        self.splits: Dict[int, Split] = {}  # a split's lead dim's first id -> the split
        self.merges: Dict[int, tuple] = {}  # id() of a merged dim's ids -> (them, its parts)
        self.result = Analysis(self.cg, {})
        self.dead = self.unused_nodes(cap.graph)

    # -- ids ------------------------------------------------------------------------------
    def fresh(self, shape, reason: Optional[str] = None) -> Ids:
        ids = [self.cg.fresh(size) for size in shape]
        if reason:
            for dim in ids:
                self.cg.pin(dim, reason)
        return ids

    def whole(self, ids: np.ndarray, reason: str) -> None:
        """All of `ids` one class, pinned: normalised or reduced over together."""
        if len(ids) > 1:
            self.cg.union(ids[:-1], ids[1:])
        self.cg.pin(ids[:1], reason)

    def normalised(self, node: fx.Node, ids: np.ndarray, reason: str) -> None:
        """Dims a norm or a reduction mixes: whole, unless `node` runs in an RMS norm that
        the cut rescales (slicing.RMS_NORMS): its mean of squares over kept channels then
        equals the original's over all channels, the removed ones being zero; or no output
        depends on what it computes."""
        if node not in self.dead and self.cap.module_path(node) not in self.rms_norms:
            self.whole(ids, reason)

    @staticmethod
    def unused_nodes(graph: fx.Graph) -> set:
        """The ops no output of the graph depends on: neither an output nor an op with a
        side effect (an in-place write) reads them, directly or through other ops."""
        used = set()
        for node in reversed(graph.nodes):
            if node.op == "output" or node.is_impure() or any(u in used for u in node.users):
                used.add(node)
        return {node for node in graph.nodes if node not in used}

    def renormalises(self, node: fx.Node, weight: str, ids: np.ndarray) -> None:
        """A LayerNorm over the channels `ids` with the parameter `weight`: its channels may
        be cut, and the cut model then normalises over the kept ones only (aten_cut.py
        verifies it against a reference that does the same)."""
        layer = self.cap.module_path(node) or weight.rpartition(".")[0]
        self.result.renormalised.append((layer, weight, ids))

    def tie(self, a: np.ndarray, b: np.ndarray) -> None:
        if len(a) == len(b):
            self.cg.union(a, b)
        else:  # internal sizes disagree: keep both rather than guess
            self.cg.pin(a, "sizes do not match")
            self.cg.pin(b, "sizes do not match")

    def pinned(self, ids: np.ndarray) -> bool:
        """Whether every id of `ids` is pinned itself, so far: not its class, which would
        recompute the union-find at every merge (50 times the walk on MaxViT, and no pin
        changed on the models measured). A merge's carrier whose class turns out pinned
        pins the merged dim: channels kept that could go, never a wrong cut."""
        return all(int(i) in self.cg.pins for i in ids)

    def ids(self, arg) -> Optional[Ids]:
        value = self.values.get(arg) if isinstance(arg, fx.Node) else None
        return value if isinstance(value, list) else None

    def pin_value(self, value, reason: str) -> None:
        if isinstance(value, tuple):
            for item in value:
                self.pin_value(item, reason)
        elif isinstance(value, list):
            for dim in value:
                self.cg.pin(dim, reason)

    # -- the walk -------------------------------------------------------------------------
    def run(self) -> Analysis:
        for node in self.cap.graph.nodes:
            if node.op == "placeholder":
                self.values[node] = self.placeholder(node)
            elif node.op == "output":
                names = self.cap.output_names
                for arg in node.all_input_nodes:
                    if arg.name in self.free_outputs:
                        continue
                    name = names.get(arg.name)
                    self.pin_value(self.values.get(arg), "feeds the model output"
                                   + (f" ({name})" if name else ""))
            elif node.op == "call_function":
                self.values[node] = self.call(node)
        for split in self.splits.values():
            split.resolve(self)
        self.keep_unsupported_attention()
        self.result.values = {node.name: value for node, value in self.values.items()}
        return self.result

    def keep_unsupported_attention(self) -> None:
        """Every dim of the tensors of an nn.MultiheadAttention that ran torch's own forward
        in the capture pinned: the pruner's capture runs the head-pruned forward
        (multihead.HeadPrunedMultiheadAttention) in every layer it can cut, so this one has
        separate q, k and v projections (kdim or vdim other than embed_dim), bias_k / bias_v
        or add_zero_attn, which that forward does not run (a capture made without the swap,
        to fold batch norms, keeps them all: it cuts nothing)."""
        paths = {path for node in self.cap.graph.nodes
                 for path, kind in (node.meta.get("nn_module_stack") or {}).values()
                 if kind.rpartition(".")[2] == "MultiheadAttention"}
        for path in paths:
            reason = (f"{path} is an nn.MultiheadAttention with separate q, k, v projections, "
                      "key / value biases or a zero attention, which a head-pruned "
                      "MultiheadAttention does not run")
            for name, ids in self.result.tensors.items():
                if name.startswith(f"{path}."):
                    self.pin_value(ids, reason)

    def placeholder(self, node: fx.Node):
        shape = shape_of(node)
        if shape is None:
            return None
        name = self.cap.parameters.get(node.name) or self.cap.buffers.get(node.name)
        if name is None:
            return self.fresh(shape, "model input or constant")
        ids = self.fresh(shape)
        self.result.tensors[name] = ids
        return ids

    def call(self, node: fx.Node):
        value = node.meta.get("val")
        if not isinstance(value, (torch.Tensor, tuple, list)):
            return None  # assertions, sizes: no tensor comes out
        if node.target is operator.getitem:
            source = self.values.get(node.args[0])
            return source[node.args[1]] if isinstance(source, tuple) else None
        rule = OPS.get(op_name(node))
        out = rule(self, node) if rule is not None else None
        if out is None:
            out = self.unknown(node)
        return out

    def unknown(self, node: fx.Node):
        reason = f"op {op_name(node)} (node {node.name}) is outside the channel analysis"
        inputs = [self.values.get(a) for a in node.all_input_nodes]
        for value in inputs:
            self.pin_value(value, reason)
        self.result.unknown_ops.append({"op": f"{op_name(node)} (node {node.name})",
                                        "reason": UNKNOWN_REASONS.get(
                                            op_name(node), "outside the channel analysis: "
                                            "the channels it reads and writes are kept"),
                                        "ids": [d for v in inputs if isinstance(v, list)
                                                for d in v]})
        return self.fresh_like(node, reason)

    def fresh_like(self, node: fx.Node, reason: Optional[str]):
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            return self.fresh(value.shape, reason)
        return tuple(self.fresh(v.shape, reason) if isinstance(v, torch.Tensor) else None
                     for v in value)

    def parameter(self, arg) -> Optional[str]:
        """The parameter name of a placeholder argument, or None."""
        if isinstance(arg, fx.Node) and arg.op == "placeholder":
            return self.cap.parameters.get(arg.name)
        return None

    def produces(self, node: fx.Node, weight, dim: int, bias=None) -> None:
        """Record a producer: `weight` a parameter (and `bias` one, or None), or one of the
        equal pieces of a parameter (and `bias` the matching piece of one)."""
        name, piece = self.parameter(weight), False
        if name is None:
            name, piece = self.piece_of_parameter(weight, dim), True
        if name is not None:
            layer = name[:-len(".weight")] if name.endswith(".weight") else name
            bias = self.piece_of_parameter(bias, 0) if piece else self.parameter(bias)
            self.result.producers.append(Producer(layer, name, dim, bias, node.name, piece))

    def piece_of_parameter(self, arg, dim: int) -> Optional[str]:
        """The parameter that `arg` is one of the equal pieces of, cut along `dim` (a chunk or
        split, then getitem), or None."""
        if not (isinstance(arg, fx.Node) and arg.target is operator.getitem
                and op_name(arg.args[0]) in ("chunk", "split", "split_with_sizes")):
            return None
        pieces, source = arg.args[0], arg.args[0].args[0]
        shapes = {tuple(v.shape) for v in pieces.meta["val"]}
        source_shape = shape_of(source)
        cut_along = _arg(pieces, 2, "dim", 0) % len(source_shape) if source_shape else None
        return self.parameter(source) if len(shapes) == 1 and cut_along == dim else None

    def tensor_name(self, arg) -> Optional[str]:
        """The parameter or buffer name of a placeholder argument, or None."""
        if isinstance(arg, fx.Node) and arg.op == "placeholder":
            return self.cap.parameters.get(arg.name) or self.cap.buffers.get(arg.name)
        return None

    def affine(self, node: fx.Node, weight, bias, mean, var, eps: float) -> None:
        source = node.args[0]
        self.result.affines.append(Affine(
            source.name, len(source.users) == 1, self.tensor_name(weight),
            self.tensor_name(bias), self.tensor_name(mean), self.tensor_name(var), float(eps)))

    def shifts(self, node: fx.Node) -> None:
        """Record the parameters an add or sub adds to an activation (a bias written as
        `x + self.bias`): what a channel emits when its producers' rows are zero."""
        for arg in node.args[:2]:
            name = self.parameter(arg)
            if name is not None:
                self.result.shifts.append(name)

    def broadcast(self, out_shape, operands: List[Ids], shapes) -> Ids:
        """Ids of an element-wise result: every operand's dims of the output's size tied."""
        out: List[Optional[np.ndarray]] = [None] * len(out_shape)
        for ids, shape in zip(operands, shapes):
            offset = len(out_shape) - len(shape)
            for dim, size in enumerate(shape):
                if size != out_shape[offset + dim]:
                    continue
                if out[offset + dim] is None:
                    out[offset + dim] = ids[dim]
                else:
                    self.tie(out[offset + dim], ids[dim])
        return [dim if dim is not None else self.fresh([size], "broadcast")[0]
                for dim, size in zip(out, out_shape)]


def analyze(cap: Capture, rms_norms: Sequence[str] = (), free_outputs: Set[str] = frozenset()
            ) -> Analysis:
    """The channel classes of the captured model (module docstring); `rms_norms` are the
    paths of the RMS norms whose channels may be cut (slicing.rms_norm_paths), and the
    output nodes `free_outputs` do not pin theirs (aten_study.side_hidden_states)."""
    return _Analyzer(cap, rms_norms, free_outputs).run()
