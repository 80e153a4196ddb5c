"""A callable importance on torch.export's capture: the scorer(module, bn) of importance.py,
called on the modules behind the ATen analysis's tensors, its scores recorded as Emitters
(aten_importance.py) so that classes, plans and residual blocks read them as they read the
built-in scores.

The scorer is called, as on the torch.fx path,
- for every producer whose weight is the `weight` of an nn.Linear or a convolution, on the
  channels that weight writes (its output channels), with `bn` the batch norm module that
  alone reads the producer's output (None where none does, or where the batch norm is no
  batch norm module: a functional call);
- as scorer(layer, None) for a batch norm module that follows no producer, and for a
  LayerNorm or GroupNorm whose channels may be cut (analysis.renormalised).
What it returns is checked as on the torch.fx path (importance.layer_scores): None (no
opinion) or one finite score >= 0 per channel, else ValueError naming the layer.

Attention heads are scored by the L2 norm of their q, k and v rows, whatever the scorer
says, as on the torch.fx path: the classes an attention product gates (the heads,
aten_importance.gated_classes) take the "l2" emitters' scores, every other class the
scorer's. Unlike on the torch.fx path, the scorer also sees the q, k, v and output
projections themselves (nn.Linear), of an nn.MultiheadAttention too (its out_proj, where
torch.fx passes the nn.MultiheadAttention), but its scores of head channels do not count.
A producer of another module (an embedding's columns, GPT-2's Conv1D, a raw parameter) and
any other parameter (a bias added as `x + b`, a PReLU) has no opinion, as on the torch.fx
path, which passes no such layer to the scorer.

A residual block scores what the scorer says of its branches' tails where a threshold is in
play, as on the torch.fx path; without one a block goes only if its L2 norms say it emits
exactly zero (aten_study.exact_emitters), whatever the scorer says.
"""
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn

from ..capture import Capture
from ..metrics import BATCH_NORMS
from .aten import Affine, Analysis
from .aten_importance import Emitter, emitters, gated_classes, readers
from .importance import Scorer, layer_scores

LINEAR_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # output channels: weight dim 0
TRANSPOSED_LAYERS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)  # dim 1
NORMS = (nn.LayerNorm, nn.GroupNorm)


def _owner(modules: Dict[str, nn.Module], tensor: Optional[str]) -> Optional[nn.Module]:
    return None if tensor is None else modules.get(tensor.rpartition(".")[0])


def _producer_module(modules: Dict[str, nn.Module], weight: str, dim: int
                     ) -> Optional[nn.Module]:
    """The linear layer or convolution whose `weight` writes its output channels on `dim`."""
    if weight.rpartition(".")[2] != "weight":
        return None
    module = _owner(modules, weight)
    if isinstance(module, LINEAR_LAYERS):
        return module if dim == 0 else None
    if isinstance(module, TRANSPOSED_LAYERS):
        return module if dim == 1 else None
    return None


def _batch_norm(modules: Dict[str, nn.Module], affine: Optional[Affine]
                ) -> Optional[nn.Module]:
    """The batch norm module behind `affine` (by its tensors' names), or None."""
    if affine is None:
        return None
    names = [affine.weight, affine.bias, affine.mean, affine.var]
    module = _owner(modules, next((n for n in names if n is not None), None))
    return module if isinstance(module, BATCH_NORMS) else None


def _scored(scorer: Scorer, module: nn.Module, bn: Optional[nn.Module], path: str,
            ids: np.ndarray, nodes) -> Optional[Emitter]:
    scores = layer_scores(scorer, module, bn, path, len(ids))
    return None if scores is None else Emitter(path, ids, scores.numpy(), tuple(nodes))


def _within(analysis: Analysis, emitter: Emitter, classes, inside: bool) -> Emitter:
    """`emitter` on the positions whose class is (`inside`) or is not one of `classes`."""
    keep = np.isin(analysis.cg.roots(emitter.ids), list(classes)) == inside
    return Emitter(emitter.layer, emitter.ids[keep], emitter.scores[keep], emitter.nodes)


def scorer_emitters(analysis: Analysis, cap: Capture, model: nn.Module,
                    tensors: Dict[str, torch.Tensor], scorer: Scorer) -> List[Emitter]:
    """The scorer's scores of the captured model as Emitters, the heads' the "l2" scores
    (module docstring)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    sole_readers = {a.input: a for a in analysis.affines if a.sole_reader}
    folded = set()
    found: List[Optional[Emitter]] = []
    for producer in analysis.producers:
        if producer.piece:  # the scorer's module writes all of its rows: no opinion
            continue
        affine = sole_readers.get(producer.output)
        if affine is not None:
            folded.add(id(affine))
        module = _producer_module(modules, producer.weight, producer.dim)
        if module is not None:
            found.append(_scored(scorer, module, _batch_norm(modules, affine), producer.layer,
                                 analysis.tensors[producer.weight][producer.dim],
                                 [producer.output]))
    for affine in analysis.affines:
        bn = _batch_norm(modules, affine)
        channel_tensor = affine.bias or affine.mean or affine.weight
        if id(affine) not in folded and bn is not None:
            found.append(_scored(scorer, bn, None, channel_tensor.rpartition(".")[0],
                                 analysis.tensors[channel_tensor][0],
                                 readers(cap, channel_tensor)))
    for layer, weight, ids in analysis.renormalised:
        norm = _owner(modules, weight)
        if isinstance(norm, NORMS):
            found.append(_scored(scorer, norm, None, layer, ids, readers(cap, weight)))
    _, heads = gated_classes(analysis, cap)
    scored = [_within(analysis, e, heads, inside=False) for e in found if e is not None]
    if not heads:
        return scored
    return scored + [_within(analysis, e, heads, inside=True)
                     for e in emitters(analysis, cap, tensors, "l2")]
