"""The rules of the ATen channel analysis for ops that only move dimensions: views,
permutes, expand, cat / stack, split / chunk / unbind and indexing (aten.py says how)."""
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from .aten_ops import Ids, _arg, registrar, shape_of

LAYOUT_OPS: Dict[str, Callable] = {}
rule = registrar(LAYOUT_OPS)


@dataclass
class Split:
    """One dim split into several of size > 1 by a view: `flat` the split dim's ids, `dims`
    the new dims' ids (sizes `sizes`). Of the last two, `lead` and `inner` (indices), one
    carries the flat ids, the other and any before them are whole. Which one is known once
    the walk has seen what becomes of the lead (`lead_stays`: why it is whole, or None), so
    `resolve` ties them after the walk."""
    flat: np.ndarray
    sizes: List[int]
    dims: Ids
    lead: int
    inner: int
    lead_stays: Optional[str] = None

    def resolve(self, a) -> None:
        """Heads (the lead carries, each owning its inner positions): a view to (H, D) keeps
        D, the head size, which attention code reads as a constant or an attribute. Where the
        lead stays instead, position i of every lead position is one class and the count of
        lead positions is kept: a shuffle (the lead merged back as the inner dim: view
        (G, C/G), transpose, view) keeps G, ShuffleNet's constant group count, so the cut is
        the same in every group and the shuffle still interleaves them as before; a lead
        picked by a constant index (nn.MultiheadAttention's packed projection viewed to
        (3, E), q, k and v selected) keeps its pieces, cut alike. A code whose constant is the
        other one fails the verification."""
        carrier = self.inner if self.lead_stays else self.lead
        whole = self.lead if self.lead_stays else self.inner
        a.cg.pin(self.dims[whole], self.lead_stays or "the inner part of a split dimension "
                                                      "(a head's channels) stays whole")
        grid = np.moveaxis(self.flat.reshape(self.sizes), carrier, 0).reshape(
            self.sizes[carrier], -1)
        a.cg.union(np.repeat(self.dims[carrier], grid.shape[1]), grid.ravel())


def lead_stays(a, ids: np.ndarray, reason: str) -> None:
    """`ids`, where they are a pending split's lead dim, stay whole for `reason`."""
    split = a.splits.get(int(ids[0])) if len(ids) else None
    if split is not None and np.array_equal(split.dims[split.lead], ids):
        split.lead_stays = reason


def _merge(a, parts: List[np.ndarray]) -> np.ndarray:
    """One id per position of dims merged into one: the first dim whose ids are not all
    pinned carries them (repeated over the others, which are pinned). A split's lead dim
    merged after its own inner dim is a shuffle (Split.resolve). The merge is remembered, so
    that a view splitting it into the same dims gets them back (`_split`)."""
    sizes = [len(p) for p in parts]
    if not parts:
        return a.fresh([1], "size-1 dimension")[0]
    if len(parts) == 1:
        return parts[0]
    for before, part in zip(parts, parts[1:]):
        split = a.splits.get(int(part[0]))
        if split is not None and np.array_equal(split.dims[split.lead], part) and (
                np.array_equal(split.dims[split.inner], before)):
            split.lead_stays = "a shuffle's groups stay (its group count is the code's)"
    carrier = next((i for i, p in enumerate(parts) if len(p) > 1 and not a.pinned(p)), 0)
    for i, part in enumerate(parts):
        if i != carrier:
            a.cg.pin(part, "merged into a dimension another one carries")
    grid = np.broadcast_to(parts[carrier].reshape(
        [len(p) if i == carrier else 1 for i, p in enumerate(parts)]), sizes)
    merged = grid.ravel().copy()
    a.merges[id(merged)] = (merged, parts)
    return merged


def _split(a, flat: np.ndarray, sizes: List[int]) -> Ids:
    """Ids of dims split from one: a merge split back into its dims gets their ids (the
    (N * H) dim attention code folds the batch into comes apart into batch and heads);
    otherwise, with two or more of size > 1, the last two are a pending Split (heads from
    H*D; from a fused q, k, v projection's (3, H, D) the heads too, each with its q, k and v
    rows; a shuffle's groups), the others fresh and pinned. A dim that is kept splits into
    kept dims, pinned for its reason (a per-head mask given as a model input keeps the
    heads it is added to)."""
    big = [i for i, s in enumerate(sizes) if s > 1]
    merged, parts = a.merges.get(id(flat), (None, None))
    if merged is flat and [len(p) for p in parts] == [sizes[i] for i in big]:
        unmerged = iter(parts)
        return [next(unmerged) if i in big else a.fresh([1], "size-1 dimension")[0]
                for i in range(len(sizes))]
    if len(big) <= 1:
        return [flat if i in big else a.fresh([1], "size-1 dimension")[0]
                for i, s in enumerate(sizes)]
    if a.pinned(flat):
        return a.fresh(sizes, f"split from a kept dimension ({a.cg.pins[int(flat[0])]})")
    lead, inner = big[-2:]
    dims = [a.cg.fresh(size) if i in (lead, inner) else a.fresh(
        [size], "the outer part of a split dimension stays whole")[0]
        for i, size in enumerate(sizes)]
    split = Split(flat, list(sizes), dims, lead, inner)
    a.splits[int(dims[lead][0])] = split
    return dims


