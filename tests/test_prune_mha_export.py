"""nn.MultiheadAttention cut by whole heads on the export path (analysis="export"): its packed
in-projection viewed to (..., 3, E) with q, k and v selected, and its (L, N, E) ->
(L, N * H, D) view that folds the batch into the heads, both followed to the heads. A plain
self-attention wrapper (batch first or not) and torchvision's VisionTransformer, every
result checked against the original with the removed positions zeroed, saved and loaded."""
import copy

import pytest
import torch
from torch import nn

import ffr_fast
from ffr_fast.pruning import load_pruned, prune, save_pruned
from ffr_fast.pruning.attention import HeadPrunedMultiheadAttention
from ffr_fast.testing import assert_same_output, relative_error, zero_heads

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


def kept_heads(result, path: str, num_heads: int, head_dim: int) -> list:
    """The heads the pruned attention at `path` kept, asserting that its q, k and v rows and
    its output projection's columns kept the same whole heads."""
    kept = result.structure["kept"]
    rows, columns = kept[f"{path}.in_proj_weight"][0], kept[f"{path}.out_proj.weight"][1]
    inner = num_heads * head_dim
    heads = sorted({c // head_dim for c in columns})
    whole = [h * head_dim + i for h in heads for i in range(head_dim)]
    assert columns == whole
    assert rows == [block * inner + c for block in range(3) for c in whole]
    assert kept[f"{path}.in_proj_bias"][0] == rows
    return heads


def assert_head_pruned(mha: nn.Module, heads: int, embed_dim: int) -> None:
    """The pruned layer's attributes agree with its tensors and with each other."""
    assert mha.num_heads == heads and mha.head_dim == HEAD_DIM and mha.embed_dim == embed_dim
    assert mha.in_proj_weight.shape == (3 * heads * HEAD_DIM, embed_dim)
    assert mha.out_proj.weight.shape == (embed_dim, heads * HEAD_DIM)
    assert mha.out_proj.in_features == heads * HEAD_DIM == mha.in_proj_weight.shape[0] // 3


def zeroed(model: nn.Module, result) -> nn.Module:
    """The original with every position the pruned model lacks set to zero."""
    twin = copy.deepcopy(model)
    tensors = dict(twin.named_parameters())
    with torch.no_grad():
        for name, dims in result.structure["kept"].items():
            for dim, kept in enumerate(dims):
                if kept is not None:
                    gone = sorted(set(range(tensors[name].shape[dim])) - set(kept))
                    tensors[name].index_fill_(dim, torch.tensor(gone, dtype=torch.long), 0)
    return twin


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
        pruned, reference = result.model(x), zeroed(model, result)(x)
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


class MaskedAttention(SelfAttention):
    """Self-attention with a mask, or cross-attention: calls a head-pruned layer cannot run."""

    def __init__(self, call: str):
        super().__init__(batch_first=True)
        self.call = call
        self.register_buffer("mask", torch.triu(torch.full((5, 5), -1e4), diagonal=1))

    def forward(self, x):
        y = self.fc(x)
        if self.call == "cross":
            return self.head(self.mha(y, x, x, need_weights=False)[0] + y)
        return self.head(self.mha(y, y, y, attn_mask=self.mask, need_weights=False)[0] + y)


@pytest.mark.parametrize("call", ["mask", "cross"])
def test_other_attention_calls_keep_the_layer_whole_on_export(call):
    torch.manual_seed(0)
    model = MaskedAttention(call).eval()
    zero_heads(model.mha.in_proj_weight, model.mha.in_proj_bias, [1], HEADS)
    x = torch.randn(2, 5, WIDTH, generator=torch.Generator().manual_seed(1))
    result = prune(model, x, ratio=0.5, analysis="export")  # no PrunedModelError
    mha = result.model.mha
    assert type(mha) is nn.MultiheadAttention and mha.num_heads == HEADS
    assert mha.in_proj_weight.shape == (3 * WIDTH, WIDTH)
    assert result.report.relative_diff <= 1e-5


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
