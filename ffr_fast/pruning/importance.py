"""Channel importance: one score per output channel of every layer, on one scale for
channels and residual branches alike.

A *scorer* maps a layer to one non-negative score per output channel:
    scorer(module, bn) -> Tensor of shape (out_channels,), or None (no opinion)
It is called for every producer (Conv, Linear), with `bn` the BatchNorm that directly
follows it (or None), and as scorer(layer, None) for a channel-wise layer with parameters
that follows no producer (a BatchNorm after a concat or an add, a LayerNorm). The score of a
channel class (channels tied by the dependency graph) is the MAX over all its members, and
the score of a residual branch is the max over the channels its last layer emits, so
`threshold=t` compares channels and branches in the same unit and removes something only
when everything it emits scores <= t.

Built-in scorers (`importance=` "l2", "l1", "bn"), and any callable of the form above:
- "l2" / "l1": the norm of what a channel emits. For a producer that is its filter and
  bias with the following BatchNorm folded in (eval-mode affine map):
      row_c = [ s_c * W_c , s_c * b_c + t_c ]     s = gamma / sqrt(var + eps), t = beta - mean * s
  and for a channel-wise layer what it emits for a zero channel (a BatchNorm's shift t_c,
  a LayerNorm's max(|weight_c|, |bias_c|): rules.py). A channel's output is identically zero
  exactly when all its rows are zero, so threshold 0 removes exactly the dead channels.
  Consumers' input weights are deliberately not counted: a dead filter is dead whatever
  reads it.
- "bn": |gamma_c| of the channel's BatchNorms (network slimming); layers without a
  BatchNorm have no opinion, and a class nothing scores is not pruned.
Attention heads are scored by the L2 (L1 under "l1") norm of their q, k and v rows,
whatever `importance` says: a head whose rows are all zero is dead.
"""
from typing import Callable, Dict, Optional, Union

import torch
from torch import nn

from .channels import ChannelGraph, ModuleChannels
from .rules import out_channels, producer_weight, rule_for

Scorer = Callable[[nn.Module, Optional[nn.Module]], Optional[torch.Tensor]]
IMPORTANCES = ("l2", "l1", "bn")


def emitted_norms(producer: nn.Module, bn: Optional[nn.Module], order: int) -> torch.Tensor:
    """(out_channels,) float64: the L1 or L2 norm of each output channel's row
    [s_c * W_c, s_c * b_c + t_c] (the BN's map folded in), computed per part so that a
    wide layer is never copied whole to float64."""
    weight = producer_weight(producer)
    norms = torch.linalg.vector_norm(weight, ord=order, dim=1, dtype=torch.float64)
    bias = (producer.bias.detach().double() if getattr(producer, "bias", None) is not None
            else torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device))
    if bn is not None:
        scale, shift = rule_for(bn).affine(bn)
        norms, bias = norms * scale.abs(), bias * scale + shift
    if order == 1:
        return norms + bias.abs()
    return torch.sqrt(norms ** 2 + bias ** 2)


def _norm_scorer(order: int) -> Scorer:
    def score(module: nn.Module, bn: Optional[nn.Module]) -> Optional[torch.Tensor]:
        rule = rule_for(module)
        if rule.kind in ("producer", "attention"):
            return emitted_norms(rule.emitter(module), bn, order)
        if rule.emits_for_zero is None:
            return None  # zero-preserving (PReLU): the producers before it decide
        emitted = torch.as_tensor(rule.emits_for_zero(module)).double().abs()
        return emitted.expand(out_channels(module)).clone()
    return score


def gamma_scores(module: nn.Module, bn: Optional[nn.Module]) -> Optional[torch.Tensor]:
    norm = module if rule_for(module).affine is not None else bn
    if norm is None:
        return None
    gamma = norm.weight if norm.weight is not None else torch.ones(out_channels(norm))
    return gamma.detach().abs().double()


SCORERS: Dict[str, Scorer] = {"l2": _norm_scorer(2), "l1": _norm_scorer(1), "bn": gamma_scores}


def scorer_for(importance: Union[str, Scorer]) -> Scorer:
    if callable(importance):
        return importance
    if importance not in SCORERS:
        raise ValueError(f"importance must be one of {IMPORTANCES} or a callable "
                         f"(module, bn) -> per-channel scores, got {importance!r}")
    return SCORERS[importance]


def label(importance: Union[str, Scorer]) -> str:
    """How a report names the importance: the built-in's name, the callable's qualified name."""
    return importance if isinstance(importance, str) else getattr(
        importance, "__qualname__", repr(importance))


def layer_scores(scorer: Scorer, module: nn.Module, bn: Optional[nn.Module], path: str,
                 channels: Optional[int] = None) -> Optional[torch.Tensor]:
    """`scorer(module, bn)`, checked: None or one finite score >= 0 per output channel
    (`channels` of them; by default as many as the module's rule says it writes)."""
    scores = scorer(module, bn)
    if scores is None:
        return None
    channels = out_channels(module) if channels is None else channels
    if (not isinstance(scores, torch.Tensor) or scores.shape != (channels,)
            or not bool(torch.isfinite(scores).all()) or bool((scores < 0).any())):
        raise ValueError(f"the importance function returned {scores!r} for layer '{path}'; "
                         f"it must return None or a tensor of {channels} finite scores >= 0 "
                         "(one per output channel)")
    return scores.detach().double().cpu()


def following_bn(cg: ChannelGraph, producer: ModuleChannels) -> Optional[ModuleChannels]:
    """The affine channel-wise layer (BatchNorm) that is the only reader of `producer`'s
    output, if any."""
    users = list(producer.node.users)
    if len(users) != 1 or users[0].op != "call_module":
        return None
    bn = cg.modules.get(users[0].target)
    if bn is None or bn.rule.affine is None or bn.node is not users[0]:
        return None
    return bn


def class_scores(cg: ChannelGraph, importance: Union[str, Scorer]) -> Dict[int, float]:
    """Score of every channel class (keyed by its union-find root) that has a member."""
    scorer = scorer_for(importance)
    scores: Dict[int, float] = {}

    def add(ids, values):
        if values is None:
            return
        for root, value in zip(cg.roots(ids).tolist(), values.tolist()):
            scores[root] = max(scores.get(root, 0.0), value)

    folded = set()
    for mc in cg.modules.values():
        if mc.rule.kind not in ("producer", "attention"):
            continue
        bn = following_bn(cg, mc)
        if bn is not None:
            folded.add(bn.path)
        add(mc.out_ids, layer_scores(scorer, mc.module, bn and bn.module, mc.path))
    for mc in cg.modules.values():
        if mc.rule.kind == "channelwise" and mc.path not in folded:
            add(mc.out_ids, layer_scores(scorer, mc.module, None, mc.path))
        if mc.inner_ids is not None:  # attention heads: what their q, k, v rows read
            order = 1 if importance == "l1" else 2
            add(mc.inner_ids, torch.linalg.vector_norm(mc.rule.inner_rows(mc.module), ord=order,
                                                       dim=1, dtype=torch.float64))
    if importance in ("l1", "l2"):  # what an added parameter contributes to a channel
        for ids, magnitude in cg.shifts:
            add(ids, magnitude)
    return scores
