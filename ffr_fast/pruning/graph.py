"""The channel-dependency graph: which channels of which layers must be removed together.

The model is traced with torch.fx (tracing.py) and shapes are propagated on the example
inputs. A tensor's *channel ids* belong to one of its dimensions (or, after a head split, to
a few adjacent ones) and follow that dimension through the ops that move dimensions
(layout.py). Ids that must be removed together are merged in a union-find (numpy,
vectorised); each merged set is a *channel class*, the atom of pruning.

How ids flow is read from the rule table (rules.py), for modules and for functions; the
result is a ChannelGraph (channels.py):
- a producer (Conv, Linear on the last dimension of any rank) reads its input's ids and
  writes fresh ones. Depthwise conv: output channel c*m+j is tied to input channel c.
  Grouped conv: position p of every group is tied across groups.
- channel-wise layers (BatchNorm, LayerNorm, activations, pools, ...) write the ids they read;
  a gate (sigmoid) only when all its readers multiply it with a tensor of the same channels;
- add / sub / mul of tensors that broadcast to one shape merge the ids of their operands
  (residual streams, squeeze-excitation `x * gate`); a parameter broadcast against a tensor
  (layer scale `gamma * x`) is sliced with the tensor's channels;
- cat along the channel dimension concatenates ids, along another dimension merges them;
- chunk along the channel dimension ties position p of every chunk (they shrink alike);
- a view that splits the channel dimension in two (channel shuffle, heads) ties the
  positions across the leading part, which keeps its size; a view given the channel count
  as a constant records it, to shrink with the channels.
Anything else, and every module listed in `ignored`, could mix channels: all channels it
reads or writes are *pinned* (never pruned) and the op is named with the reason. Model
inputs and outputs are pinned too.
"""
import operator
from typing import Dict, Optional

import numpy as np
import torch
import torch.fx as fx

