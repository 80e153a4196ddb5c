"""FFRLoss where a probe found it silently wrong: in-place writes after a hooked layer of a
compiled model, layers that return a tuple, several forwards (training, or inference in
between) before one ffr(), and infinite weights."""
import math
import warnings

import pytest
import torch
from torch import nn

from ffr_fast import FFRLoss, models
from ffr_fast.flow import reference
from ffr_fast.testing import counted_forward_hooks

OPTIONS = dict(grad_weight=0.3, curv_weight=0.7)


def block_then_inplace_relu():
    """conv, block 1, ReLU(inplace=True), blocks 3 and 4: the ReLU overwrites block 1's
    output, which can be negative (its own final ReLU is removed)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), models.BasicBlock(4, 4),
                          nn.ReLU(inplace=True), models.BasicBlock(4, 4),
                          models.BasicBlock(4, 4))
    model[1].relu = nn.Identity()
    return model.train()


@torch.compiler.disable
def run_eagerly(x):
    return x


class BreaksTheGraph(nn.Module):
    """A residual block whose forward torch.compile cannot trace whole (a graph break)."""

    def __init__(self, width=4):
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x):
        return x + run_eagerly(self.conv(x))


def test_a_compiled_model_that_overwrites_a_hooked_output_is_refused():
    model = block_then_inplace_relu()
    ffr = FFRLoss(torch.compile(model))  # the layers are found in the compiled forward
    torch.compile(model)(torch.randn(2, 3, 8, 8))
    assert ffr.layer_names == ("0", "1", "3", "4")
    with pytest.raises(RuntimeError, match=r"outputs of \['1'\] were modified in place"):
        ffr()


def test_a_compiled_model_with_graph_breaks_gives_the_eager_penalty():
    """The hooks run between compiled graphs, where a graph break is too: no false alarm."""
    torch.manual_seed(0)
    model = nn.Sequential(*[BreaksTheGraph() for _ in range(3)]).train()
    x = torch.randn(2, 4, 6, 6)
    ffr = FFRLoss(model, **OPTIONS)
    model(x)
    eager = ffr()
    torch.compile(model)(x)
    torch.testing.assert_close(ffr(), eager)


HIDDEN = object()  # TupleBlock's default first element: its hidden state


class TupleBlock(nn.Module):
    """A residual block that returns (hidden state, auxiliary output), as transformer layers
    that return attention weights do."""

    def __init__(self, width=4):
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.first = HIDDEN  # or what to return first, before the hidden state

    def forward(self, x):
        y = x + torch.relu(self.conv(x))
        aux = y.mean()
        return (y, aux) if self.first is HIDDEN else (self.first, y)


class TupleNet(nn.Module):
    def __init__(self, blocks=4):
        super().__init__()
        self.blocks = nn.ModuleList(TupleBlock() for _ in range(blocks))

    def forward(self, x):
        for block in self.blocks:
            x, _ = block(x)
        return x


def hidden_states(model):
    """Records each block's hidden state (a detached clone) at every forward."""
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, i, out: seen.append(out[0].detach().clone()))
    return seen


BLOCKS = ("blocks.0", "blocks.1", "blocks.2", "blocks.3")


# layers="auto" also reads the stream where it enters: the model's input, here
@pytest.mark.parametrize("layers, entry", [("auto", ("blocks.0:input",)), (list(BLOCKS), ())])
def test_a_layer_that_returns_a_tuple_gives_its_first_element(layers, entry):
    torch.manual_seed(0)
    model = TupleNet().train()
    x = torch.randn(2, 4, 6, 6)
    ffr = FFRLoss(model, layers=layers, example_inputs=x, **OPTIONS)
    assert ffr.layer_names == entry + BLOCKS
    seen = hidden_states(model)
    model(x)
    penalty = ffr()
    assert [chain.names for chain in ffr.chains] == [ffr.layer_names]  # no step skipped
    expected = reference.flow_penalty([x] * len(entry) + seen, **OPTIONS)
    torch.testing.assert_close(penalty, expected)


@pytest.mark.parametrize("first, found", [(None, "whose first element is a NoneType"),
                                          ("state", "whose first element is a str")])
