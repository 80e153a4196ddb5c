"""Surgery for the ATen analysis: the model's own parameters and buffers sliced by name, and
the size attributes its code reads fixed from one small per-type table.

`slice_tensors` cuts every tensor of a model (a deep copy) to the kept positions of each of
its dimensions; a tensor reached under several names (tied weights) is sliced once and stays
one tensor. `fix_sizes` then sets, per module type, the attributes that say how wide the
module is (`in_features`, `out_channels`, `groups`, `num_heads`, `split_size`, ...), from
the sliced tensors, and returns what they imply for a Hugging Face config
(`num_attention_heads`, `num_key_value_heads`, `intermediate_size`, `hidden_size`).
`register_size_rule(type_name, rule)` adds a type: `rule(module) -> {config field: value}`
or None, called after its tensors are sliced with its attributes still the old ones.
"""
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from . import attention, multihead

Keep = Dict[str, List[Optional[torch.Tensor]]]  # tensor name -> kept positions per dim
SizeRule = Callable[[nn.Module], Optional[dict]]


def _owners(model: nn.Module) -> Dict[int, list]:
    """id(tensor) -> every (module, attribute) that holds it as a parameter or buffer."""
    owners: Dict[int, list] = {}
    for module in model.modules():
        for attr, tensor in [*module.named_parameters(recurse=False),
                             *module.named_buffers(recurse=False)]:
            owners.setdefault(id(tensor), []).append((module, attr))
    return owners


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    path, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(path) if path else model, attr)


def slice_tensors(model: nn.Module, keep: Keep) -> None:
    """Cut, in place, every tensor named in `keep` to its kept positions."""
    owners = _owners(model)
    with torch.no_grad():
        for name, dims in keep.items():
            old = _tensor(model, name)
            new = old.detach()
            for dim, index in enumerate(dims):
                if index is not None:
                    new = new.index_select(dim, index.to(new.device))
            if isinstance(old, nn.Parameter):  # one Parameter for every owner: still tied
                new = nn.Parameter(new, requires_grad=old.requires_grad)
            for module, attr in owners[id(old)]:
                setattr(module, attr, new)  # a Parameter stays one; a buffer stays a buffer


def zero_removed(model: nn.Module, keep: Keep) -> None:
    """Zero, in place, every removed position of every parameter `keep` cuts: the model the
    pruned one must equal (buffers, such as running statistics, stay)."""
    with torch.no_grad():
        for name, dims in keep.items():
            tensor = _tensor(model, name)
            if not isinstance(tensor, nn.Parameter):
                continue
            for dim, index in enumerate(dims):
                if index is not None:
                    gone = torch.ones(tensor.shape[dim], dtype=torch.bool)
                    gone[index] = False
                    tensor.index_fill_(dim, torch.nonzero(gone).flatten().to(tensor.device), 0)


def _linear(m):
    m.out_features, m.in_features = m.weight.shape


def _conv(m):
    shape = m.weight.shape
    if m.transposed:
        m.in_channels, m.out_channels = shape[0], shape[1] * m.groups
    elif m.groups > 1 and m.groups == m.in_channels:  # depthwise stays depthwise
        multiplier = m.out_channels // m.groups
        m.out_channels = shape[0]
        m.groups = m.in_channels = shape[0] // multiplier
    else:
        m.in_channels, m.out_channels = shape[1] * m.groups, shape[0]


def _norm(m):
    m.num_features = len(m.running_mean if m.running_mean is not None else m.weight)


