"""nn.MultiheadAttention cut by whole heads on the export path (analysis="export"): its packed
in-projection viewed to (..., 3, E) with q, k and v selected, and its (L, N, E) ->
(L, N * H, D) view that folds the batch into the heads, both followed to the heads. A plain
self-attention wrapper (batch first or not) and torchvision's VisionTransformer, every
result checked against the original with the removed positions zeroed, saved and loaded."""
import pytest
import torch
from torch import nn

import ffr_fast
from ffr_fast.pruning import load_pruned, prune, save_pruned
from ffr_fast.pruning.multihead import HeadPrunedMultiheadAttention
from ffr_fast.testing import (
    assert_same_output,
    kept_heads,
    relative_error,
    zero_heads,
    zeroed_original,
)

import nets

WIDTH, HEADS = 16, 4
HEAD_DIM = WIDTH // HEADS


class SelfAttention(nn.Module):
    """A linear layer, then self-attention with a residual add, then a linear head."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.fc = nn.Linear(WIDTH, WIDTH)
        self.mha = nn.MultiheadAttention(WIDTH, HEADS, batch_first=batch_first)
        self.head = nn.Linear(WIDTH, 8)

    def forward(self, x):
        y = self.fc(x)
        return self.head(self.mha(y, y, y, need_weights=False)[0] + y)


def self_attention(batch_first: bool):
    torch.manual_seed(0)
    model = SelfAttention(batch_first).eval()
    shape = (2, 5, WIDTH) if batch_first else (5, 2, WIDTH)  # a batch of 2: N * H is no H
    return model, torch.randn(shape, generator=torch.Generator().manual_seed(1))


def small_vit():
    return nets.small_vit(num_layers=2)


def assert_head_pruned(mha: nn.Module, heads: int, embed_dim: int) -> None:
    """The pruned layer's attributes agree with its tensors and with each other."""
    assert mha.num_heads == heads and mha.head_dim == HEAD_DIM and mha.embed_dim == embed_dim
    assert mha.in_proj_weight.shape == (3 * heads * HEAD_DIM, embed_dim)
    assert mha.out_proj.weight.shape == (embed_dim, heads * HEAD_DIM)
    assert mha.out_proj.in_features == heads * HEAD_DIM == mha.in_proj_weight.shape[0] // 3


@pytest.mark.parametrize("batch_first", [True, False])
def test_a_dead_head_leaves_on_export_and_the_rest_is_exact(batch_first, tmp_path):
    model, x = self_attention(batch_first)
    zero_heads(model.mha.in_proj_weight, model.mha.in_proj_bias, [1], HEADS)
    result = prune(model, x, threshold=0, analysis="export")
    assert result.report.settings["path"] == "torch.export"
    mha = result.model.mha
    assert type(mha) is HeadPrunedMultiheadAttention  # 3 heads of 4 no longer make 16
    assert_head_pruned(mha, 3, WIDTH)
    assert kept_heads(result, "mha", HEADS, HEAD_DIM) == [0, 2, 3]
    assert_same_output(model, result, x)
    save_pruned(result, tmp_path / "mha.pt")
    loaded = load_pruned(tmp_path / "mha.pt", lambda: self_attention(batch_first)[0])
    assert type(loaded.mha) is HeadPrunedMultiheadAttention
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))


@pytest.mark.parametrize("batch_first", [True, False])
def test_a_ratio_cuts_whole_heads_alike_in_q_k_v(batch_first):
    model, x = self_attention(batch_first)
    result = prune(model, x, ratio=0.5, analysis="export")
    mha = result.model.mha
    heads = kept_heads(result, "mha", HEADS, HEAD_DIM)
    assert 0 < len(heads) < HEADS
    assert_head_pruned(mha, len(heads), result.model.fc.out_features)
    assert result.report.relative_diff <= 1e-5  # the pruner's own check, and ours:
    with torch.no_grad():
        pruned, reference = result.model(x), zeroed_original(model, result)(x)
        assert relative_error(pruned, reference) <= 1e-5
        assert relative_error(pruned, model(x)) > 1e-3  # the cut changed the output


