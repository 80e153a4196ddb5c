"""The one table of layer types the pruner understands, and `register_rule` to extend it.

A `Rule` says, for one module type, everything the pruner needs to know:
- how channel ids flow through it (`kind`): a *producer* (Conv, Linear) reads the ids of its
  input's channel dimension `dim` and writes fresh ids on the same dimension of its output;
  a *channelwise* layer (BatchNorm, LayerNorm, activations, pools) writes the ids it reads;
  a *reshape* (Flatten) moves them as the shapes before and after say; an *attention*
  (nn.MultiheadAttention, torchvision's Swin and MaxViT window attentions) is called on one
  input tensor (its `inputs` arguments all that tensor, no other tensor argument), reads
  its last dimension, writes fresh output ids there and has inner ids in whole heads (q, k,
  v rows, the output projection's columns and every per-head tensor go together);
- how to slice it: `params` names, for each parameter or buffer, the role of each of its
  dimensions ("out": the output channels, "in": the input channels, "inner": attention's
  head channels, "head": one entry per attention head, None: untouched), and
  `resize(module)` sets the size attributes (in_channels, num_features, num_heads, ...)
  from the sliced tensors;
- whether a zero channel stays zero through it (`zero_preserving`, decided per instance:
  Hardtanh(0.5, 2) maps 0 to 0.5) and, if not, what it emits instead (`emits_for_zero`);
- whether removing one channel changes the others (`renormalizes`: LayerNorm and GroupNorm
  divide by statistics over the channels, so their channels are pruned as a whole class
  or not at all, and the report says the surgery is approximate);
- how to fold a following BatchNorm and how to score it: producers have `weight` rows
  (importance.py); `groups(module)` gives a convolution's groups.

analysis (graph.py), surgery, importance, folding and serialization all read this table; no
other module of the pruner tests layer types. A module type with no rule is traced into (if
it is not a torch.nn leaf) or, as a leaf, pins every channel it reads or writes and is named
in the report.
"""
import operator
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple, Type

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .attention import (
    relative_attention,
    relative_attention_heads,
    relative_attention_rows,
    resize_relative_attention,
    resize_window_attention,
    shifted_window_attention,
    window_attention_heads,
    window_attention_rows,
)
from .multihead import HeadPrunedMultiheadAttention, attention_heads, inner_rows, resize_attention

Roles = Tuple[Optional[str], ...]
KINDS = ("producer", "channelwise", "reshape", "attention")


def _always(module: nn.Module) -> bool:
    return True


def _never(module: nn.Module) -> bool:
    return False


