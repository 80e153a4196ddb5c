"""The pruning plan: which channel classes go, under threshold or ratio, with per-layer floors.

A *group* is the set of producer layers (Conv / Linear) whose output channels are tied by
the dependency graph (e.g. every conv that writes into one residual stream) together with
their channel classes. Selection:
- `threshold=t`: every prunable class whose score (importance.py) is <= t is removed.
- neither: nothing is removed (prune() was asked for residual branches only).
- `ratio=r`, `scope="global"`: the ceil(r * n) lowest-scored of all n prunable classes,
  each score divided by the mean score of its group: raw norms are not comparable across
  layers (a kaiming-initialised filter's norm grows with its fan-in), so raw ranking would
  empty the layers whose filters happen to be small. Ceil as per layer, one rule for both
  (round()'s half-to-even took 2 of 5 but 4 of 7).
- `ratio=r`, `scope="layer"`: in every group, the ceil(r * size) lowest-scored classes (r
  is the least fraction removed: 3 heads at r=0.5 lose 2, as Torch-Pruning, which keeps
  int(size * (1 - r))).
Then, per producer layer, classes are given back (highest score first) until the layer keeps
at least `min_channels` channel classes, under a global ratio also at least the fraction
`min_fraction` of them (rounded up), and, with `round_to=k`, a multiple of k channels (or
all).
"""
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import numpy as np

from .channels import ChannelGraph


@dataclass
class Group:
    producers: List[str]
    roots: List[int]  # channel classes, sorted
    pinned: Dict[int, str] = field(default_factory=dict)


@dataclass
class Plan:
    removed: Set[int]  # union-find roots of the removed channel classes
    groups: List[Group]
    unpruned: List[dict]
    cutoff: Optional[float]  # the largest score removed (None when nothing was removed)


def written_layers(cg: ChannelGraph) -> List[Tuple[str, np.ndarray]]:
    """(layer name, ids) of every set of channels a layer creates: a producer's outputs,
    an attention's outputs and its heads."""
    return [entry for mc in cg.modules.values() if mc.rule.kind in ("producer", "attention")
            for entry in mc.written()]


Layers = List[Tuple[str, np.ndarray]]  # (layer name, ids of the channels it writes)


def find_groups(cg: ChannelGraph, layers: Layers) -> List[Group]:
    owner: Dict[int, int] = {}  # class root -> index of a layer, merged by union-find
    parent = list(range(len(layers)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for index, (_, ids) in enumerate(layers):
        for root in set(cg.roots(ids).tolist()):
            if root in owner:
                parent[find(index)] = find(owner[root])
            else:
                owner[root] = index
    members: Dict[int, Group] = {}
    for index, (name, _) in enumerate(layers):
        group = members.setdefault(find(index), Group([], []))
        group.producers.append(name)
    for root, index in owner.items():
        members[find(index)].roots.append(root)
    pinned = cg.pinned_roots()
    groups = list(members.values())
    for group in groups:
        group.roots.sort()
        group.pinned = {r: pinned[r] for r in group.roots if r in pinned}
    return groups


def make_plan(cg: ChannelGraph, scores: Dict[int, float], *, threshold=None, ratio=None,
              scope="global", min_channels=1, min_fraction=0.0, round_to=None,
              layers: Optional[Layers] = None, dead: Set[int] = frozenset()) -> Plan:
    """The plan over `layers` (default: the producers of the torch.fx analysis); the classes
    `dead` go too, whatever the selection (their values never reach the output)."""
    layers = written_layers(cg) if layers is None else layers
    groups = find_groups(cg, layers)
    for group in groups:  # a class nothing scores (importance "bn" without a BN) stays
        for root in group.roots:
            if root not in scores:
                group.pinned.setdefault(root, "nothing scores it under this importance "
                                              "(importance='bn' without a BatchNorm)")
    prunable = [r for g in groups for r in g.roots if r not in g.pinned]
    if threshold is not None:
        removed = {r for r in prunable if scores[r] <= threshold}
    elif ratio is None:  # only residual branches were asked for
        removed = set()
    elif scope == "global":
        relative = _relative_to_group(groups, scores)
        ranked = sorted(prunable, key=relative.get)
        removed = set(ranked[:_removed_by_ratio(ratio, len(prunable))])
    else:
        removed = set()
        for g in groups:
            candidates = sorted((r for r in g.roots if r not in g.pinned), key=scores.get)
            removed.update(candidates[:_removed_by_ratio(ratio, len(g.roots))])
    removed.update(r for r in prunable if r in dead)
    floor = min_fraction if ratio is not None and scope == "global" else 0.0
    _give_back(cg, layers, removed, scores, min_channels, floor, round_to)
    cutoff = max((scores[r] for r in removed), default=None)
    return Plan(removed, groups, _unpruned(groups), cutoff)


def _removed_by_ratio(ratio: float, n: int) -> int:
    """How many of n classes `ratio` removes: ceil(ratio * n), the product's float error
    forgiven (0.28 * 25 is 7.000000000000001 in floats: 7 go, not 8)."""
    return math.ceil(ratio * n - 1e-9)


def _relative_to_group(groups: List[Group], scores: Dict[int, float]) -> Dict[int, float]:
    """Every scored class's score divided by the mean score of its group's scored classes
    (a group whose every class scores 0 keeps 0: dead channels still rank first)."""
    relative = {}
    for group in groups:
        scored = [r for r in group.roots if r in scores]
        mean = sum(scores[r] for r in scored) / max(len(scored), 1)
        relative.update((r, scores[r] / mean if mean > 0 else 0.0) for r in scored)
    return relative


def _give_back(cg, layers: Layers, removed: Set[int], scores, min_channels: int,
               min_fraction: float, round_to) -> None:
    """Return removed classes (highest score first) to layers below their floor until every
    layer keeps at least `min_channels` classes and the fraction `min_fraction` of them
    (rounded up) and, with `round_to`, a number of channels that is a multiple of it (or
    all): a head of 64 channels counts 64."""
    sizes = []
    for _, ids in layers:
        roots, counts = np.unique(cg.roots(ids), return_counts=True)
        sizes.append(dict(zip(roots.tolist(), counts.tolist())))
    changed = True
    while changed:  # giving back to one layer can unround another that shares classes
        changed = False
        for size in sizes:
            back = sorted((r for r in size if r in removed), key=scores.get, reverse=True)
            kept = [r for r in size if r not in removed]
            floor = max(min_channels, math.ceil(min_fraction * len(size)))
            while back and (len(kept) < floor or round_to and sum(
                    size[r] for r in kept) % round_to):
                root = back.pop(0)
                removed.discard(root)
                kept.append(root)
                changed = True


def _unpruned(groups: List[Group]) -> List[dict]:
    out = []
    for g in groups:
        if g.pinned:
            reasons = sorted(set(g.pinned.values()))
            out.append({"layers": g.producers, "kept_channels": len(g.pinned),
                        "of": len(g.roots), "reasons": reasons})
    return out
