"""prune()'s options and its errors on bad input."""
import math
from fractions import Fraction

import pytest
import torch
from torch import nn

from ffr_fast import models, prune
from ffr_fast.capture import UncapturableModelError, capture
from ffr_fast.pruning import ExampleInputError, UntraceableModelError

from nets import GatedNet, ShuffleNet, look_trained

X = torch.randn(1, 3, 32, 32)


def conv_channels(result):
    return {p: after for p, (_, after) in result.report.channels.items()
            if isinstance(result.model.get_submodule(p), nn.Conv2d)}


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return look_trained(models.resnet20())


def test_round_to(resnet):
    result = prune(resnet, X, ratio=0.5, round_to=8)
    counts = conv_channels(result)
    assert all(c % 8 == 0 for c in counts.values()), counts
    assert min(counts.values()) < 64 and result.report.relative_diff <= 1e-5
    plain = conv_channels(prune(resnet, X, ratio=0.5))
    assert any(c % 8 for c in plain.values())  # without round_to the counts are ragged


def test_min_channels_keeps_layers_alive(resnet):
    result = prune(resnet, X, ratio=0.99, scope="layer", min_channels=3)
    assert set(conv_channels(result).values()) == {3}
    with torch.no_grad():
        assert result.model(X).shape == (1, 10)
    huge = prune(resnet, X, threshold=1e9, min_channels=2, remove_blocks=False)
    assert set(conv_channels(huge).values()) == {2}


def test_scope_layer_prunes_every_group_alike(resnet):
    result = prune(resnet, X, ratio=0.5, scope="layer")
    for path, (before, after) in result.report.channels.items():
        if path != "fc":
            assert after == before // 2, path


class OddWidths(nn.Module):
    """Convolutions of 5, 10 and 25 channels: ratios whose count is no whole number."""

    def __init__(self, widths=(5, 10, 25)):
        super().__init__()
        ins = (3,) + widths[:-1]
        self.convs = nn.ModuleList(nn.Conv2d(i, o, 3, padding=1) for i, o in zip(ins, widths))
        self.fc = nn.Linear(widths[-1], 2)

    def forward(self, x):
        for conv in self.convs:
            x = torch.relu(conv(x))
        return self.fc(x.mean((2, 3)))


def kept_at(ratio: float, n: int) -> int:
    """The channels of n that the fraction `ratio`, rounded up, leaves (exact arithmetic)."""
    return n - math.ceil(Fraction(str(ratio)) * n)


@pytest.mark.parametrize("analysis", ["fx", "export"])
@pytest.mark.parametrize("ratio", [0.5, 0.3, 0.28])  # 0.28 * 25 is 7.000000000000001 in floats
def test_layer_ratio_removes_its_fraction_rounded_up(analysis, ratio):
    """ceil(ratio * n) of every layer's n channels go, as under Torch-Pruning: 5 at 0.5 keep
    2, 10 at 0.3 keep 7, 25 at 0.28 keep 18 (the float error in 0.28 * 25 forgiven)."""
    torch.manual_seed(0)
    model = OddWidths().eval()
    result = prune(model, torch.randn(1, 3, 8, 8), ratio=ratio, scope="layer",
                   analysis=analysis)
    assert result.report.settings["path"] == {"fx": "torch.fx", "export": "torch.export"}[
        analysis]
    for index, conv in enumerate(model.convs):
        n = conv.out_channels
        assert result.report.channels[f"convs.{index}"] == (n, kept_at(ratio, n)), index
    assert result.report.relative_diff <= 1e-5


def test_global_ratio_removes_its_fraction_rounded_up():
    """0.5 of 5 channels removes 3 (round() took 2: half to even)."""
    torch.manual_seed(0)
    result = prune(OddWidths(widths=(5,)).eval(), torch.randn(1, 3, 8, 8), ratio=0.5,
                   min_fraction=0.0)
    assert result.report.channels["convs.0"] == (5, 2)


class ThreeHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 12)
        self.mha = nn.MultiheadAttention(12, 3, batch_first=True)
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        y = self.fc(x)
        return self.head(self.mha(y, y, y, need_weights=False)[0] + y)


@pytest.mark.parametrize("analysis", ["fx", "export"])
def test_layer_ratio_rounds_heads_up(analysis):
    """Heads follow the same rule: 3 heads at 0.5 keep 1 (deit_tiny's blocks)."""
    torch.manual_seed(0)
    result = prune(ThreeHeads().eval(), torch.randn(2, 5, 12), ratio=0.5, scope="layer",
                   analysis=analysis)
    assert result.model.get_submodule("mha").num_heads == 1
    assert result.report.relative_diff <= 1e-5


