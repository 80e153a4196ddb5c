"""Dead attention heads under threshold=0 on the export path, with a position bias added to
the logits: the bias writes a non-zero value into every head's class, yet a head whose q, k
and v rows are zero outputs attn @ 0 = 0 whatever its logits, so it leaves exactly; a head
whose values are alive stays, even with its q and k rows zero (its attention is then the
softmax of the bias alone, not zero)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ffr_fast.pruning import prune, register_size_rule
from ffr_fast.testing import assert_same_output, zero_heads

HEADS, HEAD_DIM, TOKENS = 4, 4, 6


class BiasedAttention(nn.Module):
    """Self-attention with a per-head position bias on the logits (a learnt table plus an
    MLP's output over relative coordinates, as Swin V2's), written by hand (matmul and
    softmax) or through scaled_dot_product_attention's float mask."""

    def __init__(self, kernel: str):
        super().__init__()
        self.kernel, self.heads, self.head_dim = kernel, HEADS, HEAD_DIM
        self.qkv = nn.Linear(16, 3 * HEADS * HEAD_DIM)
        self.proj = nn.Linear(HEADS * HEAD_DIM, 16)
        self.position_bias = nn.Parameter(torch.randn(HEADS, TOKENS, TOKENS))
        self.bias_mlp = nn.Linear(2, HEADS)
        self.register_buffer("coords", torch.randn(TOKENS * TOKENS, 2))

    def forward(self, x):
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (batch, heads, tokens, head_dim)
        learnt = self.bias_mlp(self.coords).transpose(0, 1).reshape(self.heads, tokens, tokens)
        bias = learnt + self.position_bias
        if self.kernel == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            logits = q @ k.transpose(-2, -1) * self.head_dim ** -0.5 + bias
            out = logits.softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, -1))


def _heads(m):
    m.heads = m.qkv.weight.shape[0] // (3 * m.head_dim)


register_size_rule("BiasedAttention", _heads)


class Net(nn.Module):
    def __init__(self, kernel):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.attn = BiasedAttention(kernel)

    def forward(self, x):
        h = self.embed(x)
        return h + self.attn(h)


def build(kernel):
    torch.manual_seed(0)
    return Net(kernel).eval(), torch.randn(2, TOKENS, 8)


def zero_qk_rows(attn, head):
    """Zero head `head`'s q and k rows (weight and bias), leaving its v rows."""
    inner = HEADS * HEAD_DIM
    rows = [block * inner + head * HEAD_DIM + i for block in (0, 1) for i in range(HEAD_DIM)]
    with torch.no_grad():
        attn.qkv.weight[rows] = 0
        attn.qkv.bias[rows] = 0


@pytest.mark.parametrize("kernel", ["matmul", "sdpa"])
def test_a_head_with_zero_qkv_leaves_exactly_despite_its_position_bias(kernel):
    model, x = build(kernel)
    zero_heads(model.attn.qkv.weight, model.attn.qkv.bias, [1], HEADS)
    result = prune(model, x, threshold=0, analysis="export")
    attn = result.model.attn
    assert attn.heads == 3 and attn.qkv.weight.shape == (36, 16)
    assert attn.position_bias.shape == (3, TOKENS, TOKENS)
    assert torch.equal(attn.position_bias, model.attn.position_bias[[0, 2, 3]])
    assert torch.equal(attn.bias_mlp.weight, model.attn.bias_mlp.weight[[0, 2, 3]])
    assert_same_output(model, result, x)


@pytest.mark.parametrize("kernel", ["matmul", "sdpa"])
def test_a_head_with_live_values_stays_even_with_zero_queries_and_keys(kernel):
    model, x = build(kernel)
    zero_qk_rows(model.attn, 2)
    result = prune(model, x, threshold=0, analysis="export")
    assert result.model.attn.heads == HEADS
    assert result.model.attn.qkv.weight.shape == (48, 16)
    assert_same_output(model, result, x)