def test_a_layer_whose_output_holds_no_tensor_first_is_refused_by_name(first, found):
    model = TupleNet().train()
    model.blocks[2].first = first  # the other blocks return (hidden state, aux)
    ffr = FFRLoss(model, layers=["blocks.0", "blocks.1", "blocks.2", "blocks.3"])
    with pytest.raises(TypeError, match=rf"layer 'blocks.2' gave a tuple {found} as its output"):
        model(torch.randn(2, 4, 6, 6))
    with pytest.raises(RuntimeError, match="before any forward"):
        ffr()  # nothing half-captured is left behind


def test_no_chain_names_the_hooked_layers_and_their_shapes():
    torch.manual_seed(0)
    model = models.resnet20().train()
    ffr = FFRLoss(model, layers=["layer1.2", "layer2.0", "layer3.0"])
    model(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError) as error:
        ffr()
    message = str(error.value)
    assert "hooked 3 explicit layers: ['layer1.2', 'layer2.0', 'layer3.0'], which gave" in message
    assert "('layer2.0', (2, 32, 16, 16))" in message and "no two consecutive" in message


def penalty_of_one_forward(model, x):
    """The penalty and parameter gradients of a single forward, by a loss of its own."""
    with FFRLoss(model, **OPTIONS) as ffr:
        model(x)
        penalty = ffr()
    return penalty, torch.autograd.grad(penalty, list(model.parameters()), allow_unused=True)


def test_every_training_forward_since_the_last_ffr_is_penalised():
    torch.manual_seed(0)
    model = models.resnet20().train()
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)]
    alone = [penalty_of_one_forward(model, crop) for crop in crops]
    ffr = FFRLoss(model, **OPTIONS)
    for crop in crops:
        model(crop)
    penalty = ffr()
    torch.testing.assert_close(penalty, alone[0][0] + alone[1][0])
    grads = torch.autograd.grad(penalty, list(model.parameters()), allow_unused=True)
    for got, first, second in zip(grads, alone[0][1], alone[1][1]):
        if first is not None:
            torch.testing.assert_close(got, first + second, rtol=1e-4, atol=1e-7)
    with pytest.raises(RuntimeError, match="already called"):
        ffr()  # both forwards were consumed


@pytest.mark.parametrize("mode", ["eval", "no_grad"])
def test_an_inference_forward_neither_captures_nor_erases(mode):
    torch.manual_seed(0)
    model = models.resnet20().train()
    x = torch.randn(2, 3, 32, 32)
    expected, _ = penalty_of_one_forward(model, x)
    ffr = FFRLoss(model, **OPTIONS)
    model(x)
    if mode == "eval":
        model.eval()
        model(torch.randn(2, 3, 32, 32))  # logging, an EMA update, ...
        model.train()
    else:
        with torch.no_grad():
            model(torch.randn(2, 3, 32, 32))
    penalty = ffr()
    assert penalty.requires_grad
    torch.testing.assert_close(penalty, expected)


def test_training_forwards_without_ffr_are_named_once():
    model = nn.Sequential(*[BreaksTheGraph() for _ in range(2)]).train()
    ffr = FFRLoss(model, curv_weight=0.0)
    x = torch.randn(1, 4, 3, 3)
    with pytest.warns(UserWarning, match="holds the features of 17 training forwards"):
        for _ in range(17):
            model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)
    assert ffr() > 0


@pytest.mark.parametrize("option, message", [
    (dict(grad_weight=math.inf), r"grad_weight must be a finite number >= 0, got inf"),
    (dict(curv_weight=math.inf), r"curv_weight must be a finite number >= 0, got inf"),
    (dict(chain_weights=[1.0, math.inf, 1.0]),
     r"chain_weights must be finite numbers >= 0, got \[1.0, inf, 1.0\]"),
    (dict(eps=math.inf), r"eps must be a finite number > 0, got inf")])
def test_infinite_weights_are_refused(option, message):
    model = models.resnet20()
    with counted_forward_hooks() as hook_calls, pytest.raises(ValueError, match=message):
        FFRLoss(model, **option)
    model(torch.randn(1, 3, 32, 32))
    assert hook_calls == []  # nothing was left attached