def _matched_groups(old, new) -> Optional[List[Tuple[List[int], List[int]]]]:
    """The dims of shapes `old` and `new` matched, in order, into groups of equal product
    (what a row-major view keeps together), or None where no such matching exists."""
    groups = []
    i = j = 0
    while i < len(old) or j < len(new):
        group_in, group_out = [], []
        if i < len(old):
            group_in, i = [i], i + 1
        if j < len(new):
            group_out, j = [j], j + 1
        while (size_in := math.prod(old[k] for k in group_in)) != (
                size_out := math.prod(new[k] for k in group_out)):
            if size_in < size_out and i < len(old):
                group_in, i = group_in + [i], i + 1
            elif j < len(new):
                group_out, j = group_out + [j], j + 1
            else:
                return None
        groups.append((group_in, group_out))
    return groups


def _refinement(old, new) -> Optional[Tuple[List[List[int]], List[List[int]]]]:
    """Shapes `old` and `new` of equal product as one finer shape both are merges of, where
    it exists: for each dim of each, the sizes of the finer dims it spans (none for a
    size-1 dim). (N, H * D) -> (N * H, D), attention code folding the batch into the heads,
    is (N, H, D) merged two ways; (4, 6) -> (6, 4) has no such shape (it returns None)."""
    def bounds(shape):  # the stride of every dim, and 1: where its dims begin and end
        return [math.prod(shape[k:]) for k in range(len(shape) + 1)]

    cuts = sorted(set(bounds(old)) | set(bounds(new)), reverse=True)
    if cuts[-1] == 0 or any(outer % inner for outer, inner in zip(cuts, cuts[1:])):
        return None  # an empty tensor, or dims that straddle each other

    def spans(shape):
        ends = bounds(shape)
        return [[cuts[k] // cuts[k + 1] for k in range(cuts.index(ends[d]),
                                                        cuts.index(ends[d + 1]))]
                for d in range(len(shape))]
    return spans(old), spans(new)


def _reshaped(a, ids: Ids, old, new) -> Ids:
    """Ids through a view from shape `old` to `new`: dims matched into groups of equal
    product; in each group every dim split into the finer dims of both shapes, which are
    then merged into the new ones (all merged, then split, where no finer shape exists)."""
    groups = _matched_groups(old, new)
    if groups is None:
        return None
    out: Ids = []
    for group_in, group_out in groups:
        sizes_in, sizes_out = [old[k] for k in group_in], [new[k] for k in group_out]
        if not group_out:
            continue
        finer = _refinement(sizes_in, sizes_out)
        if finer is None:
            flat = _merge(a, [ids[k] for k in group_in if old[k] > 1])
            out.extend(_split(a, flat, sizes_out))
            continue
        spans_in, spans_out = finer
        pieces = [piece for k, span in zip(group_in, spans_in) if span
                  for piece in _split(a, ids[k], span)]
        for span in spans_out:
            out.append(_merge(a, pieces[:len(span)]))
            pieces = pieces[len(span):]
    return out


@rule("view", "reshape", "_unsafe_view", "flatten", "unflatten", "view_as", "reshape_as",
      "squeeze", "unsqueeze")
def view(a, node):
    x = a.ids(node.args[0])
    if x is None:
        return None
    return _reshaped(a, x, shape_of(node.args[0]), shape_of(node))


@rule("permute")
def permute(a, node):
    x = a.ids(node.args[0])
    return None if x is None else [x[d % len(x)] for d in node.args[1]]


@rule("transpose", "t", "swapaxes", "movedim")
def transpose(a, node):
    x = a.ids(node.args[0])
    if x is None:
        return None
    if len(x) < 2:
        return x
    d0, d1 = (_arg(node, 1, "dim0", 0) % len(x), _arg(node, 2, "dim1", 1) % len(x))
    out = list(x)
    if node.target.name().endswith("movedim.int"):
        out.insert(d1, out.pop(d0))
    else:
        out[d0], out[d1] = out[d1], out[d0]
    return out


@rule("expand", "expand_as", "broadcast_to")
def expand(a, node):
    x = a.ids(node.args[0])
    if x is None:
        return None
    shape = shape_of(node)
    x = [a.fresh([1], "size-1 dimension")[0] for _ in range(len(shape) - len(x))] + list(x)
    return [d if len(d) == size else a.fresh([size], "expanded from size 1")[0]
            for d, size in zip(x, shape)]


def _without(x: Ids, dim: int) -> Ids:
    return x[:dim] + x[dim + 1:]


@rule("select", "unbind")
def select(a, node):
    """Positions picked by a constant index: the dim stays whole; where it is split from
    another, position i of every piece is one class (q, k and v taken from a packed
    projection's (3, E) view: Split.resolve)."""
    x = a.ids(node.args[0])
    if x is None:
        return None
    dim = _arg(node, 1, "dim", 0) % len(x)
    lead_stays(a, x[dim], "pieces picked by a constant index (q, k and v of a packed "
                          "projection) stay, cut alike")
    a.whole(x[dim], f"{node.target.name()} picks positions by a constant index")
    value = node.meta["val"]
    return tuple(_without(x, dim) for _ in value) if isinstance(value, (tuple, list)) else (
        _without(x, dim))


