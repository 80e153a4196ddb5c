"""Residual branches that are not whole blocks, removed in the model's own class: a
transformer layer's attention or MLP, a ResNet block whose shortcut is a projection.

Every residual add `y = s + f(x)` of the torch.export capture (ffr_fast.flow.stream) is one
*branch*. depth.py removes a block whose branches all go (the block hands out its input);
a branch alone leaves in one of two ways, each exact against the model with the branch's
parameters zeroed, and each replacing one submodule by a stand-in of this module:

- "zero": one module call computes the branch (`f`, reached back from the add through ops
  that keep a zero a zero: dropout, a layer scale, views) and nothing before it in the branch
  multiplies by a weight (a norm may: it stays, cheap and unread). The module becomes a
  `RemovedBranch`, which returns zeros shaped like its first tensor input in the structure the
  module returned (`(attn_output, None)` of an attention): its FLOPs leave, the add adds 0.
- "shortcut": the add is the last op of a block, called on one tensor `x`, that hands out
  `s + f(x)` (or its ReLU) and whose shortcut `s` is one child module called on `x` (a
  downsampling projection). The block becomes a `ShortcutOnly` holding that child under its
  own name: `relu(downsample(x))`.

A branch is named by the module replaced (`encoder.layers.encoder_layer_0.self_attention`,
`layer2.0`), and `Removal` says how it leaves, in a form save_pruned writes.
"""
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx as fx
from torch import nn

from ..capture import Capture, ModuleCall, flat_tensors
from ..flow.stream import residual_fork
from .aten_branches import KEEP_ZERO, activations, shortcut_and_branch
from .aten_layout import LAYOUT_OPS
from .aten_ops import op_name

# Ops that multiply by a weight: a branch with one outside the module replaced is not
# computed by that module alone.
WEIGHTED = {"linear", "addmm", "mm", "bmm", "matmul", "baddbmm", "einsum", "convolution",
            "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
            "scaled_dot_product_attention", "embedding"}
# What a block may apply to `s + f(x)` before handing it out, for ShortcutOnly to apply to s.
AFTER_ADD = {"relu": torch.relu}


@dataclass(frozen=True)
class Removal:
    """How the branch `name` (a module path) leaves: "block" (depth.py removes the block),
    "zero" (the module returns zeros laid out as `layout`) or "shortcut" (the block returns
    its child `shortcut` with the ops `after`). `add` and `branch` name the residual add and
    its branch operand in the capture it was found in (empty when read from a file)."""
    name: str
    kind: str
    layout: Any = None
    shortcut: str = ""
    after: Tuple[str, ...] = ()
    add: str = ""
    branch: str = ""

    def record(self) -> dict:
        """What save_pruned writes: enough to replace the module again."""
        return {"name": self.name, "kind": self.kind, "layout": self.layout,
                "shortcut": self.shortcut, "after": list(self.after)}

    @staticmethod
    def read(record: dict) -> "Removal":
        if not isinstance(record, dict) or record.get("kind") not in ("zero", "shortcut"):
            raise ValueError(f"a replaced branch is recorded as {record!r}")
        return Removal(record["name"], record["kind"], record.get("layout"),
                       record.get("shortcut", ""), tuple(record.get("after", ())))


class RemovedBranch(nn.Module):
    """Stands in for a removed residual branch: zeros shaped like the first tensor it is
    given, laid out as the module it replaced returned them ("tensor", None, or a list
    {"tuple": [...]} / {"list": [...]} of those).

    A Hugging Face attention it replaced filled its layer of the key/value cache, which the
    next step of generate() reads (its length sets the positions): a cache handed to it a
    second time is refused, since its layer holds nothing."""

    def __init__(self, layout):
        super().__init__()
        self.layout = layout
        self._cache = None  # a weak reference to the last cache it was handed

    def forward(self, *args, **kwargs):
        cache = next((v for v in [*args, *kwargs.values()] if hasattr(v, "get_seq_length")),
                     None)
        if cache is not None:
            if self._cache is not None and self._cache() is cache:
                raise RuntimeError(
                    "a removed attention branch cannot fill its layer of the key/value cache, "
                    "which this call reuses: call the model with use_cache=False (and "
                    "generate() with use_cache=False), or remove whole decoder layers instead")
            self._cache = weakref.ref(cache)
        return _build(self.layout, flat_tensors([args, kwargs])[0])

    def __getstate__(self):  # a weak reference does not pickle, and is no state
        return dict(super().__getstate__(), _cache=None)

    def extra_repr(self) -> str:
        return f"layout={self.layout!r}"