def test_importance_bn_ranks_by_gamma():
    model = look_trained(models.resnet20())
    with torch.no_grad():
        model.layer1[0].bn1.weight[:4] = 1e-4  # the smallest |gamma| in their layer
        model.layer1[0].bn1.bias[:4] = 5.0  # ...but a large emitted shift
    by_gamma = prune(model, X, ratio=0.25, importance="bn", scope="layer")
    by_norm = prune(model, X, ratio=0.25, importance="l2", scope="layer")
    gamma = model.layer1[0].bn1.weight
    assert torch.equal(by_gamma.model.get_submodule("layer1.0.bn1").weight, gamma[4:])
    kept = by_norm.model.get_submodule("layer1.0.bn1").weight
    assert (kept == 1e-4).sum() == 4
    l1 = prune(model, X, ratio=0.3, importance="l1")
    assert l1.report.removed_classes > 0 and l1.report.relative_diff <= 1e-5


def test_ignored_module_keeps_its_channels():
    """The gate's data-dependent `if` stops torch.export; ignored, it is captured as one op
    it does not look into (capture.py's opaque modules), and the rest is cut around it."""
    model = look_trained(GatedNet())
    x = torch.randn(2, 3, 16, 16)
    for ignored in (["gate"], [model.gate], [type(model.gate)]):
        result = prune(model, x, ratio=0.5, ignored=ignored)
        assert result.report.settings["path"] == "torch.export"
        assert isinstance(result.model, GatedNet) and "forward" not in vars(model.gate)
        assert result.report.channels["conv1.0"] == (16, 16)
        assert result.model.gate.conv.weight.shape == (16, 16, 1, 1)
        assert result.report.channels["conv2.0"][1] < 32
        assert any("ignored" in u["reason"] for u in result.report.opaque_ops)
        assert result.report.relative_diff <= 1e-5


def test_an_opaque_module_is_one_op_in_the_capture_and_leaves_no_trace():
    model = look_trained(GatedNet())
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(UncapturableModelError, match=r"module 'gate' \(Gate\)"):
        capture(model, (x,))
    cap = capture(model, (x,), opaque=["gate"])
    ops = [n for n in cap.graph.nodes if "opaque_module" in str(n.target)]
    assert len(ops) == 1 and cap.module_path(ops[0]) == "gate"
    assert all(not cap.nodes[node].users for node, name in cap.parameters.items()
               if name.startswith("gate."))  # its weights are read inside the op only
    assert cap.calls["gate"].index == 0 and "gate@1" not in cap.calls  # called once
    assert "forward" not in vars(model.gate) and not model.training


def test_a_custom_mixing_function_is_read_through_its_ops():
    """The export path reads the channel shuffle's view, transpose and view (a shuffle keeps
    its group count: aten_layout.Split) and cuts through it exactly."""
    model = look_trained(ShuffleNet())
    x = torch.randn(2, 3, 16, 16)
    result = prune(model, x, ratio=0.5)
    assert result.report.opaque_ops == [] and result.report.channels["conv1.0"][1] < 16
    assert result.report.relative_diff <= 1e-5


def test_custom_mixing_op_is_named_and_left_alone_by_the_fx_table():
    model = look_trained(ShuffleNet())
    x = torch.randn(2, 3, 16, 16)
    result = prune(model, x, ratio=0.5, analysis="fx")
    assert [o["op"] for o in result.report.opaque_ops] == [
        "call_function 'channel_shuffle' (node channel_shuffle)"]
    assert result.report.channels["conv1.0"] == (16, 16)
    assert result.model.get_submodule("conv2.0").in_channels == 16
    assert "channel_shuffle" in str(result.report)
    assert result.report.relative_diff <= 1e-5


def test_inplace(resnet):
    model = look_trained(models.resnet20())
    result = prune(model, X, ratio=0.5, inplace=True)
    assert model.layer1[0].conv1 is result.model.get_submodule("layer1.0.conv1")
    assert model.layer1[0].conv1.out_channels < 16
    with torch.no_grad():  # no block removed: the caller's own forward runs the pruned net
        assert torch.allclose(model(X), result.model(X), atol=1e-6)


