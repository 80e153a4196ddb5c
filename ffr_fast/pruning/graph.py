"""The channel-dependency graph: which channels of which layers must be removed together.

The model is traced with torch.fx and shapes are propagated on the example inputs. Every
tensor that flows through the graph gets one *channel id* per channel (dim 1; per feature for
a flattened tensor). Ids that must be removed together are merged in a union-find; each
merged set is a *channel class*, the atom of pruning. The rules (one per op family):

- Conv2d / Linear produce fresh ids for their outputs and consume their input's ids.
  Depthwise conv (groups == in_channels): output channel c*m+j is tied to input channel c,
  so a depthwise conv is pruned together with its producer. Grouped conv: position p of
  every group is tied across groups, so all groups shrink alike and `groups` is kept.
- BatchNorm2d, zero-preserving channel-wise ops (ReLU, pools, dropout, ...): output ids =
  input ids.
- add / sub / mul of same-shaped tensors (residual adds, identity and 1x1 downsample
  shortcuts alike): all inputs' ids are merged.
- cat along dim 1 concatenates the inputs' ids (channel offsets); along another dim merges.
- flatten / view to (B, C*H*W): channel c becomes features c*H*W ... (c+1)*H*W-1, so a
  Linear after avgpool/flatten loses the matching input features.
- Anything else, and every module listed in `ignored`, could mix channels: all channels it
  reads or writes are *pinned* (never pruned) and the op is named with the reason.
Model inputs and outputs are pinned too.
"""
import operator
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn


class UntraceableModelError(RuntimeError):
    """torch.fx could not trace the model; the message names the failing module."""


class _PathTracer(fx.Tracer):
    """A tracer that treats `leaves` as opaque and remembers which module it was inside."""

    def __init__(self, leaves=()):  # no-argument form: GraphModule unpickling re-traces
        super().__init__()
        self.leaves = set(leaves)
        self.stack: List[str] = []

    def is_leaf_module(self, m, qualified_name):
        return qualified_name in self.leaves or super().is_leaf_module(m, qualified_name)

    def call_module(self, m, forward, args, kwargs):
        self.stack.append(self.path_of_module(m))
        out = super().call_module(m, forward, args, kwargs)
        self.stack.pop()
        return out


def trace(model: nn.Module, leaves: Sequence[str] = ()) -> fx.Graph:
    """Trace `model`; a failure names the innermost module being traced and how to skip it."""
    tracer = _PathTracer(leaves)
    try:
        return tracer.trace(model)
    except Exception as error:
        if not tracer.stack:
            raise UntraceableModelError(
                f"torch.fx cannot trace the top-level forward of {type(model).__name__}: "
                f"{error}. Move the untraceable code into a submodule and pass its name in "
                "`ignored`.") from error
        path = tracer.stack[-1]
        kind = type(model.get_submodule(path)).__name__
        raise UntraceableModelError(
            f"torch.fx cannot trace module '{path}' ({kind}): {error}. Mark it as a leaf by "
            f"passing ignored=['{path}'] to prune(); its input and output channels are then "
            "kept.") from error


# Channel-wise ops that map a zero channel to a zero channel: pruning through them is exact.
# Types whose every instance does; a Hardtanh or Threshold does only for some settings
# (Hardtanh(0.5, 2) maps 0 to 0.5), so is_zero_preserving_module checks the instance.
ZERO_PRESERVING_MODULES = (
    nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Tanh, nn.ELU, nn.CELU, nn.Mish,
    nn.Dropout, nn.Dropout2d, nn.Identity, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d, nn.Upsample)
ZERO_PRESERVING_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.hardswish, F.elu, F.mish,
    F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
    F.interpolate, torch.relu, torch.tanh}
ZERO_PRESERVING_METHODS = {"relu", "relu_", "tanh", "contiguous", "clone", "detach", "to"}


def is_zero_preserving_module(module: nn.Module) -> bool:
    """Whether this instance maps a zero channel to a zero channel."""
    if isinstance(module, nn.Hardtanh):  # ReLU6 included
        return module.min_val <= 0 <= module.max_val
    if isinstance(module, nn.Threshold):  # y = x if x > threshold else value
        return module.threshold < 0 or module.value == 0
    return isinstance(module, ZERO_PRESERVING_MODULES)


def is_zero_preserving_call(node: fx.Node) -> bool:
    """Whether a call_function / call_method node maps a zero channel to a zero channel."""
    if node.target is F.hardtanh:
        low = node.kwargs.get("min_val", node.args[1] if len(node.args) > 1 else -1.0)
        high = node.kwargs.get("max_val", node.args[2] if len(node.args) > 2 else 1.0)
        return isinstance(low, (int, float)) and isinstance(high, (int, float)) and low <= 0 <= high
    return node.target in ZERO_PRESERVING_FUNCTIONS or node.target in ZERO_PRESERVING_METHODS


