"""Where the feature flow of a model is, found on its torch.export graph (ffr_fast.capture):
the capture points `layers="auto"` hooks, for FFRLoss, and the residual blocks LayerDrop and
depth pruning work on. docs/export-design.md has the reasoning.

1. A *residual add* is an ATen add of two tensors of the output's shape whose operands fork
   from one value, with an op that reads a parameter (a convolution, a matrix product, an
   embedding) on the way: `x + f(x)`. Rotary embeddings (parameter-free), attention masks
   (broadcast) and bias adds (no fork) are not.
2. A *residual block* is the innermost module call that holds a residual add and hands out
   its result, directly or through ops that pass one value through with parameters or
   buffers only (activations, dropout, casts, a post-norm LayerNorm or BatchNorm). A block
   holding several residual adds (a transformer layer) is read once, at its output; a block
   inside a block is not a feature of its own. Every other instance of a block's class is
   a block too: a MobileNetV2 stage starts with an InvertedResidual whose shortcut is
   switched off because it changes the shape, and its output is the stage's first feature.
3. A residual add that no module hands out (a pruned model emitted as a GraphModule calls
   its leaf modules only, so its adds sit at the top level) is read where its result goes:
   the output of the module that hands it out after pass-through ops (the activation of a
   post-activation ResNet), else the input of the first module that reads it.
4. The stream's entry: the value a block's (or loose add's) first shortcut starts from, when
   it has the block's output shape and is not a feature already (a decoder's embedding
   output, the stem's output before a ResNet's first stage), so the first block's residual
   x_1 - x_0 is penalised like every other.
5. Without any residual add (a plain net such as VGG): every activation fed by a
   convolution or linear layer, directly or through one normalization, is a unit, read at
   its output.

Where a capture point reads a feature, and how features form chains, is ffr_fast.flow.chains.
"""
import heapq
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch import nn

from ffr_fast.capture import Capture, UncapturableModelError, capture
from ffr_fast.flow.chains import CapturePoint

aten = torch.ops.aten

_ADDS = (aten.add, aten.add_)
_ACTIVATIONS = (aten.relu, aten.relu_, aten.relu6, aten.hardtanh, aten.hardtanh_,
                aten.leaky_relu, aten.leaky_relu_, aten.prelu, aten.elu, aten.elu_, aten.selu,
                aten.selu_, aten.celu, aten.celu_, aten.gelu, aten.gelu_, aten.silu,
                aten.silu_, aten.mish, aten.mish_, aten.hardswish, aten.hardswish_)
_WEIGHT_OPS = (aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution, aten.linear,
               aten.addmm)
_MIXING_OPS = (aten.embedding, aten.mm, aten.bmm, aten.matmul)  # mix channels: no pass-through
_NORMALIZATIONS = (aten.batch_norm, aten.layer_norm, aten.group_norm, aten.instance_norm)

RESIDUAL_RULE = "the residual stream (residual blocks and residual adds of the export graph)"
PLAIN_RULE = ("conv-norm-activation units (activations fed by a convolution or linear "
              "layer, directly or through a normalization)")


def _op(node: fx.Node):
    return getattr(node.target, "overloadpacket", None) if node.op == "call_function" else None


def _fork(cap: Capture, a: fx.Node, b: fx.Node) -> Tuple[Optional[fx.Node], List[fx.Node]]:
    """The latest value both `a` and `b` derive from, and the nodes on the paths from it to
    them (a walk back in reverse graph order: the first node reached from both sides)."""
    side = {a: 1, b: 2} if a is not b else {a: 3}
    heap = [(-cap.order[n], n.name, n) for n in side]
    heapq.heapify(heap)
    popped: List[fx.Node] = []
    while heap:
        node = heapq.heappop(heap)[2]
        if side[node] == 3:
            descendants = {node}
            for n in reversed(popped):  # popped in reverse graph order
                if any(p in descendants for p in n.all_input_nodes):
                    descendants.add(n)
            return node, [n for n in popped if n in descendants]
        popped.append(node)
        for parent in node.all_input_nodes:
            old = side.get(parent, 0)
            if old | side[node] != old:
                side[parent] = old | side[node]
                if not old:
                    heapq.heappush(heap, (-cap.order[parent], parent.name, parent))
    return None, []


