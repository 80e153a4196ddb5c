"""Where the feature flow of a model is: which layers FFRLoss hooks, and how the features
they output in one forward pass form chains.

Three rules find the layers when FFRLoss is given `layers="auto"` (see `auto_layers`):

0. A torch.fx.GraphModule (a model emitted by ffr_fast.prune, for one) runs its graph, which
   calls leaf modules only, so its blocks as modules never run. Its flow is read off the
   graph instead: every addition of two values computed from the input is a residual add,
   and its result is a feature, read as the output of the activation module that follows it
   (as in a post-activation ResNet) or else as the input of the module that reads it next
   (the next block's LayerNorm in a transformer). A module called several times in one
   forward is hooked at the one call that reads the feature.
1. Residual blocks. A submodule is a residual block when its own forward adds a shortcut:
   traced with torch.fx, every submodule it calls kept opaque, its graph holds an addition
   (`+`, `+=`, `torch.add`, `Tensor.add(_)`) whose two operands both derive from the same
   input of the module. The search goes top down from the model's children and stops at a block,
   so a block's inner modules are never units of their own. A module whose forward cannot
   be traced is searched through, like a container. Every other instance of a block's class
   is a block too: a MobileNetV2 stage starts with an InvertedResidual whose shortcut is
   switched off because it changes the shape, and its output is the stage's first feature.
2. Conv-norm-activation units, used only when rule 1 finds no block (a plain net such as
   VGG): the whole model is traced with torch.fx, and every activation module (ReLU, ReLU6,
   GELU, ...) whose input comes from a convolution or linear layer, directly or through one
   normalization layer, is a unit; the activation's output is the feature.

A chain is a run of consecutive captured features (forward order) of one shape: a shape
change ends a chain and starts the next, and runs of length 1 are dropped. Shapes are only
known when the model runs, so chains are formed anew from every forward (`split_into_chains`).
"""
import difflib
import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
from torch import Tensor, nn

LayerSpec = Union[str, nn.Module]

_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
                nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardtanh)
_WEIGHT_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)
_NORMALIZATIONS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
                   nn.GroupNorm, nn.LayerNorm)

GRAPH_RULE = ("residual adds of the graph (the model is a torch.fx.GraphModule, such as a "
              "pruned model)")
RESIDUAL_RULE = "residual blocks (submodules whose forward adds a shortcut to its input)"
PLAIN_RULE = ("conv-norm-activation units (activation modules fed by a convolution or linear "
              "layer, directly or through a normalization)")


@dataclass(frozen=True)
class CapturePoint:
    """Where FFRLoss reads a feature: the output of submodule `module` (or its first input,
    with `input=True`) at its `call`-th call in one forward (0-based; None: every call)."""

    module: str
    call: Optional[int] = None
    input: bool = False

    def label(self, call: int) -> str:
        """The feature's name in chains and messages: 'layer1.0', 'relu#2', 'ln:input'."""
        name = self.module if call == 0 else f"{self.module}#{call + 1}"
        return name + (":input" if self.input else "")


class _OwnCodeTracer(fx.Tracer):
    """Traces only the root's own forward: every submodule call stays one opaque node."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return True


def _is_addition(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in _ADD_FUNCTIONS)
            or (node.op == "call_method" and node.target in _ADD_METHODS))


def adds_shortcut(module: nn.Module) -> bool:
    """Whether `module`'s own forward adds two values that both derive from one input."""
    try:
        graph = _OwnCodeTracer().trace(module)
    except Exception:  # data-dependent control flow, no forward (ModuleList), ...
        return False
    inputs_of: Dict[fx.Node, FrozenSet[fx.Node]] = {}  # the placeholders a value derives from
    for node in graph.nodes:
        if node.op == "placeholder":
            inputs_of[node] = frozenset([node])
        else:
            inputs_of[node] = frozenset().union(*(inputs_of[n] for n in node.all_input_nodes))
        if _is_addition(node) and len(node.args) >= 2 and all(
                isinstance(a, fx.Node) for a in node.args[:2]):
            if inputs_of[node.args[0]] & inputs_of[node.args[1]]:
                return True
    return False


