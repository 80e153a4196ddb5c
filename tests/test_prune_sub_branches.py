"""Residual branches that leave alone on the torch.export path (pruning/sub_branches.py): an
attention or MLP in its layer, a block with a projection shortcut. The model keeps its own
class, a stand-in module takes the branch's place, the cut is verified against the model
with the branch's parameters zeroed, and save_pruned/load_pruned replays it."""
import copy

import pytest
import torch

import ffr_fast
from ffr_fast.pruning import load_pruned, prune, residual_branches, save_pruned
from ffr_fast.pruning.sub_branches import RemovedBranch, ShortcutOnly
from ffr_fast.testing import outputs, relative_error
from ffr_fast.torchvision_loader import load_torchvision

from nets import look_trained

tv = load_torchvision()
X = torch.randn(2, 3, 32, 32)


def resnet18():
    torch.manual_seed(0)
    return look_trained(tv.models.resnet18(num_classes=10))


def zeroed(model, prefixes, keep=()):
    """`model` with every parameter under `prefixes` zeroed, those under `keep` aside."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, parameter in twin.named_parameters():
            if any(name.startswith(p + ".") for p in prefixes) and not any(
                    name.startswith(k + ".") for k in keep):
                parameter.zero_()
    return twin


def test_a_projection_block_becomes_its_shortcut_and_loads_again(tmp_path):
    model = resnet18()
    result = prune(model, X, remove_branches=["layer3.0"])
    block = result.model.layer3[0]
    assert isinstance(result.model, type(model)) and isinstance(block, ShortcutOnly)
    assert "layer3.0.downsample.0.weight" in result.model.state_dict()
    reference = zeroed(model, ["layer3.0"], keep=["layer3.0.downsample"])
    assert relative_error(outputs(result.model, X), outputs(reference, X)) <= 1e-5
    [listed] = [b for b in residual_branches(model, X) if b.name == "layer3.0"]
    assert result.report.flops_before - result.report.flops_after == listed.flops
    save_pruned(result, tmp_path / "r18.pt")
    loaded = load_pruned(tmp_path / "r18.pt", resnet18)
    assert torch.equal(outputs(loaded, X), outputs(result.model, X))
    # the pruned model still trains: its shortcut gets gradients
    result.model.train()
    result.model(X).square().mean().backward()
    assert block.downsample[0].weight.grad is not None


def test_a_branch_and_a_block_go_together_and_in_place():
    model = resnet18()
    original = copy.deepcopy(model)
    result = prune(model, X, remove_branches=["layer2.0", "layer4.1"], inplace=True)
    assert result.model is model and isinstance(model.layer2[0], ShortcutOnly)
    assert len(model.layer4) == 1
    reference = zeroed(original, ["layer2.0", "layer4.1"], keep=["layer2.0.downsample"])
    assert relative_error(outputs(model, X), outputs(reference, X)) <= 1e-5


def test_naming_a_branch_inside_a_named_block_is_refused():
    model = resnet18()
    vit = tv.models.VisionTransformer(32, 8, 2, 2, 16, 32, num_classes=10).eval()
    with pytest.raises(ValueError, match=r"lie inside other branches"):
        prune(vit, X, remove_branches=["encoder.layers.encoder_layer_0",
                                       "encoder.layers.encoder_layer_0.mlp"])
    with pytest.raises(ValueError, match=r"no residual branch named \['layer2.0.conv1'\]"):
        prune(model, X, remove_branches=["layer2.0.conv1"])


def test_timm_vit_attention_and_mlp_leave_alone():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                              patch_size=8, depth=2, num_classes=10, init_values=0.5).eval()
    x = torch.randn(2, 3, 32, 32)
    branches = residual_branches(model, x, unit="branch")
    assert [b.name for b in branches] == ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn",
                                          "blocks.1.mlp"]
    removed = ["blocks.0.mlp", "blocks.1.attn"]
    result = prune(model, x, remove_branches=removed)
    assert isinstance(result.model.blocks[1].attn, RemovedBranch)
    assert result.report.flops_before - result.report.flops_after == sum(
        b.flops for b in branches if b.name in removed)
    reference = zeroed(model, removed)
    assert relative_error(outputs(result.model, x), outputs(reference, x)) <= 1e-5


def test_a_decoders_attention_leaves_and_its_cache_is_refused():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    names = [b.name for b in residual_branches(model, ids, unit="branch")]
    assert names[:2] == ["model.layers.0.self_attn", "model.layers.0.mlp"]
    removed = ["model.layers.1.self_attn", "model.layers.2.mlp"]
    result = ffr_fast.prune(model, ids, remove_branches=removed)
    assert type(result.model) is type(model)
    assert result.model.config.num_hidden_layers == 3
    assert any("save_pretrained" in w for w in result.report.warnings)
    reference = zeroed(model, removed)
    with torch.no_grad():
        torch.testing.assert_close(result.model(ids, use_cache=False).logits,
                                   reference(ids, use_cache=False).logits)
    settings = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with pytest.raises(RuntimeError, match="key/value cache"):
        result.model.generate(ids, **settings)
    assert torch.equal(result.model.generate(ids, use_cache=False, **settings),
                       reference.generate(ids, use_cache=False, **settings))