def residual_fork(cap: Capture, node: fx.Node) -> Optional[fx.Node]:
    """The value a residual add's shortcut starts from, or None if `node` is no residual add
    (rule 1 of the module docstring)."""
    if _op(node) not in _ADDS or len(node.args) < 2:
        return None
    a, b = node.args[:2]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    shape = cap.shape(node)
    if shape is None or cap.shape(a) != shape or cap.shape(b) != shape:
        return None
    fork, between = _fork(cap, a, b)
    if fork is None or not any(cap.reads_parameter(n) for n in between):
        return None
    return fork


def _passes_through(cap: Capture, node: fx.Node, value: fx.Node, norms: bool = True) -> bool:
    """Whether `node` computes from `value` alone (besides parameters and buffers), keeping
    its shape: an activation, dropout, a cast, and (with `norms`) a norm. Such a node
    carries the stream on."""
    if node.op != "call_function" or not node.args or node.args[0] is not value:
        return False
    if not norms and _op(node) in _NORMALIZATIONS:
        return False
    if _op(node) in _WEIGHT_OPS + _MIXING_OPS or cap.shape(node) != cap.shape(value):
        return False
    return all(arg is value or (arg.op == "placeholder" and (
        arg.name in cap.parameters or arg.name in cap.buffers)) for arg in node.all_input_nodes)


def _carried(cap: Capture, value: fx.Node, within: Optional[str] = None):
    """`value`, then the nodes that carry it on one by one (each the single user of the one
    before, passing it through), inside module call `within` if one is given. Outside a
    block a norm ends the walk: a pre-norm transformer's stream goes on before its norms."""
    while True:
        yield value
        users = list(value.users)
        if len(users) != 1 or not _passes_through(cap, users[0], value, norms=within is not None):
            return
        if within is not None and within not in cap.call_stack(users[0]):
            return
        value = users[0]


def _handed_out(cap: Capture, add: fx.Node, call_id: str) -> Optional[fx.Node]:
    """The value by which module call `call_id` hands out the residual add `add`, or None."""
    outputs = cap.calls[call_id].outputs
    return next((v for v in _carried(cap, add, call_id) if v.name in outputs), None)


def _entry(cap: Capture, fork: fx.Node, found, inputs) -> fx.Node:
    """The stream value a shortcut starts from. `fork`, walked back through the ops that
    carry a value on (a norm's cast, an activation between blocks): to a feature found
    already if it is one (the stream goes on), else to one of the block's `inputs`."""
    carried = [fork]
    while True:
        node = carried[-1]
        source = node.args[0] if node.op == "call_function" and node.args else None
        if not (isinstance(source, fx.Node) and _passes_through(cap, node, source)):
            break
        carried.append(source)
    return (next((n for n in carried if n.name in found), None)
            or next((n for n in carried if n.name in inputs), fork))


def _reader(cap: Capture, value: fx.Node) -> Optional[CapturePoint]:
    """Where a hook reads `value`: the innermost module call that computes and hands it out,
    else the first module call that takes it in; None if no module call sees it."""
    producers = [cap.calls[c] for c in cap.call_stack(value) if value.name in cap.calls[c].outputs]
    if producers:
        call = producers[-1]
        return CapturePoint(call.path, call.index, leaf=call.outputs.index(value.name))
    for call in cap.calls.values():
        if value.name in call.inputs:
            return CapturePoint(call.path, call.index, input=True,
                                leaf=call.inputs.index(value.name))
    return None


@dataclass
class StreamUnit:
    """One step of the stream: the value it hands on, and the shortcut it started from."""

    value: fx.Node
    fork: Optional[fx.Node]  # None: an instance of a block's class with its shortcut off
    block: Optional[str] = None  # the module call id of a residual block


def _inside_other(cap: Capture, value: fx.Node, call_id: str, blocks) -> bool:
    """Whether module call `call_id`, which hands out `value`, runs inside another block."""
    stack = cap.call_stack(value)
    outer = stack[:stack.index(call_id)] if call_id in stack else stack
    return any(c in blocks for c in outer)