@dataclass
class Rule:
    kind: str  # "producer", "channelwise" or "reshape" (a view: ids follow from the shapes)
    dim: Optional[int] = None  # the channel dimension (-1: the last; None: element-wise)
    params: Dict[str, Roles] = field(default_factory=dict)
    resize: Callable[[nn.Module], None] = lambda module: None
    zero_preserving: Callable[[nn.Module], bool] = _always
    # What a non-zero-preserving op emits for a zero channel, per channel (or one value): a
    # removed channel is exact only where that is zero (or, for a gate, multiplied by zero).
    emits_for_zero: Optional[Callable[[nn.Module], torch.Tensor]] = None
    gate: bool = False  # kept only when every reader multiplies it with the channels it gates
    # The eval-mode per-channel map y = scale * x + shift (BatchNorm): folded into the
    # producer before it, for scoring and with fold_bn.
    affine: Optional[Callable[[nn.Module], Tuple[torch.Tensor, torch.Tensor]]] = None
    renormalizes: bool = False
    groups: Callable[[nn.Module], int] = lambda module: 1
    # Attention: (num_heads, head_dim), or None where it cannot be cut by heads; the
    # "inner" role marks the heads' channels (head by head, head_dim each), the "head" role
    # a dimension with one entry per head (a relative position bias table), `blocks` how
    # many stacked copies (q, k, v) a tensor holds, `inner_rows` what each inner channel
    # reads (for its score).
    heads: Optional[Callable[[nn.Module], Optional[Tuple[int, int]]]] = None
    blocks: Dict[str, int] = field(default_factory=dict)
    inner_rows: Optional[Callable[[nn.Module], torch.Tensor]] = None
    # How an attention is called: the arguments (by position, or by these names) that must
    # all be the one input tensor; every other argument must not be a tensor. Whether it
    # returns a tuple (output, weights) (nn.MultiheadAttention) or the output alone.
    inputs: Tuple[str, ...] = ("x",)
    tuple_output: bool = False
    # The forward of the head-pruned subclass `resize` turns a layer into (attention.py):
    # a module whose forward is this one keeps its base type's rule.
    pruned_forward: Optional[Callable] = None
    # The layer whose rows and bias make this layer's output channels (a producer itself;
    # attention: its output projection): what importance scores and branch tails read.
    emitter: Callable[[nn.Module], nn.Module] = lambda module: module
    # For residual adds written back in place (inplace.py): the layer's output is a fresh
    # tensor that autograd does not save, so an add may write into it (`output_writable`),
    # or the layer returns its input or a fresh product of it and saves nothing, so the
    # question passes to its input (`passes_input`).
    output_writable: bool = False
    passes_input: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Rule.kind must be one of {KINDS}, got {self.kind!r}")


RULES: Dict[Type[nn.Module], Rule] = {}


