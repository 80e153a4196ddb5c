"""How a tensor's channel ids follow its dimensions through the ops that only move them:
reductions over other dimensions, permute / transpose / movedim, view / reshape / flatten,
chunk / split / unbind, and basic indexing. Pure functions of a Chan (channels.py), the shapes
and the op's
arguments; None where the op could mix channels. The dependency analysis (graph.py)
decides what to tie and pin.
"""
from typing import List, Optional

import numpy as np
import torch
import torch.fx as fx

from .channels import Chan
from .tracing import node_arg, shape_of


def size_args(node: fx.Node) -> Optional[list]:
    """The sizes a view / reshape is given (ints are constants of the graph), or None for
    ops that take none (flatten, squeeze, a reshape module)."""
    if node.op == "call_module" or node.target not in ("view", "reshape", torch.reshape):
        return None
    sizes = node.args[1:] if node.target != torch.reshape else node.args[1]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = sizes[0]
    return list(sizes)


def reduced(node: fx.Node, chan: Chan) -> Optional[Chan]:
    """mean / sum / amax over dimensions other than the batch and the channels."""
    dims = node_arg(node, 1, "dim")
    keepdim = node_arg(node, 2, "keepdim", False)
    ndim = len(shape_of(node.args[0]))
    if dims is None:
        return None
    dims = {d % ndim for d in ([dims] if isinstance(dims, int) else dims)}
    if 0 in dims or dims & set(chan.dims):
        return None  # reducing over the batch or the channels mixes them
    if keepdim:
        return chan
    return Chan(tuple(d - sum(r < d for r in dims) for d in chan.dims), chan.ids)


def permuted(node: fx.Node, chan: Chan) -> Optional[Chan]:
    """permute / transpose / movedim (single dimensions)."""
    ndim = len(shape_of(node.args[0]))
    if node.target in (torch.permute, "permute"):
        order = node.args[1:] if len(node.args) > 2 else node_arg(node, 1, "dims")
        order = [d % ndim for d in order]
    elif node.target in (torch.transpose, "transpose"):
        a, b = node_arg(node, 1, "dim0") % ndim, node_arg(node, 2, "dim1") % ndim
        order = list(range(ndim))
        order[a], order[b] = b, a
    else:  # movedim(source, destination)
        src, dst = node_arg(node, 1, "source"), node_arg(node, 2, "destination")
        if not isinstance(src, int):
            return None
        order = list(range(ndim))
        order.insert(dst % ndim, order.pop(src % ndim))
    new_dims = [order.index(d) for d in chan.dims]
    axes = np.argsort(new_dims)
    return Chan(tuple(sorted(new_dims)), chan.ids.transpose(axes))


def viewed(chan: Chan, before, after) -> Optional[Chan]:
    """A reshape from shape `before` to `after` (row-major): the channels land on one or
    more adjacent dimensions (a head split: (C,) -> (heads, head_dim)), or are flattened
    with the dimensions after them ((B, C, H, W) -> (B, C*H*W): channel c becomes features
    c*H*W ... (c+1)*H*W-1)."""
    before, after = list(before), list(after)
    d0, d1 = chan.dims[0], chan.dims[-1]
    if chan.dims != tuple(range(d0, d1 + 1)):
        return None
    lead = int(np.prod(before[:d0], dtype=np.int64))
    block = int(np.prod(before[d0:d1 + 1], dtype=np.int64))
    prefix = [int(np.prod(after[:k], dtype=np.int64)) for k in range(len(after) + 1)]
    starts = [k for k in range(len(after)) if prefix[k] == lead and after[k] != 1]
    if not starts:
        return None
    k = starts[0]
    for j in range(k, len(after)):  # the channels land on after[k..j]
        span = int(np.prod(after[k:j + 1], dtype=np.int64))
        if span == block:
            return Chan(tuple(range(k, j + 1)), chan.ids.reshape(after[k:j + 1]))
        if span > block:
            break
    inner = 1
    for size in before[d1 + 1:]:
        inner *= size
        if after[k] == block * inner:
            return Chan((k,), np.repeat(chan.ids.ravel(), inner))
    return None


def pieces(node: fx.Node, chan: Chan) -> Optional[List[Chan]]:
    """chunk / split / unbind: the channels of each piece. Cut along the channels, only
    chunk into equal pieces is followed: split's sizes are constants of the graph."""
    ndim = len(shape_of(node.args[0]))
    count = len(node.meta["tensor_meta"])
    if len(chan.dims) != 1:
        return None
    if node.target in (torch.unbind, "unbind"):
        dim = node_arg(node, 1, "dim", 0) % ndim
        if dim in chan.dims:
            return None
        return [Chan(tuple(d - (d > dim) for d in chan.dims), chan.ids)] * count
    dim = node_arg(node, 2, "dim", 0) % ndim
    if dim != chan.dims[0]:
        return [chan] * count
    if node.target not in (torch.chunk, "chunk") or len(chan.ids) % count:
        return None
    return [Chan(chan.dims, part) for part in chan.ids.reshape(count, -1)]


def indexed(chan: Chan, index) -> Optional[Chan]:
    """x[:, 0], x[..., :n]: basic indexing that leaves the channel dimensions whole."""
    items = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis or i is None or isinstance(i, fx.Node) for i in items):
        return None
    kept, dim = 0, 0
    mapping = {}
    for i in items:
        if isinstance(i, int):
            if dim in chan.dims:
                return None
        elif isinstance(i, slice):
            if dim in chan.dims and i != slice(None):
                return None
            mapping[dim] = kept
            kept += 1
        else:
            return None
        dim += 1
    return Chan(tuple(mapping[d] if d in mapping else d - dim + kept for d in chan.dims),
                chan.ids)