def find_residual_blocks(model: nn.Module) -> List[str]:
    """Names of the residual blocks of `model` (rule 1 of the module docstring)."""
    searched: List[Tuple[str, nn.Module, bool]] = []

    def search(prefix: str, parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if next(child.children(), None) is None:
                continue  # a leaf (Conv2d, ReLU, ...) is never a block
            shortcut = adds_shortcut(child)
            searched.append((prefix + name, child, shortcut))
            if not shortcut:
                search(prefix + name + ".", child)

    search("", model)
    block_types = {type(module) for _, module, shortcut in searched if shortcut}
    blocks = [name for name, module, _ in searched if type(module) in block_types]
    return [name for name in blocks
            if not any(name.startswith(outer + ".") for outer in blocks)]


def find_plain_units(model: nn.Module) -> List[str]:
    """Names of the activation modules that end conv-norm-activation units (rule 2)."""
    graph = fx.Tracer().trace(model)
    modules = dict(model.named_modules())

    def module_of(node) -> nn.Module:
        is_call = isinstance(node, fx.Node) and node.op == "call_module"
        return modules.get(node.target) if is_call else None

    units: List[str] = []
    for node in graph.nodes:
        if not isinstance(module_of(node), _ACTIVATIONS) or not node.args:
            continue
        source = node.args[0]
        if isinstance(module_of(source), _NORMALIZATIONS) and source.args:
            source = source.args[0]
        if isinstance(module_of(source), _WEIGHT_LAYERS) and node.target not in units:
            units.append(node.target)
    return units


def _derives_from_input(graph: fx.Graph) -> Dict[fx.Node, bool]:
    derived: Dict[fx.Node, bool] = {}
    for node in graph.nodes:
        derived[node] = node.op == "placeholder" or any(derived[n] for n in node.all_input_nodes)
    return derived


def find_graph_stream(model: fx.GraphModule) -> List[CapturePoint]:
    """Where a GraphModule's residual adds are read (rule 0 of the module docstring)."""
    modules = dict(model.named_modules())
    derived = _derives_from_input(model.graph)
    calls: Counter = Counter()
    call_index: Dict[fx.Node, int] = {}
    for node in model.graph.nodes:
        if node.op == "call_module":
            call_index[node] = calls[node.target]
            calls[node.target] += 1
    points: List[CapturePoint] = []
    for node in model.graph.nodes:
        operands = node.args[:2] if _is_addition(node) else ()
        if len(operands) < 2 or not all(isinstance(a, fx.Node) and derived[a] for a in operands):
            continue
        readers = [user for user in node.users if user.op == "call_module" and user.args
                   and user.args[0] is node]
        activation = next((user for user in readers
                           if isinstance(modules[user.target], _ACTIVATIONS)), None)
        if activation is not None:
            points.append(CapturePoint(activation.target, call_index[activation]))
        elif readers:
            points.append(CapturePoint(readers[0].target, call_index[readers[0]], input=True))
    return points


def auto_layers(model: nn.Module) -> Tuple[List[CapturePoint], str]:
    """Where `layers="auto"` reads features and the rule that found them; raises if nowhere."""
    if isinstance(model, fx.GraphModule):
        points = find_graph_stream(model)
        if points:
            return points, GRAPH_RULE
    else:
        blocks = find_residual_blocks(model)
        if blocks:
            return [CapturePoint(name) for name in blocks], RESIDUAL_RULE
    try:
        units = find_plain_units(model)
        trace_note = ""
    except Exception as error:
        units, trace_note = [], f" (torch.fx could not trace the model: {error})"
    if units:
        return [CapturePoint(name) for name in units], PLAIN_RULE
    examples = [name for name, _ in model.named_modules() if name][:6]
    raise ValueError(
        f"FFRLoss(layers='auto') found no feature flow in {type(model).__name__}: it looked "
        f"for {RESIDUAL_RULE} and, failing that, for {PLAIN_RULE}{trace_note}. Name the "
        f"layers whose outputs form the flow explicitly, e.g. FFRLoss(model, layers=[...]) "
        f"with names from model.named_modules() such as {examples}.")


def resolve_layers(model: nn.Module, layers: Sequence[LayerSpec]) -> List[CapturePoint]:
    """The outputs of explicitly given layers (names or submodules of `model`), checked."""
    if isinstance(layers, (str, nn.Module)) or not isinstance(layers, Sequence):
        raise TypeError(f"layers must be 'auto' or a list of submodule names or modules, got "
                        f"{layers!r}")
    if not layers:
        raise ValueError("layers is empty; pass 'auto' or at least two layers")
    modules = dict(model.named_modules())
    name_of = {id(module): name for name, module in modules.items()}
    names: List[str] = []
    for i, layer in enumerate(layers):
        if isinstance(layer, str):
            if layer not in modules:
                close = difflib.get_close_matches(layer, [n for n in modules if n], n=5)
                raise ValueError(f"layers[{i}]: {type(model).__name__} has no submodule named "
                                 f"{layer!r}; close matches: {close}")
            name = layer
        elif isinstance(layer, nn.Module):
            if id(layer) not in name_of:
                raise ValueError(f"layers[{i}]: this {type(layer).__name__} is not a submodule "
                                 f"of {type(model).__name__}")
            name = name_of[id(layer)]
        else:
            raise TypeError(f"layers[{i}] is a {type(layer).__name__}; expected a submodule "
                            "name or an nn.Module")
        if name == "":
            raise ValueError(f"layers[{i}] is the model itself; name the layers inside it "
                             "whose outputs form the flow")
        if name in names:
            raise ValueError(f"layers[{i}]: {name!r} is listed twice")
        names.append(name)
    return [CapturePoint(name) for name in names]


class ChainInfo(NamedTuple):
    """What describes a chain once its features are gone: its layers and feature shape."""

    names: Tuple[str, ...]
    shape: Tuple[int, ...]  # (B, *S)


@dataclass
class Chain:
    """Consecutive same-shape features of one forward, with the layers that produced them.

    `versions` are the tensors' in-place version counters at capture time: a later in-place
    operation on a captured output changes its counter and its values (None: not known,
    as for features captured in a torch.compile'd forward).
    """

    shape: torch.Size
    names: List[str] = field(default_factory=list)
    features: List[Tensor] = field(default_factory=list)
    versions: List[Optional[int]] = field(default_factory=list)

    def modified_in_place(self) -> List[str]:
        return [name for name, x, version in zip(self.names, self.features, self.versions)
                if version is not None and x._version != version]


def split_into_chains(captured: Sequence[Tuple[str, Tensor, Optional[int]]]) -> List[Chain]:
    """Group (name, feature, version) captures in forward order into chains of K >= 2."""
    runs: List[Chain] = []
    for name, x, version in captured:
        if not runs or runs[-1].shape != x.shape:
            runs.append(Chain(x.shape))
        runs[-1].names.append(name)
        runs[-1].features.append(x)
        runs[-1].versions.append(version)
    return [chain for chain in runs if len(chain.names) >= 2]
