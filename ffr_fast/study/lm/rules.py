"""The removal rules of the language-model story, each naming the decoder layers to remove:
Block Influence (ShortGPT), Gromov et al.'s angular distance (a contiguous run), and the last
n layers; and the residual stream they (and the flow figure) read."""
import math
from typing import Dict, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import ffr_fast
from ffr_fast.modes import evaluating

RULES = ("influence", "angular", "last")


def _layer_names(model: nn.Module, ids: torch.Tensor) -> List[str]:
    return [branch.name for branch in ffr_fast.residual_branches(model, ids)]


def residual_stream(model: nn.Module, names: Sequence[str], ids: torch.Tensor
                    ) -> List[torch.Tensor]:
    """The stream at the input of the first decoder layer and at every layer's output."""
    seen: List[torch.Tensor] = []

    def hook(module, args, output):
        if not seen:
            seen.append(args[0])
        seen.append(output[0] if isinstance(output, tuple) else output)

    handles = [model.get_submodule(name).register_forward_hook(hook) for name in names]
    try:
        with evaluating(model), torch.no_grad():
            model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def flow(model: nn.Module, ids: torch.Tensor) -> Dict[str, float]:
    """Per decoder layer ||x_out - x_in|| / ||x_in||, over the tokens of `ids`."""
    names = _layer_names(model, ids)
    stream = residual_stream(model, names, ids)
    return {f"layer {i}": float((b - a).norm() / a.norm())
            for i, (a, b) in enumerate(zip(stream, stream[1:]))}


def layers_to_remove(model: nn.Module, ids: torch.Tensor, count: int) -> Dict[str, List[str]]:
    """For each rule in RULES, the `count` decoder layers it removes, measured on `ids`
    (validation windows) with one residual_branches() call and one forward."""
    branches = ffr_fast.residual_branches(model, ids)
    names = [b.name for b in branches]
    if not 0 < count < len(names):
        raise ValueError(f"cannot remove {count} of {len(names)} decoder layers")
    # ShortGPT: the layers that change their input least
    ranked = sorted(range(len(names)), key=lambda i: branches[i].influence)
    # Gromov et al.: the contiguous run whose input and output are closest in angle
    stream = residual_stream(model, names, ids)
    distances = [angular_distance(stream[start], stream[start + count])
                 for start in range(len(names) - count + 1)]
    start = int(np.argmin(distances))
    return {"influence": [names[i] for i in sorted(ranked[:count])],
            "angular": names[start:start + count],
            # the last n decoder layers; the final norm and the head stay
            "last": names[-count:]}


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """arccos(cosine similarity) / pi between the two streams, averaged over the tokens."""
    cosine = F.cosine_similarity(a.flatten(0, -2).double(), b.flatten(0, -2).double(), dim=-1)
    return float(torch.arccos(cosine.clamp(-1, 1)).mean() / math.pi)
