"""The training loop and the regularizers, on a few batches of the digits set."""
from dataclasses import replace

import pytest
import torch
from torch import nn

from ffr_fast import models
from ffr_fast.study import checkpoint, pipeline, regularizers, train
from ffr_fast.testing import counted_forward_hooks, outputs

TINY = train.TrainConfig(epochs=1, max_batches=2, batch_size=16, seed=0)


def test_slimming_penalty_is_weighted_l1_of_batchnorm_scales():
    model = models.resnet20(10, 1)
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(-2, 2)
    expected = sum(m.weight.abs().sum() for m in model.modules()
                   if isinstance(m, nn.BatchNorm2d)).item()
    penalty = regularizers.build(model, "slimming", weight=1e-3)
    assert penalty().item() == pytest.approx(1e-3 * expected, rel=1e-6)
    penalty().backward()
    bn = model.layer1[0].bn1
    assert torch.allclose(bn.weight.grad, 1e-3 * bn.weight.sign())


def test_regularizer_errors():
    model = models.resnet20(10, 1)
    with pytest.raises(ValueError, match="unknown regularizer 'dropout'"):
        regularizers.build(model, "dropout", 1.0)
    with pytest.raises(ValueError, match=">= 0"):
        regularizers.build(model, "slimming", -1.0)
    with pytest.raises(ValueError, match="BatchNorm layers.*has none"):
        regularizers.build(nn.Sequential(nn.Conv2d(1, 2, 3)), "slimming", 1.0)


@pytest.mark.parametrize("name, weight", [("none", 0.0), ("slimming", 1e-4), ("ffr", 1e-2),
                                          ("layerdrop", 0.2)])
def test_fit_records_history_and_releases_hooks(splits, name, weight):
    config = replace(TINY, regularizer=name, weight=weight)
    model = pipeline.seeded_model(config, splits)
    before = [p.detach().clone() for p in model.parameters()]
    with counted_forward_hooks() as hook_calls:
        result = train.fit(model, splits, config)
    assert [r["epoch"] for r in result.history] == [1] and not result.interrupted
    for record in result.history:
        assert 0 <= record["val_accuracy"] <= 1 and record["train_loss"] > 0
        assert (record["train_penalty"] > 0) == (name in ("slimming", "ffr"))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert bool(hook_calls) == (name in ("ffr", "layerdrop"))  # the regularizers that hook
    hook_calls.clear()
    outputs(model, splits.test[0][0][None])
    assert hook_calls == []  # hooks released


def test_bf16_autocast_on_cpu(splits):
    config = replace(TINY, amp="bf16", regularizer="ffr", weight=1e-2)
    with train.autocast(config, torch.device("cpu")):
        assert torch.mm(torch.randn(2, 2), torch.randn(2, 2)).dtype == torch.bfloat16
    result = train.fit(pipeline.seeded_model(config, splits), splits, config)
    assert torch.isfinite(torch.tensor(result.history[0]["train_loss"]))
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        train.fit(pipeline.seeded_model(config, splits), splits, replace(config, amp="fp16"))


def test_checkpoint_round_trip_keeps_weights_and_history(splits, tmp_path):
    result = train.fit(pipeline.seeded_model(TINY, splits), splits, TINY, out_dir=tmp_path)
    state = checkpoint.load(tmp_path / checkpoint.FILENAME)
    assert state["epoch"] == 1 and state["history"] == result.history
    assert state["config"]["max_batches"] == 2 and state["optimizer"] is not None
    rebuilt = checkpoint.build_model(state)
    assert train.parameter_digest(rebuilt) == train.parameter_digest(result.model)


def test_pruned_model_checkpoint_round_trip(splits, tmp_path):
    from ffr_fast.pruning import prune

    model = pipeline.seeded_model(TINY, splits).eval()
    result = prune(model, pipeline.example_inputs(splits), ratio=0.5)
    assert result.report.flops_after < 0.5 * result.report.flops_before
    checkpoint.save(tmp_path / "pruned.pt", result.model, TINY)
    rebuilt = checkpoint.build_model(checkpoint.load(tmp_path / "pruned.pt")).eval()
    x = torch.randn(3, 1, 16, 16)
    assert torch.allclose(rebuilt(x), result.model.eval()(x), atol=1e-5)


def test_parameter_digest_sees_one_changed_weight():
    model = models.resnet20(10, 1)
    digest = train.parameter_digest(model)
    with torch.no_grad():
        model.fc.bias[3] += 1e-6
    assert train.parameter_digest(model) != digest


def test_structured_sparsity_counts_zeroed_filters_and_scales():
    model = models.resnet20(10, 1)
    with torch.no_grad():
        model.layer1[0].conv1.weight[:4] = 0
        model.layer1[0].bn1.weight[:8] = 1e-3
    sparsity = pipeline.structured_sparsity(model, 1e-2)
    filters = sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)) + 10
    scales = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert sparsity["filters_below"] == pytest.approx(4 / filters)
    assert sparsity["bn_scales_below"] == pytest.approx(8 / scales)
