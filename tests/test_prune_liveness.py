"""Channels the output never sees leave the model on the export path (aten_liveness.py): the
interior of a residual branch whose tail is dead, where the branch itself cannot leave (a
downsampling block keeps its projection shortcut; an MLP sub-branch is no whole block).
Each cut is checked against the original on new inputs, since removing a dead channel is
exact."""
import torch
from torch import nn

from ffr_fast import models, prune
from ffr_fast.testing import kill_channels, look_trained, outputs

from nets import small_vit


def dead_downsampling_block():
    """resnet20 whose downsampling block layer2.0 emits zero: its last BN maps to 0."""
    torch.manual_seed(0)
    model = look_trained(models.resnet20())
    kill_channels(model, "layer2.0.bn2", list(range(32)))
    return model


def test_a_dead_downsampling_block_runs_one_channel_wide():
    model, x = dead_downsampling_block(), torch.randn(2, 3, 32, 32)
    result = prune(model, x, threshold=0.0, analysis="export")
    assert "layer2.0" in result.report.kept_dead_branches  # its projection shortcut stays
    block = result.model.layer2[0]
    assert block.conv1.out_channels == 1 and block.conv2.in_channels == 1  # min_channels
    assert block.conv2.out_channels == 32 and result.model.layer2[1].conv1.in_channels == 32
    new = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(outputs(result.model, new), outputs(model, new),
                               rtol=1e-5, atol=1e-5)


def test_a_ratio_cut_takes_the_dead_interior_whole():
    """Beside the ratio's count (with remove_blocks, the default), not instead of it."""
    model, x = dead_downsampling_block(), torch.randn(2, 3, 32, 32)
    result = prune(model, x, ratio=0.25, scope="layer", analysis="export")
    assert result.model.layer2[0].conv1.out_channels == 1
    assert result.model.layer2[1].conv1.out_channels == 24  # ceil(0.25 * 32) removed
    kept = prune(model, x, ratio=0.25, scope="layer", analysis="export", remove_blocks=False)
    assert kept.model.layer2[0].conv1.out_channels == 24  # without it, the ratio only
    assert result.report.relative_diff <= 1e-5 and kept.report.relative_diff <= 1e-5


def test_an_mlp_sub_branch_whose_output_layer_is_zero_loses_its_hidden_units():
    model, x = small_vit(num_layers=2), torch.randn(2, 3, 32, 32)
    mlp = model.encoder.layers.encoder_layer_1.mlp
    with torch.no_grad():
        mlp[3].weight.zero_()
        mlp[3].bias.zero_()
    result = prune(model, x, threshold=0.0, analysis="export")
    pruned = result.model.encoder.layers.encoder_layer_1.mlp
    assert pruned[0].out_features == 1 and pruned[3].in_features == 1
    assert result.model.encoder.layers.encoder_layer_0.mlp[0].out_features == 64
    new = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(outputs(result.model, new), outputs(model, new),
                               rtol=1e-5, atol=1e-5)


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
