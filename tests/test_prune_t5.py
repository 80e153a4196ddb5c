"""T5 on the export path: its attention heads are cut in every attention of both stacks, with
the relative position bias that layer 0 of each stack computes and the others reuse, and the
zero bias a cross-attention makes for itself; the config says the new widths, so that
save_pretrained/from_pretrained (and load_pruned) rebuild the model. The hidden size is cut
too: the encoder's last hidden state, which T5 returns beside its logits, narrows with it
(the report says so) rather than pin the whole stream. Each result is checked against the
original with the removed positions zeroed by hand."""
import copy

import pytest
import torch

import ffr_fast
from ffr_fast.torchvision_loader import load_torchvision

load_torchvision()  # before transformers, on a CPU-only torch
transformers = pytest.importorskip("transformers")

GENERATE = dict(max_new_tokens=6, do_sample=False)


def tiny_t5(feed_forward):
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                   num_heads=4, decoder_start_token_id=0,
                                   feed_forward_proj=feed_forward)
    return transformers.T5ForConditionalGeneration(config).eval()


def zeroed(model, kept):
    """`model` with every position the cut removed set to zero (what the pruned one equals)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, dims in kept.items():
            tensor = model.get_parameter(name)
            for dim, index in enumerate(dims):
                if index is not None:
                    removed = sorted(set(range(tensor.shape[dim])) - set(index))
                    tensor.index_fill_(dim, torch.tensor(removed, dtype=torch.long), 0)
    return model


@pytest.mark.parametrize("feed_forward", ["relu", "gated-gelu"])
def test_t5_loses_half_its_heads_everywhere_and_rebuilds_from_its_config(feed_forward,
                                                                         tmp_path):
    model = tiny_t5(feed_forward)
    ids = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    call = dict(attention_mask=torch.ones_like(ids), decoder_input_ids=ids)
    result = ffr_fast.prune(model, ids, ratio=0.5, scope="layer", analysis="export",
                            example_kwargs=call)
    pruned, report = result.model, result.report
    attentions = [m for m in pruned.modules() if isinstance(m, transformers.models.t5.
                                                           modeling_t5.T5Attention)]
    assert len(attentions) == 6  # encoder self, decoder self and cross, in 2 layers each
    assert {(a.n_heads, a.q.out_features, a.o.in_features) for a in attentions} == {(2, 16, 16)}
    for stack in (pruned.encoder, pruned.decoder):
        assert stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight.shape \
            == (32, 2)
    assert pruned.config.num_heads == 2 and pruned.config.d_ff == 32
    assert pruned.config.d_model == 16 and pruned.shared.weight.shape == (64, 16)
    assert "{'encoder_last_hidden_state': (32, 16)}" in " ".join(report.warnings)
    assert pruned(ids, **call).encoder_last_hidden_state.shape == (2, 8, 16)
    assert report.flop_ratio > 3

    reference = zeroed(model, result.structure["kept"])
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids, **call).logits, reference(ids, **call).logits,
                                   rtol=1e-4, atol=1e-5)
        generated = pruned.generate(ids, **GENERATE)
        assert torch.equal(generated, reference.generate(ids, **GENERATE))
    pruned.save_pretrained(tmp_path / "hf")
    ffr_fast.save_pruned(result, tmp_path / "pruned.pt")
    for again in (transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "hf"),
                  ffr_fast.load_pruned(tmp_path / "pruned.pt", model)):
        with torch.no_grad():
            again.eval()
            torch.testing.assert_close(again(ids, **call).logits, pruned(ids, **call).logits)
            assert torch.equal(again.generate(ids, **GENERATE), generated)
