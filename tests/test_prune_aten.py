"""Channel pruning on torch.export's ATen graph (analysis="export"; "auto" takes it where
torch.fx cannot trace): Hugging Face transformers built from small configs, timm convnets
(pretrained=False) and a hand-written net with an op outside the table. Every result is
checked against the original with the removed positions zeroed, rebuilt here from the kept
positions the result records."""
import copy

import pytest
import torch
from torch import nn

import ffr_fast
from ffr_fast.torchvision_loader import load_torchvision

load_torchvision()  # before transformers and timm, on a CPU-only torch
transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

VOCAB = 64
DECODERS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=32, bos_token_id=0,
        eos_token_id=0)),
}
ENCODERS = {
    "bert": ("BertConfig", "BertForSequenceClassification", dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4)),
    "vit": ("ViTConfig", "ViTForImageClassification", dict(
        image_size=32, patch_size=8, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4)),
}


def randomised(model: nn.Module) -> nn.Module:
    """Every parameter non-zero and varied (norm weights too), so classes score apart."""
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.2 + 0.05)
    return model.eval()


def build(config, model, settings):
    torch.manual_seed(0)
    return randomised(getattr(transformers, model)(getattr(transformers, config)(**settings)))


class KeptLayerNorm(nn.Module):
    """A LayerNorm over the kept channels only, zeros elsewhere: what a cut one computes."""

    def __init__(self, norm: nn.LayerNorm, kept):
        super().__init__()
        self.norm, self.kept = norm, torch.tensor(kept)

    def forward(self, x):
        out = torch.zeros_like(x)
        bias = None if self.norm.bias is None else self.norm.bias[self.kept]
        out[..., self.kept] = nn.functional.layer_norm(
            x[..., self.kept], (len(self.kept),), self.norm.weight[self.kept], bias,
            self.norm.eps)
        return out