class ShortcutOnly(nn.Module):
    """Stands in for a block whose residual branch was removed: its shortcut child (kept
    under its own name, so its parameters keep theirs), then the ops the block applied
    after the add."""

    def __init__(self, name: str, shortcut: nn.Module, after: Sequence[str]):
        super().__init__()
        self.shortcut_name, self.after = name, tuple(after)
        self.add_module(name, shortcut)

    def forward(self, x):
        x = self.get_submodule(self.shortcut_name)(x)
        for op in self.after:
            x = AFTER_ADD[op](x)
        return x

    def extra_repr(self) -> str:
        return f"after={list(self.after)}"


def _buildable(layout) -> bool:
    """Whether `layout` holds tensors and None only (no "?" of _layout)."""
    if isinstance(layout, dict):
        return all(_buildable(item) for item in next(iter(layout.values())))
    return layout in ("tensor", None)


def _build(layout, like: torch.Tensor):
    if layout == "tensor":
        return torch.zeros_like(like)
    if layout is None:
        return None
    (kind, items), = layout.items()
    built = [_build(item, like) for item in items]
    return tuple(built) if kind == "tuple" else built


def _layout(call: ModuleCall) -> Any:
    """A module call's output as a RemovedBranch layout, or "?" where it holds anything else
    than tensors and None in tuples and lists (a dict, a ModelOutput, a number)."""
    if call.out_spec is None:  # a leaf module's call: its boundary is one tensor
        return "tensor" if len(call.outputs) == 1 and call.outputs[0] else "?"
    leaves = iter(zip(call.outputs, call.constant_outputs))

    def read(spec):
        if spec.is_leaf():
            name, value = next(leaves, ("", "?"))
            return "tensor" if name else None if value is None else "?"
        if spec.type is type(None):
            return None
        if spec.type in (tuple, list):
            items = [read(child) for child in spec.children()]
            return "?" if "?" in items else {spec.type.__name__: items}
        return "?"
    return read(call.out_spec)


def replace(model: nn.Module, removal: Removal) -> None:
    """Put `removal`'s stand-in in its module's place, in place."""
    if removal.kind == "zero":
        model.set_submodule(removal.name, RemovedBranch(removal.layout))
    else:
        block = model.get_submodule(removal.name)
        model.set_submodule(removal.name, ShortcutOnly(
            removal.shortcut, block.get_submodule(removal.shortcut), removal.after))


def zeroed(model: nn.Module, removal: Removal) -> Dict[str, torch.Tensor]:
    """Zeros for the parameters whose zeroing the removal stands for (name -> zeros): the
    branch's, which for a "shortcut" removal are the block's outside its shortcut."""
    keep = f"{removal.name}.{removal.shortcut}." if removal.kind == "shortcut" else None
    return {f"{removal.name}.{key}": torch.zeros_like(parameter)
            for key, parameter in model.get_submodule(removal.name).named_parameters()
            if keep is None or not f"{removal.name}.{key}".startswith(keep)}


def residual_adds(cap: Capture) -> List[Tuple[fx.Node, fx.Node]]:
    """Every residual add of the capture with the value its shortcut starts from."""
    return [(node, fork) for node in cap.graph.nodes
            if (fork := residual_fork(cap, node)) is not None]


