"""prune(inplace=True) on the torch.export path: the model itself is pruned (its blocks
removed, channels cut, BatchNorms folded) and handed back, never copied, to the same
result as on a copy; a removal that is not exact gives the blocks back, and a failure after
the model changed says so (PrunedInPlaceError) instead of going on to torch.fx."""
import pytest
import torch

from ffr_fast import models, prune
from ffr_fast.pruning import PrunedInPlaceError, PrunedModelError
from ffr_fast.testing import assert_unchanged, outputs, snapshot
from ffr_fast.torchvision_loader import load_torchvision

from nets import FixedView, kill_channels, look_trained, post_norm_bert

load_torchvision()  # before transformers, on a CPU-only torch
transformers = pytest.importorskip("transformers")

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def same_report(a, b):
    """Every number and name of two reports alike (not the time they took)."""
    a, b = a.to_dict(), b.to_dict()
    a.pop("seconds"), b.pop("seconds")
    assert a == b


def resnet_with_a_dead_block():
    model = look_trained(models.resnet18(width=8))
    kill_channels(model, "layer1.1.bn2", list(range(8)))  # the block's branch emits zero
    return model


@pytest.mark.parametrize("fold_bn", [False, True])
def test_a_resnet_is_pruned_in_place_as_its_copy_would_be(fold_bn):
    model = resnet_with_a_dead_block()
    before = snapshot(model)
    on_copy = prune(model, X, ratio=0.3, fold_bn=fold_bn)
    assert_unchanged(model, before)
    result = prune(model, X, ratio=0.3, fold_bn=fold_bn, inplace=True)
    assert result.model is model and type(model) is models.ResNet
    assert result.report.settings["path"] == "torch.export"  # "auto" stays on export
    assert [b["block"] for b in result.report.removed_blocks] == ["layer1.1"]
    assert len(model.layer1) == 1 and model.layer1[0].conv1.out_channels < 8
    same_report(result.report, on_copy.report)
    torch.testing.assert_close(outputs(model, X), outputs(on_copy.model, X), rtol=0, atol=0)
    assert result.report.relative_diff <= 1e-5 and result.report.params_after < sum(
        tensor.numel() for tensor in before.values() if tensor.is_floating_point())


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config).eval()


IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_a_llama_is_pruned_in_place_its_config_in_step():
    model = tiny_llama()
    options = dict(ratio=0.25, scope="layer", remove_branches=["model.layers.2"])
    on_copy = prune(model, IDS, **options)
    result = prune(model, IDS, **options, inplace=True)
    assert result.model is model and result.report.settings["path"] == "torch.export"
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    assert model.config.intermediate_size == on_copy.model.config.intermediate_size < 64
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    same_report(result.report, on_copy.report)
    torch.testing.assert_close(logits(model), logits(on_copy.model), rtol=0, atol=0)


def test_a_flops_search_in_place_cuts_the_chosen_candidate_into_the_model():
    model = tiny_llama()
    options = dict(flops_target=0.7, flops_search="ratio", flops_tolerance=0.05, scope="layer")
    on_copy = prune(model, IDS, **options)
    result = prune(model, IDS, **options, inplace=True)
    assert result.model is model
    same_report(result.report, on_copy.report)
    torch.testing.assert_close(logits(model), logits(on_copy.model), rtol=0, atol=0)


def test_a_removal_that_is_not_exact_gives_the_model_its_blocks_back():
    bert = post_norm_bert()
    before, layers = snapshot(bert), list(bert.encoder.layer)
    with pytest.raises(ValueError, match="not exact"):
        prune(bert, IDS, remove_branches=["encoder.layer.1"], inplace=True)
    assert list(bert.encoder.layer) == layers and bert.config.num_hidden_layers == 2
    assert_unchanged(bert, before)
    # chosen by its score, the block stays (as on a copy) and the channels are cut
    on_copy = prune(bert, IDS, ratio=0.25, scope="layer")
    result = prune(bert, IDS, ratio=0.25, scope="layer", inplace=True)
    assert result.model is bert and len(bert.encoder.layer) == 2
    assert bert.encoder.layer[1] is layers[1]
    assert result.report.max_abs_diff == on_copy.report.max_abs_diff
    with torch.no_grad():
        torch.testing.assert_close(bert(IDS).last_hidden_state,
                                   on_copy.model(IDS).last_hidden_state, rtol=0, atol=0)


def test_a_failure_after_the_model_changed_says_so_and_does_not_go_on_to_fx():
    """x.view(n, 8, -1) in the model's own forward: the export path's cut fails its check
    (on a copy, "auto" then goes on to torch.fx); in place the model is cut already."""
    model = FixedView(literal=True)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert prune(model, x, ratio=0.5, scope="layer").report.settings["path"] == "torch.fx"
    with pytest.raises(PrunedInPlaceError, match="pruned in place and is now in an "
                                                 "inconsistent state") as caught:
        prune(model, x, ratio=0.5, scope="layer", inplace=True)
    assert isinstance(caught.value, PrunedModelError)
    assert isinstance(caught.value.__cause__, PrunedModelError)
    assert model.conv1.out_channels == 4  # the state the message warns of


def test_without_a_channel_cut_the_blocks_leave_the_model_itself():
    model = tiny_llama()
    on_copy = prune(model, IDS, remove_branches=["model.layers.0", "model.layers.3"])
    result = prune(model, IDS, remove_branches=["model.layers.0", "model.layers.3"],
                   inplace=True)
    assert result.model is model and model.config.num_hidden_layers == 2
    same_report(result.report, on_copy.report)
    torch.testing.assert_close(logits(model), logits(on_copy.model), rtol=0, atol=0)