def test_vit_dead_heads_leave_on_export_in_every_layer(tmp_path):
    model = small_vit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    layers = [model.encoder.layers[i].self_attention for i in range(2)]
    for mha, dead in zip(layers, ([0], [1, 3])):
        zero_heads(mha.in_proj_weight, mha.in_proj_bias, dead, 4)
    result = prune(model, x, threshold=0, analysis="export")
    prefix = "encoder.layers.encoder_layer_"
    assert kept_heads(result, f"{prefix}0.self_attention", 4, 8) == [1, 2, 3]
    assert kept_heads(result, f"{prefix}1.self_attention", 4, 8) == [0, 2]
    assert [m.num_heads for m in (result.model.get_submodule(f"{prefix}{i}.self_attention")
                                  for i in range(2))] == [3, 2]
    assert_same_output(model, result, x)
    save_pruned(result, tmp_path / "vit.pt")
    loaded = load_pruned(tmp_path / "vit.pt", small_vit)
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))


def test_vit_loses_heads_on_export_as_on_torch_fx():
    model = small_vit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    export = prune(model, x, ratio=0.5, analysis="export")
    fx = prune(model, x, ratio=0.5, analysis="fx")
    path = "encoder.layers.encoder_layer_{}.self_attention"
    for i in range(2):
        mha = export.model.get_submodule(path.format(i))
        assert mha.num_heads < 4 and mha.num_heads * mha.head_dim * 3 == len(
            mha.in_proj_weight)
        assert mha.num_heads == fx.model.get_submodule(path.format(i)).num_heads
    assert export.report.flops_after == fx.report.flops_after


class UnsupportedAttention(nn.Module):
    """nn.MultiheadAttention with what the head-pruned layer does not run: separate q, k, v
    projections (kdim, vdim: attending to a narrower memory), key / value biases, a zero
    attention (self-attention)."""

    def __init__(self, kind: str):
        super().__init__()
        options = {"separate": dict(kdim=12, vdim=12), "bias_kv": dict(add_bias_kv=True),
                   "zero_attn": dict(add_zero_attn=True)}[kind]
        self.fc = nn.Linear(WIDTH, WIDTH)
        self.memory = nn.Linear(WIDTH, 12) if kind == "separate" else None
        self.mha = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True, **options)
        self.head = nn.Linear(WIDTH, 8)

    def forward(self, x):
        y = self.fc(x)
        source = y if self.memory is None else self.memory(x)
        return self.head(self.mha(y, source, source, need_weights=False)[0] + y)


@pytest.mark.parametrize("kind", ["separate", "bias_kv", "zero_attn"])
def test_attention_the_head_pruned_layer_cannot_run_stays_whole(kind):
    torch.manual_seed(0)
    model = UnsupportedAttention(kind).eval()
    if kind != "separate":
        zero_heads(model.mha.in_proj_weight, model.mha.in_proj_bias, [1], HEADS)
    x = torch.randn(2, 5, WIDTH, generator=torch.Generator().manual_seed(1))
    result = prune(model, x, threshold=0, analysis="export")
    mha = result.model.mha
    assert type(mha) is nn.MultiheadAttention and mha.num_heads == HEADS
    assert [t.shape for t in mha.parameters()] == [t.shape for t in model.mha.parameters()]
    reasons = [reason for entry in result.report.unpruned for reason in entry["reasons"]]
    assert any("head-pruned MultiheadAttention does not run" in r for r in reasons)
    assert_same_output(model, result, x)


def test_a_vit_blocks_flops_count_its_attention():
    """residual_branches() counts what removing a block saves, attention included (counted
    without gradients, nn.MultiheadAttention would take its fused fast path, which the FLOP
    counter does not see: each block counted half)."""
    model, x = small_vit(), torch.randn(2, 3, 32, 32)
    branches = ffr_fast.residual_branches(model, x, analysis="export")
    layer = "encoder.layers.encoder_layer_1"
    listed = next(b.flops for b in branches if b.name == layer)
    report = prune(model, x, remove_branches=[layer], analysis="export").report
    assert listed == report.flops_before - report.flops_after > 0
