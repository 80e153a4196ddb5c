"""torchvision's window attentions pruned by whole heads: Swin's ShiftedWindowAttention (and
V2's), MaxViT's RelativePositionalMultiHeadAttention.

Lossless: heads whose q, k, v rows are zero leave at threshold 0 and nothing else changes;
the head-pruned replacements compute exactly torchvision's forward on unpruned weights (eval
and training mode, shifted or not, padded or not); a pruned model saves, loads, pickles and
exports."""
import copy
import pickle

import pytest
import torch
from torch import nn

from ffr_fast.pruning import load_pruned, prune, save_pruned
from ffr_fast.pruning.attention import (
    make_head_pruned,
    relative_attention,
    shifted_window_attention,
)
from ffr_fast.pruning.slicing import SIZE_RULES
from ffr_fast.testing import assert_same_output, zero_heads, zero_rows
from ffr_fast.torchvision_loader import load_torchvision

tv = load_torchvision()
SWIN = tv.models.swin_transformer
MAXVIT = tv.models.maxvit


def swin(name="swin_t"):
    torch.manual_seed(0)
    return getattr(tv.models, name)().eval(), torch.randn(1, 3, 32, 32)


def small_maxvit():
    """torchvision's MaxVit at a size that runs on 32x32 inputs: two stages, 4 and 8 heads."""
    torch.manual_seed(0)
    model = MAXVIT.MaxVit(input_size=(32, 32), stem_channels=16, partition_size=4,
                          block_channels=[32, 64], block_layers=[1, 1], head_dim=8,
                          stochastic_depth_prob=0.0, num_classes=10).eval()
    return model, torch.randn(2, 3, 32, 32)


def heads_of(module):
    return module.num_heads if hasattr(module, "num_heads") else module.n_heads


def attentions(model):
    return {name: heads_of(m) for name, m in model.named_modules()
            if isinstance(m, (SWIN.ShiftedWindowAttention,
                              MAXVIT.RelativePositionalMultiHeadAttention))}


# ---- the replacements compute torchvision's forward ---------------------------------------

@pytest.mark.parametrize("cls", ["ShiftedWindowAttention", "ShiftedWindowAttentionV2"])
@pytest.mark.parametrize("shift", [[0, 0], [3, 3], [3, 0]])
@pytest.mark.parametrize("size", [(9, 13), (7, 7), (14, 14), (9, 5), (5, 6)])
def test_swin_replacement_equals_torchvisions_forward(cls, shift, size):
    torch.manual_seed(0)
    module = getattr(SWIN, cls)(24, [7, 7], shift, 3, attention_dropout=0.2, dropout=0.1)
    pruned = copy.deepcopy(module)
    make_head_pruned(pruned, shifted_window_attention)
    assert type(pruned) is not type(module) and isinstance(pruned, type(module))
    assert pruned.state_dict().keys() == module.state_dict().keys()
    x = torch.randn(2, *size, 24)
    for training in (False, True):  # training: the same dropout masks from the same seed
        module.train(training), pruned.train(training)
        torch.manual_seed(1)
        expected = module(x)
        torch.manual_seed(1)
        assert torch.equal(pruned(x), expected)


def test_maxvit_replacement_equals_torchvisions_forward():
    torch.manual_seed(0)
    module = MAXVIT.RelativePositionalMultiHeadAttention(32, 8, 16).eval()
    pruned = copy.deepcopy(module)
    make_head_pruned(pruned, relative_attention)
    x = torch.randn(2, 3, 16, 32)
    torch.testing.assert_close(pruned(x), module(x), rtol=1e-6, atol=1e-6)


def test_a_pruned_layer_keeps_its_size_rule_and_an_overridden_forward_keeps_its_own():
    module = SWIN.ShiftedWindowAttention(24, [7, 7], [0, 0], 3)
    make_head_pruned(module, shifted_window_attention)
    assert type(module).forward is shifted_window_attention
    assert next(SIZE_RULES[c.__name__] for c in type(module).__mro__
                if c.__name__ in SIZE_RULES) is SIZE_RULES["ShiftedWindowAttention"]

    class Custom(SWIN.ShiftedWindowAttention):
        def forward(self, x):
            return super().forward(x) * 2

    custom = Custom(24, [7, 7], [0, 0], 3)
    make_head_pruned(custom, shifted_window_attention)
    assert type(custom) is Custom  # the replacement would drop the * 2