MERGING_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.iadd, operator.isub,
                     operator.imul, torch.add, torch.sub, torch.mul}
MERGING_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_"}
SCALAR_SAFE = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}  # x * s keeps zeros
REDUCTIONS = {torch.mean, torch.sum, torch.amax, "mean", "sum", "amax"}
SHAPE_QUERIES = {"size", "dim", "numel", getattr, len}  # read a shape, not the values


@dataclass
class ModuleChannels:
    """The channel ids one parametrised module reads (`in_ids`) and writes (`out_ids`)."""
    path: str
    module: nn.Module
    in_ids: Optional[np.ndarray]
    out_ids: np.ndarray
    node: fx.Node


@dataclass
class ChannelGraph:
    parent: List[int] = field(default_factory=list)
    modules: Dict[str, ModuleChannels] = field(default_factory=dict)
    pins: Dict[int, str] = field(default_factory=dict)  # channel id -> why it is kept
    unknown_ops: List[dict] = field(default_factory=list)

    def fresh(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[ry] = rx

    def roots(self, ids: np.ndarray) -> np.ndarray:
        return np.array([self.find(i) for i in ids.tolist()], dtype=np.int64)

    def pin(self, ids: np.ndarray, reason: str) -> None:
        for i in ids.tolist():
            self.pins.setdefault(i, reason)

    def pinned_roots(self) -> Dict[int, str]:
        out: Dict[int, str] = {}
        for i, reason in self.pins.items():
            out.setdefault(self.find(i), reason)
        return out


def _shape(node) -> Optional[torch.Size]:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return getattr(meta, "shape", None)


def _describe(node: fx.Node, modules) -> str:
    if node.op == "call_module":
        return f"module '{node.target}' ({type(modules[node.target]).__name__})"
    name = getattr(node.target, "__name__", str(node.target))
    return f"{node.op} '{name}' (node {node.name})"


class _Analyzer:
    def __init__(self, gm: fx.GraphModule, ignored):
        self.gm, self.ignored = gm, set(ignored)
        self.modules = dict(gm.named_modules())
        self.cg = ChannelGraph()
        self.ids: Dict[fx.Node, Optional[np.ndarray]] = {}

    def run(self) -> ChannelGraph:
        for node in self.gm.graph.nodes:
            if node.op == "output":
                for arg in node.all_input_nodes:
                    if self.ids.get(arg) is not None:
                        self.cg.pin(self.ids[arg], "feeds the model output")
                continue
            self.ids[node] = self.visit(node)
        return self.cg

    def fresh_for(self, node) -> Optional[np.ndarray]:
        shape = _shape(node)
        if shape is None or len(shape) < 2:
            return None
        return self.cg.fresh(shape[1])

    def visit(self, node: fx.Node) -> Optional[np.ndarray]:
        if node.op == "placeholder":
            ids = self.fresh_for(node)
            if ids is not None:
                self.cg.pin(ids, "model input")
            return ids
        if node.op == "get_attr":
            return None  # parameters are read by the ops that use them
        if _shape(node) is None:  # sizes, tuples of tensors, other Python values
            reads_channels = any(self.ids.get(a) is not None for a in node.all_input_nodes)
            if not reads_channels or node.target in SHAPE_QUERIES:
                return None
            return self.unknown(node, "returns a value the analysis does not follow (e.g. a "
                                "tuple of tensors)")
        if node.op == "call_module" and node.target not in self.ignored:
            rule = self.module_rule(node, self.modules[node.target])
        elif node.op in ("call_function", "call_method"):
            rule = self.function_rule(node)
        else:
            rule = None
        if rule is not None:
            return rule
        reason = ("listed in `ignored`" if node.op == "call_module" and node.target in self.ignored
                  else "op not understood by the dependency analysis; it could mix channels")
        return self.unknown(node, reason)

    def unknown(self, node: fx.Node, reason: str) -> Optional[np.ndarray]:
        what = _describe(node, self.modules)
        self.cg.unknown_ops.append({"op": what, "reason": reason})
        for arg in node.all_input_nodes:
            if self.ids.get(arg) is not None:
                self.cg.pin(self.ids[arg], f"{what}: {reason}")
        out = self.fresh_for(node)
        if out is not None:
            self.cg.pin(out, f"{what}: {reason}")
        return out

    def first_input(self, node) -> Optional[np.ndarray]:
        arg = node.args[0] if node.args else None
        return self.ids.get(arg) if isinstance(arg, fx.Node) else None

    def passthrough(self, node) -> Optional[np.ndarray]:
        ids, shape = self.first_input(node), _shape(node)
        if ids is None or len(shape) < 2 or shape[1] != len(ids):
            return None
        return ids

    def module_rule(self, node, module) -> Optional[np.ndarray]:
        if isinstance(module, nn.Conv2d):
            return self.conv(node, module)
        if isinstance(module, nn.Linear):
            return self.linear(node, module)
        if isinstance(module, nn.BatchNorm2d):
            ids = self.passthrough(node)
            if ids is not None:
                self.record(node, module, None, ids)
            return ids
        if is_zero_preserving_module(module):
            return self.passthrough(node)
        if isinstance(module, nn.Flatten):
            return self.reshape(node)
        return None

    def function_rule(self, node) -> Optional[np.ndarray]:
        target = node.target
        if is_zero_preserving_call(node):
            return self.passthrough(node)
        if target in MERGING_FUNCTIONS or target in MERGING_METHODS:
            return self.merge(node)
        if target is torch.cat:
            return self.cat(node)
        if target in (torch.flatten, torch.reshape, "flatten", "view", "reshape"):
            return self.reshape(node)
        if target in REDUCTIONS:
            return self.reduction(node)
        return None

    def record(self, node, module, in_ids, out_ids) -> None:
        seen = self.cg.modules.get(node.target)
        if seen is None:
            self.cg.modules[node.target] = ModuleChannels(node.target, module, in_ids, out_ids,
                                                          node)
            return
        # A module called twice shares its filters between both calls.
        self.cg.union(seen.out_ids, out_ids)
        if in_ids is not None:
            self.cg.union(seen.in_ids, in_ids)

    def conv(self, node, conv: nn.Conv2d) -> Optional[np.ndarray]:
        in_ids = self.first_input(node)
        if in_ids is None or len(in_ids) != conv.in_channels:
            return None
        out_ids = self.cg.fresh(conv.out_channels)
        g = conv.groups
        if g == conv.in_channels and g > 1:  # depthwise: out c*m+j belongs to input c
            m = conv.out_channels // g
            self.cg.union(np.repeat(in_ids, m), out_ids)
        elif g > 1:  # grouped: the same position leaves every group
            for ids in (in_ids, out_ids):
                per_group = ids.reshape(g, -1)
                for k in range(1, g):
                    self.cg.union(per_group[0], per_group[k])
        self.record(node, conv, in_ids, out_ids)
        return out_ids

    def linear(self, node, linear: nn.Linear) -> Optional[np.ndarray]:
        in_ids, shape = self.first_input(node), _shape(node)
        if in_ids is None or len(shape) != 2 or len(in_ids) != linear.in_features:
            return None
        out_ids = self.cg.fresh(linear.out_features)
        self.record(node, linear, in_ids, out_ids)
        return out_ids

    def merge(self, node) -> Optional[np.ndarray]:
        shape = _shape(node)
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        scalars = [a for a in node.args if not isinstance(a, fx.Node)]
        if any(isinstance(v, fx.Node) for v in node.kwargs.values()):
            return None  # torch.add(x, other=y): not worth a rule of its own
        if any(self.ids.get(t) is None or _shape(t) != shape for t in tensors):
            return None  # broadcasting against a parameter or another shape: could mix
        if scalars and node.target not in SCALAR_SAFE:
            return None  # x + c turns a zero channel into c: removing it would not be exact
        for t in tensors[1:]:
            self.cg.union(self.ids[tensors[0]], self.ids[t])
        return self.ids[tensors[0]]

    def cat(self, node) -> Optional[np.ndarray]:
        inputs = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        parts = [self.ids.get(t) for t in inputs]
        shape = _shape(node)
        if any(p is None for p in parts):
            return None
        if dim % len(shape) == 1:
            return np.concatenate(parts)
        for p in parts[1:]:
            self.cg.union(parts[0], p)
        return parts[0]

    def reduction(self, node) -> Optional[np.ndarray]:
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        ndim = len(_shape(node.args[0]))
        dims = [dims] if isinstance(dims, int) else dims
        if dims is None or any(d % ndim < 2 for d in dims):
            return None  # reducing over the batch or the channels mixes them
        return self.passthrough(node)

    def reshape(self, node) -> Optional[np.ndarray]:
        """flatten / view / reshape, understood from the shapes before and after."""
        ids, shape = self.first_input(node), _shape(node)
        in_shape = _shape(node.args[0])
        if ids is None:
            return None
        if len(shape) == 2 and len(in_shape) >= 2 and shape[0] == in_shape[0]:
            spatial = int(np.prod(in_shape[2:], dtype=np.int64))
            if shape[1] == len(ids) * spatial:  # (B, C, H, W) -> (B, C*H*W), channel-major
                return np.repeat(ids, spatial)
        if len(shape) >= 2 and shape[:2] == in_shape[:2]:
            return ids  # row-major: every (sample, channel) block stays in place
        return None


def analyze(gm: fx.GraphModule, ignored=()) -> ChannelGraph:
    """The channel classes of `gm`, whose nodes carry shapes (ShapeProp's tensor_meta)."""
    return _Analyzer(gm, ignored).run()
