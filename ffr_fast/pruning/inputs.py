"""What every entry point of the pruner checks first: the model, the example inputs, the
`ignored` modules, and a run of the model that names what failed (the inputs, when the
original model fails on them; the pruner, when only the model it pruned does)."""
from typing import Tuple

import torch
from torch import nn

from ..metrics import flops_of


class ExampleInputError(ValueError):
    """The model failed on the example inputs; the message names their shapes and the module,
    and the original exception is chained as the cause."""


class PrunedModelError(RuntimeError):
    """The model ran on the example inputs but failed once pruned: a fault of the pruner,
    not of the inputs; the message names the module, and the original exception is chained."""


def check_model(model, caller: str) -> None:
    """`model` must be an eager nn.Module: a TorchScript module has no Python forward to
    trace, and `ignored` cannot help with that."""
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(f"{caller}() needs the eager nn.Module, not a TorchScript module; "
                        "pass the model before torch.jit.script")
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}() needs an nn.Module, got {type(model).__name__}")


def as_inputs(example_inputs) -> Tuple[torch.Tensor, ...]:
    """`example_inputs` as a tuple of tensors, each with a non-empty batch."""
    single = isinstance(example_inputs, torch.Tensor)
    inputs = (example_inputs,) if single else tuple(example_inputs)
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
                raise ValueError(
                    f"ignored: {type(model).__name__} has no submodule {item!r}") from None
            names.append(item)
        elif isinstance(item, type):
            names += [name for name, m in model.named_modules() if isinstance(m, item) and name]
        elif id(item) in by_id and by_id[id(item)]:
            names.append(by_id[id(item)])
        else:
            raise ValueError(f"ignored: {item!r} is not a submodule name, submodule or class of "
                             f"{type(model).__name__}")
    return tuple(dict.fromkeys(names))


def run_checked(model: nn.Module, inputs, run=None, count_flops: bool = True,
                pruned: bool = False):
    """`run(*inputs)` (default: the model) and its FLOPs (None unless `count_flops`). A
    failure is re-raised naming the input shapes, the innermost module of `model` that was
    running and the underlying error (the first line of the innermost cause: torch.fx wraps
    it in its own), chained from it: an ExampleInputError, or for a model the pruner
    changed (`pruned`), which the inputs ran through before, a PrunedModelError."""
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
        where = f"in module '{path or '(root)'}' ({type(model.get_submodule(path)).__name__})"
        cause = _innermost_cause(error)
        lines = str(cause).strip().splitlines()
        shown = f"{type(cause).__name__}: {lines[0] if lines else ''}"
        shapes = ", ".join(str(tuple(x.shape)) for x in inputs)
        if pruned:
            advice = f"; pass ignored=['{path}'] to keep its channels" if path else ""
            raise PrunedModelError(
                f"the pruned model failed {where}, on the example inputs of shape {shapes} "
                f"the original model ran: {shown}. The pruner broke this layer, not the "
                f"inputs{advice}, and please report the model") from cause
        raise ExampleInputError(f"the model failed on example inputs of shape {shapes} {where}: "
                                f"{shown}") from cause
    finally:
        for handle in handles:
            handle.remove()


def _innermost_cause(error: BaseException) -> BaseException:
    seen = {id(error)}
    while error.__cause__ is not None and id(error.__cause__) not in seen:
        error = error.__cause__
        seen.add(id(error))
    return error
