"""Tensors that go with the channels they meet, kept consistent by the pruner: tied weights
stay one tensor (or are kept, said so, where a use does not slice them), a depthwise
convolution with a channel multiplier loses whole groups, per-channel buffers are sliced and
keep their registration and persistence."""
import pytest
import torch
from torch import nn

from ffr_fast.metrics import count_params
from ffr_fast.pruning import load_pruned, prune, save_pruned


class TiedHead(nn.Module):
    """A language model's head that reuses its embedding's weight (tied weights)."""

    def __init__(self):
        super().__init__()
        self.emb, self.mid = nn.Embedding(50, 16), nn.Linear(16, 16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.relu(self.mid(self.emb(tokens))))


class TwinBranches(nn.Module):
    """Two convolutions that share one weight, side by side on the same input."""

    def __init__(self):
        super().__init__()
        self.stem, self.out = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(32, 4, 1)
        self.a, self.b = nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.b.weight = self.a.weight

    def forward(self, x):
        x = torch.relu(self.stem(x))
        return self.out(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1))


@pytest.mark.parametrize("emit", ["auto", "graph"])
def test_tied_weights_stay_one_tensor(emit):
    torch.manual_seed(0)
    model = TiedHead()
    result = prune(model, torch.randint(0, 50, (2, 7)), ratio=0.5, emit=emit)
    pruned = result.model
    assert pruned.head.weight is pruned.emb.weight
    assert count_params(pruned) <= count_params(model)
    assert result.report.params_after <= result.report.params_before
    if emit == "graph":  # torch.fx keeps a tensor its two uses would cut differently
        [tied] = [u for u in result.report.unpruned if u["layers"] == ["mid"]]
        assert "shared with ['head.weight'] (tied weights)" in tied["reasons"][0]
    else:  # the ATen analysis ties the two uses' dims: the hidden size is cut in both
        assert pruned.emb.weight.shape == (50, 8) and result.report.relative_diff <= 1e-5
    # Where every use slices the tensor, the uses lose the same channels, and it stays one.
    model = TwinBranches()
    x = torch.randn(1, 3, 8, 8)
    result = prune(model, x, ratio=0.5, emit=emit)
    pruned = result.model
    assert pruned.a.weight is pruned.b.weight and pruned.a.weight.shape[0] < 16
    assert count_params(pruned) < count_params(model)
    assert result.report.params_after == count_params(pruned)
    assert result.report.relative_diff <= 1e-5


class DepthwiseMultiplier(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(16, 4, 1)
        self.depthwise = nn.Conv2d(8, 16, 3, padding=1, groups=8)  # two outputs per input

    def forward(self, x):
        return self.conv2(torch.relu(self.depthwise(torch.relu(self.conv1(x)))))


def test_depthwise_conv_with_a_multiplier_loses_whole_groups(tmp_path):
    torch.manual_seed(0)
    model = DepthwiseMultiplier()
    x = torch.randn(1, 3, 8, 8)
    result = prune(model, x, ratio=0.5)
    conv = result.model.depthwise
    assert result.report.channels["depthwise"] == (16, 8)
    assert (conv.in_channels, conv.out_channels, conv.groups) == (4, 8, 4)
    assert conv.weight.shape == (8, 1, 3, 3)
    assert result.report.relative_diff <= 1e-5
    save_pruned(result, tmp_path / "p.pt")
    loaded = load_pruned(tmp_path / "p.pt", DepthwiseMultiplier)
    torch.testing.assert_close(loaded(x), result.model(x))


class ChannelBuffers(nn.Module):
    """A per-channel mask and offset registered as buffers, read by the forward."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.register_buffer("mask", (torch.arange(8) % 3 != 0).float().view(1, 8, 1, 1))
        self.register_buffer("offset", torch.rand(1, 8, 1, 1))

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x) * self.mask + self.offset))


def test_buffers_on_prunable_channels_are_sliced():
    torch.manual_seed(0)
    model = ChannelBuffers()
    result = prune(model, torch.randn(1, 3, 8, 8), ratio=0.5)
    assert result.report.channels["conv1"] == (8, 4)
    buffers = dict(result.model.named_buffers())
    assert buffers["mask"].shape == buffers["offset"].shape == (1, 4, 1, 1)
    assert result.report.relative_diff <= 1e-5
    assert model.mask.shape == (1, 8, 1, 1)  # the original is untouched


def test_a_sliced_buffer_keeps_its_registration_and_persistence():
    torch.manual_seed(0)
    model = ChannelBuffers()
    model.register_buffer("offset", model.offset, persistent=False)
    pruned = prune(model, torch.randn(1, 3, 8, 8), ratio=0.5, emit="module").model
    assert dict(pruned.named_buffers())["offset"].shape == (1, 4, 1, 1)
    assert "offset" not in pruned.state_dict() and "mask" in pruned.state_dict()
