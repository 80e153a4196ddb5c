"""Residual branches: `y = shortcut + branch(x)` becomes `y = shortcut` when a branch goes.

Found generically in the fx graph, not by module class. A *residual add* is an add of two
same-shaped tensors; one side is a *branch* when the nodes only that side uses (its
exclusive sub-graph, read back from the add until a node that something else also reads)
call at least one module and start from a tensor of the graph. When both sides qualify (a
projection shortcut), the branch is the side with more nodes and the shortcut the other.

A branch's name is the longest module path common to the modules it calls ("layer2.1" for
a ResNet block, "features.6.conv" for a MobileNetV2 block); branches that would share a name
(the attention and MLP branches of one transformer block) get the next path component of
their largest module or parameter appended ("encoder.layers.encoder_layer_3.self_attention",
"features.1.0.attn" for a Swin block whose attention reads its weights directly).

A branch's *tail* is the producer (Conv / Linear, and the BatchNorm right after it; or an
attention, through the output item of its tuple) reached from the add through
zero-preserving ops, data movement and layer scales: what the branch emits is what the
tail emits, so the branch scores like the tail's channels (importance.py: one unit for
channels and branches) and a branch whose tail emits exactly zero is exactly dead. Note that
a BN with gamma = 0 but beta != 0 still emits beta, and such a branch is kept.
"""
import operator
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx as fx

from ..metrics import flops_of
from .importance import Scorer, layer_scores
from .rules import (
    MULTIPLYING,
    PERMUTES,
    VIEWS,
    is_zero_preserving_call,
    is_zero_preserving_module,
    rule_for,
)
from .tracing import shape_of

ADD_TARGETS = {operator.add, operator.iadd, torch.add, "add", "add_"}


@dataclass
class ResidualBranch:
    """One residual branch of a traced model.

    name: stable, readable (see the module docstring); flops: what removing the branch saves
    on the example inputs; influence: ShortGPT's Block Influence on the example inputs,
    1 - cos(x_in, x_out) per sample (features flattened per sample), averaged over the batch,
    where x_in is the shortcut and x_out the sum (0: the branch changes nothing's direction).
    """
    name: str
    flops: int
    influence: float
    add: str  # name of the add node in the traced graph
    shortcut_arg: int  # which input of the add survives
    modules: Tuple[str, ...]  # modules the branch calls that nothing else calls
    tail: Optional[Tuple[str, ...]]  # (producer path, [its BatchNorm path]), if found


def _zero_source(node: fx.Node, modules) -> Optional[fx.Node]:
    """The input whose zero makes `node`'s output zero, when there is one: the input of a
    zero-preserving op or of data movement, the tensor a parameter or constant multiplies
    (a layer scale)."""
    if node.op == "call_module":
        zero = is_zero_preserving_module(modules[node.target])
    elif node.op not in ("call_function", "call_method"):
        return None
    elif node.target in MULTIPLYING:
        tensors = [a for a in node.args if isinstance(a, fx.Node) and a.op != "get_attr"]
        return tensors[0] if len(tensors) == 1 else None
    else:
        zero = is_zero_preserving_call(node) or node.target in VIEWS or node.target in PERMUTES
    source = node.args[0] if node.args else None
    return source if zero and isinstance(source, fx.Node) else None


def _tail(node: fx.Node, modules, ignored) -> Optional[Tuple[str, ...]]:
    while _zero_source(node, modules) is not None:
        node = _zero_source(node, modules)
    if node.target is operator.getitem and node.args[1] == 0:  # (out, weights) of attention
        node = node.args[0]
    tail = ()
    if node.op == "call_module" and node.target not in ignored:
        rule = rule_for(modules[node.target])
        if rule is not None and rule.affine is not None:  # a BatchNorm after the producer
            tail, node = (node.target,), node.args[0]
    if not isinstance(node, fx.Node) or node.op != "call_module" or node.target in ignored:
        return None
    rule = rule_for(modules[node.target])
    if rule is None or rule.kind not in ("producer", "attention"):
        return None
    return (node.target,) + tail


