"""threshold pruning of exactly-dead filters: exactly they go, and the output does not move.

Covers the dependency rules one by one: plain conv chains, residual streams, depthwise
convolutions, concatenation offsets, grouped convolutions and flatten -> Linear."""
import torch
from torch import nn

from ffr_fast import models, prune
from ffr_fast.testing import assert_same_output, assert_unchanged, snapshot

from nets import TinyDenseNet, TinyResNeXt, kill_channels, look_trained


def test_resnet_dead_filters_removed_exactly():
    torch.manual_seed(0)
    model = look_trained(models.resnet20())
    dead = {"layer1.0.conv1": [0, 5, 9], "layer2.1.conv1": [3], "layer3.2.conv1": [1, 2, 60]}
    for path, channels in dead.items():
        kill_channels(model, path, channels, path.replace("conv", "bn"))
    # One channel of the stage-1 residual stream, dead in every layer that writes it.
    for path in ["stem.0.0", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"]:
        kill_channels(model, path, [7], path[:-1] + "1" if path.startswith("stem") else
                      path.replace("conv2", "bn2"))
    x = torch.randn(2, 3, 32, 32)
    before = snapshot(model)
    result = prune(model, x, threshold=0.0)
    assert_unchanged(model, before)
    channels = result.report.channels
    inputs_removed = {"layer1.0.conv1": [7], "layer2.1.conv1": [], "layer3.2.conv1": []}
    for path, removed in dead.items():
        old = model.get_submodule(path).weight
        new = result.model.get_submodule(path).weight
        keep = [i for i in range(old.shape[0]) if i not in removed]
        in_keep = [i for i in range(old.shape[1]) if i not in inputs_removed[path]]
        assert channels[path] == (old.shape[0], len(keep))
        assert torch.equal(new, old[keep][:, in_keep])
    for path in ["stem.0.0", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"]:
        assert channels[path] == (16, 15)
    assert result.model.get_submodule("layer1.1.conv1").in_channels == 15
    assert result.model.get_submodule("layer2.0.downsample.0").in_channels == 15
    assert result.report.removed_classes == 3 + 1 + 3 + 1
    assert result.report.removed_blocks == []
    assert_same_output(model, result, x)


def test_beta_keeps_a_zero_filter_alive():
    """gamma = 0 but beta != 0: the channel emits beta, so it is not dead and stays."""
    model = look_trained(models.resnet20())
    kill_channels(model, "layer1.0.conv1", [4])
    with torch.no_grad():
        model.layer1[0].bn1.weight[4] = 0  # beta stays non-zero
    result = prune(model, torch.randn(1, 3, 32, 32), threshold=0.0)
    assert result.report.channels["layer1.0.conv1"] == (16, 16)


def test_depthwise_pruned_with_its_producer():
    model = look_trained(models.mobilenet_v2())
    block = "features.4.conv"  # 1x1 expand (24 -> 144), 3x3 depthwise, 1x1 project
    kill_channels(model, f"{block}.0.0", [1, 100], f"{block}.0.1")
    kill_channels(model, f"{block}.2.0", [1, 100], f"{block}.2.1")
    x = torch.randn(1, 3, 32, 32)
    result = prune(model, x, threshold=0.0)
    dw = result.model.get_submodule(f"{block}.2.0")
    assert (dw.in_channels, dw.out_channels, dw.groups) == (142, 142, 142)
    assert result.model.get_submodule(f"{block}.4.0").in_channels == 142
    keep = [i for i in range(144) if i not in (1, 100)]
    assert torch.equal(dw.weight, model.get_submodule(f"{block}.2.0").weight[keep])
    assert result.report.removed_classes == 2
    assert_same_output(model, result, x)


def test_depthwise_not_pruned_when_only_its_producer_is_dead():
    """A dead expand channel still reaches the projection as the depthwise BN's shift."""
    model = look_trained(models.mobilenet_v2())
    kill_channels(model, "features.4.conv.0.0", [1], "features.4.conv.0.1")
    result = prune(model, torch.randn(1, 3, 32, 32), threshold=0.0)
    assert result.report.removed_classes == 0


def test_concat_offsets():
    model = look_trained(TinyDenseNet())
    # Dense layer 1 writes channels 12..15 of the concat (8 stem + 4 from layer 0). Its
    # channel 2 is offset 14 in every later BN that reads the concatenation.
    kill_channels(model, "dense.1.conv", [2])
    with torch.no_grad():
        for bn in (model.dense[2].bn, model.bn):
            bn.weight[14], bn.bias[14] = 0, 0
    x = torch.randn(2, 3, 16, 16)
    result = prune(model, x, threshold=0.0)
    assert result.report.removed_classes == 1
    for path in ("dense.2.conv", "transition"):
        old, new = model.get_submodule(path).weight, result.model.get_submodule(path).weight
        keep = [i for i in range(old.shape[1]) if i != 14]
        assert torch.equal(new, old[:, keep])
    assert result.model.get_submodule("dense.1.conv").out_channels == 3
    assert result.model.bn.num_features == 19
    assert_same_output(model, result, x)


def test_grouped_conv_keeps_groups_consistent():
    model = look_trained(TinyResNeXt())
    # Output position 3 of every group of the grouped conv (4 groups of 8).
    kill_channels(model, "blocks.0.grouped.0", [3, 11, 19, 27], "blocks.0.grouped.1")
    x = torch.randn(2, 3, 16, 16)
    result = prune(model, x, threshold=0.0)
    conv = result.model.get_submodule("blocks.0.grouped.0")
    assert (conv.in_channels, conv.out_channels, conv.groups) == (32, 28, 4)
    assert result.model.get_submodule("blocks.0.expand").in_channels == 28
    assert_same_output(model, result, x)
    ratio = prune(model, x, ratio=0.5, scope="layer")
    conv = ratio.model.get_submodule("blocks.1.grouped.0")
    assert conv.groups == 4 and conv.in_channels % 4 == 0 and conv.out_channels % 4 == 0
    assert conv.in_channels < 32 and ratio.report.relative_diff <= 1e-5


def test_flatten_to_linear_drops_the_matching_features():
    """VGG without global pooling: flatten(512 x 2 x 2) -> Linear, channel c = 4 features."""
    model = models.VGG(((8,), (16,)), num_classes=5)
    model.pool = nn.Identity()
    model.classifier = nn.Linear(16 * 8 * 8, 5)
    look_trained(model)
    kill_channels(model, "features.4", [5], "features.5")
    x = torch.randn(2, 3, 32, 32)
    result = prune(model, x, threshold=0.0)
    old, new = model.classifier.weight, result.model.classifier.weight
    keep = [i for i in range(old.shape[1]) if i // 64 != 5]
    assert torch.equal(new, old[:, keep])
    assert_same_output(model, result, x)