def zeroed_original(model: nn.Module, structure: dict) -> nn.Module:
    """The original with every position the pruned model lacks set to zero, and every
    LayerNorm that lost channels normalising over the kept ones."""
    twin = copy.deepcopy(model)
    tensors = dict(twin.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, dims in structure["kept"].items():
            tensor = tensors.get(name)
            if tensor is None:
                continue  # a buffer: the pruned model keeps its kept positions, none zeroed
            for dim, kept in enumerate(dims):
                if kept is not None:
                    gone = [i for i in range(tensor.shape[dim]) if i not in set(kept)]
                    tensor.index_fill_(dim, torch.tensor(gone, dtype=torch.long), 0)
    for path, module in list(twin.named_modules()):
        kept = structure["kept"].get(f"{path}.weight")
        if type(module) is nn.LayerNorm and kept is not None:
            parent, _, child = path.rpartition(".")
            setattr(twin.get_submodule(parent), child, KeptLayerNorm(module, kept[0]))
    return twin


def check_pruned(model, result, call, floor):
    pruned, report = result.model, result.report
    assert type(pruned) is type(model)
    assert report.settings["path"] == "torch.export"
    assert report.param_ratio > floor, report
    assert report.relative_diff < 1e-5 and report.max_abs_diff_original > 0
    reference = zeroed_original(model, result.structure)
    with torch.no_grad():
        torch.testing.assert_close(call(pruned), call(reference), rtol=1e-4, atol=1e-5)
    print(f"{type(model).__name__}: {report.params_before:,} -> {report.params_after:,} "
          f"params ({report.param_ratio:.2f}x)")
    return reference


def cannot_say_heads(result):
    """A config that derives the head size from hidden_size / num_attention_heads (GPT-2,
    BERT) cannot say that heads were cut with their size kept: the report says so."""
    assert result.model.config.num_attention_heads == 4
    assert any("cannot say that heads were cut" in w for w in result.report.warnings)


def round_trip(pruned, call, tmp_path):
    pruned.save_pretrained(tmp_path)
    loaded = type(pruned).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(call(loaded), call(pruned))


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_decoder_is_cut_in_width_config_and_generate_in_step(name, tmp_path):
    model = build(*DECODERS[name])
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    config_before = model.config.to_dict()
    result = ffr_fast.prune(model, ids, ratio=0.5, scope="layer")  # "auto": fx cannot trace
    assert model.config.to_dict() == config_before
    pruned = result.model

    def logits(m):
        return m(ids).logits

    reference = check_pruned(model, result, logits, 1.3)
    config = pruned.config
    assert config.num_attention_heads == 2 and config.hidden_size == 32
    assert not result.report.warnings
    if name != "gpt2":  # whole KV groups (GQA) went; the hidden size through the RMS norms
        assert config.num_key_value_heads == 1 and config.intermediate_size == 64
        assert not result.report.approximate
    else:  # GPT-2's LayerNorms renormalise over the kept channels: named as approximate
        assert config.n_inner == 128 and pruned.transformer.h[0].attn.num_heads == 2
        assert "transformer.ln_f" in result.report.approximate
    round_trip(pruned, logits, tmp_path)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(pruned.generate(ids, **settings), reference.generate(ids, **settings))


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_encoder_heads_and_mlp_are_cut(name, tmp_path):
    model = build(*ENCODERS[name])
    if name == "vit":
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    else:
        x = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    result = ffr_fast.prune(model, x, ratio=0.5, scope="layer", analysis="export")

    def logits(m):
        return m(x).logits

    check_pruned(model, result, logits, 1.2)
    config = result.model.config
    assert config.intermediate_size == 64 and config.num_attention_heads == 2
    assert config.hidden_size == 32 and result.report.approximate
    assert not result.report.warnings
    round_trip(result.model, logits, tmp_path)


def test_a_config_that_derives_the_head_size_says_when_it_cannot_hold_the_cut():
    model = build(*ENCODERS["bert"])
    x = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    result = ffr_fast.prune(model, x, ratio=0.5, scope="layer", analysis="export",
                            ignored=["bert.embeddings"])  # the hidden size stays: heads alone
    assert result.model.config.hidden_size == 64
    cannot_say_heads(result)


@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenetv3_large_100", "regnety_008"])
def test_timm_convnet_is_cut_where_the_fx_table_pins_it(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    result = ffr_fast.prune(model, x, ratio=0.5)  # "auto": the export path
    assert result.report.settings["path"] == "torch.export"
    check_pruned(model, result, lambda m: m(x), 2.0)
    old = ffr_fast.prune(model, x, ratio=0.5, analysis="fx").report
    print(f"{name}: torch.fx path {old.param_ratio:.2f}x, torch.export path "
          f"{result.report.param_ratio:.2f}x")
    assert result.report.param_ratio > 1.5 * old.param_ratio
    assert old.opaque_ops  # the functional batch norms the torch.fx table does not know


class PixelShuffleNet(nn.Module):
    """pixel_shuffle is outside the analysis' table: the channels it reads stay."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(2, 4, 1)

    def forward(self, x):
        return self.head(nn.functional.pixel_shuffle(self.c2(torch.relu(self.c1(x))), 2))


def test_an_op_outside_the_table_is_pinned_and_named():
    model = randomised(PixelShuffleNet())
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    result = ffr_fast.prune(model, x, ratio=0.5, analysis="export")
    report = result.report
    assert [o["op"].split()[0] for o in report.opaque_ops] == ["pixel_shuffle"]
    assert report.channels["c1"] == (8, 4) and report.channels["c2"] == (8, 8)
    assert result.model.c1.out_channels == 4 and result.model.c2.in_channels == 4
    check_pruned(model, result, lambda m: m(x), 1.05)


def test_export_analysis_refuses_what_only_fx_does():
    model = randomised(PixelShuffleNet())
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="emit='graph'"):
        ffr_fast.prune(model, x, ratio=0.5, analysis="export", emit="graph")
    with pytest.raises(ValueError, match="analysis must be one of"):
        ffr_fast.prune(model, x, ratio=0.5, analysis="onnx")


def test_example_kwargs_reach_the_model():
    model = build(*ENCODERS["bert"])
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0  # padding in the second sequence changes its output
    result = ffr_fast.prune(model, ids, ratio=0.5, scope="layer",
                            example_kwargs={"attention_mask": mask})
    reference = zeroed_original(model, result.structure)
    with torch.no_grad():
        pruned = result.model(ids, attention_mask=mask).logits
        torch.testing.assert_close(pruned, reference(ids, attention_mask=mask).logits)
        assert not torch.allclose(pruned, result.model(ids).logits)
    assert result.report.relative_diff < 1e-5
