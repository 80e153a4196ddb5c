"""Residual-block removal: `y = shortcut + branch` becomes `y = shortcut` when the branch is dead.

Found generically in the fx graph, not by module class: a residual add is an add node of two
same-shaped tensors. Its *branch tail* is found by walking back from one input through
zero-preserving channel-wise ops (ReLU, dropout, ...) and an optional BatchNorm to the
producing Conv2d / Linear. The branch contributes nothing when every row that tail emits
(filter and bias with the BN folded in, importance.emitted_rows) has norm <= `tol`: with
tol = 0 the branch output is exactly zero -- note that a BN with gamma = 0 but beta != 0
still emits beta, and such a branch is kept. The add is then replaced by the other input
(the identity, or the downsample path alone) and the nodes only the branch used are erased.
"""
import operator
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch import nn

from .graph import ZERO_PRESERVING_FUNCTIONS, ZERO_PRESERVING_METHODS, ZERO_PRESERVING_MODULES
from .importance import emitted_rows, row_norm

ADD_TARGETS = {operator.add, operator.iadd, torch.add, "add", "add_"}


@dataclass
class DeadBranch:
    add: str  # name of the add node
    shortcut_arg: int  # which input of the add survives
    tail: Tuple[str, ...]  # producer path (and its BN path): zeroed in the reference model


def _is_passthrough(node: fx.Node, modules) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], ZERO_PRESERVING_MODULES)
    return node.op in ("call_function", "call_method") and (
        node.target in ZERO_PRESERVING_FUNCTIONS or node.target in ZERO_PRESERVING_METHODS)


def _tail(node: fx.Node, modules, ignored) -> Optional[Tuple[str, ...]]:
    while _is_passthrough(node, modules) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    tail = ()
    if node.op == "call_module" and isinstance(modules[node.target], nn.BatchNorm2d):
        tail, node = (node.target,), node.args[0]
    if not isinstance(node, fx.Node) or node.op != "call_module" or node.target in ignored:
        return None
    if not isinstance(modules[node.target], (nn.Conv2d, nn.Linear)) or set(tail) & ignored:
        return None
    return (node.target,) + tail


def find_dead_branches(gm: fx.GraphModule, tol: float, importance: str,
                       ignored: Sequence[str] = ()) -> List[DeadBranch]:
    modules, ignored = dict(gm.named_modules()), set(ignored)
    norm = "l1" if importance == "l1" else "l2"
    dead = []
    for node in gm.graph.nodes:
        if node.target not in ADD_TARGETS or len(node.args) != 2:
            continue
        args = node.args
        if not all(isinstance(a, fx.Node) for a in args):
            continue
        shapes = [a.meta.get("tensor_meta") for a in args]
        if None in shapes or shapes[0].shape != shapes[1].shape:
            continue
        for side in (0, 1):
            if len(args[side].users) != 1:
                continue  # read elsewhere too (an identity shortcut): not a branch
            tail = _tail(args[side], modules, ignored)
            if tail is None:
                continue
            bn = modules[tail[1]] if len(tail) > 1 else None
            if row_norm(emitted_rows(modules[tail[0]], bn), norm).max() <= tol:
                dead.append(DeadBranch(node.name, 1 - side, tail))
                break
    return dead


def _mutates_input(node: fx.Node, modules) -> bool:
    if node.op == "call_module":
        return bool(getattr(modules[node.target], "inplace", False))
    if node.op == "call_method":
        return node.target.endswith("_")
    return node.target in (operator.iadd, operator.isub, operator.imul)


def remove_branches(graph: fx.Graph, dead: Sequence[DeadBranch], modules) -> List[dict]:
    """Edit `graph`: every dead add becomes its shortcut. Returns one record per block."""
    nodes = {n.name: n for n in graph.nodes}
    records = []
    for branch in dead:
        add = nodes[branch.add]
        shortcut, start = add.args[branch.shortcut_arg], add.args[1 - branch.shortcut_arg]
        # The shortcut is the identity when the branch reads the very same tensor.
        identity = any(user is not add for user in shortcut.users)
        add.replace_all_uses_with(shortcut)
        graph.erase_node(add)
        erased = _erase_unused(graph, start)
        _guard_in_place(graph, shortcut, modules)
        records.append({"add": branch.add, "block": _common_prefix(erased),
                        "removed_modules": erased,
                        "shortcut": (f"identity shortcut (node {shortcut.name})" if identity
                                     else f"shortcut path ending in '{shortcut.target}'")})
    graph.lint()
    return records


def _erase_unused(graph: fx.Graph, start: fx.Node) -> List[str]:
    """Erase `start` and, transitively, the inputs nothing else reads. Returns module paths."""
    erased, stack, seen = set(), [start], set()
    while stack:
        node = stack.pop()
        if node in seen or node.users or node.op in ("placeholder", "output", "get_attr"):
            continue
        seen.add(node)
        inputs = node.all_input_nodes
        if node.op == "call_module":
            erased.add(node.target)
        graph.erase_node(node)
        stack.extend(inputs)
    still_called = {n.target for n in graph.nodes if n.op == "call_module"}
    return sorted(erased - still_called)


def _guard_in_place(graph: fx.Graph, shortcut: fx.Node, modules) -> None:
    """The shortcut now feeds what the add fed. An in-place op there used to write into the
    add's fresh output; now it would write into the shortcut, which other readers or autograd
    (a ReLU saves its output for the backward) still need. So such an op works out of place:
    an activation module loses its `inplace` flag, anything else gets a copy."""
    for user in list(shortcut.users):
        if not (_mutates_input(user, modules) and user.args and user.args[0] is shortcut):
            continue
        if user.op == "call_module":
            modules[user.target].inplace = False
            continue
        with graph.inserting_before(user):
            copy = graph.call_method("clone", (shortcut,))
        copy.meta = dict(shortcut.meta)  # same shape: the analysis needs no new pass
        user.replace_input_with(shortcut, copy)


def _common_prefix(paths: List[str]) -> str:
    parts = [p.split(".") for p in paths]
    prefix = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        prefix.append(level[0])
    return ".".join(prefix) or "(root)"