@rule("slice", "narrow")
def slice_(a, node):
    """A slice with constant bounds: a whole slice changes nothing, any other keeps the dim
    whole (its bounds would not follow a cut)."""
    x = a.ids(node.args[0])
    if x is None:
        return None
    dim = _arg(node, 1, "dim", 0) % len(x)
    start = _arg(node, 2, "start", 0) or 0
    if node.target.name().startswith("aten::narrow"):
        stop, step = start + node.args[3], 1
    else:
        stop, step = _arg(node, 3, "end", None), _arg(node, 4, "step", 1) or 1
    if shape_of(node) == shape_of(node.args[0]):
        return x
    size, piece = len(x[dim]), shape_of(node)[dim]
    if step == 1 and size % piece == 0 and start % piece == 0:
        # one of equal pieces (Swin V2 zeroes the key third of its qkv bias): the pieces are
        # tied position by position, as chunk ties them, so the bounds follow a cut where
        # the code derives them from the size (the verification catches code that does not)
        pieces = x[dim].reshape(size // piece, piece)
        for other in pieces[1:]:
            a.tie(pieces[0], other)
    else:
        a.whole(x[dim], "sliced with constant bounds")
    return x[:dim] + [x[dim][slice(start, stop, step)]] + x[dim + 1:]


@rule("index_select", "gather")
def gathered(a, node):
    """Positions picked by data along a dim: it stays whole."""
    x = a.ids(node.args[0])
    if x is None:
        return None
    dim = node.args[1] % len(x)
    a.whole(x[dim], f"{node.target.name()} picks positions by data")
    shape = shape_of(node)
    return [d if i != dim and len(d) == shape[i] else a.fresh([shape[i]], "gathered")[0]
            for i, d in enumerate(x)]


@rule("index")
def indexed(a, node):
    """x[i0, i1, ...] with index tensors for the leading dims: those dims stay whole and give
    way to the index's dims (fresh, pinned); the dims after them pass (a relative position
    bias table indexed by position pairs keeps its heads)."""
    x = a.ids(node.args[0])
    indices = node.args[1]
    if x is None or any(i is None for i in indices):
        return None
    for dim in range(len(indices)):
        a.whole(x[dim], "indexed by data")
    shape = shape_of(node)
    rest = x[len(indices):]
    lead = a.fresh(shape[:len(shape) - len(rest)], "positions picked by an index")
    return lead + rest if [len(d) for d in rest] == list(shape[len(lead):]) else None


@rule("constant_pad_nd", "pad")
def pad(a, node):
    x = a.ids(node.args[0])
    if x is None:
        return None
    widths = node.args[1]
    out = list(x)
    for k in range(len(widths) // 2):
        dim = len(x) - 1 - k
        if widths[2 * k] or widths[2 * k + 1]:
            a.whole(x[dim], "padded")
            out[dim] = a.fresh([shape_of(node)[dim]], "padded")[0]
    return out


@rule("cat", "concat", "concatenate")
def cat(a, node):
    parts = [(a.ids(t), shape_of(t)) for t in node.args[0]]
    parts = [(ids, shape) for ids, shape in parts if ids is not None and 0 not in shape]
    if not parts or len(parts) != len([t for t in node.args[0] if 0 not in shape_of(t)]):
        return None
    dim = _arg(node, 1, "dim", 0) % len(parts[0][0])
    out = list(parts[0][0])
    for ids, _ in parts[1:]:
        for d in range(len(out)):
            if d != dim:
                a.tie(out[d], ids[d])
    out[dim] = np.concatenate([ids[dim] for ids, _ in parts])
    return out


@rule("stack")
def stack(a, node):
    parts = [a.ids(t) for t in node.args[0]]
    if any(p is None for p in parts):
        return None
    dim = _arg(node, 1, "dim", 0) % (len(parts[0]) + 1)
    for other in parts[1:]:
        for d0, d1 in zip(parts[0], other):
            a.tie(d0, d1)
    return parts[0][:dim] + a.fresh([len(parts)], "stacked") + parts[0][dim:]


@rule("split", "split_with_sizes", "chunk", "unsafe_split", "tensor_split")
def split(a, node):
    """Pieces along a dim: equal pieces are tied position by position (they shrink alike);
    unequal ones keep the dim whole."""
    x = a.ids(node.args[0])
    if x is None:
        return None
    dim = _arg(node, 2, "dim", 0) % len(x)
    sizes = [int(v.shape[dim]) for v in node.meta["val"]]
    bounds = np.cumsum([0] + sizes)
    pieces = [x[dim][bounds[i]:bounds[i + 1]] for i in range(len(sizes))]
    if len(set(sizes)) == 1:
        for piece in pieces[1:]:
            a.tie(pieces[0], piece)
    else:
        a.whole(x[dim], "split into unequal pieces")
    return tuple(x[:dim] + [piece] + x[dim + 1:] for piece in pieces)
