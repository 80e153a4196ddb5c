"""residual_branches() and prune(remove_branches=[...]): the depth-pruning contract.

Every residual branch has a stable name, the FLOPs removing it saves and its Block
Influence; removing branches by name is exact against the model with those branches'
outputs zeroed, alone or together with channel pruning."""
import copy

import pytest
import torch
from torch import nn

from ffr_fast.pruning import load_pruned, prune, residual_branches, save_pruned
from ffr_fast.testing import assert_unchanged, outputs, relative_error, snapshot
from ffr_fast.torchvision_loader import load_torchvision

from nets import kill_channels, look_trained, small_vit

tv = load_torchvision()
X = torch.randn(2, 3, 32, 32)


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return look_trained(tv.models.resnet18(num_classes=10))


class TwoBlocks(nn.Module):
    """stem -> x + b1(x) -> x + b2(x): the influences can be computed by hand."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))
        self.b2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))

    def forward(self, x):
        x = self.stem(x)
        x = x + self.b1(x)
        return x + self.b2(x)


def test_influence_is_one_minus_cosine_of_shortcut_and_sum():
    torch.manual_seed(0)
    model = TwoBlocks()
    x = torch.randn(3, 3, 8, 8)
    branches = residual_branches(model, x)
    assert [b.name for b in branches] == ["b1", "b2"]
    with torch.no_grad():
        s = model.stem(x)
        y1 = s + model.b1(s)
        y2 = y1 + model.b2(y1)
    for branch, (a, b) in zip(branches, [(s, y1), (y1, y2)]):
        cos = nn.functional.cosine_similarity(a.double().flatten(1), b.double().flatten(1))
        assert branch.influence == pytest.approx(float((1 - cos).mean()), rel=1e-9)
        # FLOPs: the two convs of the branch (2 per multiply-add) and nothing else.
        assert branch.flops == 2 * 3 * 8 * 8 * 8 * (8 * 9 + 8)


def test_resnet18_branches_names_flops_and_model_untouched(resnet18):
    resnet18.train()
    resnet18.layer1[0].bn1.eval()  # a frozen BatchNorm inside a training model
    before = snapshot(resnet18)
    branches = residual_branches(resnet18, X)
    assert [b.name for b in branches] == [f"layer{i}.{j}" for i in (1, 2, 3, 4) for j in (0, 1)]
    assert all(0 < b.influence < 2 for b in branches)
    assert resnet18.training and not resnet18.layer1[0].bn1.training
    assert resnet18.layer1[0].bn2.training
    assert_unchanged(resnet18, before)
    # What removing a branch saves is what its FLOPs say (layer2.0 keeps its downsample).
    for name in ("layer2.0", "layer3.1"):
        report = prune(resnet18, X, remove_branches=[name]).report
        [branch] = [b for b in branches if b.name == name]
        assert report.flops_before - report.flops_after == branch.flops
    resnet18.eval()


def test_removed_branches_equal_zeroed_branches(resnet18):
    result = prune(resnet18, X, remove_branches=["layer1.1", "layer3.0"])
    assert [b["block"] for b in result.report.removed_blocks] == ["layer1.1", "layer3.0"]
    names = {n for n, _ in result.model.named_modules()}
    assert "layer1.1.conv1" not in names and "layer3.0.downsample.0" in names
    zeroed = copy.deepcopy(resnet18)
    kill_channels(zeroed, "layer1.1.bn2", list(range(64)))
    kill_channels(zeroed, "layer3.0.bn2", list(range(256)))
    assert relative_error(outputs(result.model, X), outputs(zeroed, X)) <= 1e-5
    assert result.report.relative_diff <= 1e-5


def test_remove_branches_together_with_channel_pruning(resnet18):
    result = prune(resnet18, X, ratio=0.5, scope="layer", remove_branches=["layer4.1"])
    assert [b["block"] for b in result.report.removed_blocks] == ["layer4.1"]
    assert result.report.removed_classes > 0 and result.report.relative_diff <= 1e-5
    assert result.model.get_submodule("layer2.0.conv1").out_channels == 64


def test_unknown_branch_is_a_clear_error_and_leaves_the_model(resnet18):
    before = snapshot(resnet18)
    with pytest.raises(ValueError, match=r"no residual branch named \['layer9.0'\].*'layer1.0'"):
        prune(resnet18, X, remove_branches=["layer9.0"])
    with pytest.raises(TypeError, match=r"remove_branches=\['layer1.0'\]"):
        prune(resnet18, X, remove_branches="layer1.0")
    assert_unchanged(resnet18, before)


def test_vit_attention_and_mlp_branches():
    """unit="block" lists a transformer's layers, unit="branch" their attention and MLP
    apart; either name is removed by prune(), the layer staying with its norms."""
    model = small_vit()
    x = torch.randn(2, 3, 32, 32)
    prefix = "encoder.layers.encoder_layer_"
    layers = residual_branches(model, x)
    assert [b.name for b in layers] == [f"{prefix}{i}" for i in range(4)]
    branches = residual_branches(model, x, unit="branch")
    assert [b.name for b in branches] == [f"{prefix}{i}.{part}" for i in range(4)
                                          for part in ("self_attention", "mlp")]
    assert all(b.flops > 0 for b in branches)
    assert [b.flops for b in layers] == [sum(b.flops for b in branches[2 * i:2 * i + 2])
                                         for i in range(4)]
    removed = [f"{prefix}0.self_attention", f"{prefix}1.mlp"]
    result = prune(model, x, remove_branches=removed)
    report = result.report
    assert report.flops_before - report.flops_after == sum(
        b.flops for b in branches if b.name in removed)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for path in (f"{prefix}0.self_attention.out_proj", f"{prefix}1.mlp.3"):
            zeroed.get_submodule(path).weight.zero_()
            zeroed.get_submodule(path).bias.zero_()
    assert relative_error(outputs(result.model, x), outputs(zeroed, x)) <= 1e-5


def test_removed_branches_save_and_load(tmp_path):
    model = small_vit()
    x = torch.randn(1, 3, 32, 32)
    result = prune(model, x, remove_branches=["encoder.layers.encoder_layer_2.self_attention"])
    save_pruned(result, tmp_path / "vit.pt")
    loaded = load_pruned(tmp_path / "vit.pt", small_vit)
    assert torch.equal(outputs(loaded, x), outputs(result.model, x))


def test_swin_and_convnext_branch_names():
    """Swin's attention reads its weights directly (no module call): named by the parameter;
    ConvNeXt's block branch is named by its block (its layer scale belongs to it)."""
    x = torch.randn(1, 3, 32, 32)
    swin = [b.name for b in residual_branches(tv.models.swin_t().eval(), x, unit="branch")]
    assert swin[:4] == ["features.1.0.attn", "features.1.0.mlp", "features.1.1.attn",
                        "features.1.1.mlp"] and len(swin) == 24
    convnext = [b.name for b in residual_branches(tv.models.convnext_tiny().eval(), x,
                                                  unit="branch")]
    assert convnext[:3] == ["features.1.0", "features.1.1", "features.1.2"]
    assert len(convnext) == 18