def _exclusive(add: fx.Node, start: fx.Node, order: Dict[fx.Node, int]) -> List[fx.Node]:
    """The nodes that only `add`'s input `start` uses (start included), in graph order."""
    if set(start.users) != {add}:
        return []
    inside: Set[fx.Node] = {start}
    pending = {n for n in start.all_input_nodes}
    # Users come after their inputs in the graph, so visiting candidates from the latest
    # back decides every user before the nodes it reads.
    while pending:
        node = max(pending, key=order.get)
        pending.discard(node)
        # `out, _ = attention(...)` leaves an unread getitem: it does not keep a node alive.
        unread = {u for u in node.users if u.target is operator.getitem and not u.users}
        if node.op in ("placeholder", "output") or not set(node.users) - unread <= inside:
            continue
        inside.add(node)
        inside.update(unread)
        pending.update(node.all_input_nodes)
    return sorted(inside, key=order.get)


def _is_branch(nodes: List[fx.Node]) -> bool:
    calls_module = any(n.op == "call_module" for n in nodes)
    inside = set(nodes)
    reads_graph = any(i not in inside and i.op != "get_attr"
                      for n in nodes for i in n.all_input_nodes)
    return calls_module and reads_graph


def _common_prefix(paths: Sequence[str]) -> str:
    parts = [p.split(".") for p in paths]
    prefix = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        prefix.append(level[0])
    return ".".join(prefix)


def find_branches(gm: fx.GraphModule, ignored: Sequence[str] = ()) -> List[ResidualBranch]:
    """Every residual branch of `gm` (whose nodes carry ShapeProp shapes), in forward order;
    `flops` and `influence` are left at 0 (see measure_branches)."""
    modules, ignored = dict(gm.named_modules()), set(ignored)
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    called = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            called.setdefault(node.target, set()).add(node)
    found = []
    for add in gm.graph.nodes:
        if add.target not in ADD_TARGETS or len(add.args) != 2 or add.kwargs:
            continue
        args = add.args
        if (not all(isinstance(a, fx.Node) for a in args) or args[0] is args[1]
                or shape_of(args[0]) is None or shape_of(args[0]) != shape_of(args[1])
                or shape_of(args[0]) != shape_of(add)):
            continue
        sides = [_exclusive(add, a, order) for a in args]
        candidates = [s for s in (0, 1) if _is_branch(sides[s])]
        if not candidates:
            continue
        side = max(candidates, key=lambda s: (len(sides[s]), -s))
        nodes = sides[side]
        inside = set(nodes)
        paths = [n.target for n in nodes if n.op == "call_module"]
        own = tuple(p for p in dict.fromkeys(paths) if called[p] <= inside)
        named = paths + [n.target for n in nodes if n.op == "get_attr"]  # e.g. a layer scale
        found.append((add, 1 - side, own, named, _tail(args[side], modules, ignored)))
    names = _names([named for *_, named, _ in found], modules)
    return [ResidualBranch(name, 0, 0.0, add.name, shortcut, own, tail)
            for name, (add, shortcut, own, _, tail) in zip(names, found)]


def _size(path: str, modules) -> int:
    """Parameters of a module path, or elements of a parameter path (read by get_attr)."""
    if path in modules:
        return sum(p.numel() for p in modules[path].parameters())
    owner, _, name = path.rpartition(".")
    return getattr(modules[owner], name).numel()


def _names(branch_paths: List[List[str]], modules) -> List[str]:
    prefixes = [_common_prefix(paths) for paths in branch_paths]
    names = []
    for prefix, paths in zip(prefixes, branch_paths):
        if prefixes.count(prefix) == 1 and prefix:
            names.append(prefix)
            continue
        biggest = max(paths, key=lambda p: _size(p, modules))
        rest = biggest[len(prefix):].lstrip(".").split(".")[0]
        names.append(f"{prefix}.{rest}" if prefix else rest)
    for i, name in enumerate(list(names)):
        if names.count(name) > 1:  # still ambiguous: number them in forward order
            names[i] = f"{name}#{names[:i].count(name)}"
    return names


