"""Lossless pruning of today's architectures: what FFR drives to zero in a ViT or
a ConvNeXt -- MLP hidden units, whole attention heads, whole attention and MLP branches --
is removed by threshold=0, exactly that, and the output does not change."""
import copy

import pytest
import torch

from ffr_fast.pruning import prune, residual_branches
from ffr_fast.testing import assert_same_output, zero_heads, zero_rows
from ffr_fast.torchvision_loader import load_torchvision

from nets import small_vit

tv = load_torchvision()
LAYERS = "encoder.layers.encoder_layer_"


def test_vit_hidden_units_heads_and_branches():
    model = small_vit()
    layer = [model.get_submodule(f"{LAYERS}{i}") for i in range(4)]
    zero_rows(layer[0].mlp[0], list(range(0, 64, 2)))  # half the MLP hidden units
    for i, heads in ((0, [1]), (1, [0, 3])):  # one head of the first layer, two of the second
        attention = layer[i].self_attention
        zero_heads(attention.in_proj_weight, attention.in_proj_bias, heads, attention.num_heads)
    zero_rows(layer[2].self_attention.out_proj, list(range(32)))  # the whole attention branch
    zero_rows(layer[3].mlp[3], list(range(32)))  # the whole MLP branch
    x = torch.randn(2, 3, 32, 32)
    original = copy.deepcopy(model)
    result = prune(model, x, threshold=0.0)
    assert [b["block"] for b in result.report.removed_blocks] == [
        f"{LAYERS}2.self_attention", f"{LAYERS}3.mlp"]
    changed = {k: v for k, v in result.report.channels.items() if v[0] != v[1]}
    # the export path reports nn.MultiheadAttention's heads by its packed q/k/v weight
    assert result.report.settings["path"] == "torch.export"
    assert changed == {f"{LAYERS}0.mlp.0": (64, 32),
                       f"{LAYERS}0.self_attention.in_proj_weight": (96, 72),
                       f"{LAYERS}1.self_attention.in_proj_weight": (96, 48)}
    attention = result.model.get_submodule(f"{LAYERS}1.self_attention")
    assert attention.num_heads == 2 and attention.in_proj_weight.shape == (48, 32)
    assert_same_output(original, result, x)
    # What was removed is exactly what residual_branches() would have named.
    names = [b.name for b in residual_branches(original, x, unit="branch")]
    assert {b["block"] for b in result.report.removed_blocks} <= set(names)


def small_convnext():
    torch.manual_seed(0)
    block = tv.models.convnext.CNBlockConfig
    setting = [block(16, 32, 2), block(32, None, 2)]
    model = tv.models.ConvNeXt(setting, layer_scale=0.5, num_classes=10).eval()
    return model


def test_convnext_hidden_units_and_branches():
    model = small_convnext()
    blocks = [model.features[1][0], model.features[1][1], model.features[3][0],
              model.features[3][1]]
    zero_rows(blocks[0].block[3], list(range(0, 64, 2)))  # half the hidden units (4C = 64)
    zero_rows(blocks[2].block[3], list(range(100)))
    zero_rows(blocks[1].block[5], list(range(16)))  # the whole branch
    zero_rows(blocks[3].block[5], list(range(32)))
    x = torch.randn(2, 3, 32, 32)
    original = copy.deepcopy(model)
    result = prune(model, x, threshold=0.0)
    assert [b["block"] for b in result.report.removed_blocks] == ["features.1.1", "features.3.1"]
    changed = {k: v for k, v in result.report.channels.items() if v[0] != v[1]}
    assert changed == {"features.1.0.block.3": (64, 32), "features.3.0.block.3": (128, 28)}
    assert_same_output(original, result, x)


def test_round_to_counts_channels_so_heads_still_go():
    """round_to=8 asks for multiples of 8 channels: a head of 8 channels is one such step.
    On the torch.fx path, whose report names the heads' channels (test_prune_mha_export.py
    cuts nn.MultiheadAttention's heads on the export path)."""
    model = small_vit()
    result = prune(model, torch.randn(1, 3, 32, 32), ratio=0.5, scope="layer", round_to=8,
                   analysis="fx")
    heads = result.report.channels[f"{LAYERS}0.self_attention (heads)"]
    assert heads == (32, 16)
    assert all(after % 8 == 0 for before, after in result.report.channels.values()
               if after < before)


@pytest.mark.parametrize("emit", ["module", "graph"])
def test_stochastic_depth_still_drops_paths_after_pruning(emit):
    """StochasticDepth reads self.training: it is a leaf of the trace, so the pruned model
    still drops paths when fine-tuned (traced into, eval's 'never' would be baked in into
    an emitted GraphModule)."""
    torch.manual_seed(0)
    setting = [tv.models.convnext.CNBlockConfig(16, None, 3)]
    # layer_scale=1: at torchvision's 1e-6 a dropped path moves the output by float rounding
    model = tv.models.ConvNeXt(setting, stochastic_depth_prob=0.9, layer_scale=1.0,
                               num_classes=10).eval()
    x = torch.randn(2, 3, 16, 16)
    pruned = prune(model, x, ratio=0.5, scope="layer", emit=emit).model
    assert isinstance(pruned, torch.fx.GraphModule) == (emit == "graph")
    if emit == "graph":
        targets = [n.target for n in pruned.graph.nodes if n.op == "call_module"]
        assert "features.1.2.stochastic_depth" in targets
    pruned.train()
    runs = [pruned(x) for _ in range(4)]
    assert any(not torch.equal(runs[0], r) for r in runs[1:])
    pruned.eval()
    assert torch.equal(pruned(x), pruned(x))
