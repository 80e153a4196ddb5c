"""metrics: parameter and FLOP counts against hand formulas, sparsity, latency bookkeeping,
its statistic under interference and its refused settings."""
import time

import pytest
import torch
from torch import nn

from ffr_fast.metrics import (
    BATCH_NORMS,
    NOISY_SPREAD,
    LatencyWarning,
    batchnorm_scales,
    count_flops,
    count_params,
    filter_sparsity,
    measure_latency,
    weight_sparsity,
)


def small_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 5))


def test_batch_norms_are_every_batchnorm_class_torch_publishes():
    assert set(BATCH_NORMS) == {getattr(nn, name) for name in dir(nn) if "BatchNorm" in name}


def test_batchnorm_scales_of_every_kind_and_only_affine_ones():
    model = nn.Sequential(nn.BatchNorm1d(2), nn.BatchNorm2d(3), nn.BatchNorm3d(4),
                          nn.SyncBatchNorm(5), nn.BatchNorm2d(6, affine=False), nn.LayerNorm(7))
    scales = batchnorm_scales(model)
    assert list(scales) == ["0", "1", "2", "3"]
    assert all(scales[name] is model[int(name)].weight for name in scales)


def test_count_params():
    assert count_params(small_net()) == (8 * 3 * 9 + 8) + 2 * 8 + (288 * 5 + 5)


def test_count_flops_matches_formula_and_restores_mode():
    net = small_net().train()
    flops = count_flops(net, torch.randn(2, 3, 6, 6))
    conv = 2 * 2 * 8 * 3 * 9 * 6 * 6  # 2 per multiply-add, batch 2, 8x6x6 outputs
    linear = 2 * 2 * 288 * 5
    assert flops == conv + linear
    assert net.training


def test_sparsity():
    net = small_net()
    with torch.no_grad():
        net[0].weight[:2] = 0  # two of 8 conv filters, 54 of 216 conv weights
        net[4].weight[:, :10] = 0  # 50 scattered linear weights, no whole filter
    assert filter_sparsity(net) == pytest.approx(2 / (8 + 5))
    assert weight_sparsity(net) == pytest.approx((54 + 50) / (216 + 1440))


def test_measure_latency_bookkeeping():
    net = small_net().train()
    threads = torch.get_num_threads()
    times = measure_latency(net, (3, 6, 6), batch_sizes=(1, 4), threads=1, warmup=1,
                            repeats=3)
    assert set(times) == {1, 4} and all(t > 0 for t in times.values())
    assert torch.get_num_threads() == threads and net.training

def test_flops_and_latency_keep_every_submodule_s_own_flag():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    model[1].eval()  # a frozen BatchNorm inside a training model
    count_flops(model, torch.randn(1, 3, 8, 8))
    measure_latency(model, (3, 8, 8), batch_sizes=(1,), warmup=0, repeats=1)
    assert model.training and model[0].training and not model[1].training


class Stalls(nn.Module):
    """A forward that sleeps `seconds`, except on the calls listed in `fast`: a measurement
    that the machine disturbed on every other call."""

    def __init__(self, seconds, fast=()):
        super().__init__()
        self.seconds, self.fast, self.calls = seconds, set(fast), 0

    def forward(self, x):
        if self.calls not in self.fast:
            time.sleep(self.seconds)
        self.calls += 1
        return x


def test_latency_is_the_fastest_run_and_flags_disagreeing_runs():
    with pytest.warns(LatencyWarning, match=r"latency at batch 1 is noisy: the median of 4 "
                                            r"runs is .*x their minimum"):
        [disturbed] = measure_latency(Stalls(0.02, fast=[0]), (3,), batch_sizes=(1,),
                                      warmup=0, repeats=4).values()
    assert disturbed < 0.01 and disturbed.median >= 0.02 and disturbed.repeats == 4
    assert disturbed.noisy and disturbed.spread > NOISY_SPREAD
    steady = measure_latency(Stalls(0.05), (3,), batch_sizes=(1,), warmup=0, repeats=3)[1]
    assert not steady.noisy and 1.0 <= steady.spread <= NOISY_SPREAD
    assert isinstance(steady, float) and 1e3 * steady >= 50  # callers compute with it


@pytest.mark.parametrize("setting,message", [
    (dict(repeats=0), "repeats must be an int >= 1"),
    (dict(warmup=-1), "warmup must be an int >= 0"),
    (dict(batch_sizes=(0,)), "batch_sizes must be a non-empty list of ints >= 1"),
    (dict(batch_sizes=()), "batch_sizes must be a non-empty list of ints >= 1")])
def test_latency_settings_that_measure_nothing_are_refused(setting, message):
    with pytest.raises(ValueError, match=message):
        measure_latency(small_net(), (3, 6, 6), **{"batch_sizes": (1,), **setting})