class _BranchMeter(fx.Interpreter):
    """Runs the graph once, counting each node's FLOPs and each residual add's influence."""

    def __init__(self, gm: fx.GraphModule, branches: Sequence[ResidualBranch]):
        super().__init__(gm)
        self.watch = {b.add: b.shortcut_arg for b in branches}
        self.flops: Dict[str, int] = {}
        self.influence: Dict[str, float] = {}

    def run_node(self, node: fx.Node):
        result, self.flops[node.name] = flops_of(super().run_node, node)
        if node.name in self.watch:  # now, before an in-place op overwrites the sum
            shortcut = self.env[node.args[self.watch[node.name]]]
            self.influence[node.name] = block_influence(shortcut, result)
        return result


def block_influence(x_in: torch.Tensor, x_out: torch.Tensor) -> float:
    """1 - cos(x_in, x_out) per sample (flattened), averaged over the batch (ShortGPT)."""
    a, b = x_in.detach().double().flatten(1), x_out.detach().double().flatten(1)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-30)
    return float((1 - cos).mean())


def measure_branches(gm: fx.GraphModule, inputs, branches: Sequence[ResidualBranch]) -> None:
    """Fill in each branch's `flops` (of the nodes removing it erases) and `influence`."""
    meter = _BranchMeter(gm, branches)
    with torch.no_grad():
        meter.run(*inputs)
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    nodes = {n.name: n for n in gm.graph.nodes}
    for branch in branches:
        add = nodes[branch.add]
        erased = _exclusive(add, add.args[1 - branch.shortcut_arg], order) + [add]
        branch.flops = sum(meter.flops[n.name] for n in erased)
        branch.influence = meter.influence[branch.add]


def branch_score(branch: ResidualBranch, scorer: Scorer, modules) -> Optional[float]:
    """The branch's importance in the unit of its channels (None: nothing to score it by)."""
    if branch.tail is None:
        return None
    bn = modules[branch.tail[1]] if len(branch.tail) > 1 else None
    scores = layer_scores(scorer, modules[branch.tail[0]], bn, branch.tail[0])
    return None if scores is None else float(scores.max())


def select_branches(branches: Sequence[ResidualBranch], names: Sequence[str]
                    ) -> List[ResidualBranch]:
    """The branches called `names` (each must exist), in forward order."""
    if isinstance(names, str):
        raise TypeError(f"remove_branches must be a list of branch names, got the string "
                        f"{names!r}; write remove_branches=[{names!r}]")
    valid = [b.name for b in branches]
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ValueError(f"remove_branches: no residual branch named {unknown}; the model's "
                         f"branches are {valid}")
    return [b for b in branches if b.name in set(names)]


def _mutates_input(node: fx.Node, modules) -> bool:
    if node.op == "call_module":
        return bool(getattr(modules[node.target], "inplace", False))
    if node.op == "call_method":
        return node.target.endswith("_")
    return node.target in (operator.iadd, operator.isub, operator.imul)


def remove_branches(graph: fx.Graph, branches: Sequence[ResidualBranch], modules
                    ) -> List[dict]:
    """Edit `graph`: every branch's add becomes its shortcut. Returns one record per branch
    removed (a branch inside one removed before it is gone with it and has no record)."""
    records = []
    for branch in branches:
        nodes = {n.name: n for n in graph.nodes}
        if branch.add not in nodes:
            continue
        add = nodes[branch.add]
        shortcut, start = add.args[branch.shortcut_arg], add.args[1 - branch.shortcut_arg]
        # The shortcut is the identity when the branch reads the very same tensor.
        identity = any(user is not add for user in shortcut.users)
        branch_nodes = _exclusive(add, start, {n: i for i, n in enumerate(graph.nodes)})
        add.replace_all_uses_with(shortcut)
        graph.erase_node(add)
        erased = _erase(graph, branch_nodes)
        _guard_in_place(graph, shortcut, modules)
        records.append({"add": branch.add, "block": branch.name, "removed_modules": erased,
                        "shortcut": (f"identity shortcut (node {shortcut.name})" if identity
                                     else f"shortcut path ending in '{shortcut.target}'")})
    graph.lint()
    return records


def _erase(graph: fx.Graph, nodes: List[fx.Node]) -> List[str]:
    """Erase `nodes` (a branch, in graph order). Returns the module paths no longer called."""
    for node in reversed(nodes):
        graph.erase_node(node)
    still_called = {n.target for n in graph.nodes if n.op == "call_module"}
    return sorted({n.target for n in nodes if n.op == "call_module"} - still_called)


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
