"""prune() on the torch.export capture with the options the torch.fx path had alone: FLOPs
targets, residual blocks removed together with channel cuts (by name and by score),
importance folded through batch norms, "bn" importance, ignored modules, and save_pruned /
load_pruned replaying all of it on the original architecture. Each result is checked
against what it claims: the FLOPs kept, the output of the original with the removed parts
zeroed, the outputs of the reloaded model."""
import copy

import pytest
import torch
from torch import nn

import ffr_fast
from ffr_fast.pruning import ExampleInputError
from ffr_fast.torchvision_loader import load_torchvision

from nets import post_norm_bert

torchvision = load_torchvision()  # before transformers, on a CPU-only torch
transformers = pytest.importorskip("transformers")


class Block(nn.Module):
    """x + bn(conv(relu(conv(x)))): its branch emits exactly zero when the last BN's affine
    map is zero."""

    def __init__(self, width):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(width, width, 3, padding=1), nn.Conv2d(width, width, 3,
                                                                            padding=1)
        self.bn = nn.BatchNorm2d(width)

    def forward(self, x):
        return x + self.bn(self.c2(torch.relu(self.c1(x))))


class StackNet(nn.Module):
    def __init__(self, width=8, depth=3):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(width)
        self.blocks = nn.Sequential(*[Block(width) for _ in range(depth)])
        self.head = nn.Linear(width, 5)

    def forward(self, x):
        x = self.blocks(torch.relu(self.stem_bn(self.stem(x))))
        return self.head(x.mean((2, 3)))


def stack_net(seed=0):
    torch.manual_seed(seed)
    model = StackNet()
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


def image(seed=0):
    return torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(seed))


def test_a_block_that_emits_zero_goes_with_the_channel_cut():
    model = stack_net()
    with torch.no_grad():  # the branch of block 1 emits zero: its last BN maps to 0
        dead = model.blocks[1].bn
        dead.weight.zero_()
        dead.bias.zero_()
        dead.running_mean.zero_()
    x = image()
    result = ffr_fast.prune(model, x, ratio=0.25, scope="layer", analysis="export")
    report = result.report
    assert [b["block"] for b in report.removed_blocks] == ["blocks.1"]
    assert len(result.model.blocks) == 2 and report.removed_classes > 0
    assert report.relative_diff < 1e-5
    with torch.no_grad():  # the block contributed nothing: only the channel cut differs
        kept_blocks = ffr_fast.prune(model, x, ratio=0.25, scope="layer", analysis="export",
                                     remove_blocks=False)
        assert len(kept_blocks.model.blocks) == 3
        torch.testing.assert_close(result.model(x), kept_blocks.model(x), rtol=1e-4,
                                   atol=1e-5)
        assert report.flops_after < kept_blocks.report.flops_after


class Stage(nn.Module):
    """Blocks held as attributes, not in a container (timm's RegNet stages)."""

    def __init__(self, width=8):
        super().__init__()
        self.b1, self.b2 = Block(width), Block(width)

    def forward(self, x):
        return self.b2(self.b1(x))


def test_a_block_held_as_an_attribute_becomes_an_identity(tmp_path):
    model = stack_net()
    model.blocks[1] = Stage()
    model.eval()
    with torch.no_grad():  # the branch of blocks.1.b2 emits zero
        dead = model.blocks[1].b2.bn
        dead.weight.zero_()
        dead.bias.zero_()
        dead.running_mean.zero_()
    x = image()
    result = ffr_fast.prune(model, x, threshold=0.0)
    assert result.report.settings["path"] == "torch.export"
    assert [b["block"] for b in result.report.removed_blocks] == ["blocks.1.b2"]
    assert isinstance(result.model.blocks[1].b2, nn.Identity)
    assert result.report.relative_diff < 1e-5 and result.report.flops_after < \
        result.report.flops_before
    ffr_fast.save_pruned(result, tmp_path / "p.pt")
    loaded = ffr_fast.load_pruned(tmp_path / "p.pt", model)
    assert isinstance(loaded.blocks[1].b2, nn.Identity)
    torch.testing.assert_close(loaded(x), result.model(x))


