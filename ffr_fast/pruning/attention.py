"""Attention layers of other libraries pruned by whole heads: torchvision's Swin (V1 and V2)
and MaxViT window attentions (nn.MultiheadAttention's head-pruned layer is multihead.py's).

torchvision's window attentions tie their inner width to their input width (Swin derives
head_dim from the input width, MaxViT reshapes the heads' outputs to it): a layer whose
widths no longer agree becomes a subclass of its own class made here (`make_head_pruned`)
whose forward, `shifted_window_attention` or `relative_attention`, reads num_heads and
head_dim from the pruned module; it computes exactly torchvision's forward on unpruned
weights.
"""
import copyreg
import math
import pickle
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .multihead import (
    HeadPrunedMultiheadAttention,  # noqa: F401 (earlier releases' whole-model pickles name it here)
    qkv_rows,
)

# torchvision's window attentions tie their inner width to their input width (Swin derives
# head_dim as C // num_heads from the input, MaxViT reshapes to the input width D), so a
# layer that lost heads (or input channels) cannot run its own forward. The rule's resize
# turns it into a subclass made here: the same module (parameters, names, state dict keys,
# every attribute) with a forward that reads num_heads and head_dim from the sliced
# weights. The library imports no torchvision: the subclass is made from the module's own
# class, when the pruner first needs it.

_SUBCLASSES: Dict[Tuple[type, Callable], type] = {}


def head_pruned_class(base: type, forward: Callable) -> type:
    """The subclass of `base` whose forward is `forward` (made once, then reused)."""
    key = (base, forward)
    if key not in _SUBCLASSES:
        name = f"HeadPruned{base.__name__}"
        _SUBCLASSES[key] = type(name, (base,), {
            "forward": forward, "__module__": __name__, "__qualname__": name,
            "__reduce_ex__": _reduce_head_pruned,
            "__doc__": f"A {base.__name__} whose heads were pruned (made by the pruner, "
                       "never directly)."})
    return _SUBCLASSES[key]


def _new_head_pruned(base: type, forward: Callable) -> nn.Module:
    cls = head_pruned_class(base, forward)
    return cls.__new__(cls)


def _reduce_head_pruned(self, protocol):
    """Pickle / deepcopy by the base class and the forward, both importable by name: the
    subclass itself is made at run time."""
    reduced = nn.Module.__reduce_ex__(self, protocol)
    cls = type(self)
    if protocol < 2 or reduced[0] is not copyreg.__newobj__:
        raise pickle.PicklingError(f"{cls.__name__} pickles with protocol 2 or higher only")
    return (_new_head_pruned, (cls.__bases__[0], cls.forward)) + tuple(reduced[2:])


# the classes whose forward the head-pruned forwards compute
REPLACED = ("ShiftedWindowAttention", "ShiftedWindowAttentionV2",
            "RelativePositionalMultiHeadAttention")


def make_head_pruned(module: nn.Module, forward: Callable) -> None:
    """Give `module` the head-pruned forward (a no-op when it has it already). A subclass
    that overrides torchvision's forward keeps its own: the replacement would drop what it
    adds (its cut then fails the pruner's verification rather than change silently)."""
    if type(module).forward is forward:
        return
    owner = next(cls for cls in type(module).__mro__ if "forward" in vars(cls))
    if owner.__name__ in REPLACED:
        module.__class__ = head_pruned_class(type(module), forward)


def _regions(size: int, window: int, shift: int) -> torch.Tensor:
    """Along one padded axis of a shifted-window attention, which of the (up to) three
    stripes each position came from before the cyclic shift: the windows that straddle the
    wrap-around mix stripes, and tokens of different stripes must not attend to each other.
    Without a shift the axis is one stripe."""
    position = torch.arange(size)
    if shift == 0:
        return torch.zeros(size, dtype=torch.long)
    return (position >= size - window).long() + (position >= size - shift).long()


