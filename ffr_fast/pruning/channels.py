"""What the channel analysis (graph.py) produces: the channel ids of tensors, modules and
parameters, and the ChannelGraph whose union-find turns them into channel classes."""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from .rules import Rule


@dataclass
class Chan:
    """The channel ids of one tensor: `ids` spans the tensor's dimensions `dims` (adjacent,
    ascending; one dimension but after a head split), its shape their sizes."""
    dims: Tuple[int, ...]
    ids: np.ndarray


@dataclass
class ParamView:
    """A parameter expanded to a tensor of the same rank (ViT's class token): its channels
    are the tensor's, once an op tells which dimension they are on."""
    path: str


@dataclass
class ModuleChannels:
    """The channel ids one module with a rule reads (`in_ids`) and writes (`out_ids`)."""
    path: str
    module: nn.Module
    rule: Rule
    in_ids: Optional[np.ndarray]
    out_ids: np.ndarray
    node: fx.Node
    inner_ids: Optional[np.ndarray] = None  # attention: the heads' channels
    head_ids: Optional[np.ndarray] = None  # attention: one id per head (its first channel's)

    def written(self) -> List[Tuple[str, np.ndarray]]:
        """(layer name, ids) of every set of channels this layer creates."""
        out = [(self.path, self.out_ids)]
        if self.inner_ids is not None:
            out.append((f"{self.path} (heads)", self.inner_ids))
        return out


@dataclass
class ParamChannels:
    """A parameter the graph reads directly (get_attr), e.g. a layer scale: its dimension
    `dim` holds the channels `ids`."""
    path: str
    dim: int
    ids: np.ndarray


@dataclass
class ViewSize:
    """A size a view / reshape is given as a constant of the graph where the channels land
    (ViT's `x.reshape(n, 768, -1)`): node `node`'s size number `index` counts `ids`."""
    node: str
    index: int
    ids: np.ndarray


@dataclass
class ChannelGraph:
    size: int = 0
    edges: List[Tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    modules: Dict[str, ModuleChannels] = field(default_factory=dict)
    params: List[ParamChannels] = field(default_factory=list)
    view_sizes: List[ViewSize] = field(default_factory=list)
    pins: Dict[int, str] = field(default_factory=dict)  # channel id -> why it is kept
    unknown_ops: List[dict] = field(default_factory=list)
    renormalized: List[Tuple[np.ndarray, str]] = field(default_factory=list)
    # Parameters added to channels (a position embedding): a removed channel loses its
    # share of them, so they count in its score (the largest |value| per channel).
    shifts: List[Tuple[np.ndarray, torch.Tensor]] = field(default_factory=list)
    _labels: Optional[np.ndarray] = None

    def fresh(self, n: int) -> np.ndarray:
        start, self.size = self.size, self.size + n
        self._labels = None
        return np.arange(start, start + n, dtype=np.int64)

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = np.asarray(a, dtype=np.int64).ravel(), np.asarray(b, dtype=np.int64).ravel()
        if a.shape != b.shape:
            raise RuntimeError(f"internal: union of {a.shape} and {b.shape} ids")
        self.edges.append((a, b))
        self._labels = None

    def labels(self) -> np.ndarray:
        """Every id's class root (the smallest id of its class), computed once for all the
        unions: min-label propagation with pointer jumping, vectorised in numpy."""
        if self._labels is not None:
            return self._labels
        labels = np.arange(self.size, dtype=np.int64)
        if self.edges:
            a = np.concatenate([e[0] for e in self.edges])
            b = np.concatenate([e[1] for e in self.edges])
            while True:
                la, lb = labels[a], labels[b]
                low = np.minimum(la, lb)
                if np.array_equal(la, lb):
                    break
                for ends in (a, b, la, lb):  # hook both ids and their roots to the lower root
                    np.minimum.at(labels, ends, low)
                while True:  # pointer jumping until every id points at a root
                    jumped = labels[labels]
                    if np.array_equal(jumped, labels):
                        break
                    labels = jumped
        self._labels = labels
        return labels

    def roots(self, ids: np.ndarray) -> np.ndarray:
        return self.labels()[np.asarray(ids, dtype=np.int64)]

    def pin(self, ids: np.ndarray, reason: str) -> None:
        for i in np.asarray(ids).ravel().tolist():
            self.pins.setdefault(i, reason)

    def pinned_roots(self) -> Dict[int, str]:
        out: Dict[int, str] = {}
        if not self.pins:
            return out
        ids = np.fromiter(self.pins.keys(), dtype=np.int64)
        for root, reason in zip(self.roots(ids).tolist(), self.pins.values()):
            out.setdefault(root, reason)
        return out
