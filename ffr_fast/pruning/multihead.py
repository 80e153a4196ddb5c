"""nn.MultiheadAttention pruned by whole heads.

nn.MultiheadAttention ties its inner width (num_heads * head_dim) to its input and output
width (embed_dim), so a model with heads removed cannot be one. After pruning it becomes a
`HeadPrunedMultiheadAttention`: the same parameters by the same names (in_proj_weight
(3 * inner, in), in_proj_bias, out_proj), sized independently, and a forward that computes
what nn.MultiheadAttention's does for a packed in-projection: self- or cross-attention,
batch first or not, unbatched, key_padding_mask and attn_mask (bool or float), is_causal,
need_weights (averaged over the heads it has), dropout in training, and the nested tensors
nn.TransformerEncoder hands its layers at inference.

The pruner's capture (aten_study.py) runs this forward in every layer it can cut by heads
(`capturing_head_pruned`), so that the channel analysis reads the code the cut layer runs;
torch's own forward splits the packed projection unequally for cross-attention and expands
a padding mask over the heads, both of which would keep every head. What the forward reads
of a mask decides what the cut may do: a 2D attn_mask and a key_padding_mask broadcast over
the heads, so heads go freely; a 3D attn_mask holds one mask per batch item and head, tied
to the heads, so one made outside the model keeps them (the cut layer would not know which
of the original heads each mask belongs to); the averaged weights mix the heads, so heads
go only where nothing reads the weights.
"""
import math
from contextlib import contextmanager
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def qkv_rows(weight: torch.Tensor, bias) -> torch.Tensor:
    """(inner, 3 * (in + 1)): the q, k and v rows (with biases) of every inner channel of a
    projection that stacks q, k and v as three blocks of `inner` rows."""
    inner = weight.shape[0] // 3
    weight = weight.detach().view(3, inner, -1)
    bias = (bias.detach().view(3, inner, 1) if bias is not None
            else torch.zeros(3, inner, 1, dtype=weight.dtype, device=weight.device))
    return torch.cat([weight, bias], dim=2).permute(1, 0, 2).reshape(inner, -1)


def _additive(mask: Optional[torch.Tensor], name: str, dtype: torch.dtype
              ) -> Optional[torch.Tensor]:
    """A mask as the float added to the logits: a bool mask's True is -inf (torch's rule)."""
    if mask is None or torch.is_floating_point(mask):
        return mask
    if mask.dtype != torch.bool:
        raise AssertionError(f"only bool and floating types of {name} are supported")
    return torch.zeros_like(mask, dtype=dtype).masked_fill(mask, float("-inf"))