def shifted_window_attention(self, x: torch.Tensor) -> torch.Tensor:
    """torchvision's ShiftedWindowAttention (and V2's cosine attention) with num_heads and
    head_dim read from the (pruned) module rather than derived from the input width.

    x: (B, H, W, C_in). The feature map is padded to whole windows and, for a shifted layer,
    rolled back by the shift; each window's tokens attend to each other (per head: scaled
    dot products, or V2's cosine similarity times a per-head learnt scale, plus the per-head
    relative position bias, and -100 between tokens of different stripes of a shifted
    map); the heads' outputs, concatenated, go through `proj`; the windows are put back,
    rolled forward and cropped. Dropout as torchvision's, in training mode only."""
    batch, height, width, _ = x.shape
    wh, ww = self.window_size
    x = F.pad(x, (0, 0, 0, (ww - width % ww) % ww, 0, (wh - height % wh) % wh))
    _, ph, pw, c_in = x.shape
    sh, sw = (0 if wh >= ph else self.shift_size[0]), (0 if ww >= pw else self.shift_size[1])
    if sh or sw:
        x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
    rows, cols = ph // wh, pw // ww
    tokens = wh * ww
    x = x.view(batch, rows, wh, cols, ww, c_in).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(batch * rows * cols, tokens, c_in)

    heads = self.num_heads
    logit_scale = getattr(self, "logit_scale", None)  # V2: cosine attention
    qkv_bias = self.qkv.bias
    if logit_scale is not None and qkv_bias is not None:
        qkv_bias = qkv_bias.clone()  # V2 keeps no key bias
        third = qkv_bias.numel() // 3
        qkv_bias[third:2 * third] = 0
    qkv = F.linear(x, self.qkv.weight, qkv_bias)
    head_dim = qkv.shape[-1] // (3 * heads)
    qkv = qkv.reshape(x.shape[0], tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # (windows, heads, tokens, head_dim)
    if logit_scale is not None:
        scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        scores = scores * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        scores = (q * head_dim ** -0.5) @ k.transpose(-2, -1)
    scores = scores + self.get_relative_position_bias()
    if sh or sw:
        region = (_regions(ph, wh, sh).to(x.device)[:, None] * 3
                  + _regions(pw, ww, sw).to(x.device)[None, :])
        region = region.view(rows, wh, cols, ww).permute(0, 2, 1, 3).reshape(rows * cols, tokens)
        mask = torch.zeros(rows * cols, tokens, tokens, dtype=scores.dtype, device=x.device)
        mask = mask.masked_fill(region[:, None, :] != region[:, :, None], -100.0)
        scores = scores.view(batch, rows * cols, heads, tokens, tokens) + mask[None, :, None]
        scores = scores.view(-1, heads, tokens, tokens)
    attn = F.dropout(F.softmax(scores, dim=-1), p=self.attention_dropout, training=self.training)
    out = (attn @ v).transpose(1, 2).reshape(x.shape[0], tokens, heads * head_dim)
    out = F.dropout(F.linear(out, self.proj.weight, self.proj.bias), p=self.dropout,
                    training=self.training)

    c_out = out.shape[-1]
    out = out.view(batch, rows, cols, wh, ww, c_out).permute(0, 1, 3, 2, 4, 5)
    out = out.reshape(batch, ph, pw, c_out)
    if sh or sw:
        out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
    return out[:, :height, :width, :].contiguous()


def relative_attention(self, x: torch.Tensor) -> torch.Tensor:
    """torchvision's MaxViT RelativePositionalMultiHeadAttention with the inner width
    n_heads * head_dim, not the input width D, between `to_qkv` and `merge`.

    x: (B, G, P, D): G groups (windows or grid cells) of P tokens. Per group and head:
    softmax(q . (k * scale_factor) + relative position bias) @ v; the heads' outputs,
    concatenated, go through `merge`. `scale_factor` stays the original D ** -0.5."""
    batch, groups, tokens, _ = x.shape
    heads, head_dim = self.n_heads, self.head_dim
    q, k, v = (t.reshape(batch, groups, tokens, heads, head_dim).transpose(2, 3)
               for t in torch.chunk(self.to_qkv(x), 3, dim=-1))  # (B, G, heads, P, head_dim)
    scores = q @ (k * self.scale_factor).transpose(-2, -1)
    attn = F.softmax(scores + self.get_relative_positional_bias(), dim=-1)
    out = (attn @ v).transpose(2, 3).reshape(batch, groups, tokens, heads * head_dim)
    return self.merge(out)


def _resize_linears(*linears: nn.Linear) -> None:
    for linear in linears:
        linear.out_features, linear.in_features = linear.weight.shape


def window_attention_heads(m: nn.Module) -> Optional[Tuple[int, int]]:
    """(num_heads, head_dim) of a Swin (V1 or V2) window attention whose tensors agree on
    them (q, k, v stacked in `qkv`, the heads' outputs read by `proj`, one entry per head
    in every per-head tensor), or None."""
    rows, heads = m.qkv.weight.shape[0], m.num_heads
    if rows % (3 * heads) or m.proj.weight.shape[1] != rows // 3:
        return None
    per_head = [t.shape[i] for t, i in ((getattr(m, "relative_position_bias_table", None), -1),
                                        (getattr(m, "logit_scale", None), 0)) if t is not None]
    if hasattr(m, "cpb_mlp"):  # V2: the bias comes from an MLP (Linear, ReLU, Linear)
        if len(m.cpb_mlp) != 3:
            return None
        per_head.append(m.cpb_mlp[2].weight.shape[0])
    if not per_head or any(n != heads for n in per_head):
        return None
    return heads, rows // (3 * heads)


def resize_window_attention(m: nn.Module) -> None:
    """Sizes from the sliced tensors; a layer whose inner, input and output widths no longer
    agree gets the head-pruned forward."""
    _resize_linears(m.qkv, m.proj)
    table = getattr(m, "relative_position_bias_table", None)
    m.num_heads = table.shape[-1] if table is not None else m.logit_scale.shape[0]
    if hasattr(m, "cpb_mlp"):
        _resize_linears(m.cpb_mlp[2])
    inner = m.qkv.weight.shape[0] // 3
    if not inner == m.qkv.weight.shape[1] == m.proj.weight.shape[0]:
        make_head_pruned(m, shifted_window_attention)


def window_attention_rows(m: nn.Module) -> torch.Tensor:
    return qkv_rows(m.qkv.weight, m.qkv.bias)


def relative_attention_heads(m: nn.Module) -> Optional[Tuple[int, int]]:
    """(n_heads, head_dim) of a MaxViT attention whose tensors agree on them, or None."""
    heads, head_dim = m.n_heads, m.head_dim
    inner = heads * head_dim
    if (m.to_qkv.weight.shape[0] != 3 * inner or m.merge.weight.shape[1] != inner
            or m.relative_position_bias_table.shape[-1] != heads):
        return None
    return heads, head_dim


def resize_relative_attention(m: nn.Module) -> None:
    _resize_linears(m.to_qkv, m.merge)
    m.n_heads = m.relative_position_bias_table.shape[-1]
    m.head_dim = m.to_qkv.weight.shape[0] // 3 // m.n_heads
    if m.to_qkv.weight.shape[0] // 3 != m.to_qkv.weight.shape[1]:
        make_head_pruned(m, relative_attention)


def relative_attention_rows(m: nn.Module) -> torch.Tensor:
    return qkv_rows(m.to_qkv.weight, m.to_qkv.bias)