def register_rule(module_type: Type[nn.Module], rule: Rule) -> None:
    """Tell the pruner how `module_type` (and its subclasses without a rule of their own)
    takes part in pruning. The module type is then traced as a leaf. Example, a per-channel
    scale y = x * weight[None, :, None, None]:

        register_rule(ChannelScale, Rule("channelwise", dim=1, params={"weight": ("out",)},
                                     resize=lambda m: setattr(m, "channels", m.weight.numel())))
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_rule needs an nn.Module subclass, got {module_type!r}")
    if not isinstance(rule, Rule):
        raise TypeError(f"register_rule needs a Rule, got {type(rule).__name__}")
    RULES[module_type] = rule


# Rules for other libraries' types, by qualified name, so that the library imports none of
# them. torchvision's StochasticDepth reads `self.training`: traced into, that flag would be
# baked into the graph (a fine-tuned pruned model would never drop a path), so it is a leaf,
# element-wise (identity in eval, a per-sample scale in training: zeros stay zeros).
RULES_BY_NAME: Dict[str, Rule] = {
    "torchvision.ops.stochastic_depth.StochasticDepth": Rule("channelwise", passes_input=True)}


def _nearest_rule(module: nn.Module) -> Tuple[Optional[type], Optional[Rule]]:
    for cls in type(module).__mro__:
        rule = RULES.get(cls) or RULES_BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
        if rule is not None:
            return cls, rule
    return None, None


def rule_for(module: nn.Module) -> Optional[Rule]:
    """The rule of the module's type, or of the nearest base class whose forward it keeps
    (torchvision's LayerNorm2d overrides LayerNorm.forward: it has no rule, and is traced);
    a head-pruned layer's forward (`pruned_forward`) keeps its base class's rule."""
    cls, rule = _nearest_rule(module)
    if rule is None:
        return None
    forward = type(module).forward
    own = cls.forward is forward or (rule.pruned_forward is not None
                                     and forward is rule.pruned_forward)
    return rule if own else None


def resize_from_tensors(module: nn.Module) -> None:
    """Set the size attributes of a module whose tensors were sliced or given new shapes,
    by the rule of its nearest type that has one, whatever its forward: LayerNorm2d is
    traced into, yet its own forward reads LayerNorm's `normalized_shape`."""
    rule = _nearest_rule(module)[1]
    if rule is not None:
        rule.resize(module)


# ---- the built-in rules -------------------------------------------------------------------

def _resize_conv(conv: nn.Module) -> None:
    if conv.groups > 1 and conv.groups == conv.in_channels:
        # Depthwise, `multiplier` outputs per input channel: whole groups went (graph.py
        # ties an input channel to its outputs). Read before the sizes change.
        multiplier = conv.out_channels // conv.groups
        conv.out_channels = conv.weight.shape[0]
        conv.groups = conv.in_channels = conv.out_channels // multiplier
    else:
        conv.out_channels = conv.weight.shape[0]
        conv.in_channels = conv.weight.shape[1] * conv.groups


def _resize_conv_transpose(conv: nn.Module) -> None:  # weight: (in, out / groups, *k)
    conv.in_channels = conv.weight.shape[0]
    conv.out_channels = conv.weight.shape[1] * conv.groups


def _resize_linear(linear: nn.Linear) -> None:
    linear.out_features, linear.in_features = linear.weight.shape


def _resize_norm(norm: nn.Module) -> None:
    tensor = norm.weight if norm.weight is not None else norm.running_mean
    norm.num_features = tensor.shape[0]


def _resize_layer_norm(norm: nn.LayerNorm) -> None:
    norm.normalized_shape = tuple(norm.weight.shape)


def _resize_group_norm(norm: nn.GroupNorm) -> None:
    norm.num_channels = norm.weight.shape[0]


def _resize_prelu(prelu: nn.PReLU) -> None:
    prelu.num_parameters = prelu.weight.shape[0]


CONV_PARAMS = {"weight": ("out", "in"), "bias": ("out",)}
NORM_PARAMS = {"weight": ("out",), "bias": ("out",), "running_mean": ("out",),
               "running_var": ("out",)}

for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_rule(_conv, Rule("producer", 1, CONV_PARAMS, _resize_conv,
                              groups=lambda m: m.groups, output_writable=True))
register_rule(nn.ConvTranspose2d, Rule("producer", 1, {"weight": ("in", "out"), "bias": ("out",)},
                                       _resize_conv_transpose, groups=lambda m: m.groups))
register_rule(nn.Linear, Rule("producer", -1, CONV_PARAMS, _resize_linear,
                              output_writable=True))


def bn_affine(bn: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """The eval-mode per-channel map y = scale * x + shift of a BatchNorm, in float64."""
    ones = torch.ones(bn.num_features, device=bn.running_var.device
                      if bn.running_var is not None else None)
    mean = bn.running_mean if bn.running_mean is not None else torch.zeros_like(ones)
    var = bn.running_var if bn.running_var is not None else ones
    gamma = bn.weight if bn.affine else ones
    beta = bn.bias if bn.affine else torch.zeros_like(ones)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale.detach().double(), (beta - mean * scale).detach().double()


def _affine_bound(norm: nn.Module) -> torch.Tensor:
    """A renormalising layer emits (-mean / std) * weight + bias for a zero channel: bounded
    by neither alone, so both count."""
    weight = norm.weight.detach().abs() if norm.weight is not None else 1.0
    bias = norm.bias.detach().abs() if norm.bias is not None else 0.0
    return torch.maximum(torch.as_tensor(weight), torch.as_tensor(bias)).double()


for _bn in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    register_rule(_bn, Rule("channelwise", 1, NORM_PARAMS, _resize_norm, _never,
                            emits_for_zero=lambda m: bn_affine(m)[1], affine=bn_affine,
                            output_writable=True))
register_rule(nn.LayerNorm, Rule("channelwise", -1, {"weight": ("out",), "bias": ("out",)},
                                 _resize_layer_norm, _never, emits_for_zero=_affine_bound,
                                 renormalizes=True))
register_rule(nn.GroupNorm, Rule("channelwise", 1, {"weight": ("out",), "bias": ("out",)},
                                 _resize_group_norm, _never, emits_for_zero=_affine_bound,
                                 renormalizes=True, groups=lambda m: m.num_groups))
register_rule(nn.PReLU, Rule("channelwise", 1, {"weight": ("out",)}, _resize_prelu,
                             zero_preserving=lambda m: True))


def _hardtanh_keeps_zero(m: nn.Hardtanh) -> bool:  # ReLU6 included
    return m.min_val <= 0 <= m.max_val


def _threshold_keeps_zero(m: nn.Threshold) -> bool:  # y = x if x > threshold else value
    return m.threshold < 0 or m.value == 0


# Element-wise ops whose every instance maps a zero to a zero.
for _op in (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Tanh, nn.ELU, nn.CELU,
            nn.Mish, nn.Dropout1d, nn.Dropout2d):
    register_rule(_op, Rule("channelwise"))
for _op in (nn.Identity, nn.Dropout):  # their input itself (eval), or a fresh product
    register_rule(_op, Rule("channelwise", passes_input=True))
# Ops on the dimensions after the channel: pools and resizing.
for _op in (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
            nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample):
    register_rule(_op, Rule("channelwise", dim=1))
register_rule(nn.Hardtanh, Rule("channelwise", zero_preserving=_hardtanh_keeps_zero))
register_rule(nn.Threshold, Rule("channelwise", zero_preserving=_threshold_keeps_zero))
for _mha in (nn.MultiheadAttention, HeadPrunedMultiheadAttention):
    register_rule(_mha, Rule(
        "attention", -1,
        {"in_proj_weight": ("inner", "in"), "in_proj_bias": ("inner",),
         "out_proj.weight": ("out", "inner"), "out_proj.bias": ("out",)},
        resize_attention, heads=attention_heads, blocks={"in_proj_weight": 3, "in_proj_bias": 3},
        inner_rows=inner_rows, emitter=lambda mha: mha.out_proj,
        inputs=("query", "key", "value"), tuple_output=True))
# torchvision's window attentions: called on one (B, H, W, C) / (B, G, P, D) tensor, q, k, v
# stacked as three blocks of (heads, head_dim) rows, a per-head relative position bias
# (Swin V2: a per-head logit scale and the rows of the MLP that computes the bias).
_SWIN = {"qkv.weight": ("inner", "in"), "qkv.bias": ("inner",),
         "proj.weight": ("out", "inner"), "proj.bias": ("out",),
         "relative_position_bias_table": (None, "head")}
_SWIN_V2 = dict(_SWIN, **{"logit_scale": ("head", None, None),
                          "cpb_mlp.2.weight": ("head", None), "cpb_mlp.2.bias": ("head",)})
for _name, _params in (("ShiftedWindowAttention", _SWIN), ("ShiftedWindowAttentionV2", _SWIN_V2)):
    RULES_BY_NAME[f"torchvision.models.swin_transformer.{_name}"] = Rule(
        "attention", -1, _params, resize_window_attention, heads=window_attention_heads,
        blocks={"qkv.weight": 3, "qkv.bias": 3}, inner_rows=window_attention_rows,
        emitter=lambda m: m.proj, pruned_forward=shifted_window_attention)
RULES_BY_NAME["torchvision.models.maxvit.RelativePositionalMultiHeadAttention"] = Rule(
    "attention", -1,
    {"to_qkv.weight": ("inner", "in"), "to_qkv.bias": ("inner",),
     "merge.weight": ("out", "inner"), "merge.bias": ("out",),
     "relative_position_bias_table": (None, "head")},
    resize_relative_attention, heads=relative_attention_heads,
    blocks={"to_qkv.weight": 3, "to_qkv.bias": 3}, inner_rows=relative_attention_rows,
    emitter=lambda m: m.merge, pruned_forward=relative_attention)
for _view in (nn.Flatten, nn.Unflatten):
    register_rule(_view, Rule("reshape"))
# A gate: f(0) = 1/2, so a channel that is removed must be multiplied by a zero channel
# after it (squeeze-excitation: x * sigmoid(...)); graph.py checks that.
for _gate in (nn.Sigmoid, nn.Hardsigmoid):
    register_rule(_gate, Rule("channelwise", zero_preserving=_never,
                              emits_for_zero=lambda m: torch.tensor(0.5), gate=True))


def is_zero_preserving_module(module: nn.Module) -> bool:
    """Whether this instance maps a zero channel to a zero channel, channel by channel."""
    rule = rule_for(module)
    return rule is not None and rule.kind == "channelwise" and rule.zero_preserving(module)


def tensor_of(module: nn.Module, name: str) -> Tuple[nn.Module, str, Optional[torch.Tensor]]:
    """(owner, attribute, tensor) for a parameter or buffer name such as 'out_proj.weight'."""
    path, _, attr = name.rpartition(".")
    owner = module.get_submodule(path) if path else module
    return owner, attr, getattr(owner, attr, None)


def out_channels(module: nn.Module) -> int:
    """The number of channels a module with a rule writes."""
    rule = rule_for(module)
    for name, roles in rule.params.items():
        tensor = tensor_of(module, name)[2]
        if tensor is not None and "out" in roles:
            return tensor.shape[roles.index("out")]
    raise ValueError(f"{type(module).__name__} has no parameter holding its output channels")


def producer_weight(module: nn.Module) -> torch.Tensor:
    """A producer's weight with output channels first, flattened: (out, fan_in)."""
    rule = rule_for(module)
    weight = module.weight.detach()
    out_axis = rule.params["weight"].index("out")
    return weight.movedim(out_axis, 0).flatten(1)


# ---- functions and methods: how the traced graph's own calls pass channel ids (graph.py) --
# Element-wise ops that map a zero to a zero: ids pass through on any dimension.
ELEMENTWISE = {F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.hardswish, F.elu, F.mish,
               F.dropout, torch.relu, torch.tanh, "relu", "relu_", "tanh", "contiguous",
               "clone", "detach", "to", "float", "type_as"}
# Ops on the dimensions after the channel (dim 1): pools and resizing.
SPATIAL = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
           F.interpolate, F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d}
GATES = {torch.sigmoid, F.sigmoid, F.hardsigmoid, "sigmoid"}  # f(0) = 1/2
MERGING = {operator.add, operator.sub, operator.mul, operator.iadd, operator.isub,
           operator.imul, torch.add, torch.sub, torch.mul, "add", "add_", "sub", "sub_", "mul",
           "mul_"}
MULTIPLYING = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}  # x * s keeps zeros
VIEWS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.unflatten,
         "flatten", "view", "reshape", "squeeze", "unsqueeze", "unflatten"}
