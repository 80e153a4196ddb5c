"""What prune() hands back: the user's own model class, or the traced GraphModule.

The pruner works on a torch.fx trace, whose layers are the very module objects of the model
it traced: slicing a layer slices it in both. When pruning changed only layers and
parameters, the model's own module tree, given the graph's new layers and tensors at the same
paths, *is* the pruned model: it keeps its class, its methods and its own forward (a forward
that reads `self.training` keeps training behaviour), and it runs as fast as the eager model
(a GraphModule looks every layer up through a chain of `getattr`s on each call: 1 ms of a 13
ms efficientnet_b0 forward at batch 1 on one CPU thread).

When pruning rewired the graph (a residual branch replaced by its shortcut), only the
GraphModule has the new wiring, and it is what comes back. `emit="auto"` decides so;
"module" and "graph" ask for one or the other.

The model's own forward is checked against the graph it was traced into, on the example
inputs: a forward that reads an attribute pruning changed (a width kept as a Python int)
would disagree. The trace is taken in eval mode; where the forward reads `self.training`,
code that only training runs (Inception's auxiliary classifier) was never analysed, so the
own forward must also run in training mode. Failing either, the GraphModule is emitted
(auto) or the call fails (module).
"""
import copy
from typing import Any, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch import nn

from ..capture import flat_leaves
from .rules import resize_from_tensors
from .surgery import set_submodule

EMITS = ("auto", "module", "graph")
# Where a pruned model keeps what save_pruned needs to rebuild it, out of its state dict:
# a GraphModule in its `meta` (which its deepcopy keeps, unlike other attributes), the
# model's own class in a plain attribute (deepcopy and pickling keep it).
STRUCTURE_KEY = "ffr_fast_structure"


def attach_structure(model: nn.Module, structure: dict) -> None:
    if isinstance(model, fx.GraphModule):
        model.meta[STRUCTURE_KEY] = structure
    else:
        setattr(model, STRUCTURE_KEY, structure)


def structure_of(model: nn.Module) -> Optional[dict]:
    if isinstance(model, fx.GraphModule):
        return model.meta.get(STRUCTURE_KEY)
    return getattr(model, STRUCTURE_KEY, None)


def adopt(model: nn.Module, gm: fx.GraphModule, folded_bn: Sequence[Tuple[str, str]]) -> None:
    """Give `model`, the module tree `gm` was traced from, every layer and tensor the graph
    reads at the same path, and an nn.Identity where a BatchNorm was folded into its conv."""
    resized = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            layer = gm.get_submodule(node.target)
            if model.get_submodule(node.target) is not layer:
                set_submodule(model, node.target, layer)
        elif node.op == "get_attr":
            owner_path, _, name = node.target.rpartition(".")
            owner = model.get_submodule(owner_path) if owner_path else model
            tensor = getattr(gm.get_submodule(owner_path) if owner_path else gm, name)
            if not hasattr(owner, name) or getattr(owner, name) is tensor:
                continue  # a constant fx made for the trace alone, or unchanged
            setattr(owner, name, tensor)  # nn.Module keeps a buffer a buffer, persistence too
            resized.append(owner)
    for owner in resized:  # the sizes its own forward reads (LayerNorm2d's normalized_shape)
        resize_from_tensors(owner)
    for _, bn_path in folded_bn:
        set_submodule(model, bn_path, nn.Identity())


def own_forward(model: nn.Module, graph_output, inputs) -> Tuple[Any, Optional[str]]:
    """(the model's own output on `inputs`, None) when it computes what its pruned graph
    computed (`graph_output`), else (None, why not: it raised, or its output differs)."""
    with torch.no_grad():
        try:
            output = model(*inputs)
        except Exception as error:
            return None, f"it raised {type(error).__name__}: {error}"
    got, expected = flat_leaves(output), flat_leaves(graph_output)
    pairs = [(g, e) for g, e in zip(got, expected) if isinstance(e, torch.Tensor)]
    if len(got) != len(expected) or any(
            not isinstance(g, torch.Tensor) or g.shape != e.shape for g, e in pairs):
        return None, "its output has a different structure or shape"
    for g, e in pairs:
        scale = max(float(e.abs().max()), 1e-30) if e.numel() else 1.0
        if e.numel() and float((g - e).abs().max()) > 1e-6 * scale:
            return None, ("its output differs from its pruned graph's (it reads a size "
                          "pruning changed)")
    return output, None


def own_training_forward_fails(model: nn.Module, inputs) -> Optional[str]:
    """Why the model's own forward cannot run in training mode (a branch only training runs
    reads channels pruning removed), or None. It runs on a copy, since training mode
    updates BatchNorm statistics, and on a batch of at least two, which BatchNorm needs."""
    trial = copy.deepcopy(model).train()
    batch = [torch.cat([x, x]) if x.shape[0] == 1 else x for x in inputs]
    try:
        with torch.no_grad():
            trial(*batch)
    except Exception as error:
        return f"in training mode it raised {type(error).__name__}: {error}"
    return None
