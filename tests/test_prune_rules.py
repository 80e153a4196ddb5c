"""One small net per family of the ATen op table (aten_ops.py, aten_layout.py): channels
followed through permute, a channels-last MLP, channel shuffle written out, squeeze-excitation
gates, layer scales, GroupNorm, Conv1d, PReLU, ConvTranspose2d; an op outside the table pins
its channels and is named; a user's layer in plain torch needs no rule, only its size
attributes a size rule (register_size_rule)."""
import pytest
import torch
from torch import nn

from ffr_fast.pruning import load_pruned, prune, register_size_rule, save_pruned
from ffr_fast.pruning.slicing import SIZE_RULES

from nets import (
    ChannelsLastMLP,
    Conv1dNet,
    FixedView,
    GroupNormNet,
    LayerScaleNet,
    ScaleNet,
    SENet,
    SoftmaxNet,
    TokenNet,
    TracedShuffle,
    TransposedNet,
    look_trained,
)

X = torch.randn(2, 3, 8, 8)

# net, input, {layer: dead output channels}, {layer: channels left by threshold=0}
CASES = {
    "channels-last MLP": (ChannelsLastMLP, X, {"fc1": [3, 7]}, {"fc1": 14}),
    "channel shuffle": (TracedShuffle, X, {"conv1.0": [1, 5]}, {"conv1.0": 6}),
    "squeeze-excitation": (SENet, X, {"conv1.0": [2], "se.fc2": [2]}, {"conv1.0": 7,
                                                                        "se.fc2": 7}),
    "layer scale": (LayerScaleNet, X, {"conv1": [0, 4]}, {"conv1": 6}),
    "conv1d, BatchNorm1d, PReLU": (Conv1dNet, torch.randn(2, 3, 16), {"conv1": [1]},
                                   {"conv1": 7}),  # its BatchNorm1d is fresh: shift 0
    "transposed conv": (TransposedNet, X, {"up": [2]}, {"up": 5}),
}


def kill(model, dead):
    with torch.no_grad():
        for path, channels in dead.items():
            layer = model.get_submodule(path)
            out_dim = 1 if isinstance(layer, nn.ConvTranspose2d) else 0
            layer.weight.index_fill_(out_dim, torch.tensor(channels), 0)
            if layer.bias is not None:
                layer.bias[channels] = 0
            bn = path.replace(".0", ".1") if path.endswith(".0") else None
            if bn is not None:
                model.get_submodule(bn).bias[channels] = 0
                model.get_submodule(bn).weight[channels] = 0


@pytest.mark.parametrize("case", list(CASES))
def test_rule_prunes_exactly(case):
    make, x, dead, left = CASES[case]
    torch.manual_seed(0)
    model = look_trained(make())
    kill(model, dead)
    with torch.no_grad():
        expected = model(x)
    result = prune(model, x, threshold=0.0)
    assert result.report.opaque_ops == []
    assert {p: result.report.channels[p][1] for p in left} == left
    assert result.report.max_abs_diff_original <= 1e-5 * expected.abs().max()
    ratio = prune(model, x, ratio=0.5, scope="layer")
    assert ratio.report.removed_classes > 0
    if not ratio.report.approximate:  # the channels-last MLP's LayerNorm lost channels
        assert ratio.report.relative_diff <= 1e-5
    with torch.no_grad():
        assert ratio.model(torch.cat([x, x])).shape[1:] == expected.shape[1:]


def test_channel_shuffle_ties_positions_across_groups():
    """Channel 1 alone is not removed: after the shuffle it shares a slot with channel 5
    (position 1 of both groups), and the shuffle's group count stays."""
    model = look_trained(TracedShuffle())
    kill(model, {"conv1.0": [1]})
    assert prune(model, X, threshold=0.0).report.channels["conv1.0"] == (8, 8)
    kill(model, {"conv1.0": [5]})
    result = prune(model, X, threshold=0.0)
    assert result.report.channels["conv1.0"] == (8, 6)
    assert result.report.relative_diff <= 1e-5


