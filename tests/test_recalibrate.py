import pytest
import torch
from torch import nn

from ffr_fast import recalibrate_bn


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5))


def test_statistics_become_the_average_over_the_batches():
    net = _net()
    batches = [torch.randn(8, 3, 6, 6) * 3 + 1 for _ in range(3)]
    used = recalibrate_bn(net, [(b, torch.zeros(8)) for b in batches])
    assert used == 3
    with torch.no_grad():
        conv_out = [net[0](b) for b in batches]
    means = torch.stack([c.mean(dim=(0, 2, 3)) for c in conv_out]).mean(0)
    torch.testing.assert_close(net[1].running_mean, means, rtol=1e-5, atol=1e-5)


def test_flags_and_momentum_are_restored_and_weights_untouched():
    net = _net()
    net.train()
    net[3].eval()  # a user's own choice of mode must survive
    weights = [p.clone() for p in net.parameters()]
    recalibrate_bn(net, [torch.randn(4, 3, 6, 6)], max_batches=1)
    assert net.training and net[1].training and not net[3].training
    assert net[1].momentum == 0.1
    assert all(torch.equal(a, b) for a, b in zip(weights, net.parameters()))


def test_no_batch_is_an_error_that_keeps_the_old_statistics():
    net = _net()
    net[1].running_mean.fill_(2.5)
    with pytest.raises(ValueError, match="no batch"):
        recalibrate_bn(net, [])
    assert torch.all(net[1].running_mean == 2.5)


def test_max_batches_limits_the_pass():
    net = _net()
    assert recalibrate_bn(net, (torch.randn(2, 3, 6, 6) for _ in range(10)), max_batches=2) == 2


@pytest.mark.parametrize("norm, shape", [(nn.BatchNorm1d, (8, 3)),
                                         (nn.BatchNorm3d, (8, 3, 2, 2, 2)),
                                         (nn.SyncBatchNorm, (8, 3, 2, 2))])
def test_every_kind_of_batchnorm_is_recalibrated(norm, shape):
    net = nn.Sequential(norm(3)).eval()
    batch = torch.randn(shape) * 3 + 1
    assert recalibrate_bn(net, [batch]) == 1
    dims = [d for d in range(len(shape)) if d != 1]
    torch.testing.assert_close(net[0].running_mean, batch.mean(dims), rtol=1e-5, atol=1e-5)
