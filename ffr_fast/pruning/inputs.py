"""What every entry point of the pruner checks first: the example inputs, the `ignored`
modules, and a run of the model that names what failed."""
from typing import Tuple

import torch
from torch import nn

from ..metrics import flops_of


class ExampleInputError(ValueError):
    """The model failed on the example inputs; the message names their shapes and the module,
    and the original exception is chained as the cause."""


def as_inputs(example_inputs) -> Tuple[torch.Tensor, ...]:
    """`example_inputs` as a tuple of tensors, each with a non-empty batch."""
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"example_inputs[{i}] must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"example_inputs[{i}] has shape {tuple(x.shape)}: the pruner "
                             "measures the model on it, so it needs a batch of at least one "
                             "sample")
    return inputs


def resolve_ignored(model: nn.Module, ignored) -> Tuple[str, ...]:
    """Module names for `ignored` given as names, module instances or module classes."""
    if isinstance(ignored, (str, nn.Module, type)):
        raise TypeError(f"ignored must be a list (of submodule names, submodules or module "
                        f"classes), got {ignored!r} itself; write ignored=[{ignored!r}]")
    names = []
    by_id = {id(m): name for name, m in model.named_modules()}
    for item in ignored:
        if isinstance(item, str):
            if item == "":
                raise ValueError("ignored: '' names the whole model, which cannot be a leaf "
                                 "of its own trace; name the submodules to keep instead")
            try:
                model.get_submodule(item)
            except AttributeError:
                raise ValueError(f"ignored: {type(model).__name__} has no submodule {item!r}") from None
            names.append(item)
        elif isinstance(item, type):
            names += [name for name, m in model.named_modules() if isinstance(m, item) and name]
        elif id(item) in by_id and by_id[id(item)]:
            names.append(by_id[id(item)])
        else:
            raise ValueError(f"ignored: {item!r} is not a submodule name, submodule or class of "
                             f"{type(model).__name__}")
    return tuple(dict.fromkeys(names))


def run_checked(model: nn.Module, inputs, run=None, count_flops: bool = True):
    """`run(*inputs)` (default: the model) and its FLOPs (None unless `count_flops`); a
    failure is re-raised naming the input shapes and the innermost module of `model` that
    was running, with the original exception chained."""
    stack, handles = [], []

    def enter(name):
        return lambda module, args: stack.append(name)  # returns None: inputs unchanged

    def leave(module, args, output):
        stack.pop()  # returns None: output unchanged

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    try:
        if count_flops:
            return flops_of(run or model, *inputs)
        return (run or model)(*inputs), None
    except Exception as error:
        path = stack[-1] if stack else ""
        kind = type(model.get_submodule(path)).__name__
        shapes = ", ".join(str(tuple(x.shape)) for x in inputs)
        raise ExampleInputError(f"the model failed on example inputs of shape {shapes} in "
                                f"module '{path or '(root)'}' ({kind}): "
                                f"{type(error).__name__}: {error}") from error
    finally:
        for handle in handles:
            handle.remove()
