"""Tracing a model for the pruner: torch.fx with the rule table's types as leaves, errors
that name the module that could not be traced, and the checks that depend on tracing itself
(a forward whose code reads `self.training`, a LayerNorm whose size must follow its weight).
"""
from typing import List, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..modes import restore_training_flags, training_flags
from .rules import rule_for


class UntraceableModelError(RuntimeError):
    """torch.fx could not trace the model; the message names the failing module."""


def layer_norm_last_dim(x, weight, bias, eps: float):
    """F.layer_norm over the last dimension, its size read from the weight: a traced
    `F.layer_norm(x, (C,), weight, bias)` has C baked in, so trace() rewrites it to this."""
    return F.layer_norm(x, weight.shape, weight, bias, eps)


torch.fx.wrap("layer_norm_last_dim")


class _PathTracer(fx.Tracer):
    """A tracer that treats `leaves` and types with a rule as opaque, and remembers which
    module it was inside."""

    def __init__(self, leaves=()):  # no-argument form: GraphModule unpickling re-traces
        super().__init__()
        self.leaves = set(leaves)
        self.stack: List[str] = []

    def is_leaf_module(self, m, qualified_name):
        return (qualified_name in self.leaves or rule_for(m) is not None
                or super().is_leaf_module(m, qualified_name))

    def call_module(self, m, forward, args, kwargs):
        self.stack.append(self.path_of_module(m))
        out = super().call_module(m, forward, args, kwargs)
        self.stack.pop()
        return out


def trace(model: nn.Module, leaves: Sequence[str] = ()) -> fx.GraphModule:
    """`model` traced into a GraphModule that shares its submodules; a failure names the
    innermost module being traced and how to skip it.

    torch.fx stores the tensor constants a forward creates (MaxViT's relative position
    index) as new attributes of the module it traces; they are moved into the GraphModule
    and taken off `model`, which is left as it was."""
    tracer = _PathTracer(leaves)
    attributes = set(vars(model))
    try:
        graph = tracer.trace(model)
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
    _layer_norm_sizes_from_weights(graph)
    traced = fx.GraphModule(model, graph)
    for added in set(vars(model)) - attributes:
        delattr(model, added)
    return traced


def reads_training_flag(model: nn.Module, leaves: Sequence[str] = ()) -> bool:
    """Whether the traced code differs between train and eval mode: a traced forward that
    reads `self.training` (torch.fx bakes its value into the graph), whose pruned model
    then runs the mode it was traced in, whatever its flags say. Leaves every flag as it
    was."""
    flags = training_flags(model)
    try:
        codes = []
        for mode in (False, True):
            model.train(mode)
            codes.append(trace(model, leaves).code)
    finally:
        restore_training_flags(model, flags)
    return codes[0] != codes[1]


def _layer_norm_sizes_from_weights(graph: fx.Graph) -> None:
    for node in list(graph.nodes):
        if node.target is not F.layer_norm:
            continue
        shape, weight = node_arg(node, 1, "normalized_shape"), node_arg(node, 2, "weight")
        bias, eps = node_arg(node, 3, "bias"), node_arg(node, 4, "eps", 1e-5)
        if isinstance(weight, fx.Node) and isinstance(shape, (tuple, list)) and len(shape) == 1:
            with graph.inserting_before(node):
                new = graph.call_function(layer_norm_last_dim, (node.args[0], weight, bias, eps))
            node.replace_all_uses_with(new)
            graph.erase_node(node)


def shape_of(node) -> Optional[torch.Size]:
    """The shape ShapeProp recorded for a node's tensor, or None (not a node, not a tensor)."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return getattr(meta, "shape", None)


def node_arg(node: fx.Node, index: int, name: str, default=None):
    """Argument `index` of a call node, given by position or by keyword `name`."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)
