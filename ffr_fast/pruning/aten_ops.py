"""The one table of the ATen channel analysis (aten.py): op name -> how channel ids flow.

A rule takes the analyzer and the node and returns the ids of the op's output (a list of
id arrays, one per dimension; a tuple of them for an op with several outputs), or None
when the op is used in a way the rule does not follow: the analyzer then pins it as an
unknown op. The module docstring of aten.py says what each family does; the rules that only move
dimensions (views, permutes, cat, split, indexing) are in aten_layout.py.
"""
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.fx as fx

Ids = List[np.ndarray]  # one array of ids per dimension of a tensor
OPS: Dict[str, Callable] = {}


def op_name(node: fx.Node) -> str:
    """The op's name without namespace, overload or in-place underscore: "add" for add_."""
    target = node.target
    name = (target.name().split("::")[-1].split(".")[0] if hasattr(target, "name")
            else getattr(target, "__name__", str(target)))
    return name[:-1] if name.endswith("_") and not name.startswith("__") else name


def shape_of(node) -> Optional[Tuple[int, ...]]:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(int(s) for s in value.shape) if isinstance(value, torch.Tensor) else None


def _arg(node: fx.Node, index: int, key: str, default=None):
    return node.args[index] if len(node.args) > index else node.kwargs.get(key, default)


def _dims(dims, ndim: int) -> List[int]:
    if dims is None or dims == []:
        return list(range(ndim))
    return sorted({d % ndim for d in ([dims] if isinstance(dims, int) else dims)})


def registrar(table: Dict[str, Callable]):
    """A decorator that enters a rule into `table` under each of its op names."""
    def rule(*names: str):
        def register(function):
            for name in names:
                table[name] = function
            return function
        return register
    return rule


rule = registrar(OPS)


ELEMENTWISE = (
    "add sub rsub mul div true_divide where pow neg abs rsqrt sqrt exp log log1p reciprocal "
    "square relu relu6 gelu silu mish sigmoid hardsigmoid hardswish hardtanh tanh elu selu "
    "leaky_relu softplus erf cos sin clamp clamp_min clamp_max maximum minimum sign dropout "
    "threshold hardshrink softshrink celu "
    "clone contiguous alias detach to _to_copy type_as lift_fresh_copy masked_fill eq ne lt le "
    "gt ge __and__ __or__ logical_not logical_and logical_or bitwise_not bitwise_and "
    "zeros_like ones_like full_like empty_like fill zero copy").split()


# The ops that write fresh channels from a parameter: a dead channel is 0 at their output.
PRODUCERS = ("linear", "addmm", "mm", "matmul", "bmm", "conv1d", "conv2d", "conv3d",
             "convolution", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
             "embedding")
# Reductions whose result is the reduced values' constant when they all hold one.
REDUCTIONS = ("mean", "amax", "amin", "max", "min", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
              "adaptive_avg_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d",
              "max_pool2d", "max_pool3d")


@rule(*ELEMENTWISE)
def elementwise(a, node):
    operands = [(a.ids(arg), shape_of(arg)) for arg in node.args if a.ids(arg) is not None]
    operands += [(a.ids(v), shape_of(v)) for v in node.kwargs.values() if a.ids(v) is not None]
    if not operands:
        return a.fresh(shape_of(node), "computed from constants")
    if op_name(node) in ("add", "sub", "rsub"):
        a.shifts(node)
    return a.broadcast(shape_of(node), [o[0] for o in operands], [o[1] for o in operands])


@rule("arange", "empty", "scalar_tensor", "new_empty", "randn", "rand", "tensor")
def creation(a, node):
    return a.fresh_like(node, "created inside the model")


@rule("zeros", "ones", "full", "new_zeros", "new_ones", "new_full")
def constant_fill(a, node):
    """A tensor of one value (T5's zero position bias of a cross-attention, (1, heads, q, k)):
    every position of a dim holds the same, so its dims take the ids they meet, unpinned.
    The code must make it as wide as the cut model (T5 reads n_heads, which a size rule
    fixes); one that states the width as a constant fails the verification."""
    return a.fresh_like(node, None)


