"""Every submodule's own training flag, saved and given back exactly.

`model.train(was_training)` sets one flag on every submodule, so a BatchNorm the user froze
inside a training model would come back training. Whatever runs a user's model in eval mode
for a moment (FLOP counting, latency, pruning, BatchNorm recalibration) goes through here.
"""
import contextlib
from typing import Dict, Iterator, Optional

import torch
from torch import nn


def training_flags(model: nn.Module) -> Dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def restore_training_flags(model: nn.Module, flags: Dict[str, bool]) -> None:
    """Give every submodule that has a saved flag exactly that flag back."""
    for name, module in model.named_modules():
        if name in flags:
            module.training = flags[name]


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode inside the block; every submodule's own flag restored after."""
    flags = training_flags(model)
    model.eval()
    try:
        yield model
    finally:
        restore_training_flags(model, flags)


def run_evaluating(model: nn.Module, args, kwargs):
    """`model(*args, **kwargs)` in eval mode without gradients, every flag restored after
    (what prune() measures and verifies with; flops_of counts it)."""
    with evaluating(model), torch.no_grad():
        return model(*args, **kwargs)


def training_failure(model: nn.Module, args, kwargs) -> Optional[Exception]:
    """What `model(*args, **kwargs)` raises in training mode (None if it runs), run without
    gradients on copies of its buffers and a forked random state, so that neither the
    running statistics nor the caller's random stream move; every flag restored after."""
    flags = training_flags(model)
    buffers = {name: b.clone() for name, b in model.named_buffers(remove_duplicate=False)}
    model.train()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.func.functional_call(model, buffers, tuple(args), kwargs, strict=False)
    except Exception as error:
        return error
    finally:
        restore_training_flags(model, flags)
    return None