def _exclusive(add: fx.Node, start: fx.Node, order: Dict[fx.Node, int]) -> Set[fx.Node]:
    """The nodes only the operand `start` of `add` is computed from (start included)."""
    inside, pending = {start}, set(start.all_input_nodes)
    while pending:  # the latest first: every user is decided before the nodes it reads
        node = max(pending, key=order.get)
        pending.discard(node)
        if node.op != "placeholder" and set(node.users) <= inside:
            inside.add(node)
            pending.update(node.all_input_nodes)
    return inside


class BranchFinder:
    """How the branches of one capture can leave on their own (module docstring): the module
    calls looked up once, by the value each hands out first, by path, and by their nodes."""

    def __init__(self, cap: Capture):
        self.cap = cap
        self.by_output: Dict[str, List[str]] = {}  # value -> ids of the calls handing it out
        for call_id, call in cap.calls.items():
            if call.path and call.outputs and call.outputs[0]:
                self.by_output.setdefault(call.outputs[0], []).append(call_id)
        self.calls_of = Counter(call.path for call in cap.calls.values())
        self.nodes_in = Counter(call_id for node in cap.graph.nodes
                                for call_id in cap.call_stack(node))

    def find(self, add: fx.Node, fork: fx.Node) -> Optional[Removal]:
        """How the branch of residual add `add` can leave on its own, or None."""
        return self._zero(add, fork) or self._shortcut(add, fork)

    def _zero(self, add: fx.Node, fork: fx.Node) -> Optional[Removal]:
        cap = self.cap
        split = shortcut_and_branch(cap, add, fork)
        if split is None:
            return None
        value = node = split[1]
        around = set(cap.call_stack(add))
        candidates: List[str] = []  # module calls handing out the branch, latest first
        while len(node.users) == 1:  # back through ops that keep a zero a zero
            candidates += sorted((c for c in self.by_output.get(node.name, ()) if c not in around),
                                 key=lambda c: cap.calls[c].path.count("."))  # outermost first
            operands = activations(cap, node)
            if node.op != "call_function" or len(operands) != 1 or not (
                    op_name(node) in KEEP_ZERO or op_name(node) in LAYOUT_OPS
                    or op_name(node) in ("mul", "div")):
                break
            node = operands[0]
        exclusive = _exclusive(add, value, cap.order)
        for call_id in candidates:  # the first that computes the whole branch
            call = cap.calls[call_id]
            result, first = cap.nodes.get(call.outputs[0]), cap.nodes.get(call.inputs[0]) \
                if call.inputs else None
            layout = _layout(call)
            if self.calls_of[call.path] != 1 or first is None \
                    or cap.shape(first) != cap.shape(result) or not _buildable(layout):
                continue
            if not any(n.op == "call_function" and op_name(n) in WEIGHTED
                       and call_id not in cap.call_stack(n) for n in exclusive):
                return Removal(call.path, "zero", layout, add=add.name, branch=value.name)
        return None

    def _shortcut(self, add: fx.Node, fork: fx.Node) -> Optional[Removal]:
        cap = self.cap
        if fork in add.args[:2]:  # an identity shortcut: the whole block goes (depth.py)
            return None
        after, node = [], add
        for block_id in reversed(cap.call_stack(add)):  # the innermost block first
            block = cap.calls[block_id]
            if block.inputs == (fork.name,) and len(block.outputs) == 1:
                break
        else:
            return None
        while node.name != block.outputs[0]:
            users = list(node.users)
            if len(users) != 1 or op_name(users[0]) not in AFTER_ADD \
                    or activations(cap, users[0]) != [node]:
                return None
            node = users[0]
            after.append(op_name(node))
        if self.calls_of[block.path] != 1:
            return None
        children = []
        for side, operand in enumerate(add.args[:2]):
            for call_id, call in cap.calls.items():
                child = call.path[len(block.path) + 1:]
                if (call.path.startswith(block.path + ".") and "." not in child
                        and call.inputs == (fork.name,) and call.outputs == (operand.name,)):
                    children.append((self.nodes_in[call_id], side, child))
        if not children:
            return None
        _, side, child = min(children)  # the cheaper side is the shortcut
        return Removal(block.path, "shortcut", shortcut=child, after=tuple(after), add=add.name,
                       branch=add.args[1 - side].name)
