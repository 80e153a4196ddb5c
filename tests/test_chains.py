"""Where FFRLoss finds the feature flow: the auto rules on the model zoo, explicit layers,
chain formation, and the errors for models and layer lists it cannot use."""
import pytest
import torch
from torch import nn

from ffr_fast import FFRLoss, models
from ffr_fast.capture import UncapturableModelError
from ffr_fast.flow import reference
from ffr_fast.flow.chains import split_into_chains
from ffr_fast.flow.stream import residual_blocks
from ffr_fast.testing import counted_forward_hooks


def stage(prefix, blocks):
    return tuple(f"{prefix}.{i}" for i in range(blocks))


def features(indices):
    return tuple(f"features.{i}" for i in indices)


# model, input shape, expected chains as (layer names, per-sample shape), in forward order.
# A stage whose first block keeps the shape starts at that block's input (the stem's output),
# so the first block's residual is penalised too.
ZOO_CASES = {
    "resnet20": (models.resnet20, (2, 3, 32, 32), [
        (("stem.1",) + stage("layer1", 3), (16, 32, 32)),
        (stage("layer2", 3), (32, 16, 16)),
        (stage("layer3", 3), (64, 8, 8))]),
    "resnet56": (models.resnet56, (2, 3, 32, 32), [
        (("stem.1",) + stage("layer1", 9), (16, 32, 32)),
        (stage("layer2", 9), (32, 16, 16)),
        (stage("layer3", 9), (64, 8, 8))]),
    "resnet18": (lambda: models.resnet18(width=8), (2, 3, 64, 64), [
        (("maxpool",) + stage("layer1", 2), (8, 16, 16)),
        (stage("layer2", 2), (16, 8, 8)),
        (stage("layer3", 2), (32, 4, 4)),
        (stage("layer4", 2), (64, 2, 2))]),
    "resnet50": (lambda: models.resnet50(width=8), (2, 3, 64, 64), [
        (stage("layer1", 3), (32, 16, 16)),
        (stage("layer2", 4), (64, 8, 8)),
        (stage("layer3", 6), (128, 4, 4)),
        (stage("layer4", 3), (256, 2, 2))]),
    # one chain per stage: the ReLU outputs of the conv-bn-relu units between two poolings
    "vgg16_bn": (models.vgg16_bn, (2, 3, 32, 32), [
        (features([2, 5]), (64, 32, 32)),
        (features([9, 12]), (128, 16, 16)),
        (features([16, 19, 22]), (256, 8, 8)),
        (features([26, 29, 32]), (512, 4, 4)),
        (features([36, 39, 42]), (512, 2, 2))]),
    # every InvertedResidual, the shape-changing first block of a stage included; the
    # single-block stages (16 and 320 channels) form no chain
    "mobilenet_v2": (models.mobilenet_v2, (2, 3, 32, 32), [
        (features([3, 4]), (24, 32, 32)),
        (features([5, 6, 7]), (32, 16, 16)),
        (features([8, 9, 10, 11]), (64, 8, 8)),
        (features([12, 13, 14]), (96, 8, 8)),
        (features([15, 16, 17]), (160, 4, 4))]),
}


@pytest.mark.parametrize("name", sorted(ZOO_CASES))
def test_auto_chains_on_the_zoo(name):
    factory, input_shape, expected = ZOO_CASES[name]
    torch.manual_seed(0)
    model = factory()
    ffr = FFRLoss(model)
    assert "not formed yet" in ffr.describe()
    model(torch.randn(input_shape))
    batch = input_shape[0]
    assert [(c.names, c.shape) for c in ffr.chains] == [
        (names, (batch, *shape)) for names, shape in expected]
    text = repr(ffr)
    for i, (names, shape) in enumerate(expected):
        assert f"chain {i}: length {len(names)}, shape {shape}: {', '.join(names)}" in text


class AddsInput(nn.Module):
    def __init__(self, add):
        super().__init__()
        self.body = nn.Conv2d(2, 2, 3, padding=1)
        self.bias = nn.Parameter(torch.randn(1, 2, 1, 1))
        self.add = add

    def forward(self, x):
        return self.add(self, x)


@pytest.mark.parametrize("add, expected", [
    (lambda m, x: x + m.body(x), True),
    (lambda m, x: torch.add(m.body(x), x), True),
    (lambda m, x: m.body(x).add_(x), True),
    (lambda m, x: m.body(x) + m.body(m.body(x)), True),   # two paths from the input join
    (lambda m, x: torch.relu(x + m.body(x)), True),       # handed out through an activation
    (lambda m, x: m.body(x) + m.bias, False),             # a bias is no shortcut
    (lambda m, x: m.body(x) * x, False),
    (lambda m, x: x * 2 + x.flip(1), False),              # no parameter on either path
])
def test_residual_add(add, expected):
    model = nn.Sequential(nn.Conv2d(3, 2, 1), AddsInput(add))
    assert residual_blocks(model, (torch.randn(1, 3, 4, 4),)) == (["1"] if expected else [])


