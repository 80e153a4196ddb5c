"""nn.MultiheadAttention pruned by whole heads.

nn.MultiheadAttention ties its inner width (num_heads * head_dim) to its input and output
width (embed_dim), so a model with heads removed cannot be one. After pruning it becomes a
`HeadPrunedMultiheadAttention`: the same parameters by the same names (in_proj_weight
(3 * inner, in), in_proj_bias, out_proj), sized independently, and a forward with the same
signature for self-attention (query is key is value) without masks, as torchvision's
VisionTransformer calls it. Anything else raises, naming what is not supported.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


class HeadPrunedMultiheadAttention(nn.MultiheadAttention):
    """A MultiheadAttention whose heads were pruned (made by the pruner, never directly)."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        if key is not query or value is not query:
            raise NotImplementedError("a head-pruned MultiheadAttention supports self-attention "
                                      "only (query, key and value the same tensor)")
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise NotImplementedError("a head-pruned MultiheadAttention supports no masks")
        x = query if self.batch_first else query.transpose(0, 1)  # (N, L, E)
        n, length, _ = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.view(n, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (N, heads, L, head_dim)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.head_dim), dim=-1)
            out = F.dropout(attn, dropout, self.training) @ v
            weights = attn.mean(1) if average_attn_weights else attn
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, -1))
        return (out if self.batch_first else out.transpose(0, 1)), weights


def attention_heads(mha: nn.MultiheadAttention):
    """(num_heads, head_dim) of a self-attention layer the pruner can cut by heads, or None
    when it has separate key / value projections or key / value biases."""
    if mha.in_proj_weight is None or mha.bias_k is not None:
        return None
    return mha.num_heads, mha.head_dim


def resize_attention(mha: nn.MultiheadAttention) -> None:
    """Sizes from the sliced tensors; a layer whose widths no longer agree becomes a
    HeadPrunedMultiheadAttention (same parameters, same state dict keys)."""
    inner = mha.in_proj_weight.shape[0] // 3
    mha.out_proj.out_features, mha.out_proj.in_features = mha.out_proj.weight.shape
    mha.num_heads = inner // mha.head_dim
    mha.kdim = mha.vdim = mha.in_proj_weight.shape[1]
    mha.embed_dim = mha.out_proj.weight.shape[0]
    if not (inner == mha.embed_dim == mha.kdim):
        mha.__class__ = HeadPrunedMultiheadAttention


def inner_rows(mha: nn.MultiheadAttention) -> torch.Tensor:
    """(inner, 3 * (in + 1)): the q, k and v rows (with biases) of every inner channel."""
    inner = mha.in_proj_weight.shape[0] // 3
    weight = mha.in_proj_weight.detach().view(3, inner, -1)
    bias = (mha.in_proj_bias.detach().view(3, inner, 1) if mha.in_proj_bias is not None
            else torch.zeros(3, inner, 1, dtype=weight.dtype))
    return torch.cat([weight, bias], dim=2).permute(1, 0, 2).reshape(inner, -1)