def residual_units(model: nn.Module, cap: Capture) -> List[StreamUnit]:
    """The steps of the residual stream (rules 1-3 of the module docstring), in forward
    order: residual blocks, and residual adds that no module hands out."""
    forks = {}
    for node in cap.graph.nodes:
        fork = residual_fork(cap, node)
        if fork is not None:
            forks[node] = fork
    blocks: Dict[str, StreamUnit] = {}
    for add, fork in forks.items():
        for call_id in reversed(cap.call_stack(add)):  # innermost first
            value = _handed_out(cap, add, call_id)
            if value is not None:
                blocks.setdefault(call_id, StreamUnit(value, fork, call_id)).value = value
                break
    # the shortcut of a block starts where its first residual add's does
    for add, fork in forks.items():
        for call_id in cap.call_stack(add):
            if call_id in blocks and cap.order[fork] < cap.order[blocks[call_id].fork]:
                blocks[call_id].fork = fork
    # a block inside a block is no feature of its own
    outer = {call_id: unit for call_id, unit in blocks.items()
             if not _inside_other(cap, unit.value, call_id, blocks)}
    units = list(outer.values())
    for add, fork in forks.items():
        if not any(c in blocks for c in cap.call_stack(add)):
            *_, value = _carried(cap, add)
            units.append(StreamUnit(value, fork))
    # every other instance of a block's class, not inside a block, is a block too
    block_types = {type(model.get_submodule(cap.calls[c].path)) for c in outer}
    for call_id, call in cap.calls.items():
        if (call_id in outer or type(model.get_submodule(call.path)) not in block_types
                or not call.outputs or not call.outputs[0]):
            continue
        value = cap.nodes[call.outputs[0]]
        if not _inside_other(cap, value, call_id, outer):
            units.append(StreamUnit(value, None, call_id))
    units.sort(key=lambda unit: cap.order[unit.value])
    return units


def _plain_units(cap: Capture) -> List[fx.Node]:
    """The activations that end conv-norm-activation units (rule 5)."""
    units = []
    for node in cap.graph.nodes:
        if _op(node) not in _ACTIVATIONS or not isinstance(node.args[0], fx.Node):
            continue
        source = node.args[0]
        if _op(source) in _NORMALIZATIONS and isinstance(source.args[0], fx.Node):
            source = source.args[0]
        if _op(source) in _WEIGHT_OPS:
            units.append(node)
    return units


def find_stream(model: nn.Module, cap: Capture) -> Tuple[List[CapturePoint], str]:
    """The capture points of the model's feature flow and the rule that found them."""
    units = residual_units(model, cap)
    points: List[CapturePoint] = []

    def read(value: fx.Node, block: Optional[str] = None, starts_chain: bool = False) -> None:
        if block is not None:
            call = cap.calls[block]
            point = CapturePoint(call.path, call.index, leaf=call.outputs.index(value.name))
        else:
            point = _reader(cap, value)
        if point is not None and point not in points:
            points.append(replace(point, starts_chain=starts_chain))

    if not units:
        for value in _plain_units(cap):
            read(value)
        return points, PLAIN_RULE
    found = set()
    for unit in units:
        inputs = cap.calls[unit.block].inputs if unit.block else ()
        entry = _entry(cap, unit.fork, found, inputs) if unit.fork is not None else unit.value
        if entry.name not in found | {unit.value.name} and (
                cap.shape(entry) == cap.shape(unit.value)):
            read(entry, starts_chain=True)
            found.add(entry.name)
        read(unit.value, unit.block)
        found.add(unit.value.name)
    return points, RESIDUAL_RULE


def auto_layers(model: nn.Module, args: Sequence = (), kwargs: Optional[dict] = None
                ) -> Tuple[List[CapturePoint], str]:
    """Where `layers="auto"` reads features on the example call `model(*args, **kwargs)`, and
    the rule that found them; raises if nowhere."""
    try:
        cap = capture(model, args, kwargs)
    except UncapturableModelError as error:
        raise UncapturableModelError(
            f"FFRLoss(layers='auto') reads the model's torch.export graph, and {error}. Name "
            "the layers whose outputs form the flow explicitly: FFRLoss(model, layers=[...])."
        ) from error
    points, rule = find_stream(model, cap)
    if points:
        return points, rule
    examples = [name for name, _ in model.named_modules() if name][:6]
    raise ValueError(
        f"FFRLoss(layers='auto') found no feature flow in {type(model).__name__}: it looked "
        f"for {RESIDUAL_RULE} and, failing that, for {PLAIN_RULE}. Name the layers whose "
        f"outputs form the flow explicitly, e.g. FFRLoss(model, layers=[...]) with names "
        f"from model.named_modules() such as {examples}.")


def residual_blocks(model: nn.Module, args: Sequence = (), kwargs: Optional[dict] = None
                    ) -> List[str]:
    """Names of the residual blocks of `model` (rule 2 of the module docstring) in forward
    order, found on the example call `model(*args, **kwargs)`."""
    names: List[str] = []
    for unit in residual_units(model, cap := capture(model, args, kwargs)):
        if unit.block is not None and cap.calls[unit.block].path not in names:
            names.append(cap.calls[unit.block].path)
    return names