# ---- lossless: exactly the dead heads leave ----------------------------------------------

def test_swin_t_dead_heads_and_units_leave_exactly():
    model, x = swin()
    dead = {"features.1.0.attn": [1], "features.3.1.attn": [0, 4], "features.5.2.attn": [3, 7, 11]}
    for name, heads in dead.items():
        attn = model.get_submodule(name)
        zero_heads(attn.qkv.weight, attn.qkv.bias, heads, attn.num_heads)
    hidden = model.get_submodule("features.3.1.mlp.0")
    zero_rows(hidden, list(range(0, hidden.out_features, 2)))
    before = attentions(model)
    result = prune(model, x, threshold=0)
    after = attentions(result.model)
    assert after == {name: n - len(dead.get(name, ())) for name, n in before.items()}
    assert result.report.channels["features.3.1.mlp.0"] == (768, 384)
    assert "HeadPruned" in type(result.model.get_submodule("features.3.1.attn")).__name__
    assert_same_output(model, result, x)


def test_swin_v2_dead_heads_leave_exactly():
    model, x = swin("swin_v2_t")
    dead = {"features.1.1.attn": [2], "features.5.0.attn": [1, 5]}
    for name, heads in dead.items():
        attn = model.get_submodule(name)
        zero_heads(attn.qkv.weight, attn.qkv.bias, heads, attn.num_heads)
    before = attentions(model)
    result = prune(model, x, threshold=0)
    assert attentions(result.model) == {n: h - len(dead.get(n, ())) for n, h in before.items()}
    pruned = result.model.get_submodule("features.5.0.attn")
    assert pruned.logit_scale.shape == (10, 1, 1) and pruned.cpb_mlp[2].out_features == 10
    assert_same_output(model, result, x)


def test_maxvit_dead_heads_and_units_leave_exactly():
    model, x = small_maxvit()
    window = "blocks.0.layers.0.layers.window_attention"
    grid = "blocks.1.layers.0.layers.grid_attention"
    dead = {f"{window}.attn_layer.1": [0, 3], f"{grid}.attn_layer.1": [5]}
    for name, heads in dead.items():
        attn = model.get_submodule(name)
        zero_heads(attn.to_qkv.weight, attn.to_qkv.bias, heads, attn.n_heads)
    zero_rows(model.get_submodule(f"{grid}.mlp_layer.1"), list(range(0, 256, 2)))
    before = attentions(model)
    result = prune(model, x, threshold=0)
    assert attentions(result.model) == {n: h - len(dead.get(n, ())) for n, h in before.items()}
    assert result.report.channels[f"{grid}.mlp_layer.1"] == (256, 128)
    assert_same_output(model, result, x)


def test_maxvit_t_dead_heads_leave_exactly():
    """The real maxvit_t (224x224 only), once."""
    torch.manual_seed(0)
    model = tv.models.maxvit_t().eval()
    x = torch.randn(1, 3, 224, 224)
    name = "blocks.3.layers.1.layers.window_attention.attn_layer.1"  # 16 heads
    attn = model.get_submodule(name)
    zero_heads(attn.to_qkv.weight, attn.to_qkv.bias, [1, 2, 9], attn.n_heads)
    result = prune(model, x, threshold=0)
    pruned = attentions(result.model)
    assert pruned[name] == 13 and sum(pruned.values()) == sum(attentions(model).values()) - 3
    assert_same_output(model, result, x)