def test_threshold_zero_removes_exactly_the_channels_that_emit_zero():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 1))
    conv, bn = model[0], model[1]
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        for channel in (0, 1):  # both filters dead ...
            conv.weight[channel].zero_()
            conv.bias[channel] = 0.0
        # ... but the BN still shifts channel 0 (by bias - mean * scale), not channel 1
        scale = bn.weight[1] / torch.sqrt(bn.running_var[1] + bn.eps)
        bn.bias[1] = bn.running_mean[1] * scale
        bn.bias[0] = 0.3
    model.eval()
    for analysis in ("fx", "export"):
        report = ffr_fast.prune(model, image(), threshold=0.0, analysis=analysis).report
        assert report.channels["0"] == (6, 5), analysis
        assert report.max_abs_diff_original < 1e-6, analysis


def test_bn_importance_and_folded_scores_match_the_fx_path():
    model = stack_net()
    x = image()
    for importance in ("l2", "l1", "bn"):
        reports = [ffr_fast.prune(model, x, ratio=0.5, importance=importance,
                                  analysis=analysis, remove_blocks=False).report
                   for analysis in ("fx", "export")]
        fx_channels, export_channels = reports[0].channels, reports[1].channels
        assert export_channels == {k: fx_channels[k] for k in export_channels}, importance
        assert reports[1].relative_diff < 1e-5


@pytest.mark.parametrize("search", ["ratio", "threshold"])
def test_a_flops_target_is_met_on_the_export_capture(search):
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    result = ffr_fast.prune(model, x, flops_target=0.5, flops_search=search,
                            flops_tolerance=0.05, analysis="export")
    report = result.report
    kept = report.flops_after / report.flops_before
    assert 0.45 <= kept <= 0.5, kept
    assert report.settings["path"] == "torch.export" and report.relative_diff < 1e-5
    with torch.no_grad():  # the FLOPs the report states are the pruned model's own
        assert ffr_fast.metrics.count_flops(result.model, x) == report.flops_after


def test_an_ignored_module_keeps_its_channels_on_the_export_capture():
    model = stack_net()
    x = image()
    result = ffr_fast.prune(model, x, ratio=0.5, scope="layer", analysis="export",
                            ignored=["blocks.0"], remove_blocks=False)
    channels = result.report.channels
    assert channels["blocks.0.c1"] == (8, 8) and channels["blocks.0.c2"] == (8, 8)
    assert channels["blocks.1.c1"][1] < 8
    with pytest.raises(ValueError, match="no submodule"):
        ffr_fast.prune(model, x, ratio=0.5, analysis="export", ignored=["nowhere"])
    names = [b.name for b in ffr_fast.residual_branches(model, x, ignored=["blocks.0"],
                                                        analysis="export")]
    assert names == ["blocks.1", "blocks.2"]


def test_inputs_the_model_cannot_run_are_named_as_such():
    """Not as a capture failure: the shapes, the module and the model's own error."""
    model = stack_net()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ExampleInputError, match=r"\(2, 5, 12, 12\).*expected input"):
        ffr_fast.prune(model, torch.randn(2, 5, 12, 12), ratio=0.5, analysis="export")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_export_analysis_names_a_branch_it_does_not_have():
    model = stack_net()
    with pytest.raises(ValueError, match="no residual branch named"):
        ffr_fast.prune(model, image(), ratio=0.5, analysis="export",
                       remove_branches=["blocks.7"])


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config).eval()


