"""Which layers FFRLoss hooks and how the features they output in one forward form chains.

A capture point says where a hook reads a feature: where a module call hands it out (its
output, or the tensor at that place of a tuple output) or takes it in (an argument). The
points come from an explicit layer list (`resolve_layers`) or from the residual stream
(ffr_fast.flow.stream). A chain is a run of consecutive captured features (forward order) of
one shape: a shape change ends a chain and starts the next, so does a stream's entry, and
runs of length 1 are dropped. Shapes are only known when the model runs, so chains are
formed anew from every forward (`split_into_chains`).
"""
import difflib
from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

LayerSpec = Union[str, nn.Module]


@dataclass(frozen=True)
class CapturePoint:
    """Where FFRLoss reads a feature: what submodule `module` hands out (or, with
    `input=True`, takes in) at its `call`-th call in one forward (0-based; None: every call),
    `leaf` the place of the tensor among the flattened outputs (or arguments)."""

    module: str
    call: Optional[int] = None
    input: bool = False
    leaf: int = 0
    starts_chain: bool = False  # the stream's entry: a new chain starts here, whatever the shape

    def label(self, call: int) -> str:
        """The feature's name in chains and messages: 'layer1.0', 'relu#2', 'ln:input'."""
        name = self.module if call == 0 else f"{self.module}#{call + 1}"
        return name + (":input" if self.input else "")


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


def version_of(tensor: Tensor) -> int:
    """The tensor's in-place version counter: every in-place write bumps it. autograd keeps
    it as `_version` and torch has no public accessor; this is the one place it is read."""
    return tensor._version


@dataclass
class Chain:
    """Consecutive same-shape features of one forward, with the layers that produced them.

    `versions` are the tensors' in-place version counters at capture time: a later in-place
    operation on a captured output changes its counter and its values (FFRLoss's hooks run
    outside compiled graphs, so a compiled forward's counters are the real ones too).
    """

    shape: torch.Size
    names: List[str] = field(default_factory=list)
    features: List[Tensor] = field(default_factory=list)
    versions: List[int] = field(default_factory=list)

    def modified_in_place(self) -> List[str]:
        return [name for name, x, version in zip(self.names, self.features, self.versions)
                if version_of(x) != version]


def split_into_chains(captured: Sequence[Tuple[str, Tensor, int, bool]]
                      ) -> List[Chain]:
    """Group (name, feature, version, starts_chain) captures in forward order into chains of
    K >= 2: a chain ends where the shape changes or a stream's entry starts a new one."""
    runs: List[Chain] = []
    for name, x, version, starts_chain in captured:
        if not runs or runs[-1].shape != x.shape or starts_chain:
            runs.append(Chain(x.shape))
        runs[-1].names.append(name)
        runs[-1].features.append(x)
        runs[-1].versions.append(version)
    return [chain for chain in runs if len(chain.names) >= 2]
