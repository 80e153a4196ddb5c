"""Channels the output never sees leave the model on the export path (aten_liveness.py): the
interior of a residual branch whose tail is dead, where the branch itself cannot leave (its
block's shortcut is computed in the forward, with no module of its own to stand in for the
block; sub_branches.py). Each cut is checked against the original on new inputs, since
removing a dead channel is exact."""
import torch
import torch.nn.functional as F
from torch import nn

from ffr_fast import prune
from ffr_fast.testing import kill_channels, look_trained, outputs


class PooledShortcut(nn.Module):
    """avg_pool(x) + bn2(conv2(relu(bn1(conv1(x))))), the branch strided: a shortcut written
    in the forward, so neither the block nor its branch can leave."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        branch = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(F.avg_pool2d(x, 2) + branch)


def dead_branch_net() -> nn.Sequential:
    """stem, a PooledShortcut block whose branch emits zero (its last BN maps to 0), head."""
    torch.manual_seed(0)
    model = look_trained(nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), PooledShortcut(16),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 10)))
    kill_channels(model, "3.bn2", list(range(16)))
    return model


def test_a_dead_branch_that_cannot_leave_runs_one_channel_wide():
    model, x = dead_branch_net(), torch.randn(2, 3, 16, 16)
    result = prune(model, x, threshold=0.0, analysis="export")
    assert result.report.kept_dead_branches == ["3"]  # no stand-in for its shortcut
    block = result.model[3]
    assert block.conv1.out_channels == 1 and block.conv2.in_channels == 1  # min_channels
    assert block.conv2.out_channels == 16 and result.model[4].in_channels == 16
    new = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(outputs(result.model, new), outputs(model, new),
                               rtol=1e-5, atol=1e-5)


def test_a_ratio_cut_takes_the_dead_interior_whole():
    """Beside the ratio's count (with remove_blocks, the default), not instead of it."""
    model, x = dead_branch_net(), torch.randn(2, 3, 16, 16)
    result = prune(model, x, ratio=0.25, scope="layer", analysis="export")
    assert result.model[3].conv1.out_channels == 1
    assert result.model[4].out_channels == 24  # ceil(0.25 * 32) removed
    kept = prune(model, x, ratio=0.25, scope="layer", analysis="export", remove_blocks=False)
    assert kept.model[3].conv1.out_channels == 12  # without it, the ratio only
    assert result.report.relative_diff <= 1e-5 and kept.report.relative_diff <= 1e-5


class ReducedBeforeTheDeadLayer(nn.Module):
    """conv1's channels reach a zero conv2, but a mean over them also feeds the output: the
    rule follows producers only, so they stay."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        return self.conv2(y) + y.mean(dim=1, keepdim=True)


def test_a_channel_another_op_reads_stays():
    torch.manual_seed(0)
    model = ReducedBeforeTheDeadLayer().eval()
    with torch.no_grad():
        model.conv2.weight.zero_()
    result = prune(model, torch.randn(2, 3, 8, 8), threshold=0.0, analysis="export")
    assert result.model.conv1.out_channels == 8