def test_adding_two_different_inputs_is_no_shortcut():
    class Fuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.conv = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 1), nn.Conv2d(2, 2, 1)

        def forward(self, x, y):
            return self.conv(self.a(x)) + self.b(y)

    x = torch.randn(1, 3, 4, 4)
    assert residual_blocks(Fuse(), (x, x.clone())) == []


def test_shortcut_of_submodules_does_not_make_their_parent_a_block():
    class Stage(nn.Module):  # not a Sequential: its forward loops over residual blocks
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(models.BasicBlock(4, 4) for _ in range(3))

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Stage())
    x = torch.randn(2, 3, 5, 5)
    assert residual_blocks(model, (x,)) == ["1.blocks.0", "1.blocks.1", "1.blocks.2"]
    ffr = FFRLoss(model, example_inputs=x)  # the stream starts at the stage's input
    assert ffr.layer_names == ("0", "1.blocks.0", "1.blocks.1", "1.blocks.2")


def test_a_model_export_cannot_capture_is_named_with_the_way_out():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = models.BasicBlock(4, 4), models.BasicBlock(4, 4)

        def forward(self, x):
            return self.b(self.a(x)) if x.sum() > -1e30 else x  # data-dependent control flow

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), DataDependent()).train()
    ffr = FFRLoss(model)
    with pytest.raises(UncapturableModelError, match=r"failed in module '1' \(DataDependent\)"
                                                     r".*layers=\[\.\.\.\]"):
        model(torch.randn(2, 3, 5, 5))
    ffr.remove()
    ffr = FFRLoss(model, layers=["1.a", "1.b"])  # the way out the message names
    model(torch.randn(2, 3, 5, 5))
    assert [c.names for c in ffr.chains] == [("1.a", "1.b")]


def test_a_module_called_twice_gives_two_features():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    relu = nn.ReLU()

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.relu = conv, relu

        def forward(self, x):
            return self.relu(self.conv(self.relu(self.conv(x))))

    model = Shared()
    ffr = FFRLoss(model)
    model(torch.randn(2, 4, 5, 5))
    assert ffr.layer_names == ("relu", "relu#2")
    assert [c.names for c in ffr.chains] == [("relu", "relu#2")]


def test_split_into_chains():
    def capture(name, *shape, starts=False):
        return name, torch.randn(shape), 0, starts

    captured = [capture("a", 2, 3), capture("b", 2, 3), capture("c", 2, 4),
                capture("d", 2, 3), capture("e", 2, 3), capture("f", 2, 3), capture("g", 1, 3),
                capture("h", 2, 3), capture("i", 2, 3), capture("j", 2, 3, starts=True),
                capture("k", 2, 3)]
    chains = split_into_chains(captured)
    assert [c.names for c in chains] == [["a", "b"], ["d", "e", "f"], ["h", "i"], ["j", "k"]]
    assert [tuple(c.shape) for c in chains] == [(2, 3)] * 4
    assert chains[1].features[2] is captured[5][1]


def test_explicit_layers_by_name_and_module():
    model = models.resnet20()
    ffr = FFRLoss(model, layers=["layer2.1", model.layer2[2], "layer2.0"])
    assert ffr.layer_names == ("layer2.1", "layer2.2", "layer2.0")
    assert ffr.rule == "explicit layers"
    model(torch.randn(2, 3, 32, 32))
    assert [c.names for c in ffr.chains] == [("layer2.0", "layer2.1", "layer2.2")]


@pytest.mark.parametrize("layers, error, message", [
    (["layer1.0", "layer2.9"], ValueError, r"layers\[1\].*no submodule named 'layer2.9'"
                                           r".*close matches.*layer2.0"),
    ([nn.Conv2d(1, 1, 1)], ValueError, r"layers\[0\]: this Conv2d is not a submodule"),
    ([""], ValueError, r"the model itself"),
    (["layer1.0", "layer1.0"], ValueError, r"'layer1.0' is listed twice"),
    ([], ValueError, r"layers is empty"),
    ("layer1", TypeError, r"layers must be 'auto' or a list"),
    ([3], TypeError, r"layers\[0\] is a int"),
])
def test_bad_layers(layers, error, message):
    model = models.resnet20()
    with counted_forward_hooks() as hook_calls, pytest.raises(error, match=message):
        FFRLoss(model, layers=layers)
    model(torch.randn(1, 3, 32, 32))
    assert hook_calls == []  # nothing was left attached