from .channels import Chan, ChannelGraph, ModuleChannels, ParamChannels, ParamView, ViewSize
from .layout import indexed, permuted, pieces, reduced, size_args, viewed
from .rules import (
    GATES,
    MERGING,
    MULTIPLYING,
    PERMUTES,
    REDUCTIONS,
    SHAPE_QUERIES,
    SPATIAL,
    SPLITS,
    VIEWS,
    Rule,
    is_zero_preserving_call,
    out_channels,
    rule_for,
    tensor_of,
)
from .tracing import layer_norm_last_dim, node_arg, shape_of


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
        self.chan: Dict[fx.Node, object] = {}  # Chan, a list of them (tuples), or None

    def run(self) -> ChannelGraph:
        for node in self.gm.graph.nodes:
            if node.op == "output":
                for arg in node.all_input_nodes:
                    self.pin_all(arg, "feeds the model output")
                continue
            self.chan[node] = self.visit(node)
        return self.cg

    # -- helpers --------------------------------------------------------------------------
    def pin_all(self, node, reason: str) -> None:
        value = self.chan.get(node)
        for chan in value if isinstance(value, list) else [value]:
            if isinstance(chan, Chan):
                self.cg.pin(chan.ids, reason)

    def fresh_pinned(self, node, dim: int, reason: str) -> Optional[Chan]:
        shape = shape_of(node)
        if shape is None or len(shape) < 2:
            return None
        dim %= len(shape)
        ids = self.cg.fresh(shape[dim])
        self.cg.pin(ids, reason)
        return Chan((dim,), ids)

    def take(self, arg, dim: int, user: str) -> np.ndarray:
        """The ids on dimension `dim` of `arg`; channels tracked elsewhere are pinned and
        the dimension gets fresh pinned ids."""
        shape = shape_of(arg)
        dim %= len(shape)
        chan = self.chan.get(arg)
        if isinstance(chan, Chan) and chan.dims == (dim,):
            return chan.ids
        reason = f"{user} reads dimension {dim}, its channels are elsewhere"
        if isinstance(chan, Chan):
            self.cg.pin(chan.ids, reason)
        ids = self.cg.fresh(shape[dim])
        self.cg.pin(ids, reason if isinstance(chan, Chan) else "model input or opaque op")
        return ids

    def unknown(self, node: fx.Node, reason: str):
        what = _describe(node, self.modules)
        self.cg.unknown_ops.append({"op": what, "reason": reason})
        for arg in node.all_input_nodes:
            self.pin_all(arg, f"{what}: {reason}")
        return self.fresh_pinned(node, 1, f"{what}: {reason}")

    def visit(self, node: fx.Node):
        if node.op == "placeholder":
            return self.fresh_pinned(node, 1, "model input")
        if node.op == "get_attr":
            return None  # parameters are read by the ops that use them
        if node.op == "call_function" and node.target is operator.getitem:
            return self.getitem(node)
        meta = node.meta.get("tensor_meta")
        if meta is None:  # sizes and other Python values
            reads = any(isinstance(self.chan.get(a), (Chan, list)) for a in node.all_input_nodes)
            if not reads or node.target in SHAPE_QUERIES:
                return None
            return self.unknown(node, "returns a value the analysis does not follow")
        if node.op == "call_module":
            module = self.modules[node.target]
            rule = None if node.target in self.ignored else rule_for(module)
            if rule is None:
                reason = ("listed in `ignored`" if node.target in self.ignored
                          else "module type without a pruning rule (see register_rule)")
                return self.unknown(node, reason)
            out = self.module_rule(node, module, rule)
        else:
            out = self.function_rule(node)
        if out is None:
            return self.unknown(node, "op not understood by the dependency analysis; it "
                                "could mix channels")
        return out

    # -- modules --------------------------------------------------------------------------
    def module_rule(self, node, module, rule: Rule):
        if rule.kind == "attention":
            return self.attention(node, module, rule)
        if not node.args or not isinstance(node.args[0], fx.Node) or shape_of(node) is None:
            return None
        if rule.kind == "producer":
            return self.producer(node, module, rule)
        if rule.kind == "reshape":
            return self.view(node)
        if not rule.zero_preserving(module):
            if rule.gate:
                return self.elementwise(node) if self.gated(node) else None
            if not rule.params:
                return None  # e.g. Hardtanh(0.5, 2): a removed channel would emit 0.5
        if rule.dim is None:
            return self.elementwise(node)
        ids = self.take(node.args[0], rule.dim, _describe(node, self.modules))
        if shape_of(node)[rule.dim] != len(ids):
            return None
        self.tie_groups(ids, rule.groups(module))
        if rule.params:
            self.record(node, module, rule, None, ids)
        if rule.renormalizes:
            self.cg.renormalized.append((ids, node.target))
        return Chan((rule.dim % len(shape_of(node)),), ids)

    def producer(self, node, module, rule: Rule):
        dim = rule.dim % len(shape_of(node))
        in_ids = self.take(node.args[0], dim, _describe(node, self.modules))
        weight = module.weight
        roles = rule.params["weight"]
        out_ids = self.cg.fresh(weight.shape[roles.index("out")])
        g = rule.groups(module)
        if g > 1:
            if roles[:2] != ("out", "in"):
                return None  # grouped transposed conv: not supported, pinned
            if g == len(in_ids) and weight.shape[1] == 1:  # depthwise: out c*m+j reads c
                self.cg.union(np.repeat(in_ids, len(out_ids) // g), out_ids)
            else:  # grouped: the same position leaves every group
                self.tie_groups(in_ids, g)
                self.tie_groups(out_ids, g)
        self.record(node, module, rule, in_ids, out_ids)
        return Chan((dim,), out_ids)

    def add_param(self, path: str, dim: int, ids: np.ndarray) -> None:
        for seen in self.cg.params:
            if seen.path == path:  # read twice: one slicing for both readers
                if seen.dim != dim or len(seen.ids) != len(ids):
                    self.cg.pin(ids, f"parameter '{path}' read along different dimensions")
                    self.cg.pin(seen.ids, f"parameter '{path}' read along different dimensions")
                else:
                    self.cg.union(seen.ids, ids)
                return
        self.cg.params.append(ParamChannels(path, dim, ids))

    def attention(self, node, module, rule: Rule):
        """Self-attention on one input tensor, channels last: the rule's `inputs` arguments
        all that tensor, no other tensor argument (no masks). Its output, or for a
        `tuple_output` a list (output, weights), the weights untracked."""
        heads = rule.heads(module)
        inputs = [node_arg(node, i, name) for i, name in enumerate(rule.inputs)]
        extra = list(node.args[len(rule.inputs):]) + [
            v for k, v in node.kwargs.items() if k not in rule.inputs]
        x = inputs[0]
        if (heads is None or not isinstance(x, fx.Node) or any(t is not x for t in inputs)
                or any(isinstance(v, fx.Node) for v in extra) or shape_of(x) is None):
            return None
        out_shape = None if rule.tuple_output else shape_of(node)
        if not rule.tuple_output and (out_shape is None or len(out_shape) != len(shape_of(x))
                                      or out_shape[-1] != out_channels(module)):
            return None
        in_ids = self.take(x, -1, _describe(node, self.modules))
        num_heads, head_dim = heads
        head_ids = self.cg.fresh(num_heads)
        out_ids = self.cg.fresh(out_channels(module))
        self.record(node, module, rule, in_ids, out_ids, np.repeat(head_ids, head_dim), head_ids)
        out = Chan((len(shape_of(x)) - 1,), out_ids)
        return [out, None] if rule.tuple_output else out

    def tie_groups(self, ids: np.ndarray, groups: int) -> None:
        """Position p of every group is removed together, so the groups stay equal."""
        if groups > 1:
            per_group = ids.reshape(groups, -1)
            self.cg.union(np.repeat(per_group[:1], groups - 1, axis=0), per_group[1:])

    def record(self, node, module, rule, in_ids, out_ids, inner_ids=None, head_ids=None
               ) -> None:
        seen = self.cg.modules.get(node.target)
        if seen is None:
            self.cg.modules[node.target] = ModuleChannels(node.target, module, rule, in_ids,
                                                          out_ids, node, inner_ids, head_ids)
            return
        # A module called twice shares its filters between both calls.
        for old, new in ((seen.out_ids, out_ids), (seen.in_ids, in_ids),
                         (seen.inner_ids, inner_ids), (seen.head_ids, head_ids)):
            if new is not None:
                self.cg.union(old, new)

    def gated(self, node) -> bool:
        """Every reader multiplies this gate with another tensor (x * sigmoid(...)): the
        gate's 1/2 for a removed channel then meets a zero channel."""
        return bool(node.users) and all(
            u.target in MULTIPLYING and len(u.args) == 2
            and all(isinstance(a, fx.Node) for a in u.args) for u in node.users)

    def elementwise(self, node):
        chan = self.chan.get(node.args[0])
        if not isinstance(chan, Chan) or shape_of(node) != shape_of(node.args[0]):
            return None if isinstance(chan, Chan) else self.fresh_pinned(node, 1, "untracked")
        return chan

    # -- functions ------------------------------------------------------------------------
    def function_rule(self, node):
        target = node.target
        if not node.args or not isinstance(node.args[0], (fx.Node, list, tuple)):
            return None
        if target in GATES:
            return self.elementwise(node) if self.gated(node) else None
        if target in SPATIAL:
            chan = self.chan.get(node.args[0])
            if isinstance(chan, Chan) and chan.dims == (1,) and shape_of(node)[1] == len(chan.ids):
                return chan
            return None
        if is_zero_preserving_call(node):
            return self.elementwise(node)
        if target is layer_norm_last_dim:
            return self.layer_norm(node)
        if target in MERGING:
            return self.merge(node)
        if target is torch.cat:
            return self.cat(node)
        if target in VIEWS:
            return self.view(node)
        if target in PERMUTES:
            return self.permute(node)
        if target in REDUCTIONS:
            return self.reduction(node)
        if target in SPLITS:
            return self.split(node)
        if target == "expand" and node.args[0].op == "get_attr":
            return ParamView(node.args[0].target)  # same rank, size-1 dims broadcast
        return None

    def layer_norm(self, node):
        x, weight, bias = node.args[0], node.args[1], node.args[2]
        ids = self.take(x, -1, _describe(node, self.modules))
        for param in (weight, bias):
            if isinstance(param, fx.Node):
                if param.op != "get_attr":
                    return None
                self.add_param(param.target, 0, ids)
        self.cg.renormalized.append((ids, f"layer_norm (node {node.name})"))
        return Chan((len(shape_of(node)) - 1,), ids)

    def merge(self, node):
        shape = shape_of(node)
        if any(isinstance(v, fx.Node) for v in node.kwargs.values()):
            return None  # torch.add(x, other=y): not worth a rule of its own
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        multiplying = node.target in MULTIPLYING
        if len(tensors) < len(node.args) and not multiplying:
            return None  # x + c turns a zero channel into c: removing it would not be exact
        tracked = [t for t in tensors if isinstance(self.chan.get(t), Chan)]
        if not tracked:
            return None
        first = self.chan[tracked[0]]
        dims = tuple(d + len(shape) - len(shape_of(tracked[0])) for d in first.dims)
        for t in tensors:
            t_shape = shape_of(t)
            if t_shape is None:
                return None
            offset = len(shape) - len(t_shape)
            chan = self.chan.get(t)
            if isinstance(chan, Chan):
                shifted = tuple(d + offset for d in chan.dims)
                if shifted != dims or chan.ids.shape != first.ids.shape:
                    return None
                self.cg.union(first.ids, chan.ids)
                continue
            own = [d - offset for d in dims]
            sizes = [t_shape[d] if d >= 0 else 1 for d in own]
            if all(s == 1 for s in sizes):
                continue  # broadcast along the channels: the same value for every channel
            if t.op != "get_attr" or len(own) != 1 or own[0] < 0:
                return None  # an untracked tensor: it could hold anything per channel
            self.add_param(t.target, own[0], first.ids)
            if not multiplying:  # x + p: a removed channel drops p's share, so p scores
                param = tensor_of(self.gm, t.target)[2].detach()  # a parameter or buffer
                self.cg.shifts.append((first.ids, param.abs().double().movedim(
                    own[0], 0).flatten(1).amax(1)))
        return Chan(dims, first.ids)

    def cat(self, node):
        inputs = node_arg(node, 0, "tensors")
        dim = node_arg(node, 1, "dim", 0) % len(shape_of(node))
        parts = [self.chan.get(t) for t in inputs]
        chans = [p for p in parts if isinstance(p, Chan)]
        if (not chans or any(not isinstance(p, (Chan, ParamView)) for p in parts)
                or any(p.dims != chans[0].dims for p in chans) or len(chans[0].dims) != 1):
            return None
        if chans[0].dims == (dim,):
            if len(chans) < len(parts):
                return None  # a parameter's own channels joined along the channels
            return Chan((dim,), np.concatenate([p.ids for p in parts]))
        for p in chans[1:]:
            if p.ids.shape != chans[0].ids.shape:
                return None
            self.cg.union(chans[0].ids, p.ids)
        for t, p in zip(inputs, parts):  # a class token: sliced with the channels
            if isinstance(p, ParamView) and shape_of(t)[chans[0].dims[0]] == len(chans[0].ids):
                self.add_param(p.path, chans[0].dims[0], chans[0].ids)
            elif isinstance(p, ParamView):
                return None
        return chans[0]

    def reduction(self, node):
        chan = self.chan.get(node.args[0])
        return reduced(node, chan) if isinstance(chan, Chan) else None

    def permute(self, node):
        chan = self.chan.get(node.args[0])
        return permuted(node, chan) if isinstance(chan, Chan) else None

    def view(self, node):
        """A reshape understood from the shapes before and after (row-major). Where the
        channels land on one dimension given as a constant (x.reshape(n, 768, -1)), the
        constant is recorded to shrink with them. Split in two (channel shuffle, heads),
        the leading part keeps its size (view_shapes) and the trailing one must be
        computed (c // groups), not a constant."""
        chan = self.view_shapes(node)
        sizes = size_args(node)
        if not isinstance(chan, Chan) or sizes is None:
            return chan
        last = chan.dims[-1]
        if not (last < len(sizes) and isinstance(sizes[last], int) and sizes[last] != -1):
            return chan
        if len(chan.dims) > 1 or len(sizes) != len(shape_of(node)):
            return None
        self.cg.view_sizes.append(ViewSize(node.name, chan.dims[0], chan.ids))
        return chan

    def view_shapes(self, node):
        """The channels after the view; split over several dimensions (channel shuffle's
        (groups, c // groups), heads), every slice along the leading part keeps its size (a
        constant of the graph), so positions are tied across it and the last part shrinks
        alike in every slice."""
        chan = self.chan.get(node.args[0])
        if not isinstance(chan, Chan):
            return None
        chan = viewed(chan, shape_of(node.args[0]), shape_of(node))
        if chan is not None and len(chan.dims) > 1:
            rows = chan.ids.reshape(-1, chan.ids.shape[-1])
            self.cg.union(np.repeat(rows[:1], len(rows) - 1, axis=0), rows[1:])
        return chan

    def split(self, node):
        """chunk / split / unbind: a list with the channels of each piece; pieces cut along
        the channels shrink alike, so their positions are tied."""
        chan = self.chan.get(node.args[0])
        parts = pieces(node, chan) if isinstance(chan, Chan) else None
        if parts and parts[0].ids is not chan.ids:
            for part in parts[1:]:
                self.cg.union(parts[0].ids, part.ids)
        return parts

    def getitem(self, node):
        source, index = node.args
        value = self.chan.get(source)
        if isinstance(value, list):  # an item of a tuple (chunk, MultiheadAttention, ...)
            return value[index] if isinstance(index, int) else None
        if shape_of(node) is None:
            return None
        if not isinstance(value, Chan):
            return self.fresh_pinned(node, 1, "item of an opaque op's output")
        return indexed(value, index) or self.unknown(node, "indexing across the channels")


def analyze(gm: fx.GraphModule, ignored=()) -> ChannelGraph:
    """The channel classes of `gm`, whose nodes carry shapes (ShapeProp's tensor_meta)."""
    return _Analyzer(gm, ignored).run()
