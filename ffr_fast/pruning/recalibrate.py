"""recalibrate_bn: the standard step after pruning a model with BatchNorm.

Pruning changes what reaches every BatchNorm layer after the cut (a removed channel or
residual branch no longer adds its share), so the running statistics saved during training
describe a model that no longer exists, and a pruned model evaluated with them can look
broken when it is not. Recomputing the statistics on a few training batches (no weight is
updated) is the fair way to evaluate any pruned model. Models without BatchNorm (LayerNorm
transformers) need no such step: their normalisation uses the statistics of each input.
"""
from typing import Iterable, Optional

import torch
from torch import nn

from ..metrics import BATCH_NORMS
from ..modes import restore_training_flags, training_flags


def recalibrate_bn(model: nn.Module, batches: Iterable, max_batches: Optional[int] = None) -> int:
    """Recompute the running mean and variance of every BatchNorm layer of `model` from
    `batches` (tensors, or (input, target, ...) tuples whose first item is the input, on the
    model's device). The statistics become the plain average over the batches (momentum
    None while they run). No parameter changes; every module's training flag and every
    BatchNorm's momentum are restored. Returns the number of batches used.
    """
    norms = [m for m in model.modules() if isinstance(m, BATCH_NORMS) and m.track_running_stats]
    if not norms:
        return 0
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1, got {max_batches}")
    flags = training_flags(model)
    momenta = {m: m.momentum for m in norms}
    saved = {m: {k: v.clone() for k, v in m.state_dict().items()} for m in norms}
    used = 0
    try:
        model.eval()
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # cumulative average over the batches
            norm.train()
        with torch.no_grad():
            for batch in batches:
                if max_batches is not None and used >= max_batches:
                    break
                inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(inputs)
                used += 1
        if used == 0:
            raise ValueError("recalibrate_bn got no batch; pass a non-empty iterable of "
                             "input batches (the model is left as it was)")
    except BaseException:
        for norm, state in saved.items():  # a failed run leaves the old statistics
            norm.load_state_dict(state)
        raise
    finally:
        restore_training_flags(model, flags)
        for norm, momentum in momenta.items():
            norm.momentum = momentum
    return used
