"""FFRLoss where an adversarial probe found it silently wrong or crashing: layers run without
gradients inside a training forward, curvature asked of chains too short to have one, and
copies or pickles of a model taken while features are captured."""
import copy
import io
import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ffr_fast import FFRLoss, models


class Block(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x):
        return x + torch.relu(self.conv(x))


class CheckpointedNet(nn.Module):
    """Four residual blocks, each run under checkpoint() unless use_reentrant is None."""

    def __init__(self, use_reentrant):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(4))
        self.use_reentrant = use_reentrant

    def forward(self, x):
        for block in self.blocks:
            if self.use_reentrant is None:
                x = block(x)
            else:
                x = checkpoint(block, x, use_reentrant=self.use_reentrant)
        return x


def test_reentrant_checkpointing_is_refused_with_the_way_out():
    torch.manual_seed(0)
    model = CheckpointedNet(use_reentrant=True).train()
    ffr = FFRLoss(model, curv_weight=1.0)
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        model(x)
    with pytest.raises(RuntimeError, match="before any forward"):
        ffr()  # nothing half-captured is left behind


def test_non_reentrant_checkpointing_trains_the_checkpointed_layers():
    torch.manual_seed(0)
    model = CheckpointedNet(use_reentrant=False).train()
    plain = copy.deepcopy(model)
    plain.use_reentrant = None
    x = torch.randn(2, 4, 6, 6)
    grads = []
    for net in (model, plain):
        ffr = FFRLoss(net, grad_weight=1.0, curv_weight=1.0,
                      layers=[f"blocks.{i}" for i in range(4)])
        net(x)
        ffr().backward()
        grads.append(net.blocks[0].conv.weight.grad.clone())
        ffr.remove()
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


def test_curvature_weight_on_chains_of_two_is_named_once():
    torch.manual_seed(0)
    model = models.resnet18(width=8).train()
    two_chains_of_two = ["layer2.0", "layer2.1", "layer3.0", "layer3.1"]
    ffr = FFRLoss(model, curv_weight=1.0, layers=two_chains_of_two)
    with pytest.warns(UserWarning, match="curvature needs 3"):
        model(torch.randn(2, 3, 64, 64))
    ffr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per loss, not once per step
        model(torch.randn(2, 3, 64, 64))
        ffr()
    ffr.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ffr = FFRLoss(model, curv_weight=0.0, layers=two_chains_of_two)
        model(torch.randn(2, 3, 64, 64))
        assert ffr() > 0


def test_deepcopy_and_pickle_between_forward_and_ffr():
    torch.manual_seed(0)
    model = models.resnet20().train()
    ffr = FFRLoss(model)
    x = torch.randn(2, 3, 32, 32)
    model(x)
    twin = copy.deepcopy(model)  # failed with "Only Tensors created explicitly by the user"
    buffer = io.BytesIO()
    torch.save(model, buffer)
    saved_with_hooks = buffer.tell()
    penalty = ffr()  # the original's pending forward is intact
    assert penalty > 0
    ffr.remove()
    plain = io.BytesIO()
    torch.save(model, plain)
    # no captured activations in the pickle: a few kB of hook state at most
    assert saved_with_hooks - plain.tell() < 16_000
    # the copy is a working model with its own, fresh loss attached to it
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b) and a is not b
    # the copy's loss is reachable only through the hooks deepcopy gave the copy
    twin_ffr = next(hook for hook in twin._forward_hooks.values()).__self__
    assert twin_ffr.model is twin
    with pytest.raises(RuntimeError, match="before any forward"):
        twin_ffr()
    twin(x)
    torch.testing.assert_close(twin_ffr(), penalty)