@rule("prelu", "_prelu_kernel")
def prelu(a, node):
    """max(0, x) + weight * min(0, x): a slope per channel ties to the channel dim (dim 1,
    or the only dim of a 1-d input), a single slope broadcasts."""
    x, w = a.ids(node.args[0]), a.ids(node.args[1])
    if x is None or w is None:
        return None
    if len(w) == 1 and len(w[0]) > 1:
        a.tie(w[0], x[1 if len(x) > 1 else 0])
        return x
    return a.broadcast(shape_of(node), [x, w], [shape_of(node.args[0]), shape_of(node.args[1])])


# -- matrix products ------------------------------------------------------------------------
def _contract(a, x: Ids, w: Ids, first, second, out_shape) -> Ids:
    """x @ w with broadcast batch dims; 1-D operands as torch.matmul treats them."""
    xk, wk = x[-1], (w[0] if len(w) == 1 else w[-2])
    a.tie(xk, wk)
    if a.parameter(first) is None and a.parameter(second) is None:
        a.whole(xk, "contracted between two activations")
    rows = x[:-1]
    cols = [] if len(w) == 1 else [w[-1]]
    batch_x, batch_w = rows[:-1], (w[:-2] if len(w) > 2 else [])
    lead = len(out_shape) - len(cols) - (1 if len(x) > 1 else 0)
    batch = []
    for i in range(lead):
        bx = batch_x[i - lead + len(batch_x)] if i - lead + len(batch_x) >= 0 else None
        bw = batch_w[i - lead + len(batch_w)] if i - lead + len(batch_w) >= 0 else None
        picks = [b for b in (bx, bw) if b is not None and len(b) == out_shape[i]]
        for other in picks[1:]:
            a.tie(picks[0], other)
        batch.append(picks[0] if picks else a.fresh([out_shape[i]], "broadcast")[0])
    return batch + (rows[-1:] if len(x) > 1 else []) + cols


@rule("matmul", "mm", "bmm")
def matmul(a, node):
    x, w = a.ids(node.args[0]), a.ids(node.args[1])
    if x is None or w is None:
        return None
    if len(w) >= 2:
        a.produces(node, node.args[1], len(w) - 1)
    return _contract(a, x, w, node.args[0], node.args[1], shape_of(node))


@rule("linear")
def linear(a, node):
    x, w, b = a.ids(node.args[0]), a.ids(node.args[1]), a.ids(_arg(node, 2, "bias"))
    if x is None or w is None or len(w) != 2:
        return None
    a.tie(x[-1], w[1])
    if b is not None:
        a.tie(b[0], w[0])
    a.produces(node, node.args[1], 0, _arg(node, 2, "bias"))
    return x[:-1] + [w[0]]


@rule("addmm")
def addmm(a, node):
    b, x, w = (a.ids(arg) for arg in node.args[:3])
    if x is None or w is None:
        return None
    out = _contract(a, x, w, node.args[1], node.args[2], shape_of(node))
    if b is not None:
        out = a.broadcast(shape_of(node), [out, b], [shape_of(node), shape_of(node.args[0])])
    a.produces(node, node.args[2], 1, node.args[0])
    return out


# -- convolution ----------------------------------------------------------------------------
@rule("conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d",
      "conv_transpose3d")
