"""The pruner's answers to adversarial probes: zero preservation decided per instance,
training flags kept, bad files, inputs and models refused by name (and a pruner failure
never blamed on the inputs), a FLOPs budget that says when it misses, user importance
functions and one unit for channels and branches; named branches alone removed; a global
ratio that keeps a floor of every layer. (Tensors shared or sliced with channels:
test_prune_tensors.py.)"""
import math
import warnings

import pytest
import torch
from torch import nn

from ffr_fast import models
from ffr_fast.pruning import (
    ExampleInputError,
    FlopsTargetWarning,
    PrunedModelError,
    Rule,
    load_pruned,
    prune,
    register_rule,
    residual_branches,
    save_pruned,
)
from ffr_fast.pruning.rules import RULES
from ffr_fast.torchvision_loader import load_torchvision

from nets import ChannelScale, look_trained

X = torch.randn(2, 3, 32, 32)


class ActNet(nn.Module):
    """conv1 -> act -> conv2: whether conv1's dead channels may go depends on act(0)."""

    def __init__(self, act):
        super().__init__()
        self.conv1, self.act, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), act, nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv2(self.act(self.conv1(x)))


class FunctionalHardtanh(ActNet):
    def __init__(self):
        super().__init__(nn.Identity())

    def forward(self, x):
        return self.conv2(nn.functional.hardtanh(self.conv1(x), 0.5, 2.0))


def dead_conv1(model):
    with torch.no_grad():
        model.conv1.weight[[1, 6]] = 0
        model.conv1.bias[[1, 6]] = 0
    return model


@pytest.mark.parametrize("make,exact", [
    (lambda: ActNet(nn.Hardtanh(0.5, 2.0)), False), (FunctionalHardtanh, False),
    (lambda: ActNet(nn.Threshold(0.1, 20.0)), False), (lambda: ActNet(nn.Hardtanh()), True),
    (lambda: ActNet(nn.ReLU6()), True), (lambda: ActNet(nn.LeakyReLU(0.3)), True),
    (lambda: ActNet(nn.Threshold(-0.1, 20.0)), True)])
@pytest.mark.parametrize("analysis", ["fx", "export"])
def test_zero_preservation_is_decided_per_instance(make, exact, analysis):
    torch.manual_seed(0)
    model = dead_conv1(make())
    x = torch.randn(2, 3, 8, 8)
    result = prune(model, x, threshold=0.0, analysis=analysis)
    assert result.report.channels["conv1"] == (8, 6 if exact else 8)
    assert result.report.max_abs_diff_original <= 1e-6 * result.report.reference_max_abs
    if not exact and analysis == "fx":  # the ATen analysis reads the op's value at zero
        assert any("hardtanh" in o["op"].lower() or "Threshold" in o["op"]
                   for o in result.report.opaque_ops)


def frozen_bn_training_model():
    model = look_trained(models.resnet20()).train()
    model.layer1[0].bn1.eval()
    model.layer2.eval()
    return model


def flags(model):
    return {name: m.training for name, m in model.named_modules()}


@pytest.mark.parametrize("inplace", [False, True])
def test_training_flags_are_kept_exactly(inplace):
    model = frozen_bn_training_model()
    before = flags(model)
    result = prune(model, X, ratio=0.3, inplace=inplace)
    assert flags(model) == before
    got = flags(result.model)
    assert all(got[name] == before[name] for name in got if name in before)
    assert not got["layer1.0.bn1"] and got["layer1.0.bn2"] and not got["layer2.0.conv1"]


def test_loaded_model_keeps_the_training_flags(tmp_path):
    result = prune(frozen_bn_training_model(), X, ratio=0.3)
    save_pruned(result, tmp_path / "p.pt")
    assert flags(load_pruned(tmp_path / "p.pt", models.resnet20)) == flags(result.model)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("pruned") / "p.pt"
    save_pruned(prune(look_trained(models.resnet20()), X, ratio=0.3), path)
    return path


