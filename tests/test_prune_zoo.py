"""Every zoo model and test net prunes at ratio 0.3 and 0.7 into a smaller model that runs."""
import math
from fractions import Fraction

import pytest
import torch

from ffr_fast import models, prune
from ffr_fast.metrics import count_flops, count_params

from nets import TEST_NETS, look_trained

CASES = [(name, 32) for name in ("resnet20", "resnet56", "vgg16_bn", "mobilenet_v2")]
CASES += [(name, 16) for name in TEST_NETS]


def build(name):
    if name in TEST_NETS:
        cls, ignored = TEST_NETS[name]
        return look_trained(cls()), ignored
    return look_trained(models.create(name)), ()


@pytest.mark.parametrize("ratio", [0.3, 0.7])
@pytest.mark.parametrize("name,size", CASES)
def test_ratio_pruning_shrinks_and_runs(name, size, ratio):
    torch.manual_seed(0)
    model, ignored = build(name)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        expected = model(x)
    result = prune(model, x, ratio=ratio, ignored=ignored)
    report, new = result.report, result.model
    with torch.no_grad():
        out = new(torch.randn(2, 3, size, size))  # another batch size runs too
    assert out.shape == (2,) + expected.shape[1:]
    assert report.params_after == count_params(new) < report.params_before == count_params(model)
    assert report.flops_after == count_flops(new, x) < report.flops_before
    # The surgery is exact against the original with the removed channels zeroed...
    assert report.relative_diff <= 1e-5
    # ...and the pruning did change the random (not sparse) model.
    assert report.max_abs_diff_original > 1e-4
    # Global ratio: that fraction of the prunable channel classes goes, rounded up, less
    # what the per-layer floor (min_channels=1) gives back.
    assert 0.5 * ratio * report.prunable_classes < report.removed_classes
    assert report.removed_classes <= math.ceil(Fraction(str(ratio)) * report.prunable_classes)
