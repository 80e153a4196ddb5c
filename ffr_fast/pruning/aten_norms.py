"""Norms that lose channels on the export path: which ones (cut_norms), and the reference
that verifies their cut exactly (KeptChannelNorms). A cut LayerNorm or GroupNorm normalises
over its kept channels only, which changes what those get; the verification compares the
cut model with the original doing the same, so it stays exact."""
from typing import List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .aten import Analysis


def cut_norms(analysis: Analysis, removed: set) -> List[Tuple[str, str, torch.Tensor]]:
    """(layer, weight name, kept positions) of every LayerNorm or GroupNorm that loses
    channels."""
    removed_ids = np.array(sorted(removed), dtype=np.int64)
    out = []
    for layer, weight, ids in analysis.renormalised:
        gone = np.isin(analysis.cg.roots(ids), removed_ids)
        if gone.any():
            out.append((layer, weight, torch.from_numpy(np.flatnonzero(~gone))))
    return out


class KeptChannelNorms(TorchFunctionMode):
    """While active, a layer_norm or group_norm whose weight is one of the cut norms' (of
    `model`) normalises over that norm's kept channels only (a GroupNorm: each group over
    its kept members, every group having lost as many) and writes zeros elsewhere: what the
    cut model computes, on the original's shapes, so the cut is verified exactly."""

    def __init__(self, model: nn.Module, norms: Sequence[Tuple[str, str, torch.Tensor]]):
        super().__init__()
        tensors = dict(model.named_parameters(remove_duplicate=False))
        self.kept = {id(tensors[weight]): kept for _, weight, kept in norms}

    def __enter__(self):
        return super().__enter__() if self.kept else self

    def __exit__(self, *exc):
        return super().__exit__(*exc) if self.kept else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.layer_norm, torch.layer_norm):
            x, _, weight, bias, eps = _norm_args(*args, **kwargs)
            dim, norm = -1, lambda x, w, b: F.layer_norm(x, (len(w),), w, b, eps)
        elif func in (F.group_norm, torch.group_norm):
            x, groups, weight, bias, eps = _norm_args(*args, **kwargs)
            dim, norm = 1, lambda x, w, b: F.group_norm(x, groups, w, b, eps)
        else:
            return func(*args, **kwargs)
        kept = self.kept.get(id(weight))
        if kept is None:
            return func(*args, **kwargs)
        kept = kept.to(x.device)
        out = torch.zeros_like(x)
        index = (slice(None),) * (dim % x.dim()) + (kept,)
        out[index] = norm(x[index], weight[kept], None if bias is None else bias[kept])
        return out


def _norm_args(input, shape_or_groups, weight=None, bias=None, eps=1e-5, *_):
    return input, shape_or_groups, weight, bias, eps