def test_bad_pruned_files_are_named_errors(saved, tmp_path):
    data = saved.read_bytes()
    cases = {
        "truncated.pt": (data[:len(data) // 2], "cannot be read as a file written by save_pruned"),
        "empty.pt": (b"", "cannot be read as a file written by save_pruned"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"{name}.*{message}"):
            load_pruned(tmp_path / name, models.resnet20)
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="tensor.pt is not a file written by save_pruned: it "
                                         "holds a Tensor"):
        load_pruned(tmp_path / "tensor.pt", models.resnet20)
    payload = torch.load(saved, weights_only=True)
    del payload["structure"]["kept"]
    torch.save(payload, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"partial.pt is incomplete: its structure lacks "
                                         r"\['kept'\]"):
        load_pruned(tmp_path / "partial.pt", models.resnet20)
    torch.save({"state_dict": {}}, tmp_path / "dict.pt")
    with pytest.raises(ValueError, match=r"dict.pt is not a file written by save_pruned: it "
                                         r"holds a dict with keys \['state_dict'\]"):
        load_pruned(tmp_path / "dict.pt", models.resnet20)
    with pytest.raises(FileNotFoundError):
        load_pruned(tmp_path / "missing.pt", models.resnet20)


def test_bad_example_inputs_and_ignored():
    model = look_trained(models.resnet20())
    with pytest.raises(ValueError, match=r"example_inputs\[0\] has shape \(0, 3, 32, 32\).*at "
                                         "least one sample"):
        prune(model, torch.randn(0, 3, 32, 32), ratio=0.5)
    with pytest.raises(ExampleInputError, match="RuntimeError: ") as caught:
        prune(model, torch.randn(1, 5, 32, 32), ratio=0.5)
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert str(caught.value.__cause__) in str(caught.value)
    with pytest.raises(TypeError, match=r"ignored must be a list.*ignored=\['layer1.0'\]"):
        prune(model, X, ratio=0.5, ignored="layer1.0")
    with pytest.raises(ValueError, match="'' names the whole model"):
        prune(model, X, ratio=0.5, ignored=[""])
    with pytest.raises(ValueError, match="is not a submodule name"):
        prune(model, X, ratio=0.5, ignored=[model])


def flops_kept(result):
    return result.report.flops_after / result.report.flops_before


@pytest.mark.parametrize("search", ["threshold", "ratio"])
def test_flops_target_lands_within_tolerance(search):
    model = look_trained(models.resnet20())
    with warnings.catch_warnings():
        warnings.simplefilter("error", FlopsTargetWarning)
        result = prune(model, X, flops_target=0.5, flops_search=search, flops_tolerance=0.03)
    assert 0.47 <= flops_kept(result) <= 0.5
    assert result.report.settings["flops_target"] == 0.5 and not result.report.warnings
    assert result.report.relative_diff <= 1e-5


class OneClass(nn.Module):
    """All filters of conv1 have the same norm: a threshold keeps all or (min_channels) one."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        with torch.no_grad():
            self.conv1.weight.copy_(torch.randn(1, 3, 3, 3).expand(16, 3, 3, 3))
            self.conv1.bias.fill_(0.1)
            self.conv2.weight.normal_()
            self.conv2.bias.fill_(10.0)  # conv2 is never removed below threshold 1e3

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


def test_flops_target_out_of_reach_says_so_and_returns_the_report():
    model = OneClass()
    x = torch.randn(1, 3, 8, 8)
    with pytest.warns(FlopsTargetWarning, match=r"flops_target=50.0% .* not reached"):
        result = prune(model, x, flops_target=0.5)
    [message] = result.report.warnings
    assert "not reached" in message and "WARNING" in str(result.report)
    assert flops_kept(result) < 0.45  # the one candidate under the budget


def test_importance_callable_ranks_channels():
    model = look_trained(models.resnet20())

    def by_position(module, bn):  # later filters count more: the first ones go
        return torch.arange(module.weight.shape[0], dtype=torch.float64)

    result = prune(model, X, ratio=0.25, scope="layer", importance=by_position)
    old, new = model.layer1[0].conv1.weight, result.model.get_submodule("layer1.0.conv1").weight
    assert torch.equal(new, old[4:, :][:, 4:])  # its input (the stem's stream) lost 4 too
    assert result.report.settings["importance"].endswith("by_position")
    with pytest.raises(ValueError, match=r"returned .* for layer 'stem.0.0'.*16 finite scores"):
        prune(model, X, ratio=0.25, importance=lambda module, bn: torch.ones(3))


def test_threshold_compares_channels_and_branches_in_one_unit():
    """Under importance='bn' a branch scores |gamma| of its last BatchNorm, like its channels:
    gamma ~ 1e-3 (beta not small) is under threshold 1e-2 for both."""
    model = look_trained(models.resnet20())
    with torch.no_grad():
        model.layer1[1].bn2.weight.fill_(1e-3)
    by_gamma = prune(model, X, threshold=1e-2, importance="bn")
    assert [b["block"] for b in by_gamma.report.removed_blocks] == ["layer1.1"]
    by_norm = prune(model, X, threshold=1e-2, importance="l2")
    assert by_norm.report.removed_blocks == []  # it emits its beta (~0.1): not removed


class TrainOnlyNoise(nn.Module):
    """A traced forward that reads self.training: fx bakes in the value it had (eval)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        x = self.conv(x)
        if self.training:
            x = x + 0.1 * torch.randn_like(x)
        return x


def test_a_forward_that_reads_the_training_flag_is_reported():
    model = nn.Sequential(TrainOnlyNoise(), nn.ReLU(), nn.Conv2d(8, 4, 1))
    result = prune(model, torch.randn(1, 3, 8, 8), ratio=0.5, emit="graph")
    [note] = result.report.warnings
    assert "reads self.training" in note and "WARNING" in str(result.report)
    # The model's own class keeps its own forward, training branch included: nothing to say.
    own = prune(model, torch.randn(1, 3, 8, 8), ratio=0.5)
    assert isinstance(own.model, nn.Sequential) and own.report.warnings == []
    assert prune(look_trained(models.resnet20()), X, ratio=0.5).report.warnings == []


class ConstantIndexNet(nn.Module):
    """A forward that makes a tensor from constants: torch.fx stores it as a new attribute
    (_tensor_constant0) of the module it traces."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))[:, torch.tensor([3, 2, 1, 0])]


def test_tracing_leaves_no_attribute_on_the_user_model(tmp_path):
    torch.manual_seed(0)
    model = ConstantIndexNet().eval()
    before = set(vars(model))
    x = torch.randn(1, 3, 10, 10)
    first = prune(model, x, ratio=0.5)
    residual_branches(model, x)
    assert set(vars(model)) == before
    save_pruned(first, tmp_path / "p.pt")  # a second prune and a reload see the same model
    loaded = load_pruned(tmp_path / "p.pt", model)
    torch.testing.assert_close(loaded(x), first.model(x))
    torch.testing.assert_close(prune(model, x, ratio=0.5).model(x), first.model(x))


@pytest.mark.parametrize("x,cause", [
    (torch.randn(1, 3, 32, 32, dtype=torch.float64), "expected scalar type Double but found Float"),
    (torch.randn(1, 5, 32, 32), "expected input[1, 5, 32, 32] to have 3 channels")])
def test_example_input_errors_name_the_module_and_the_real_cause(x, cause):
    with pytest.raises(ExampleInputError) as caught:
        prune(look_trained(models.resnet20()), x, ratio=0.5)
    message = str(caught.value)
    assert "in module 'stem.0.0' (Conv2d): RuntimeError: " in message and cause in message
    assert "ShapeProp" not in message and "\n" not in message
    assert "ShapeProp" not in str(caught.value.__cause__)


def test_a_torchscript_model_is_refused_up_front():
    scripted = torch.jit.script(models.resnet20())
    for call in (lambda: prune(scripted, X, ratio=0.5), lambda: residual_branches(scripted, X)):
        with pytest.raises(TypeError, match="needs the eager nn.Module, not a TorchScript "
                                            "module; pass the model before torch.jit.script"):
            call()


class UnslicedScale(ChannelScale):
    """A user's layer whose registered rule forgets to slice its weight."""


@pytest.fixture
def unsliced_rule():
    register_rule(UnslicedScale, Rule("channelwise", dim=1))
    yield
    del RULES[UnslicedScale]


def test_a_layer_the_pruner_broke_is_not_blamed_on_the_inputs(unsliced_rule):
    """On the torch.fx path, whose rule table the user's rule entered (the export path reads
    the layer's own ops and needs no rule)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), UnslicedScale(8), nn.Conv2d(8, 4, 1))
    with pytest.raises(PrunedModelError, match=r"the pruned model failed in module '1' "
                                               r"\(UnslicedScale\).*the original model ran.*"
                                               r"ignored=\['1'\]") as caught:
        prune(model, torch.randn(1, 3, 8, 8), ratio=0.5, analysis="fx")
    assert not isinstance(caught.value, ExampleInputError)


def zero_initialised_branches(model, names):
    """Zero each branch's last BatchNorm, as a zero-init residual recipe does: the branch
    emits exactly zero."""
    with torch.no_grad():
        for name in names:
            bn = model.get_submodule(f"{name}.bn2")
            bn.weight.zero_()
            bn.bias.zero_()
    return model


def test_named_branches_alone_go_unless_more_are_asked_for():
    model = zero_initialised_branches(look_trained(models.resnet20()), ["layer1.1", "layer2.2"])
    named = ["layer1.0", "layer3.2"]

    def removed(**options):
        result = prune(model, X, remove_branches=named, **options)
        return sorted(b["block"] for b in result.report.removed_blocks)

    assert removed() == removed(remove_blocks=False) == named
    assert removed(remove_blocks=True) == sorted(named + ["layer1.1", "layer2.2"])
    # Without names the exactly-zero branches go by default, as before.
    assert [b["block"] for b in prune(model, X, ratio=0.0).report.removed_blocks] == [
        "layer1.1", "layer2.2"]
    with pytest.raises(TypeError, match="remove_blocks must be None, True or False"):
        prune(model, X, ratio=0.0, remove_blocks="yes")


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    return load_torchvision().models.resnet50(weights=None).eval()


def lowest_kept_fraction(result):
    return min(after / before for before, after in result.report.channels.values())


def test_a_global_ratio_keeps_a_floor_of_every_layer(resnet50):
    """Ranked by raw norms, resnet50's layer1.0.conv3 (ratio 0.3) and layer4.0.downsample
    (ratio 0.5) kept one channel: scores relative to their layer's mean keep every layer near
    the ratio, and the
    floor holds even where the ranking alone would empty a layer."""
    x = torch.randn(1, 3, 32, 32)
    half = prune(resnet50, x, ratio=0.5)
    assert all(after >= math.ceil(0.1 * before)
               for before, after in half.report.channels.values())
    assert lowest_kept_fraction(half) >= 0.4
    assert lowest_kept_fraction(prune(resnet50, x, ratio=0.9, min_fraction=0.0)) < 0.1
    most = prune(resnet50, x, ratio=0.9)
    assert all(after >= math.ceil(0.1 * before)
               for before, after in most.report.channels.values())
    assert most.report.settings["min_fraction"] == 0.1
    with pytest.raises(ValueError, match="min_fraction must be a number in"):
        prune(resnet50, x, ratio=0.5, min_fraction=1.5)


def test_the_verification_counts_a_nan_as_a_difference():
    """A NaN where the reference holds a number would pass `diff > tolerance` unseen."""
    from ffr_fast.pruning.report import max_abs_diff

    reference = torch.tensor([1.0, float("nan"), float("inf"), -2.0])
    assert max_abs_diff(reference.clone(), reference) == 0.0  # NaN and inf agree with themselves
    broken = reference.clone()
    broken[0] = float("nan")
    assert max_abs_diff(broken, reference) == float("inf")
    broken = reference.clone()
    broken[2] = 3.0
    assert max_abs_diff(broken, reference) == float("inf")
    assert max_abs_diff(reference + torch.tensor([0.5, 0, 0, 0]), reference) == 0.5
