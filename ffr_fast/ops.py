"""The flow-sums op, declared once; the dispatcher picks the implementation per device.

    ffr_fast::flow_sums(Tensor[] features) -> Tensor                      (B, 3, K-1)
    ffr_fast::flow_sums_backward(Tensor[] features, Tensor grad_sums) -> Tensor[]

Implementations, most specific first:
    CPU   the C++ kernels in csrc/ (extension ffr_fast._C, TORCH_LIBRARY_IMPL)
    CUDA  the Triton kernels in kernels/ (ffr_fast.kernels.flow_sums)
    any   the plain-PyTorch reference (CompositeExplicitAutograd), the fallback
"""
import importlib.util
import warnings
from typing import List, Sequence

import torch
from torch import Tensor
from torch.autograd import forward_ad

from ffr_fast import reference

_LIB = torch.library.Library("ffr_fast", "DEF")
_LIB.define("flow_sums(Tensor[] features) -> Tensor")
_LIB.define("flow_sums_backward(Tensor[] features, Tensor grad_sums) -> Tensor[]")
_LIB.impl("flow_sums", reference.flow_sums, "CompositeExplicitAutograd")
_LIB.impl("flow_sums_backward", reference.flow_sums_backward, "CompositeExplicitAutograd")


@torch.library.register_fake("ffr_fast::flow_sums")
def _flow_sums_fake(features: List[Tensor]) -> Tensor:
    x = features[0]
    return x.new_empty((x.shape[0], 3, len(features) - 1),
                       dtype=reference.accumulation_dtype(x.dtype))


@torch.library.register_fake("ffr_fast::flow_sums_backward")
def _flow_sums_backward_fake(features: List[Tensor], grad_sums: Tensor) -> List[Tensor]:
    return [torch.empty_like(x) for x in features]


def _setup_context(ctx, inputs, output):
    (features,) = inputs
    ctx.save_for_backward(*features)


def _backward(ctx, grad_sums):
    return list(torch.ops.ffr_fast.flow_sums_backward(list(ctx.saved_tensors), grad_sums))


torch.library.register_autograd("ffr_fast::flow_sums", _backward, setup_context=_setup_context)

HIGHER_ORDER_MESSAGE = (
    "ffr_fast: the flow penalty supports first-order reverse-mode gradients only: a second "
    "backward (create_graph=True, e.g. a gradient penalty) and forward-mode AD "
    "(torch.func.jvp, torch.autograd.forward_ad) are not implemented. Use "
    "ffr_fast.reference.flow_penalty, plain PyTorch, for higher-order derivatives.")


def _refuse_double_backward(ctx, *grads):
    raise RuntimeError(HIGHER_ORDER_MESSAGE)


# With create_graph=True the backward op is recorded in the graph; differentiating it again
# must fail loudly rather than treat the backward as a constant (as torchvision's ops do).
torch.library.register_autograd("ffr_fast::flow_sums_backward", _refuse_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


def refuse_forward_mode(features: Sequence[Tensor]) -> None:
    """Raise for forward-mode dual tensors: the op's autograd has no jvp, and without this
    check the dispatcher would drop the tangents and report a zero derivative."""
    if any(forward_ad.unpack_dual(x).tangent is not None for x in features):
        raise RuntimeError(HIGHER_ORDER_MESSAGE)


# Device types ("cpu", "cuda") whose kernels were registered below: set where they are
# registered, so that no one has to ask the dispatcher's internals.
_COMPILED_KERNELS = set()


def _load_cpu_kernel() -> None:
    try:
        import ffr_fast._C  # noqa: F401  registers the CPU kernels with the dispatcher
        _COMPILED_KERNELS.add("cpu")
    except ImportError as error:
        warnings.warn(
            f"ffr_fast: the compiled CPU kernel is not available ({error}); the flow penalty "
            "runs its plain-PyTorch reference on CPU, which is correct but slower. Reinstall "
            "with `pip install --no-build-isolation .` on a machine with a C++ compiler.",
            stacklevel=3,
        )


def _triton_kernels():
    from ffr_fast.kernels import flow_sums as kernels  # imports triton: on first CUDA call

    return kernels


def _register_cuda_kernels() -> None:
    """Route CUDA tensors to the Triton kernels, when triton is installed.

    Why register_kernel and not torch.library.triton_op: triton_op defines its own op (schema
    inferred from the Python function), so it cannot serve a schema declared once above that
    the C++ CPU kernels also implement; and under torch.compile it decomposes the op into its
    Python body for every device, which would bypass the CPU kernel and launch Triton on CPU
    tensors. With register_kernel, torch.compile keeps the op as one opaque node (traced
    through the fake kernel above), and the dispatcher picks CPU or CUDA at run time.
    """
    if importlib.util.find_spec("triton") is None:
        return  # CUDA tensors then run the reference
    torch.library.register_kernel(
        "ffr_fast::flow_sums", "cuda",
        lambda features: _triton_kernels().flow_sums(features), lib=_LIB)
    torch.library.register_kernel(
        "ffr_fast::flow_sums_backward", "cuda",
        lambda features, grad_sums: _triton_kernels().flow_sums_backward(features, grad_sums),
        lib=_LIB)
    _COMPILED_KERNELS.add("cuda")


_load_cpu_kernel()
_register_cuda_kernels()


def has_compiled_kernel(device_type: str) -> bool:
    """Whether the dispatcher has a device-specific kernel (not the reference) for the op."""
    return device_type in _COMPILED_KERNELS


def require_compiled_cpu_kernel() -> None:
    """Fail loudly when the CPU kernel is missing: `make` and the tests call this."""
    if not has_compiled_kernel("cpu"):
        raise RuntimeError("ffr_fast: the compiled CPU kernel (ffr_fast._C) is not loaded")


def flow_sums(features: Sequence[Tensor]) -> Tensor:
    """The (B, 3, K-1) flow sums of one chain, through the op (differentiable)."""
    refuse_forward_mode(features)
    return torch.ops.ffr_fast.flow_sums(list(features))
