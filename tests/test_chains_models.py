"""FFRLoss(model) with no layer list on the models people train today: Hugging Face
transformers and timm, built from configs (random init, nothing downloaded). The stream it
finds on the torch.export graph is checked by name, its penalty against the reference on
the same features read by plain hooks, and its gradient reaches the first layer."""
import pytest
import torch

from ffr_fast import FFRLoss
from ffr_fast.flow import reference
from ffr_fast.torchvision_loader import load_torchvision

load_torchvision()  # timm imports torchvision, whose wheel needs its op declarations first
transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

OPTIONS = dict(grad_weight=0.5, curv_weight=0.25)
VOCAB, BATCH, LENGTH = 64, 2, 8
SMALL = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
             num_attention_heads=4)


def tokens(seed=0):
    return torch.randint(0, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(seed))


def hf(config, model, **settings):
    return getattr(transformers, model)(getattr(transformers, config)(**settings))


def layers(prefix, count, suffixes=("",)):
    return tuple(f"{prefix}.{i}{suffix}" for i in range(count) for suffix in suffixes)


# name: (model factory, call keyword arguments, expected chains of layer names)
CASES = {
    "llama": (lambda: hf("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2, **SMALL),
              lambda: dict(input_ids=tokens(), labels=tokens()),
              [("model.embed_tokens",) + layers("model.layers", 3)]),
    "qwen2": (lambda: hf("Qwen2Config", "Qwen2ForCausalLM", num_key_value_heads=2, **SMALL),
              lambda: dict(input_ids=tokens(), labels=tokens()),
              [("model.embed_tokens",) + layers("model.layers", 3)]),
    "qwen3": (lambda: hf("Qwen3Config", "Qwen3ForCausalLM", num_key_value_heads=2, head_dim=4,
                         **SMALL),
              lambda: dict(input_ids=tokens(), labels=tokens()),
              [("model.embed_tokens",) + layers("model.layers", 3)]),
    "gpt2": (lambda: hf("GPT2Config", "GPT2LMHeadModel", vocab_size=VOCAB, n_embd=16, n_layer=3,
                        n_head=4, n_positions=LENGTH, bos_token_id=0, eos_token_id=0),
             lambda: dict(input_ids=tokens(), labels=tokens()),
             [("transformer.drop",) + layers("transformer.h", 3)]),
    # post-norm: the stream is each sub-layer's normalised output
    "bert": (lambda: hf("BertConfig", "BertForSequenceClassification", **SMALL),
             lambda: dict(input_ids=tokens(), labels=torch.tensor([0, 1])),
             [("bert.embeddings.dropout",)
              + layers("bert.encoder.layer", 3, (".attention.output", ".output"))]),
    # two streams of one shape: the encoder's and the decoder's chains stay apart
    "t5": (lambda: hf("T5Config", "T5ForConditionalGeneration", vocab_size=VOCAB, d_model=16,
                      d_kv=4, d_ff=32, num_layers=2, num_heads=4, decoder_start_token_id=0,
                      pad_token_id=0),
           lambda: dict(input_ids=tokens(), labels=tokens(1)),
           [("encoder.dropout",) + layers("encoder.block", 2, (".layer.0", ".layer.1")),
            ("decoder.dropout",) + layers("decoder.block", 2, (".layer.0", ".layer.1",
                                                                ".layer.2"))]),
    "hf_vit": (lambda: hf("ViTConfig", "ViTForImageClassification", hidden_size=16,
                          intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                          image_size=16, patch_size=8),
               lambda: dict(pixel_values=torch.randn(BATCH, 3, 16, 16),
                            labels=torch.tensor([0, 1])),
               [("vit.embeddings.dropout",) + layers("vit.layers", 3)]),
    # timm writes its norms and attention with functional calls and tensor methods
    "efficientnet_b0": (lambda: timm.create_model("efficientnet_b0", pretrained=False),
                        lambda: dict(x=torch.randn(BATCH, 3, 32, 32)),
                        [("blocks.1.0", "blocks.1.1"), ("blocks.2.0", "blocks.2.1"),
                         ("blocks.3.0", "blocks.3.1", "blocks.3.2"),
                         ("blocks.4.0", "blocks.4.1", "blocks.4.2"),
                         ("blocks.5.0", "blocks.5.1", "blocks.5.2", "blocks.5.3")]),
    "vit_tiny": (lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                                           depth=3),
                 lambda: dict(x=torch.randn(BATCH, 3, 32, 32)),
                 [("pos_drop",) + layers("blocks", 3)]),
}


def call(model, kwargs):
    """The model's forward on `kwargs` (timm's models take the image positionally)."""
    return model(kwargs["x"]) if "x" in kwargs else model(**kwargs)


def scalar_loss(output):
    return output.loss if hasattr(output, "loss") else output.float().pow(2).mean()


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_stream_is_found_and_trained(name):
    factory, inputs, expected = CASES[name]
    torch.manual_seed(0)
    model = factory().train()
    ffr = FFRLoss(model, **OPTIONS)  # the stream is found at the first training forward
    # the same features read by plain hooks on the modules the chains name, in that forward,
    # at their first call (T5's stack calls its dropout again after its final norm)
    seen = {}

    def record(layer):
        def hook(module, args, out):
            seen.setdefault(layer, out[0] if isinstance(out, tuple) else out)
        return hook

    for layer in {layer for chain in expected for layer in chain}:
        model.get_submodule(layer).register_forward_hook(record(layer))
    output = call(model, inputs())
    assert [chain.names for chain in ffr.chains] == expected
    penalty = ffr()
    torch.testing.assert_close(penalty, sum(
        reference.flow_penalty([seen[layer] for layer in chain], **OPTIONS)
        for chain in expected), rtol=1e-4, atol=1e-7)
    first = next(model.parameters())  # the embedding or the stem: the stream's source
    (scalar_loss(output) + penalty).backward()
    assert first.grad is not None and first.grad.abs().sum() > 0