def test_auto_without_flow_says_what_it_looked_for():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.Sigmoid())
    with pytest.raises(ValueError, match=r"found no feature flow in Sequential: it looked for "
                                         r"the residual stream.*conv-norm-activation.*"
                                         r"layers=\[") :
        FFRLoss(model, example_inputs=torch.randn(2, 12))


def test_layers_without_equal_shapes_form_no_chain():
    model = models.resnet20()
    ffr = FFRLoss(model, layers=["layer1.2", "layer2.0", "layer3.0"])
    model(torch.randn(2, 3, 32, 32))
    assert ffr.chains == [] and "none formed" in ffr.describe()
    with pytest.raises(ValueError, match=r"formed no chain.*'layer2.0', \(2, 32, 16, 16\)"):
        ffr()


def test_a_pruned_model_has_the_flow_of_its_original_and_can_be_pruned_again():
    import ffr_fast

    torch.manual_seed(0)
    model = models.resnet20().eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():  # shrink two branches to zero so the first prune removes blocks
        for block in (model.layer1[1], model.layer2[2]):
            block.conv2.weight.zero_()
            block.bn2.weight.zero_()
            block.bn2.bias.zero_()
    first = ffr_fast.prune(model, x[:1], threshold=0.0)
    assert first.report.removed_blocks
    pruned = first.model.train()
    ffr = FFRLoss(pruned, grad_weight=0.1, curv_weight=0.1)
    out = pruned(x)
    assert [len(chain.names) for chain in ffr.chains] == [3, 2, 3]  # a block gone in 1, 2
    # the features are the stem's and the surviving blocks' outputs, as the original
    # computes them
    surviving = [["stem.1", "layer1.0", "layer1.2"], ["layer2.0", "layer2.1"],
                 ["layer3.0", "layer3.1", "layer3.2"]]
    outputs = {}
    hooks = [model.get_submodule(name).register_forward_hook(
        lambda m, a, out, name=name: outputs.__setitem__(name, out.clone()))
        for chain in surviving for name in chain]
    model.train()(x)
    for hook in hooks:
        hook.remove()
    expected = sum(reference.flow_penalty([outputs[n] for n in chain], grad_weight=0.1,
                                          curv_weight=0.1) for chain in surviving)
    penalty = ffr()
    torch.testing.assert_close(penalty, expected, rtol=1e-4, atol=1e-6)
    (out.sum() + penalty).backward()
    assert pruned.get_submodule("layer3.0.conv1").weight.grad.abs().sum() > 0
    ffr.remove()
    second = ffr_fast.prune(pruned.eval(), x[:1], ratio=0.25)
    assert second.report.flops_after < first.report.flops_after


def test_explicit_blocks_of_a_graph_module_that_never_run_are_named():
    import ffr_fast

    torch.manual_seed(0)
    pruned = ffr_fast.prune(models.resnet20().eval(), torch.randn(1, 3, 32, 32),
                            ratio=0.2, emit="graph").model.train()
    with FFRLoss(pruned, layers=["layer1.0", "layer1.1"]), pytest.raises(
            RuntimeError, match=r"never called the hooked layers \['layer1.0', 'layer1.1'\]"
                                r".*GraphModule"):
        pruned(torch.randn(2, 3, 32, 32))


def test_a_traced_pre_norm_transformer_is_read_at_its_residual_adds():
    from ffr_fast.torchvision_loader import load_torchvision

    vision_transformer = load_torchvision().models.VisionTransformer
    torch.manual_seed(0)
    vit = vision_transformer(image_size=16, patch_size=4, num_layers=3, num_heads=2,
                             hidden_dim=16, mlp_dim=32, num_classes=10)
    traced = torch.fx.symbolic_trace(vit).train()
    ffr = FFRLoss(traced, curv_weight=0.5)
    x = torch.randn(2, 3, 16, 16)
    out = traced(x)
    (chain,) = ffr.chains  # the residual stream: its entry, after each attention and MLP
    assert len(chain.names) == 7 and chain.shape == (2, 17, 16)
    assert chain.names[0] == "encoder.dropout" and chain.names[-1] == "encoder.ln:input"
    penalty = ffr()
    # the same features read from the module model: the stream enters as the input of the
    # first ln_1, each block's input after attention is the input of ln_2, and each block's
    # output the input of the next ln_1 / final ln
    stream = []
    hooks = [m.register_forward_pre_hook(lambda m, a: stream.append(a[0]))
             for name, m in vit.named_modules()
             if name.endswith("ln_2") or name.endswith("ln_1") or name == "encoder.ln"]
    vit.train()
    vit(x)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(
        penalty, reference.flow_penalty(stream, grad_weight=1e-3, curv_weight=0.5))
    del out