def test_width_and_depth_together_then_saved_and_loaded(tmp_path):
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    result = ffr_fast.prune(model, ids, ratio=0.5, scope="layer",
                            remove_branches=["model.layers.1"])
    pruned, report = result.model, result.report
    assert report.settings["path"] == "torch.export"
    assert [b["block"] for b in report.removed_blocks] == ["model.layers.1"]
    assert pruned.config.num_hidden_layers == 2 and pruned.config.intermediate_size == 64
    assert pruned.config.num_key_value_heads == 1 and report.relative_diff < 1e-5
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1]
    assert report.flops_before == ffr_fast.metrics.count_flops(model, ids)
    path = tmp_path / "pruned.pt"
    ffr_fast.save_pruned(result, path)
    loaded = ffr_fast.load_pruned(path, tiny_llama)
    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, pruned(ids).logits)
        assert torch.equal(loaded.generate(ids, **settings), pruned.generate(ids, **settings))
    pruned.save_pretrained(tmp_path / "hf")
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, pruned(ids).logits)


def test_load_pruned_names_an_architecture_that_does_not_match(tmp_path):
    model = stack_net()
    path = tmp_path / "pruned.pt"
    ffr_fast.save_pruned(ffr_fast.prune(model, image(), ratio=0.5, analysis="export"), path)
    loaded = ffr_fast.load_pruned(path, stack_net)
    with torch.no_grad():
        torch.testing.assert_close(loaded(image()), ffr_fast.load_pruned(path, model)(image()))
    with pytest.raises(ValueError, match="does not match the architecture"):
        ffr_fast.load_pruned(path, lambda: torchvision.models.resnet18())


def test_the_hidden_size_is_cut_through_rms_norms_exactly(tmp_path):
    """Llama's and Qwen's RMS norms lose channels with their weight and eps rescaled (the mean
    of squares over the kept channels equals the original's over all, the removed ones
    zero): the residual stream narrows and the cut stays exact."""
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    llama = tiny_llama()
    result = ffr_fast.prune(llama, ids, ratio=0.5, scope="layer")
    config = result.model.config
    assert config.hidden_size == 32 and result.model.model.norm.weight.shape == (32,)
    assert config.rms_norm_eps == pytest.approx(2 * llama.config.rms_norm_eps)
    assert result.report.relative_diff < 1e-5 and not result.report.warnings
    result.model.save_pretrained(tmp_path)
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, result.model(ids).logits)
    torch.manual_seed(0)
    qwen3 = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16)).eval()
    result = ffr_fast.prune(qwen3, ids, ratio=0.5, scope="layer")
    attention = result.model.model.layers[0].self_attn
    assert result.model.config.hidden_size == 32 and attention.q_norm.weight.shape == (16,)
    assert attention.q_norm.variance_epsilon == qwen3.config.rms_norm_eps  # head dim: kept
    assert result.report.relative_diff < 1e-5
    assert any("config.rms_norm_eps cannot say" in w for w in result.report.warnings)


@pytest.mark.parametrize("name,options,size", [
    ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2), 32),
    ("swin_tiny_patch4_window7_224", dict(depths=(1, 1, 1, 1), embed_dim=24,
                                          num_heads=(2, 2, 4, 4)), 224)])
def test_timm_transformers_lose_heads_units_and_width(name, options, size, tmp_path):
    """timm's ViT and Swin: heads (their q, k, v rows and relative position bias), MLP units
    and the LayerNorm'd stream (renormalised over what stays: report.approximate), verified
    against the original computing the same; saved, loaded and exported."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **options).eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    result = ffr_fast.prune(model, x, ratio=0.5, scope="layer", analysis="export")
    report = result.report

    def heads(m):
        return [a.num_heads for a in m.modules() if hasattr(a, "qkv")]

    assert all(after < before for before, after in zip(heads(model), heads(result.model)))
    assert report.flop_ratio > 1.8 and report.approximate and report.relative_diff < 1e-5
    path = tmp_path / "pruned.pt"
    ffr_fast.save_pruned(result, path)
    loaded = ffr_fast.load_pruned(path, model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), result.model(x))
        exported = torch.export.export(result.model, (x,)).module()
        torch.testing.assert_close(exported(x), result.model(x), rtol=1e-4, atol=1e-5)


class NormalizedNet(nn.Module):
    """F.normalize over the channels (a vector norm with an `ord` before its dims): those
    channels stay whole; the ones before the norm's producer are cut."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = nn.functional.normalize(self.c2(torch.relu(self.c1(x))), dim=1)
        return self.head(y.mean((2, 3)))