def test_swin_stream_channels_leave_without_heads_and_the_model_reloads(tmp_path):
    """Dead channels of the last stage's residual stream: the attentions there lose input and
    output channels but no head, and still need the head-pruned forward (Swin ties head_dim
    to the input width); load_pruned gets there from their projections' shapes alone."""
    model, x = swin()
    dead = [5, 100, 700]
    with torch.no_grad():
        model.features[6].reduction.weight[dead] = 0
        for module in model.features[7].modules():
            if isinstance(module, nn.LayerNorm):
                module.weight[dead], module.bias[dead] = 0, 0
        for block in model.features[7]:
            zero_rows(block.attn.proj, dead)
            zero_rows(block.mlp[3], dead)
        model.norm.weight[dead], model.norm.bias[dead] = 0, 0
    result = prune(model, x, threshold=0)
    attn = result.model.get_submodule("features.7.0.attn")
    assert attn.num_heads == 24 and attn.qkv.weight.shape == (3 * 768, 765)
    assert attn.proj.weight.shape == (765, 768) and "HeadPruned" in type(attn).__name__
    assert result.report.approximate  # the LayerNorms there lost channels: named
    save_pruned(result, tmp_path / "pruned.pt")
    loaded = load_pruned(tmp_path / "pruned.pt", lambda: swin()[0])
    assert type(loaded.get_submodule("features.7.0.attn")) is type(attn)
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))


# ---- random init at a ratio; saving, loading, pickling, exporting -----------------------

@pytest.mark.parametrize("build", [swin, small_maxvit], ids=["swin_t", "maxvit"])
def test_ratio_cuts_heads_and_the_model_saves_loads_pickles_exports(build, tmp_path):
    model, x = build()
    before = attentions(model)
    result = prune(model, x, ratio=0.5, scope="layer")
    after = attentions(result.model)
    assert after == {name: n // 2 for name, n in before.items()}  # ceil(n / 2) go: 3 -> 1
    if not result.report.approximate:
        assert result.report.relative_diff <= 1e-5
    with torch.no_grad():
        expected = result.model(x)
    save_pruned(result, tmp_path / "pruned.pt")
    loaded = load_pruned(tmp_path / "pruned.pt", lambda: build()[0])
    assert attentions(loaded) == after
    types = {name: type(m) for name, m in result.model.named_modules() if name}
    assert {name: type(m) for name, m in loaded.named_modules() if name} == types
    for copied in (loaded, pickle.loads(pickle.dumps(result.model)),
                   copy.deepcopy(result.model)):
        with torch.no_grad():
            assert torch.equal(copied(x), expected)
    exported = torch.export.export(result.model, (x,))
    torch.testing.assert_close(exported.module()(x), expected)


# ---- what the attention rule refuses: pinned, never guessed -------------------------------

class AttentionCalls(nn.Module):
    """nn.MultiheadAttention called as cross-attention or with a mask: not one input tensor,
    which torch.fx's attention rule refuses (the export path cuts them:
    test_prune_mha_masks.py)."""

    def __init__(self, call):
        super().__init__()
        self.call = call
        self.fc = nn.Linear(16, 16)
        self.mha = nn.MultiheadAttention(16, 4, batch_first=True)
        self.register_buffer("mask", torch.zeros(5, 5))

    def forward(self, x):
        y = self.fc(x)
        if self.call == "cross":
            out = self.mha(x, y, y, need_weights=False)[0]
        else:
            out = self.mha(y, y, y, attn_mask=self.mask, need_weights=False)[0]
        return out + y


@pytest.mark.parametrize("call", ["cross", "mask"])
def test_attention_with_other_tensor_arguments_keeps_its_heads_on_torch_fx(call):
    torch.manual_seed(0)
    model = AttentionCalls(call).eval()
    with torch.no_grad():
        model.mha.in_proj_weight[4:8] = 0  # head 1's q, k, v rows
        model.mha.in_proj_weight[20:24] = 0
        model.mha.in_proj_weight[36:40] = 0
        model.mha.in_proj_bias.zero_()
    x = torch.randn(2, 5, 16)
    result = prune(model, x, threshold=0, analysis="fx")
    assert result.model.mha.num_heads == 4
    assert result.model.mha.in_proj_weight.shape == (48, 16)  # the dead head's rows stay
    assert type(result.model.mha) is nn.MultiheadAttention
    assert_same_output(model, result, x)
