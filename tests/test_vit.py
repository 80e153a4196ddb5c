"""The study's small ViT (torchvision's VisionTransformer, configured for 16x16 digits):
it trains with every regularizer that applies, and its branches leave through the public
pruner with a verified result."""
import copy
from dataclasses import replace

import pytest
import torch

from ffr_fast import models
from ffr_fast.pruning import prune, residual_branches
from ffr_fast.study import data, pipeline, train
from ffr_fast.testing import counted_forward_hooks, outputs

STEP = train.TrainConfig(model="vit_tiny", epochs=1, max_batches=1, batch_size=16, seed=0)


def test_vit_tiny_is_torchvisions_encoder_for_16x16_digits():
    model = models.create("vit_tiny", 10, 1)
    assert type(model).__name__ == "VisionTransformer" and len(model.encoder.layers) == 8
    assert model(torch.randn(3, 1, 16, 16)).shape == (3, 10)
    with pytest.raises(ValueError, match="cannot take digits images of shape \\(1, 24, 24\\)"):
        pipeline.seeded_model(STEP, data.load_digits(size=24))


@pytest.mark.parametrize("name, weight", [("none", 0.0), ("ffr", 0.1), ("layerdrop", 0.3)])
def test_vit_trains_a_step_with_each_regularizer(splits, name, weight):
    config = replace(STEP, regularizer=name, weight=weight)
    model = pipeline.seeded_model(config, splits)
    before = [p.detach().clone() for p in model.parameters()]
    with counted_forward_hooks() as hook_calls:
        result = train.fit(model, splits, config, progress=False)
    record = result.history[0]
    assert torch.isfinite(torch.tensor(record["train_loss"]))
    assert (record["train_penalty"] > 0) == (name == "ffr")
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert bool(hook_calls) == (name != "none")
    hook_calls.clear()
    outputs(model, splits.test[0][0][None])
    assert hook_calls == []  # hooks released


def test_slimming_on_the_vit_is_refused(splits):
    config = replace(STEP, regularizer="slimming", weight=1e-3)
    with pytest.raises(ValueError, match="BatchNorm layers with affine scales; the model has"):
        train.fit(pipeline.seeded_model(config, splits), splits, config, progress=False)


def _zero_branch(model, branch) -> None:
    """Zero the last layer of a ViT branch: the attention's out_proj or the MLP's second
    linear layer, weights and biases, so that the branch adds exactly zero."""
    for name in branch.modules:
        if name.endswith("self_attention"):
            layer = model.get_submodule(name).out_proj
        elif name.endswith("mlp.3"):
            layer = model.get_submodule(name)
        else:
            continue
        with torch.no_grad():
            layer.weight.zero_()
            layer.bias.zero_()
        return
    raise AssertionError(f"branch {branch.name} has neither attention nor MLP: {branch.modules}")


def test_vit_branch_removal_equals_the_zeroed_branches():
    torch.manual_seed(0)
    model = models.create("vit_tiny", 10, 1).eval()
    torch.nn.init.normal_(model.heads.head.weight)  # torchvision starts it at zero
    images = torch.randn(32, 1, 16, 16)
    branches = residual_branches(model, (images,), unit="branch")
    assert len(branches) == 16  # an attention and an MLP branch per encoder block
    assert all(b.flops > 0 for b in branches)
    lowest = sorted(branches, key=lambda b: b.influence)[:5]
    result = prune(model, (images,), remove_branches=[b.name for b in lowest])
    zeroed = copy.deepcopy(model)
    for branch in lowest:
        _zero_branch(zeroed, branch)
    x = torch.randn(8, 1, 16, 16)
    expected = zeroed(x)
    assert torch.allclose(result.model(x), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model(x), expected, atol=1e-3)  # the branches mattered
    assert result.report.params_after < result.report.params_before
    assert result.report.flops_after < result.report.flops_before


def test_vit_feature_flow_has_one_step_per_encoder_block(splits):
    model = pipeline.seeded_model(STEP, splits)
    flow = pipeline.feature_flow(model, splits.test, max_batches=1)
    assert len(flow) == 8 and all(step is not None and step > 0 for step in flow.values())