class HeadPrunedMultiheadAttention(nn.MultiheadAttention):
    """A MultiheadAttention whose heads were pruned (made by the pruner, never directly)."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        if query.is_nested:
            return self._nested(query, key, value, key_padding_mask, attn_mask), None
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use "
                               "the Transformer module method `generate_square_subsequent_mask`"
                               " to create this mask.")
        unbatched = query.dim() == 2

        def batch_major(x):  # (N, L, E)
            return x.unsqueeze(0) if unbatched else (x if self.batch_first else x.transpose(0, 1))

        q, k, v = self._in_projection(query, key, value, batch_major)
        n, length, source = q.shape[0], q.shape[2], k.shape[2]
        # torch's rule: the causal hint stands for the mask only where nothing else is merged
        # into it and no weights are computed
        causal = is_causal and key_padding_mask is None and not need_weights
        mask = None
        if not causal:
            masks = [m for m in (
                self._attn_mask(_additive(attn_mask, "attn_mask", q.dtype), n, length, source),
                _padding(_additive(key_padding_mask, "key_padding_mask", q.dtype), n, source))
                if m is not None]
            mask = masks[0] + masks[1] if len(masks) == 2 else next(iter(masks), None)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * math.sqrt(1.0 / self.head_dim)) @ k.transpose(-2, -1)
            attn = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            if dropout > 0.0:
                attn = F.dropout(attn, p=dropout)
            out = attn @ v
            weights = attn.mean(dim=1) if average_attn_weights else attn
            weights = weights.squeeze(0) if unbatched else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=causal)
        out = self.out_proj(out.transpose(1, 2).flatten(2))  # (N, L, E)
        if unbatched:
            return out.squeeze(0), weights
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _in_projection(self, query, key, value, batch_major
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k and v, (N, heads, L or S, head_dim): the in-projection's q rows applied to
        the query, its k rows to the key and its v rows to the value."""
        weight, bias = self.in_proj_weight, self.in_proj_bias
        if key is query and value is query:  # self-attention: one product
            projected = F.linear(batch_major(query), weight, bias).chunk(3, dim=-1)
        else:
            biases = bias.chunk(3) if bias is not None else (None,) * 3
            projected = [F.linear(batch_major(x), w, b)
                         for x, w, b in zip((query, key, value), weight.chunk(3), biases)]
        return tuple(t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
                     for t in projected)

    def _attn_mask(self, mask, n: int, length: int, source: int) -> Optional[torch.Tensor]:
        """attn_mask broadcast to (N, heads, L, S): a 2D (L, S) mask as it is, a 3D one of
        (N * num_heads, L, S) per batch item and head."""
        if mask is None or mask.dim() == 2:
            if mask is not None and mask.shape != (length, source):
                raise RuntimeError(f"The shape of the 2D attn_mask is {mask.shape}, but should "
                                   f"be {(length, source)}.")
            return mask
        expected = (n * self.num_heads, length, source)
        if mask.dim() != 3 or mask.shape != expected:
            raise RuntimeError(
                f"attn_mask of shape {tuple(mask.shape)} does not fit this head-pruned "
                f"MultiheadAttention: a 3D mask must be (N * num_heads, L, S) = {expected}, "
                f"num_heads being the {self.num_heads} heads it kept (one made for the original "
                "layer's heads cannot say which of them were cut), or 2D (L, S)")
        return mask.view(n, self.num_heads, length, source)

    def _nested(self, query, key, value, key_padding_mask, attn_mask):
        """nn.TransformerEncoder's inference path: self-attention on a nested tensor of
        sequences (batch first), with no mask, as torch's fused layer runs it; computed on the
        zero-padded batch with the padding masked, and nested again."""
        if key is not query or value is not query or key_padding_mask is not None or (
                attn_mask is not None):
            raise NotImplementedError("a head-pruned MultiheadAttention runs a nested tensor "
                                      "as self-attention without masks only")
        lengths = [len(sequence) for sequence in query.unbind()]
        padded = torch.nested.to_padded_tensor(query, 0.0)
        padding = torch.arange(padded.shape[1], device=padded.device)[None, :] >= torch.tensor(
            lengths, device=padded.device)[:, None]
        out, _ = self.forward(padded, padded, padded, key_padding_mask=padding,
                              need_weights=False)
        return torch.nested.as_nested_tensor([o[:size] for o, size in zip(out, lengths)])


def _padding(mask, n: int, source: int) -> Optional[torch.Tensor]:
    """key_padding_mask, (N, S) (unbatched: (S,)), broadcast to (N, heads, L, S)."""
    return None if mask is None else mask.view(n, 1, 1, source)


def attention_heads(mha: nn.MultiheadAttention) -> Optional[Tuple[int, int]]:
    """(num_heads, head_dim) of a layer the pruner can cut by heads, or None when it has
    separate q, k and v projections (kdim or vdim other than embed_dim), key / value biases
    or a zero attention: HeadPrunedMultiheadAttention's forward runs none of them."""
    if mha.in_proj_weight is None or mha.bias_k is not None or mha.add_zero_attn:
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
    if not (inner == mha.embed_dim == mha.kdim) and type(mha) is nn.MultiheadAttention:
        mha.__class__ = HeadPrunedMultiheadAttention
    if isinstance(mha, HeadPrunedMultiheadAttention):
        # nn.TransformerEncoderLayer reads this to choose torch's fused kernel, which assumes
        # q, k and v as wide as embed_dim: false here, so the layer calls this forward
        mha._qkv_same_embed_dim = False


def inner_rows(mha: nn.MultiheadAttention) -> torch.Tensor:
    """(inner, 3 * (in + 1)): the q, k and v rows (with biases) of every inner channel."""
    return qkv_rows(mha.in_proj_weight, mha.in_proj_bias)


@contextmanager
def capturing_head_pruned(model: nn.Module) -> Iterator[None]:
    """Inside, every nn.MultiheadAttention of `model` that can be cut by heads
    (attention_heads) runs HeadPrunedMultiheadAttention's forward, which computes the same
    on its unpruned weights: what a capture for the pruner's channel analysis reads (module
    docstring). A plain nn.MultiheadAttention left in the capture is one it cannot cut."""
    swapped = [m for m in model.modules()
               if type(m) is nn.MultiheadAttention and attention_heads(m) is not None]
    for mha in swapped:
        mha.__class__ = HeadPrunedMultiheadAttention
    try:
        yield
    finally:
        for mha in swapped:
            mha.__class__ = nn.MultiheadAttention