def test_prune_is_exported_by_the_package(resnet):
    import ffr_fast.pruning.graph  # noqa: F401  (importing the subpackage must not shadow it)
    result = ffr_fast.prune(resnet, X, ratio=0.1)
    assert isinstance(result, ffr_fast.PruneResult)


@pytest.mark.parametrize("kwargs,message", [
    (dict(), "exactly one of threshold=, ratio= or flops_target="),
    (dict(threshold=0.1, ratio=0.5), "exactly one of threshold=, ratio= or flops_target="),
    (dict(ratio=0.5, flops_target=0.5), "exactly one of threshold=, ratio= or flops_target="),
    (dict(flops_target=1.0), r"flops_target must be in \(0, 1\)"),
    (dict(flops_target=0.5, flops_search="bisect"), "flops_search must be one of"),
    (dict(ratio=1.0), r"ratio must be in \[0, 1\)"),
    (dict(ratio=-0.1), r"ratio must be in \[0, 1\)"),
    (dict(threshold=-1.0), "threshold must be >= 0"),
    (dict(ratio=0.5, importance="l3"), "importance must be one of"),
    (dict(ratio=0.5, scope="net"), "scope must be one of"),
    (dict(ratio=0.5, min_channels=0), "min_channels must be an int >= 1"),
    (dict(ratio=0.5, round_to=0), "round_to must be None or an int >= 1"),
    (dict(ratio=0.5, ignored=["layer9"]), "has no submodule 'layer9'"),
])
def test_bad_settings(resnet, kwargs, message):
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        prune(resnet, X, **kwargs)
    assert all(torch.equal(v, before[k]) for k, v in resnet.state_dict().items())


def test_wrong_input_shape_names_shape_and_module(resnet):
    with pytest.raises(ExampleInputError, match=r"shape \(1, 4, 32, 32\) in module 'stem.0.0'"):
        prune(resnet, torch.randn(1, 4, 32, 32), ratio=0.5)
    with pytest.raises(TypeError, match=r"example_inputs\[0\] must be a torch.Tensor"):
        prune(resnet, [[1.0]], ratio=0.5)


def test_untraceable_model_names_module_and_fix():
    with pytest.raises(UntraceableModelError,
                       match=r"module 'gate' \(Gate\).*ignored=\['gate'\]"):
        prune(GatedNet(), torch.randn(1, 3, 16, 16), ratio=0.5)


class SplitNet(nn.Module):
    """torch.chunk on channels, then the halves multiplied: they shrink alike."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        a, b = torch.chunk(torch.relu(self.conv1(x)), 2, dim=1)
        y = torch.relu(self.conv2(a)) * b
        return self.fc(y.view(y.size(0), y.size(1), -1).mean(2))


def test_chunk_on_channels_ties_the_pieces():
    """Both halves keep the same positions, so chunk(2) still splits where it should."""
    model = SplitNet()
    x = torch.randn(2, 3, 16, 16)
    result = prune(model, x, ratio=0.5)
    assert result.report.opaque_ops == []
    kept = result.model.conv1.out_channels
    assert kept % 2 == 0 and kept < 16
    weight, old = result.model.conv1.weight, model.conv1.weight
    rows = [i for i in range(16) if any(torch.equal(old[i], w) for w in weight)]
    assert [r + 8 for r in rows[:kept // 2]] == rows[kept // 2:]
    assert result.report.relative_diff <= 1e-5


class ShiftNet(nn.Module):
    """x + 1 is channel-wise but turns a zero channel into ones: removing it is not exact."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x)) + 1)))


@pytest.mark.parametrize("analysis", ["fx", "export"])
def test_constant_shift_is_not_pruned_through(analysis):
    model = ShiftNet()
    with torch.no_grad():
        model.conv1.weight[2] = 0
        model.conv1.bias[2] = 0
        model.conv2.weight[5] = 0
        model.conv2.bias[5] = 0
    result = prune(model, torch.randn(1, 3, 8, 8), threshold=0.0, analysis=analysis)
    assert result.report.channels["conv1"] == (8, 8)
    assert result.report.channels["conv2"] == (8, 7)
    assert result.report.max_abs_diff_original <= 1e-6 * result.report.reference_max_abs
    if analysis == "fx":  # the ATen analysis understands the add: it scores the shift
        assert [o["op"] for o in result.report.opaque_ops] == ["call_function 'add' (node add)"]
    assert result.report.relative_diff <= 1e-5 and result.report.max_abs_diff_original < 1e-5