def test_a_split_whose_lead_is_merged_back_outermost_cuts_whole_groups():
    """The same view without the transpose ((B, C) -> (B, C / 4, 4) -> (B, C), heads of 4)
    cuts whole groups and keeps the group's size, which the code says as a constant."""
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = torch.relu(self.conv1(x))
            b, c, h, w = y.shape
            return self.conv2(y.view(b, c // 4, 4, h, w).softmax(2).reshape(b, c, h, w))

    torch.manual_seed(0)
    result = prune(Heads(), X, ratio=0.5, scope="layer")
    assert result.report.channels["conv1"] == (8, 4) and result.report.relative_diff <= 1e-5
    assert result.structure["kept"]["conv1.weight"][0] in ([0, 1, 2, 3], [4, 5, 6, 7])


def test_squeeze_excitation_gate_is_tied_to_its_channels():
    model = look_trained(SENet())
    result = prune(model, X, ratio=0.5, scope="layer")
    se = result.model.se
    kept = result.model.get_submodule("conv1.0").out_channels
    assert se.fc1.in_channels == se.fc2.out_channels == kept < 8


def test_group_norm_keeps_its_groups_and_says_it_is_approximate():
    model = GroupNormNet()
    result = prune(model, X, ratio=0.5, scope="layer")
    norm = result.model.norm
    assert norm.num_channels == 4 and norm.num_groups == 2
    assert result.report.approximate == ["norm"]
    assert "Renormalising layers that lost channels" in str(result.report)


def test_op_without_a_rule_pins_its_channels_and_is_named():
    """The capture names the ATen op (here a user's custom op) and its node."""
    model = SoftmaxNet()
    result = prune(model, X, ratio=0.5, scope="layer")
    assert [o["op"] for o in result.report.opaque_ops] == [
        "channel_softmax (node channel_softmax)"]
    assert "outside the channel analysis" in result.report.opaque_ops[0]["reason"]
    assert result.report.channels["conv2"] == (8, 8)  # read by the custom op: kept
    assert result.report.channels["conv1"] == (8, 4)  # elsewhere: pruned
    assert result.report.relative_diff <= 1e-5


def test_without_a_rule_a_user_layer_is_read_through_its_ops():
    """ChannelScale's `x * weight.view(1, -1, 1, 1)` is a view and a mul of the table: its
    weight is sliced with conv1 and nothing is opaque; only its `channels` attribute, which
    no op reads, keeps the old count without a size rule."""
    result = prune(ScaleNet(), X, ratio=0.5, scope="layer")
    assert result.report.opaque_ops == [] and result.report.channels["conv1"] == (8, 4)
    assert result.model.scale.weight.shape == (4,) and result.model.scale.channels == 8
    assert result.report.relative_diff <= 1e-5


@pytest.fixture
def scale_size_rule():
    handle = register_size_rule("ChannelScale",
                                lambda m: setattr(m, "channels", m.weight.shape[0]))
    yield
    handle.remove()
    assert "ChannelScale" not in SIZE_RULES


def test_register_size_rule_fixes_a_user_layer_s_sizes(scale_size_rule, tmp_path):
    model = ScaleNet()
    result = prune(model, X, ratio=0.5, scope="layer")
    assert result.report.opaque_ops == [] and result.report.channels["conv1"] == (8, 4)
    assert result.model.scale.channels == 4 and result.model.scale.weight.shape == (4,)
    assert result.report.relative_diff <= 1e-5
    save_pruned(result, tmp_path / "p.pt")
    loaded = load_pruned(tmp_path / "p.pt", ScaleNet)
    assert loaded.scale.channels == 4
    torch.testing.assert_close(loaded(X), result.model(X))


def test_prelu_with_one_slope_is_not_sliced():
    model = Conv1dNet()
    model.act = nn.PReLU()  # one slope for every channel: it broadcasts, nothing to slice
    x = torch.randn(2, 3, 16)
    result = prune(model, x, ratio=0.5, scope="layer")
    assert result.model.act.weight.shape == (1,) and result.report.relative_diff <= 1e-5
    assert result.model.conv1.out_channels == 4


def test_class_token_and_position_embedding_are_sliced_with_the_channels():
    torch.manual_seed(0)
    model = TokenNet()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        for t in (model.patch.weight, model.patch.bias, model.cls, model.pos):
            t.index_fill_(0 if t is model.patch.weight or t is model.patch.bias else 2,
                          torch.tensor([3, 6]), 0)
        model.pos[0, :, 6] = 0.5  # channel 6 still gets its position embedding: it stays
    result = prune(model, x, threshold=0.0)
    assert result.report.opaque_ops == [] and result.report.channels["patch"] == (8, 7)
    assert result.model.cls.shape == (1, 1, 7) and result.model.pos.shape == (1, 5, 7)
    assert result.report.max_abs_diff_original <= 1e-6
    ratio = prune(model, x, ratio=0.5, scope="layer")
    assert ratio.model.pos.shape == (1, 5, 4) and ratio.report.relative_diff <= 1e-5


@pytest.mark.parametrize("literal", [True, False])
def test_a_view_to_a_constant_channel_count_shrinks_with_the_channels(literal, tmp_path):
    """x.view(n, 8, -1): the graph's 8 becomes the kept count, which only torch.fx's emitted
    GraphModule holds (the model's own forward still says 8, so the export path cannot
    serve and says so); written as y.shape[1], the model's own class serves."""
    model = FixedView(literal)
    result = prune(model, X, ratio=0.5, scope="layer")
    assert result.report.channels["conv1"] == (8, 4) and not result.report.opaque_ops
    assert result.report.relative_diff <= 1e-5
    assert isinstance(result.model, torch.fx.GraphModule) == literal
    if literal:
        assert result.structure["view_sizes"] == [["view", 1, 4]]
        assert "the torch.export analysis could not prune" in result.report.warnings[0]
    save_pruned(result, tmp_path / "p.pt")
    loaded = load_pruned(tmp_path / "p.pt", FixedView(literal))
    with torch.no_grad():
        assert torch.equal(loaded(X), result.model(X))


def test_a_view_splitting_the_channels_over_constants_pins_them():
    class HeadsAsNumbers(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(4, 4)

        def forward(self, x):
            y = self.conv1(x).flatten(2).transpose(1, 2)  # (n, hw, 8)
            return self.fc(y.reshape(y.shape[0], y.shape[1], 2, 4)).mean((1, 2))

    result = prune(HeadsAsNumbers(), X, ratio=0.5, scope="layer")
    assert result.report.channels["conv1"] == (8, 8)  # the mean reads the heads' dims whole


def test_a_size_rule_s_handle_puts_back_the_rule_it_replaced():
    built_in = SIZE_RULES["Linear"]

    def replacement(m):
        return built_in(m)
    handle = register_size_rule("Linear", replacement)
    assert SIZE_RULES["Linear"] is replacement
    handle.remove()
    assert SIZE_RULES["Linear"] is built_in
    handle.remove()  # a second remove changes nothing
    assert SIZE_RULES["Linear"] is built_in
    with pytest.raises(TypeError, match="must be a callable"):
        register_size_rule("Linear", "not a rule")
    assert SIZE_RULES["Linear"] is built_in
