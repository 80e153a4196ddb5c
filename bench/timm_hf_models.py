"""The timm and Hugging Face transformers models bench/vs_torch_pruning.py prunes, each with
its example call, and what the benchmark reads off them: the layers that write the output,
the attention layers with their head counts, and the head counts a model states.

Every model is randomly initialised (timm pretrained=False, transformers from a config):
nothing is downloaded. The transformers are tiny (hidden 128, 2 layers, vocabulary 1000,
16 tokens), so that a row runs in seconds on one CPU thread.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ffr_fast.torchvision_loader import load_torchvision

TIMM_MODELS = ("resnet50", "efficientnet_b0", "mobilenetv3_large_100", "regnety_008",
               "convnext_tiny", "vit_small_patch16_224", "deit_tiny_patch16_224",
               "swin_tiny_patch4_window7_224", "levit_128s", "fastvit_t8", "mobilevit_s")

VOCAB, TOKENS = 1000, 16
_DECODER = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)  # grouped-query attention
HF_MODELS: Dict[str, Tuple[str, dict]] = {  # model class -> (its config class, settings)
    "LlamaForCausalLM": ("LlamaConfig", _DECODER),
    "Qwen2ForCausalLM": ("Qwen2Config", _DECODER),
    "Qwen3ForCausalLM": ("Qwen3Config", dict(_DECODER, head_dim=32)),
    "GPT2LMHeadModel": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=128, n_layer=2, n_head=4,
                                           n_positions=64, bos_token_id=0, eos_token_id=0)),
    "BertForSequenceClassification": ("BertConfig", dict(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4)),
    "ViTForImageClassification": ("ViTConfig", dict(
        image_size=224, patch_size=16, hidden_size=128, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=4)),
    "T5ForConditionalGeneration": ("T5Config", dict(
        vocab_size=VOCAB, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4,
        decoder_start_token_id=0)),
}

# Where an attention layer keeps its head count and the widths derived from it.
HEAD_FIELDS = ("num_heads", "num_attention_heads", "num_key_value_heads", "n_heads")
# The query, key and value projections of a Hugging Face attention layer, by their names.
HF_PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("q", "k", "v"))


@dataclass
class Case:
    """A model and the call it is pruned, measured and verified on: model(*inputs, **kwargs)."""
    model: nn.Module
    inputs: Tuple[torch.Tensor, ...]
    kwargs: dict = field(default_factory=dict)


@dataclass
class Attention:
    """An attention layer as Torch-Pruning is told about it: its query projection (timm:
    the fused qkv) and how many heads each projection holds."""
    module: nn.Module
    query: nn.Linear
    heads: Dict[nn.Linear, int]
    fused_qkv: bool


def timm_case(name: str, image_size: int) -> Case:
    load_torchvision()  # before timm, on a CPU-only torch
    import timm
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    return Case(model, (torch.randn(1, 3, image_size, image_size,
                                    generator=torch.Generator().manual_seed(0)),))


def hf_case(name: str, image_size: int) -> Case:
    load_torchvision()  # before transformers, on a CPU-only torch
    import transformers
    config_class, settings = HF_MODELS[name]
    torch.manual_seed(0)
    model = getattr(transformers, name)(getattr(transformers, config_class)(**settings)).eval()
    generator = torch.Generator().manual_seed(0)
    if name.startswith("ViT"):
        return Case(model, (torch.randn(1, 3, image_size, image_size, generator=generator),))
    ids = torch.randint(0, VOCAB, (1, TOKENS), generator=generator)
    kwargs = dict(attention_mask=torch.ones_like(ids))
    if getattr(model.config, "use_cache", False):  # decoders: no key/value cache in the output
        kwargs["use_cache"] = False
    if model.config.is_encoder_decoder:
        kwargs["decoder_input_ids"] = ids
    return Case(model, (ids,), kwargs)


def output_layers(model: nn.Module) -> List[nn.Module]:
    """The layers that write the model's output (neither tool may narrow them): a language
    model's head (the output embedding, tied to the input one or not), timm's classifier
    (LeViT has two, summed), else the last Linear."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        return [head]
    if hasattr(model, "get_classifier"):
        heads = model.get_classifier()
        heads = heads if isinstance(heads, tuple) else (heads,)
        return [m for h in heads for m in h.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return [[m for m in model.modules() if isinstance(m, nn.Linear)][-1]]


def timm_attention(model: nn.Module) -> List[Attention]:
    """timm's attention layers with a fused qkv Linear (ViT's Attention, Swin's
    WindowAttention, ...): num_heads heads in each third of qkv, as Torch-Pruning's timm
    examples state them."""
    return [Attention(m, m.qkv, {m.qkv: m.num_heads}, fused_qkv=True) for m in model.modules()
            if isinstance(getattr(m, "qkv", None), nn.Linear)
            and isinstance(getattr(m, "num_heads", None), int)]


def hf_attention(model: nn.Module) -> List[Attention]:
    """Hugging Face attention layers with separate query, key and value Linears; each
    projection's heads are its width over the head size (fewer key/value heads under
    grouped-query attention), as Torch-Pruning's prune_hf_*.py and LLM examples state them."""
    found = []
    for module in model.modules():
        head_dim = next((getattr(module, f) for f in ("head_dim", "attention_head_size",
                                                       "key_value_proj_dim")
                         if isinstance(getattr(module, f, None), int)), None)
        for names in HF_PROJECTIONS:
            projections = [getattr(module, n, None) for n in names]
            if head_dim and all(isinstance(p, nn.Linear) for p in projections):
                found.append(Attention(module, projections[0],
                                       {p: p.out_features // head_dim for p in projections},
                                       fused_qkv=False))
    return found


def state_heads(attention: List[Attention], heads_now: Dict[nn.Linear, int],
                config: Optional[object]) -> None:
    """After Torch-Pruning cut heads, write the head counts it keeps (`heads_now`, its
    pruner.num_heads) and the widths derived from them into the attention layers and the
    config, as its examples do: the layers' forward reads them."""
    for layer in attention:
        heads, width = heads_now[layer.query], layer.query.out_features
        width = width // 3 if layer.fused_qkv else width
        for name in ("num_heads", "num_attention_heads", "n_heads"):
            if hasattr(layer.module, name):
                setattr(layer.module, name, heads)
        if layer.fused_qkv:
            layer.module.head_dim = width // heads
        for name in ("attn_dim", "all_head_size", "inner_dim"):
            if hasattr(layer.module, name):
                setattr(layer.module, name, width)
        key_heads = min(heads_now[p] for p in layer.heads)
        if hasattr(layer.module, "num_key_value_groups"):
            layer.module.num_key_value_groups = heads // key_heads
    if config is None or not attention:
        return
    query_heads = {heads_now[layer.query] for layer in attention}
    key_heads = {min(heads_now[p] for p in layer.heads) for layer in attention}
    if len(query_heads) == 1 and hasattr(config, "num_attention_heads"):
        config.num_attention_heads = query_heads.pop()
    if len(key_heads) == 1 and getattr(config, "num_key_value_heads", None):
        config.num_key_value_heads = key_heads.pop()


def head_counts(model: nn.Module) -> Dict[str, int]:
    """Every head count the model states (path.field -> heads): its layers' and, for a
    Hugging Face model, its config's."""
    counts = {f"{path}.{name}": getattr(module, name) for path, module in model.named_modules()
              for name in HEAD_FIELDS if isinstance(getattr(module, name, None), int)}
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        counts.update({f"config.{name}": getattr(config, name) for name in HEAD_FIELDS[1:3]
                       if isinstance(getattr(config, name, None), int)})
    return counts