def test_a_vector_norm_over_the_channels_keeps_them_whole():
    torch.manual_seed(0)
    result = ffr_fast.prune(NormalizedNet().eval(), image(), ratio=0.5, scope="layer",
                            analysis="export")
    assert result.report.channels["c1"] == (8, 4) and result.report.channels["c2"] == (8, 8)
    assert result.report.relative_diff < 1e-5


def test_a_model_pruned_twice_reloads_from_the_original(tmp_path):
    """Pruned on the export capture, then pruned again: record_source keeps the first
    pruning as the base, and load_pruned replays both on the original architecture."""
    model = stack_net()
    first = ffr_fast.prune(model, image(), ratio=0.25, scope="layer", analysis="export",
                           remove_blocks=False)
    second = ffr_fast.prune(first.model, image(), ratio=0.25, scope="layer",
                            analysis="export", remove_branches=["blocks.2"])
    ffr_fast.pruning.serialize.record_source(second, first.model)
    path = tmp_path / "twice.pt"
    ffr_fast.save_pruned(second, path)
    loaded = ffr_fast.load_pruned(path, stack_net)
    assert len(loaded.blocks) == 2 and loaded.stem.out_channels < 6
    with torch.no_grad():
        torch.testing.assert_close(loaded(image()), second.model(image()))


def test_fold_bn_on_the_export_path_folds_each_batch_norm_its_producer_alone_feeds(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    plain = ffr_fast.prune(model, x, ratio=0.5, analysis="export")
    folded = ffr_fast.prune(model, x, ratio=0.5, analysis="export", fold_bn=True)
    pairs = folded.report.folded_bn
    assert len(pairs) == 20 and ("conv1", "bn1") in [tuple(p) for p in pairs]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.model.modules())
    assert isinstance(model.bn1, nn.BatchNorm2d)  # the user's model keeps its own
    with torch.no_grad():
        torch.testing.assert_close(folded.model(x), plain.model(x), rtol=1e-4, atol=1e-5)
    path = tmp_path / "folded.pt"
    ffr_fast.save_pruned(folded, path)
    loaded = ffr_fast.load_pruned(path, torchvision.models.resnet18)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), folded.model(x))


def test_a_block_that_scores_zero_but_is_no_identity_stays_and_the_report_says_why():
    """BERT's post-norm layer: its branches' last layers are zeroed, but it still normalises
    x, so removing it would not be exact: it stays, and the report names its dead branches."""
    bert = post_norm_bert()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    result = ffr_fast.prune(bert, ids, ratio=0.25, scope="layer")
    assert not result.report.removed_blocks and len(result.model.encoder.layer) == 2
    assert result.report.kept_dead_branches == ["encoder.layer.1.attention.output",
                                                 "encoder.layer.1.output"]
    assert any("['encoder.layer.1.attention.output', 'encoder.layer.1.output'] emit at most "
               "the threshold" in w for w in result.report.warnings)
    assert result.report.relative_diff < 1e-5


def test_timm_branches_are_its_blocks_and_removing_two_saves_their_flops():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                              patch_size=8, depth=4).eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    branches = ffr_fast.residual_branches(model, x, analysis="export")
    assert [b.name for b in branches] == [f"blocks.{i}" for i in range(4)]
    gone = [b for b in branches if b.name in ("blocks.1", "blocks.2")]
    result = ffr_fast.prune(model, x, remove_branches=[b.name for b in gone],
                            analysis="export")
    report = result.report
    assert len(result.model.blocks) == 2 and report.relative_diff < 1e-5
    assert report.flops_before - report.flops_after == sum(b.flops for b in gone)
