"""Depth pruning of Hugging Face transformers (built from configs, nothing downloaded):
whole decoder or encoder layers leave their ModuleList, the model stays of its class with
its config and layer_idx in step, and the result is verified against the original with the
removed layers zeroed: its outputs, greedy generate() with the KV cache, save_pretrained
then from_pretrained, and save_pruned then load_pruned."""
import copy

import pytest
import torch

import ffr_fast
from ffr_fast.torchvision_loader import load_torchvision

load_torchvision()  # before transformers, on a CPU-only torch
transformers = pytest.importorskip("transformers")

VOCAB = 64
SMALL = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
             num_attention_heads=4)
DECODERS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2, **SMALL)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, **SMALL)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=4,
                                                     **SMALL)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=VOCAB, n_embd=16, n_layer=4,
                                                  n_head=4, n_positions=32, bos_token_id=0,
                                                  eos_token_id=0)),
}
LAYERS = {"llama": "model.layers", "qwen2": "model.layers", "qwen3": "model.layers",
          "gpt2": "transformer.h"}


def build(config, model, settings):
    torch.manual_seed(0)
    return getattr(transformers, model)(getattr(transformers, config)(**settings)).eval()


def tokens():
    return torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))


def zeroed(model, names):
    """The original with the removed layers' parameters zeroed: what the cut must equal."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name in names:
            for parameter in twin.get_submodule(name).parameters():
                parameter.zero_()
    return twin


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_decoder_layers_are_removed_by_name(name, tmp_path):
    model = build(*DECODERS[name])
    ids = tokens()
    stack = LAYERS[name]
    branches = ffr_fast.residual_branches(model, ids)
    assert [b.name for b in branches] == [f"{stack}.{i}" for i in range(4)]
    assert all(b.flops > 0 and 0 < b.influence < 2 for b in branches)
    removed = [f"{stack}.1", f"{stack}.2"]
    before = {n: p.clone() for n, p in model.state_dict().items()}
    result = ffr_fast.prune(model, ids, remove_branches=removed)
    pruned = result.model
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())  # untouched
    assert type(pruned) is type(model) and model.config.num_hidden_layers == 4
    assert pruned.config.num_hidden_layers == 2 and len(pruned.get_submodule(stack)) == 2
    layer_types = getattr(pruned.config, "layer_types", None)
    if layer_types is not None:
        assert len(layer_types) == 2
    indices = [m.layer_idx for m in pruned.modules() if isinstance(getattr(m, "layer_idx", None),
                                                                   int)]
    assert indices and sorted(set(indices)) == [0, 1]
    report = result.report
    assert report.relative_diff < 1e-5 and report.max_abs_diff_original > 0
    assert report.params_after < report.params_before
    assert report.flops_after < report.flops_before
    reference = zeroed(model, removed)
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, reference(ids).logits)
    # the KV cache is sized from the config: greedy decoding as the zeroed original's
    mask = torch.ones_like(ids)
    settings = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(pruned.generate(ids, **settings), reference.generate(ids, **settings))
    pruned.save_pretrained(tmp_path / "hf")
    again = type(model).from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, pruned(ids).logits)
    ffr_fast.save_pruned(result, tmp_path / "pruned.pt")
    loaded = ffr_fast.load_pruned(tmp_path / "pruned.pt", lambda: build(*DECODERS[name]))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, pruned(ids).logits)


def test_an_encoder_classifier_loses_layers_too():
    model = build("ViTConfig", "ViTForImageClassification",
                  dict(hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                       num_attention_heads=4, image_size=16, patch_size=8))
    x = torch.randn(2, 3, 16, 16)
    result = ffr_fast.prune(model, x, remove_branches=["vit.layers.0", "vit.layers.3"])
    assert result.model.config.num_hidden_layers == 2
    with torch.no_grad():
        torch.testing.assert_close(result.model(x).logits,
                                   zeroed(model, ["vit.layers.0", "vit.layers.3"])(x).logits)


def test_what_cannot_be_removed_whole_is_refused_with_the_reason():
    ids = tokens()
    bert = build("BertConfig", "BertModel", SMALL)
    # post-norm: a layer with its branches zeroed still normalises, so it is no identity
    with pytest.raises(ValueError, match=r"not exact.*post-norm"):
        ffr_fast.prune(bert, ids, remove_branches=["encoder.layer.1"])
    llama = build(*DECODERS["llama"])
    with pytest.raises(ValueError, match=r"no residual branch named \['model.layers.9'\].*"
                                         r"model.layers.0"):
        ffr_fast.prune(llama, ids, remove_branches=["model.layers.9"])
    t5 = build("T5Config", "T5Model", dict(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32,
                                           num_layers=2, num_heads=4,
                                           decoder_start_token_id=0))
    with pytest.raises(ValueError, match=r"config inconsistent"):
        ffr_fast.pruning.depth.cut(copy.deepcopy(t5), ["decoder.block.1"])