def _attention_heads(m) -> dict:
    """A Hugging Face decoder attention (q_proj, k_proj, head_dim): its head counts, and
    its head size, which it reads as config.head_dim where the config has one."""
    heads, kv_heads = m.q_proj.weight.shape[0] // m.head_dim, m.k_proj.weight.shape[0] // m.head_dim
    for attr, value in (("num_heads", heads), ("num_key_value_heads", kv_heads)):
        if hasattr(m, attr):
            setattr(m, attr, value)
    return {"num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "head_dim": m.head_dim}


def _bert_attention(m) -> dict:
    m.all_head_size = m.query.weight.shape[0]
    m.num_attention_heads = m.all_head_size // m.attention_head_size
    return {"num_attention_heads": m.num_attention_heads,
            "derived_head_dim": m.attention_head_size}


def _gpt2_attention(m) -> dict:
    m.split_size = m.c_attn.weight.shape[1] // 3
    m.num_heads = m.split_size // m.head_dim
    return {"num_attention_heads": m.num_heads, "derived_head_dim": m.head_dim}


def _timm_attention(m):
    m.num_heads = m.qkv.weight.shape[0] // (3 * m.head_dim)
    if hasattr(m, "attn_dim"):  # the width its output is reshaped to
        m.attn_dim = m.num_heads * m.head_dim


def _window_attention(m):
    if hasattr(m, "relative_position_bias_table"):  # (positions, heads): sliced by head
        m.num_heads = m.relative_position_bias_table.shape[-1]


def _t5_attention(m) -> dict:
    """T5's attention: its head count (read for the zero position bias of a cross-attention)
    and inner width from q; its head size is config.d_kv, which the config keeps."""
    m.n_heads = m.q.weight.shape[0] // m.key_value_proj_dim
    m.inner_dim = m.n_heads * m.key_value_proj_dim
    return {"num_attention_heads": m.n_heads}


def _t5_logit_scale(m):
    """T5ForConditionalGeneration multiplies the decoder's output by model_dim ** -0.5 before
    its tied head, and from_pretrained sets model_dim from config.d_model: at a new width the
    change of that factor goes into the decoder's last norm, so the logits stay as they were
    and the config rebuilds them."""
    width = m.shared.weight.shape[1]
    if width != m.model_dim and m.config.tie_word_embeddings:
        with torch.no_grad():
            m.decoder.final_layer_norm.weight.mul_((width / m.model_dim) ** 0.5)
    m.model_dim = width


def _conv1d(m):
    m.nx, m.nf = m.weight.shape


def _gated_mlp(m) -> dict:
    if hasattr(m, "intermediate_size"):
        m.intermediate_size = m.up_proj.weight.shape[0]
    return {"intermediate_size": m.up_proj.weight.shape[0]}


def _embedding(m) -> dict:
    m.embedding_dim = m.weight.shape[1]
    return {}


# type name (the class or any base class) -> rule; keyed by name so that no library needs
# to be imported to describe its layers
SIZE_RULES: Dict[str, SizeRule] = {
    "Linear": _linear, "_ConvNd": _conv, "_NormBase": _norm, "Embedding": _embedding,
    "LayerNorm": lambda m: setattr(m, "normalized_shape", tuple(m.weight.shape))
    if m.weight is not None else None,
    "GroupNorm": lambda m: setattr(m, "num_channels", len(m.weight)) if m.weight is not None
    else None,
    "Conv1D": _conv1d,  # transformers' GPT-2 layer: weight (in, out)
    "T5ForConditionalGeneration": _t5_logit_scale,
    "LlamaAttention": _attention_heads, "Qwen2Attention": _attention_heads,
    "Qwen3Attention": _attention_heads, "MistralAttention": _attention_heads,
    "LlamaMLP": _gated_mlp, "Qwen2MLP": _gated_mlp, "Qwen3MLP": _gated_mlp,
    "MistralMLP": _gated_mlp,
    "ViTAttention": _attention_heads,
    "ViTMLP": lambda m: {"intermediate_size": m.fc1.weight.shape[0]},
    "BertSelfAttention": _bert_attention,
    "BertIntermediate": lambda m: {"intermediate_size": m.dense.weight.shape[0]},
    "GPT2Attention": _gpt2_attention,
    "GPT2MLP": lambda m: {"n_inner": m.c_fc.weight.shape[1]},
    "T5Attention": _t5_attention,
    "T5DenseActDense": lambda m: {"d_ff": m.wi.weight.shape[0]},
    "T5DenseGatedActDense": lambda m: {"d_ff": m.wi_0.weight.shape[0]},
    "Attention": _timm_attention,  # timm's ViT attention: qkv, num_heads, head_dim
    "WindowAttention": _window_attention,  # timm's Swin attention
    # the layers whose code ties the inner width to the input width become their head-pruned
    # replacements (attention.py) where the cut unties them; load_pruned replays the same
    "MultiheadAttention": multihead.resize_attention,
    "VisionTransformer": lambda m: setattr(m, "hidden_dim", m.conv_proj.weight.shape[0])
    if hasattr(m, "conv_proj") else None,  # torchvision's: the width it reshapes patches to
    "ShiftedWindowAttention": attention.resize_window_attention,  # torchvision's Swin, V1, V2
    "RelativePositionalMultiHeadAttention": attention.resize_relative_attention,  # MaxViT
}


# RMS norms, y = weight * x / sqrt(mean(x^2) + eps) over the last dim, by type name -> the
# attribute holding eps. Cutting k of n channels that are zero in x keeps the sum of squares,
# so with weight * sqrt(n / k) and eps * n / k the cut norm equals the original exactly.
# (Gemma's norm scales by 1 + weight and is not one of them.)
RMS_NORMS: Dict[str, str] = {
    "RMSNorm": "eps", "LlamaRMSNorm": "variance_epsilon", "Qwen2RMSNorm": "variance_epsilon",
    "Qwen3RMSNorm": "variance_epsilon", "MistralRMSNorm": "variance_epsilon",
    "T5LayerNorm": "variance_epsilon",
}


def _rms_eps_attribute(module: nn.Module) -> Optional[str]:
    names = [RMS_NORMS.get(cls.__name__) for cls in type(module).__mro__]
    attribute = next((name for name in names if name), None)
    weight = getattr(module, "weight", None)
    if attribute is None or not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return None
    return attribute


EPS_FIELDS = ("rms_norm_eps", "layer_norm_epsilon")


def rms_norm_paths(model: nn.Module) -> List[str]:
    """The paths of the RMS norms of `model` whose channels the analysis may cut."""
    return [path for path, module in model.named_modules() if _rms_eps_attribute(module)]


def rescale_rms_norms(model: nn.Module, keep: Keep) -> None:
    """Before slicing: every RMS norm losing channels gets weight * sqrt(n / k) and
    eps * n / k (RMS_NORMS), so that over its k kept channels it computes what it did over
    all n with the removed ones zero."""
    with torch.no_grad():
        for path, module in model.named_modules():
            attribute = _rms_eps_attribute(module)
            dims = keep.get(f"{path}.weight" if path else "weight")
            if attribute is None or dims is None or dims[0] is None:
                continue
            n, k = module.weight.shape[0], len(dims[0])
            module.weight.mul_((n / k) ** 0.5)
            eps = getattr(module, attribute)
            if eps is None:  # torch's RMSNorm: the dtype's machine epsilon
                eps = torch.finfo(module.weight.dtype).eps
            setattr(module, attribute, eps * n / k)


def rms_norm_eps(model: nn.Module) -> Dict[str, List[float]]:
    """The config fields that hold an RMS norm's eps (Llama's `rms_norm_eps`, T5's
    `layer_norm_epsilon`) -> the eps of every RMS norm of `model`, for update_config."""
    values = [getattr(m, attr) for m in model.modules()
              for attr in [_rms_eps_attribute(m)] if attr and getattr(m, attr) is not None]
    return {"rms_norm_eps": values, "layer_norm_epsilon": values} if values else {}


class SizeRuleHandle:
    """What register_size_rule returns: `remove()` puts back the rule the type had before
    (none, or a built-in one it replaced), as a hook's handle does."""

    def __init__(self, type_name: str, size_rule: SizeRule, replaced: Optional[SizeRule]):
        self.type_name, self.size_rule, self.replaced = type_name, size_rule, replaced

    def remove(self) -> None:
        if SIZE_RULES.get(self.type_name) is not self.size_rule:
            return  # removed already, or registered over since: that rule stays
        if self.replaced is None:
            del SIZE_RULES[self.type_name]
        else:
            SIZE_RULES[self.type_name] = self.replaced


def register_size_rule(type_name: str, size_rule: SizeRule) -> SizeRuleHandle:
    """Teach fix_sizes a module type (by class name): `size_rule(module)` sets its size
    attributes from its sliced tensors, and may return the config fields they imply. The
    rule holds for every later prune() and load_pruned() until its handle's `remove()`."""
    if not callable(size_rule):
        raise TypeError(f"register_size_rule({type_name!r}, ...): the size rule must be a "
                        f"callable taking the module, not {type(size_rule).__name__}")
    handle = SizeRuleHandle(type_name, size_rule, SIZE_RULES.get(type_name))
    SIZE_RULES[type_name] = size_rule
    return handle


def fix_sizes(model: nn.Module, changed: set) -> Dict[str, List[int]]:
    """Size attributes of every module in `changed` (paths) set from its sliced tensors;
    returns config field -> the values the modules imply (one per module)."""
    implied: Dict[str, List[int]] = {}
    for path, module in model.named_modules():
        if path not in changed:
            continue
        for cls in type(module).__mro__:
            size_rule = SIZE_RULES.get(cls.__name__)
            if size_rule is not None and not (cls.__name__ == "Attention" and not hasattr(
                    module, "qkv")):
                for field, value in (size_rule(module) or {}).items():
                    implied.setdefault(field, []).append(value)
                break
    return implied


def update_config(model: nn.Module, implied: Dict[str, List[int]]) -> List[str]:
    """A Hugging Face model's config in step with the cut: every field the modules imply
    one value for, and `hidden_size` from the input embeddings (`head_dim` is written where
    the attention reads it from the config, so that fewer heads keep their size). Returns
    warnings for what the config cannot say: widths that differ per layer, heads cut where
    the head size is hidden_size / num_attention_heads."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return []
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        implied = dict(implied, hidden_size=[weight.shape[1]])
    elif isinstance(embeddings, nn.Module):  # ViT's patch embedding holds a convolution
        convs = [m for m in embeddings.modules()
                 if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]
        if len(convs) == 1:
            implied = dict(implied, hidden_size=[convs[0].weight.shape[0]])
    warnings = []
    heads, head_dims = implied.get("num_attention_heads"), implied.pop("derived_head_dim", None)
    hidden = implied.get("hidden_size", [getattr(config, "hidden_size", None)])
    if heads and head_dims and (len(set(hidden)) != 1 or any(
            hidden[0] != h * d for h, d in zip(heads, head_dims))):
        del implied["num_attention_heads"]
        warnings.append(
            f"{type(config).__name__} derives the head size from hidden_size / "
            "num_attention_heads, so it cannot say that heads were cut and their size kept: "
            "config.num_attention_heads is left as it was, and save_pretrained/"
            "from_pretrained would not rebuild this model (torch.save or save_pruned does)")
    for field, values in implied.items():
        if getattr(config, field, None) is None and field not in ("n_inner", "head_dim"):
            continue
        if len(set(values)) == 1:
            setattr(config, field, values[0])
        elif field in EPS_FIELDS:
            warnings.append(
                f"config.{field} cannot say the eps of the RMS norms whose channels were cut "
                f"(rescaled to {max(values):.3g}, the others {min(values):.3g}): "
                "from_pretrained would rebuild them with the old eps, a relative change of "
                "the output of the order of eps (torch.save or save_pruned keeps it exact)")
        else:
            warnings.append(
                f"config.{field} cannot say the per-layer widths {values}: the pruned model "
                "runs, but save_pretrained/from_pretrained would not rebuild it (prune with "
                "scope='layer' for equal widths)")
    return warnings