def convolution(a, node):
    name = op_name(node)
    x, w, b = a.ids(node.args[0]), a.ids(node.args[1]), a.ids(_arg(node, 2, "bias"))
    if x is None or w is None:
        return None
    transposed = name.startswith("conv_transpose") or (
        name == "convolution" and _arg(node, 6, "transposed", False))
    groups = _arg(node, 8 if name == "convolution" else 6, "groups", 1)
    out_dim = 1 if transposed else 0
    if transposed:
        if groups != 1:
            return None
        a.tie(x[1], w[0])
    elif groups == 1:
        a.tie(x[1], w[1])
    elif len(w[1]) == 1 and groups == len(x[1]):  # depthwise: output c*m+j reads input c
        a.tie(np.repeat(x[1], len(w[0]) // groups), w[0])
        a.cg.pin(w[1], "a depthwise filter reads one channel")
    else:  # grouped: position p of every group is tied across the groups
        per_in, per_out = x[1].reshape(groups, -1), w[0].reshape(groups, -1)
        for g in range(1, groups):
            a.tie(per_in[0], per_in[g])
            a.tie(per_out[0], per_out[g])
        a.tie(per_in[0], w[1])
    if b is not None:
        a.tie(b[0], w[out_dim])
    a.produces(node, node.args[1], out_dim, _arg(node, 2, "bias"))
    spatial = a.fresh(shape_of(node)[2:], "spatial dimension")
    return [x[0], w[out_dim]] + spatial


@rule("embedding")
def embedding(a, node):
    w, idx = a.ids(node.args[0]), a.ids(node.args[1])
    if w is None or idx is None:
        return None
    a.cg.pin(w[0], "embedding rows are looked up by data")
    a.produces(node, node.args[0], 1)
    return idx + [w[1]]


# -- normalisation ----------------------------------------------------------------------------
# The batch norms whose eval-mode affine map scores a channel: (training?, index of eps).
EVAL_BATCH_NORMS = {
    "batch_norm": (lambda node: node.args[5], 7),
    "native_batch_norm": (lambda node: node.args[5], 7),
    "_native_batch_norm_legit": (lambda node: node.args[5], 7),
    "_native_batch_norm_legit_no_training": (lambda node: False, 6),
}


@rule("batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
      "native_batch_norm", "instance_norm")
def batch_norm(a, node):
    x = a.ids(node.args[0])
    if x is None or len(x) < 2:
        return None
    for arg in node.args[1:5]:
        stats = a.ids(arg)
        if stats is not None:
            a.tie(stats[0], x[1])
    name = op_name(node)
    if name == "instance_norm":
        a.whole(x[1], "instance_norm normalises its channels together")
    elif name in EVAL_BATCH_NORMS and not EVAL_BATCH_NORMS[name][0](node):
        a.affine(node, *node.args[1:5], node.args[EVAL_BATCH_NORMS[name][1]])
    if isinstance(node.meta.get("val"), torch.Tensor):
        return x
    return tuple([x] if i == 0 else [x[1]] for i in range(len(node.meta["val"])))


@rule("layer_norm", "rms_norm", "native_layer_norm")
def layer_norm(a, node):
    x = a.ids(node.args[0])
    if x is None:
        return None
    count = len(node.args[1])
    for arg in node.args[2:4]:
        param = a.ids(arg)
        if param is not None:
            for p, d in zip(param, x[-count:]):
                a.tie(p, d)
    weight = a.parameter(_arg(node, 2, "weight"))
    if op_name(node) != "rms_norm" and count == 1 and weight is not None:
        a.renormalises(node, weight, x[-1])  # cut, and renormalised over what stays
        return x
    for d in x[-count:]:
        a.normalised(node, d, f"normalised together by {op_name(node)}")
    return x


@rule("group_norm")
def group_norm(a, node):
    """Position p of every group is one class, so every group keeps as many channels as the
    others and the group count stays; with a weight the cut norm renormalises each group
    over its kept channels (report.approximate), without one the channels stay whole."""
    x = a.ids(node.args[0])
    if x is None:
        return None
    groups = node.args[1]
    for arg in node.args[2:4]:
        param = a.ids(arg)
        if param is not None:
            a.tie(param[0], x[1])
    weight = a.parameter(_arg(node, 2, "weight"))
    if weight is None:
        a.whole(x[1], "normalised together by group_norm")
        return x
    per_group = x[1].reshape(groups, -1)
    for g in range(1, groups):
        a.tie(per_group[0], per_group[g])
    a.renormalises(node, weight, x[1])
    return x


# -- reductions and scans ---------------------------------------------------------------------
@rule("sum", "mean", "amax", "amin", "max", "min", "var", "std", "prod", "logsumexp",
      "linalg_vector_norm", "norm", "argmax", "argmin", "any", "all", "count_nonzero",
      "var_mean", "std_mean")
def reduction(a, node):
    x = a.ids(node.args[0])
    if x is None:
        return None
    if isinstance(_arg(node, 1, "dim"), fx.Node):  # max(a, b), min(a, b): element-wise
        return elementwise(a, node)
    value = node.meta["val"]
    out_shape = tuple((value[0] if isinstance(value, tuple) else value).shape)
    if op_name(node) in ("norm", "linalg_vector_norm"):  # (x, ord, dim, ...): all dims if none
        dims = _dims(_arg(node, 2, "dim"), len(x))
    else:
        dims = _dims(_arg(node, 1, "dim"), len(x))
    for d in dims:
        a.normalised(node, x[d], f"reduced over by {op_name(node)}")
    keep = len(out_shape) == len(x)
    ids = [d if i not in dims else a.fresh([1], "reduced")[0]
           for i, d in enumerate(x) if keep or i not in dims]
    return tuple(ids for _ in value) if isinstance(value, tuple) else ids


@rule("softmax", "_softmax", "log_softmax", "_log_softmax", "cumsum", "cumprod", "flip",
      "roll", "sort")
def along_dim(a, node):
    x = a.ids(node.args[0])
    if x is None:
        return None
    for d in _dims(_arg(node, 1, "dim"), len(x)):
        a.whole(x[d], f"{op_name(node)} mixes positions along it")
    value = node.meta["val"]
    return tuple(x for _ in value) if isinstance(value, tuple) else x


# -- pooling and resizing: batch and channel dims pass, spatial dims are fresh -------------
@rule("max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
      "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
      "adaptive_max_pool2d", "max_pool2d_with_indices", "upsample_nearest2d",
      "upsample_bilinear2d", "upsample_nearest1d")
def pooling(a, node):
    x = a.ids(node.args[0])
    value = node.meta["val"]
    shape = tuple((value[0] if isinstance(value, tuple) else value).shape)
    if x is None or len(x) < 3 or len(shape) != len(x):
        return None
    ids = x[:2] + a.fresh(shape[2:], "spatial dimension")
    return tuple(ids for _ in value) if isinstance(value, tuple) else ids


@rule("scaled_dot_product_attention")
def attention(a, node):
    q, k, v = (a.ids(arg) for arg in node.args[:3])
    if q is None or k is None or v is None or len(q) < 3:
        return None
    for dq, dk, dv in zip(q[:-3], k[:-3], v[:-3]):
        a.tie(dq, dk)
        a.tie(dk, dv)
    heads, kv_heads = len(q[-3]), len(k[-3])
    if heads == kv_heads:
        a.tie(q[-3], k[-3])
    else:  # grouped-query attention: query head h reads KV head h // (heads / kv_heads)
        a.tie(q[-3], np.repeat(k[-3], heads // kv_heads))
    a.tie(k[-3], v[-3])
    a.tie(q[-1], k[-1])
    a.whole(q[-1], "attention contracts the head dimension")
    a.tie(k[-2], v[-2])
    a.cg.pin(k[-2], "key length")
    mask = a.ids(_arg(node, 3, "attn_mask"))
    if mask is not None:
        scores = q[:-1] + [k[-2]]
        a.broadcast(tuple(len(d) for d in scores), [scores, mask],
                    [tuple(len(d) for d in scores), shape_of(node.args[3])])
    return q[:-1] + [v[-1]]



@rule("einsum")
def einsum(a, node):
    """An einsum of activations (no parameter operand, no ellipsis, no repeated letter): a
    letter's dims are tied across the operands (those of the output's size: a size-1 dim
    broadcasts); a letter the output keeps carries them there, a summed one is whole, as
    in a matmul between two activations."""
    equation, tensors = node.args[0], node.args[1]
    inputs, _, output = equation.replace(" ", "").partition("->")
    operands = inputs.split(",")
    ids = [a.ids(t) for t in tensors]
    if "." in equation or not output or len(operands) != len(ids) or any(
            a.parameter(t) is not None for t in tensors) or any(
            x is None or len(x) != len(letters) or len(set(letters)) != len(letters)
            for x, letters in zip(ids, operands)):
        return None
    out_shape = shape_of(node)
    carriers = {}
    for letter in dict.fromkeys("".join(operands)):
        dims = [x[letters.index(letter)] for x, letters in zip(ids, operands) if letter in letters]
        size = out_shape[output.index(letter)] if letter in output else max(map(len, dims))
        dims = [d for d in dims if len(d) == size] or dims[:1]
        for other in dims[1:]:
            a.tie(dims[0], other)
        if letter in output:
            carriers[letter] = dims[0]
        else:
            a.whole(dims[0], "contracted between two activations")
    return [carriers[letter] for letter in output]
