"""Code that only training runs (Inception's auxiliary classifiers) on the torch.export path:
a cut analysed on the eval-mode capture leaves such a head reading channels that are gone,
so prune() analyses the cut again on the training-mode capture, which holds the head, and
the result is the model's own class in both modes."""
import copy

import pytest
import torch

from ffr_fast.pruning import load_pruned, prune, save_pruned
from ffr_fast.pruning.aten_pruner import TRAINING_CAPTURE_NOTE
from ffr_fast.testing import assert_unchanged, snapshot, zeroed_original
from ffr_fast.torchvision_loader import load_torchvision

from nets import AuxiliaryHead

tv = load_torchvision()


def test_a_training_only_head_is_cut_with_the_channels_it_reads():
    torch.manual_seed(0)
    model = AuxiliaryHead().eval()
    before = snapshot(model)
    x = torch.randn(2, 3, 16, 16)
    result = prune(model, x, ratio=0.5)
    assert result.report.settings["path"] == "torch.export"
    assert result.report.warnings[0] == TRAINING_CAPTURE_NOTE
    pruned = result.model
    assert type(pruned) is AuxiliaryHead and pruned.conv1.out_channels == 4
    assert pruned.aux.in_features == 4 and pruned.conv2.in_channels == 4
    # in both modes the pruned model is the original with the removed positions zeroed
    zeroed = zeroed_original(model, result)
    with torch.no_grad():
        torch.testing.assert_close(pruned.eval()(x), zeroed.eval()(x))
        for cut, full in zip(pruned.train()(x), zeroed.train()(x)):
            torch.testing.assert_close(cut, full)
    assert_unchanged(model, before)
    with pytest.raises(Exception, match="fails in training mode"):
        prune(copy.deepcopy(model), x, ratio=0.5, inplace=True)  # no second try in place


def test_googlenet_with_its_auxiliary_classifiers_saves_and_trains(tmp_path):
    def build():
        torch.manual_seed(0)
        return tv.models.googlenet(num_classes=10, aux_logits=True, init_weights=True).eval()
    model, x = build(), torch.randn(1, 3, 64, 64)
    result = prune(model, x, ratio=0.5, scope="layer")
    assert result.report.settings["path"] == "torch.export"
    assert type(result.model) is type(model)
    assert result.report.flops_before / result.report.flops_after > 3.5
    logits, aux2, aux1 = result.model.train()(torch.randn(2, 3, 64, 64))
    assert logits.shape == aux1.shape == aux2.shape == (2, 10)
    result.model.eval()
    save_pruned(result, tmp_path / "googlenet.pt")
    loaded = load_pruned(tmp_path / "googlenet.pt", build)
    assert torch.equal(loaded(x), result.model(x))
