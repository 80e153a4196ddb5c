"""Residual branches on torch.export's capture: which ops a residual block's branches end in,
so a block scores what its branches write into the stream (and nothing else it computes).

A residual block hands out `x + f(x)` (or `relu(x + f(x))`, or `x + f(x) + g(x + f(x))` for a
transformer layer): walking back from the value it hands out, through ops that pass one
value on (an activation, a cast), each residual add splits into its shortcut, which the walk
follows on towards the block's input, and its branch `f(x)`. A branch's *tail* is what it
is computed from through ops that keep a zero a zero: views and permutes, zero-preserving
activations, a multiplication by a parameter or a constant (a layer scale; stochastic depth
in eval mode is no op at all) and the adds of a parameter (a bias written `x + b`, which
emits b). It ends at its producers (a linear layer, a convolution; with a batch norm after
it), which emit what the branch emits: the branch adds exactly zero to the stream when its
tail emits zero. A branch whose tail passes through anything else (a norm, a sigmoid) has
no tail: nothing can say it is zero, and its block is not scored.

Scored this way a pre-norm block is not kept alive by its norm's shift or its depthwise
convolution, which write the stream's channel class but not into the stream.
"""
from typing import List, Optional, Set

import torch.fx as fx

from ..capture import Capture
from ..flow.stream import residual_fork
from . import depth
from .aten import Analysis
from .aten_importance import Emitter
from .aten_layout import LAYOUT_OPS
from .aten_ops import op_name

# Element-wise ops that map 0 to 0 on the one activation they read.
KEEP_ZERO = {"relu", "relu6", "gelu", "silu", "mish", "hardswish", "hardtanh", "tanh",
                   "leaky_relu", "elu", "selu", "celu", "dropout", "clone", "contiguous",
                   "alias", "detach", "to", "_to_copy", "type_as", "neg"}
# Ops that hand their one activation on unchanged in value or by an activation that maps 0
# to 0; what a residual block may apply to `x + f(x)` before handing it out.
PASS_THROUGH = KEEP_ZERO - {"neg"}


def activations(cap: Capture, node: fx.Node) -> List[fx.Node]:
    """The operands of `node` that are activations (not parameters, buffers or constants)."""
    return [arg for arg in node.all_input_nodes
            if not (arg.op == "placeholder" and (arg.name in cap.parameters or
                                                 arg.name in cap.buffers))]


def shortcut_and_branch(cap: Capture, add: fx.Node, fork: fx.Node):
    """(shortcut operand, branch operand) of residual add `add` whose shortcut starts at
    `fork`, or None when both operands compute with parameters (a projection shortcut)."""
    def plain(value: fx.Node) -> bool:  # reaches the fork through pass-through ops only
        while value is not fork:
            inputs = activations(cap, value)
            if op_name(value) not in PASS_THROUGH or len(inputs) != 1 or \
                    value.all_input_nodes != inputs:
                return False
            value = inputs[0]
        return True
    a, b = add.args[:2]
    if plain(a):
        return a, b
    if plain(b):
        return b, a
    return None


def block_branches(cap: Capture, block: str) -> Optional[List[fx.Node]]:
    """The branch operand of every residual add by which module call `block` turns its input
    into its output, last first; None when its output is not its input plus branches (a
    post-norm layer normalises the sum, a downsampling block projects its shortcut)."""
    call = cap.calls[block]
    inputs = set(call.inputs)
    node = cap.nodes.get(call.outputs[0]) if call.outputs else None
    branches = []
    while node is not None and node.name not in inputs:
        fork = residual_fork(cap, node)
        if fork is not None and block in cap.call_stack(node):
            split = shortcut_and_branch(cap, node, fork)
            if split is None:
                return None
            node, branch = split
            branches.append(branch)
            continue
        operands = activations(cap, node)
        if op_name(node) not in PASS_THROUGH or len(operands) != 1:
            return None
        node = operands[0]
    return branches if node is not None and branches else None


def tail(cap: Capture, analysis: Analysis, branch: fx.Node) -> Optional[Set[str]]:
    """What residual branch `branch` emits from (module docstring): the names of the
    producer, batch-norm and bias-add nodes its value is made of through zero-preserving
    ops (the nodes an Emitter writes), or None when it passes through any other op."""
    producers = {p.output for p in analysis.producers}
    sources: Set[str] = set()
    pending = [branch]
    while pending:
        node = pending.pop()
        if node.name in producers:
            sources.add(node.name)
            continue
        if node.op != "call_function":
            return None
        name = op_name(node)
        operands = activations(cap, node)
        if name == "batch_norm":  # its shift, or the producer it folds into
            sources.add(node.name)
            pending += operands[:1]
        elif name in ("add", "sub") and len(operands) == 1:  # x + bias
            sources.add(node.name)
            pending += operands
        elif name in ("add", "sub", "cat") and operands:
            pending += operands  # two zero values add to zero
        elif (name in KEEP_ZERO or name in LAYOUT_OPS or name in ("mul", "div")) \
                and len(operands) == 1:
            pending += operands
        else:
            return None
    return sources


def block_score(cap: Capture, analysis: Analysis, found: List[Emitter], block: str
                ) -> Optional[float]:
    """The score of residual block `block`: the largest score its branches' tails emit
    (None when a branch has no tail, or nothing scores it)."""
    branches = block_branches(cap, block)
    if branches is None:
        return None
    scores = [emitted(cap, analysis, found, branch) for branch in branches]
    return None if None in scores else max(scores)


def emitted(cap: Capture, analysis: Analysis, found: List[Emitter], branch: fx.Node
            ) -> Optional[float]:
    """The largest score that residual branch `branch`'s tail emits by the emitters
    `found` (None when it has no tail, or nothing scores it)."""
    sources = tail(cap, analysis, branch)
    written = [float(e.scores.max()) for e in found
               if sources and sources.intersection(e.nodes) and len(e.scores)]
    return max(written) if written else None


def dead_branches(cap: Capture, analysis: Analysis, found: List[Emitter], limit: float,
                  removed: List[str], removed_adds: Set[str]) -> List[str]:
    """The modules holding the residual adds, outside the `removed` modules and other than
    the adds `removed_adds` whose branches leave alone, whose branch's tail emits at most
    `limit`: branches that no removal here can take out."""
    out = []
    for node in cap.graph.nodes:
        fork = residual_fork(cap, node)
        if fork is None or node.name in removed_adds or depth.inside(cap.module_path(node),
                                                                       removed):
            continue
        split = shortcut_and_branch(cap, node, fork)
        # a projection shortcut: either side may be the branch that went dead
        for branch in [split[1]] if split else node.args[:2]:
            score = emitted(cap, analysis, found, branch)
            if score is not None and score <= limit:
                out.append(cap.module_path(node))
                break
    return list(dict.fromkeys(out))
