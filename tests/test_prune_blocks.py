"""Residual blocks whose branch emits exactly zero are replaced by their shortcut."""
import pytest
import torch

from ffr_fast import models, prune
from ffr_fast.metrics import count_params
from ffr_fast.testing import assert_same_output

from nets import TinyResNeXt, kill_channels, look_trained


def module_names(model):
    return {name for name, _ in model.named_modules()}


def test_identity_block_disappears():
    model = look_trained(models.resnet20())
    kill_channels(model, "layer1.1.bn2", list(range(16)))  # gamma = beta = 0: branch is zero
    x = torch.randn(2, 3, 32, 32)
    result = prune(model, x, threshold=0.0)
    [block] = result.report.removed_blocks
    assert block["block"] == "layer1.1" and block["shortcut"].startswith("identity")
    assert len(result.model.layer1) == len(model.layer1) - 1  # the model's own class
    assert result.report.params_before - result.report.params_after == sum(
        p.numel() for p in model.layer1[1].parameters())
    assert_same_output(model, result, x)


def test_model_without_a_block_still_trains():
    """The removed block's ReLU(inplace=True) now acts on the previous block's output, which
    autograd saved: it must not write into it, or the pruned model cannot be fine-tuned."""
    model = look_trained(models.resnet20())
    kill_channels(model, "layer1.1.bn2", list(range(16)))
    x = torch.randn(2, 3, 32, 32)
    pruned = prune(model, x, threshold=0.0).model.train()
    pruned(x).square().mean().backward()
    assert all(p.grad is not None for p in pruned.parameters())


def test_downsample_block_becomes_its_shortcut():
    """A dead branch beside a projection shortcut: the block becomes its shortcut (and the
    ReLU after the add), in the model's own class; torch.fx's rewired graph keeps as much."""
    model = look_trained(models.resnet20())
    kill_channels(model, "layer2.0.conv2", list(range(32)), "layer2.0.bn2")
    x = torch.randn(2, 3, 32, 32)
    result = prune(model, x, threshold=0.0)
    assert result.report.settings["path"] == "torch.export"
    assert not result.report.kept_dead_branches
    [block] = result.report.removed_blocks
    assert block["block"] == "layer2.0" and "layer2.0.downsample" in block["shortcut"]
    assert isinstance(result.model, models.CifarResNet)
    names = module_names(result.model)
    assert "layer2.0.conv1" not in names and "layer2.0.downsample.0" in names
    assert_same_output(model, result, x)
    graph = prune(model, x, threshold=0.0, analysis="fx").report
    assert result.report.flops_after <= graph.flops_after


@pytest.mark.parametrize("analysis, removed", [("auto", "features.6"),
                                               ("fx", "features.6.conv")])
def test_generic_residual_add_mobilenet(analysis, removed):
    """Block removal reads the graph (x + branch(x)), not our BasicBlock class: the export
    path removes the InvertedResidual from its Sequential, torch.fx rewires its add."""
    model = look_trained(models.mobilenet_v2())
    kill_channels(model, "features.6.conv.4.1", list(range(32)))  # project BN of a residual
    x = torch.randn(1, 3, 32, 32)
    result = prune(model, x, threshold=0.0, analysis=analysis)
    assert [b["block"] for b in result.report.removed_blocks] == [removed]
    if analysis == "auto":  # the model's own class, one member shorter
        assert len(result.model.features) == len(model.features) - 1
    assert result.report.params_after == count_params(model) - sum(
        p.numel() for p in model.features[6].conv.parameters())
    assert_same_output(model, result, x)


def test_branch_with_beta_is_kept():
    """gamma = 0 but beta != 0: the branch adds a constant, so the block must stay."""
    model = look_trained(models.resnet20())
    with torch.no_grad():
        model.layer1[1].conv2.weight.zero_()
        model.layer1[1].bn2.weight.zero_()
    result = prune(model, torch.randn(1, 3, 32, 32), threshold=0.0)
    assert result.report.removed_blocks == []
    assert "layer1.1.conv2" in module_names(result.model)


def test_remove_blocks_false_keeps_the_block():
    model = look_trained(models.resnet20())
    kill_channels(model, "layer1.1.bn2", list(range(16)))
    x = torch.randn(1, 3, 32, 32)
    result = prune(model, x, threshold=0.0, remove_blocks=False)
    assert result.report.removed_blocks == []
    assert "layer1.1.conv1" in module_names(result.model)
    assert_same_output(model, result, x)


@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_threshold_on_branch_importance(threshold):
    """A branch under the threshold (not exactly zero) is removed; the report measures it."""
    model = look_trained(TinyResNeXt())
    with torch.no_grad():
        model.blocks[1].bn.weight.mul_(1e-3)
        model.blocks[1].bn.bias.mul_(1e-3)
    result = prune(model, torch.randn(2, 3, 16, 16), threshold=threshold, remove_blocks=True)
    removed = [b["block"] for b in result.report.removed_blocks]
    assert removed == ([] if threshold == 0.0 else ["blocks.1"])
    # Exact against the original with the branch zeroed, whatever the threshold.
    assert result.report.relative_diff <= 1e-5


def test_dead_input_to_a_residual_add_is_not_a_block():
    """features.5 (no residual) emits zero, so features.6 computes 0 + branch(0): the dead
    side is the identity, which the branch also reads, so nothing is removed."""
    model = look_trained(models.mobilenet_v2())
    kill_channels(model, "features.5.conv.4.1", list(range(32)))
    x = torch.randn(1, 3, 32, 32)
    result = prune(model, x, threshold=0.0)
    assert result.report.removed_blocks == []
    assert_same_output(model, result, x)