PERMUTES = {torch.permute, "permute", torch.transpose, "transpose", torch.movedim, "movedim"}
REDUCTIONS = {torch.mean, torch.sum, torch.amax, "mean", "sum", "amax"}
SHAPE_QUERIES = {"size", "dim", "numel", getattr, len}  # read a shape, not the values
SPLITS = {torch.chunk, "chunk", torch.unbind, "unbind", torch.split, "split"}
# torchvision's stochastic depth is an fx-wrapped function: identity in eval, and in
# training a per-sample multiplier, which keeps zeros.
ELEMENTWISE_BY_NAME = {("torchvision.ops.stochastic_depth", "stochastic_depth")}


def is_zero_preserving_call(node: fx.Node) -> bool:
    """Whether a call_function / call_method node maps a zero element to zero."""
    if node.target is F.hardtanh:
        low = node.kwargs.get("min_val", node.args[1] if len(node.args) > 1 else -1.0)
        high = node.kwargs.get("max_val", node.args[2] if len(node.args) > 2 else 1.0)
        return isinstance(low, (int, float)) and isinstance(high, (int, float)) and low <= 0 <= high
    named = (getattr(node.target, "__module__", None), getattr(node.target, "__name__", None))
    return node.target in ELEMENTWISE or node.target in SPATIAL or named in ELEMENTWISE_BY_NAME
