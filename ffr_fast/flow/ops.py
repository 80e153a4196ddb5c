"""The ops of ffr_fast, declared once; the dispatcher picks the implementation per device.

One call takes every chain of a forward, like a multi-tensor apply: `features` holds the
chains one after the other, lengths[c] is chain c's K (chains may differ in shape and
length; one call has one dtype and device). A single chain is the case lengths = [K].

    ffr_fast::flow_sums(Tensor[] features, int[] lengths) -> Tensor
        the flow sums of every chain, packed: chain c is a row-major (B_c, 3, K_c - 1) block
        (ffr_fast.flow.reference.flow_sums), the blocks one after the other
    ffr_fast::flow_sums_backward(Tensor[] features, int[] lengths, Tensor grad_sums) -> Tensor[]
    ffr_fast::flow_penalty(Tensor[] features, int[] lengths, float[] chain_weights,
                           float grad_weight, float curv_weight, str norm, str curvature,
                           float eps, float delta) -> (Tensor penalty, Tensor sums)
        sum_c chain_weights[c] * (the penalty of chain c): one op and one autograd node for
        the whole flow. `sums` (the packed flow sums) is what the backward needs; it carries
        no gradient.
    ffr_fast::flow_penalty_backward(Tensor[] features, int[] lengths, Tensor sums,
                                    Tensor grad, <the options above>) -> Tensor[]

Implementations, most specific first:
    CPU   the C++ kernels in csrc/ (extension ffr_fast._C, TORCH_LIBRARY_IMPL), all four ops
    CUDA  the Triton kernels in kernels/ (flow_sums.py, flow_penalty.py), all four ops: one
          launch over every chain per pass, and a per-sample epilogue launch for the
          penalty's math
    any   the fallback (CompositeExplicitAutograd): the plain-PyTorch reference's flow sums,
          and the penalty's math from them in chain_terms below

Derivatives: first-order reverse mode, one backward per op (the autograd section below). A
second backward raises HIGHER_ORDER_MESSAGE rather than return wrong numbers, whoever calls the
op. Forward-mode AD raises it in flow_penalty and flow_sums below, the entry points of
ffr_fast.flow.penalty and FFRLoss; torch.library's autograd has no forward-mode hook, so a direct
torch.ops call on dual tensors returns outputs without a tangent.
"""
import importlib
import importlib.util
import warnings
from typing import List, Sequence, Tuple

import torch
from torch import Tensor
from torch.autograd import forward_ad

from ffr_fast.flow import reference

_LIB = torch.library.Library("ffr_fast", "DEF")
_OPTIONS = ("float grad_weight, float curv_weight, str norm, str curvature, float eps, "
            "float delta")
_LIB.define("flow_sums(Tensor[] features, int[] lengths) -> Tensor")
_LIB.define("flow_sums_backward(Tensor[] features, int[] lengths, Tensor grad_sums) -> Tensor[]")
_LIB.define(f"flow_penalty(Tensor[] features, int[] lengths, float[] chain_weights, "
            f"{_OPTIONS}) -> (Tensor, Tensor)")
_LIB.define(f"flow_penalty_backward(Tensor[] features, int[] lengths, Tensor sums, Tensor grad, "
            f"float[] chain_weights, {_OPTIONS}) -> Tensor[]")


def split_chains(features: Sequence[Tensor], lengths: Sequence[int]) -> List[List[Tensor]]:
    """The chains of a flat feature list: chain c is the next lengths[c] features."""
    chains, start = [], 0
    for K in lengths:
        chains.append(list(features[start:start + K]))
        start += K
    return chains


def chain_blocks(packed: Tensor, chains: Sequence[Sequence[Tensor]]) -> List[Tensor]:
    """The (B, 3, K-1) block of each chain in packed flow sums."""
    blocks, start = [], 0
    for chain in chains:
        B, L = chain[0].shape[0], len(chain) - 1
        blocks.append(packed[start:start + B * 3 * L].view(B, 3, L))
        start += B * 3 * L
    return blocks


# -- the penalty from the flow sums: the Python twin of csrc/penalty_math.h (and of the
# Triton epilogue in kernels/flow_penalty.py) ---------------------------------------------
def _term_size(v: Tensor, n: int, norm: str, eps: float) -> Tensor:
    """A term's size from its squared norm v, for n-element features."""
    return torch.sqrt(v + eps**2) / n**0.5 if norm == "l2" else v / n


def _term_size_derivative(v: Tensor, n: int, norm: str, eps: float) -> Tensor:
    if norm == "l2":
        return 0.5 / (torch.sqrt(v + eps**2) * n**0.5)
    return torch.full_like(v, 1 / n)


def _cosines(sums: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """cos(d_l, d_{l+1}) per sample and l (unclipped), and ||d_l||_eps."""
    norm_d = torch.sqrt(sums[:, 0] + eps**2)
    return sums[:, 2, :-1] / (norm_d[:, :-1] * norm_d[:, 1:]), norm_d


def chain_terms(sums: Tensor, n: int, norm: str, curvature: str, eps: float,
                delta: float) -> Tuple[Tensor, Tensor]:
    """FFR's per-sample G_b and C_b of one chain from its (B, 3, K-1) sums."""
    G = _term_size(sums[:, 0], n, norm, eps).sum(1)
    if curvature == "angle":
        cosine, _ = _cosines(sums, eps)
        C = torch.arccos(torch.clamp(cosine, -1 + delta, 1 - delta)).sum(1)
    else:
        C = _term_size(sums[:, 1, :-1], n, norm, eps).sum(1)
    return G, C


def chain_terms_gradient(sums: Tensor, n: int, norm: str, curvature: str, eps: float,
                         delta: float, grad_scale: Tensor, curv_scale: Tensor) -> Tensor:
    """The gradient of sum_b (grad_scale G_b + curv_scale C_b) with respect to sums."""
    grad = torch.zeros_like(sums)
    grad[:, 0] = grad_scale * _term_size_derivative(sums[:, 0], n, norm, eps)
    if curvature == "angle":
        cosine, norm_d = _cosines(sums, eps)
        # torch.clamp passes the gradient on the closed interval: so does this.
        inside = (cosine >= -1 + delta) & (cosine <= 1 - delta)
        dtheta = torch.where(inside, -curv_scale / torch.sqrt(1 - cosine.clamp(-1, 1) ** 2), 0)
        grad[:, 2, :-1] = dtheta / (norm_d[:, :-1] * norm_d[:, 1:])
        grad[:, 0, :-1] -= dtheta * cosine / (2 * norm_d[:, :-1] ** 2)
        grad[:, 0, 1:] -= dtheta * cosine / (2 * norm_d[:, 1:] ** 2)
    else:
        grad[:, 1, :-1] = curv_scale * _term_size_derivative(sums[:, 1, :-1], n, norm, eps)
    return grad


def _feature_size(chain: Sequence[Tensor]) -> int:
    return chain[0][0].numel()


def _penalty_composite(features, lengths, chain_weights, grad_weight, curv_weight, norm,
                       curvature, eps, delta):
    """flow_penalty from the flow_sums op, on devices without a flow_penalty kernel (where
    flow_sums has none either, so its sums are the reference's)."""
    sums = torch.ops.ffr_fast.flow_sums(features, lengths)
    chains = split_chains(features, lengths)
    penalty = sums.new_zeros(())
    for w, chain, block in zip(chain_weights, chains, chain_blocks(sums, chains)):
        G, C = chain_terms(block, _feature_size(chain), norm, curvature, eps, delta)
        penalty = penalty + w * (grad_weight * G.mean() + curv_weight * C.mean())
    return penalty, sums


def _penalty_backward_composite(features, lengths, sums, grad, chain_weights, grad_weight,
                                curv_weight, norm, curvature, eps, delta):
    chains = split_chains(features, lengths)
    grad_sums = []
    for w, chain, block in zip(chain_weights, chains, chain_blocks(sums, chains)):
        scale = grad.to(sums.dtype) * w / chain[0].shape[0]
        grad_sums.append(chain_terms_gradient(block, _feature_size(chain), norm, curvature, eps,
                                              delta, scale * grad_weight, scale * curv_weight)
                         .reshape(-1))
    return torch.ops.ffr_fast.flow_sums_backward(features, lengths, torch.cat(grad_sums))


def _sums_reference(features, lengths):
    return torch.cat([reference.flow_sums(chain).reshape(-1)
                      for chain in split_chains(features, lengths)])


def _sums_backward_reference(features, lengths, grad_sums):
    chains = split_chains(features, lengths)
    return [grad for chain, block in zip(chains, chain_blocks(grad_sums, chains))
            for grad in reference.flow_sums_backward(chain, block)]


_LIB.impl("flow_sums", _sums_reference, "CompositeExplicitAutograd")
_LIB.impl("flow_sums_backward", _sums_backward_reference, "CompositeExplicitAutograd")
_LIB.impl("flow_penalty", _penalty_composite, "CompositeExplicitAutograd")
_LIB.impl("flow_penalty_backward", _penalty_backward_composite, "CompositeExplicitAutograd")


# -- shapes for torch.compile and meta tensors ----------------------------------------------
def _packed_size(features, lengths) -> int:
    return sum(chain[0].shape[0] * 3 * (len(chain) - 1)
               for chain in split_chains(features, lengths))


@torch.library.register_fake("ffr_fast::flow_sums")
def _flow_sums_fake(features, lengths):
    x = features[0]
    return x.new_empty((_packed_size(features, lengths),),
                       dtype=reference.accumulation_dtype(x.dtype))


@torch.library.register_fake("ffr_fast::flow_penalty")
def _flow_penalty_fake(features, lengths, chain_weights, *options):
    sums = _flow_sums_fake(features, lengths)
    return sums.new_empty(()), sums


def _gradients_fake(features, *args):
    return [torch.empty_like(x) for x in features]


torch.library.register_fake("ffr_fast::flow_sums_backward", _gradients_fake)
torch.library.register_fake("ffr_fast::flow_penalty_backward", _gradients_fake)


# -- autograd -------------------------------------------------------------------------------
# Each op has one backward. flow_penalty's is _penalty_feature_gradients, fed by
# _save_for_penalty_backward; two thin entry points lead to them: the autograd registered on
# the op (torch.ops callers) and _FlowPenalty (ffr_fast.flow.penalty, below).
def _save_features(ctx, inputs, output):
    features, lengths = inputs[0], inputs[1]
    ctx.save_for_backward(*features)
    ctx.lengths = lengths


def _flow_sums_backward(ctx, grad_sums):
    return list(torch.ops.ffr_fast.flow_sums_backward(list(ctx.saved_tensors), ctx.lengths,
                                                      grad_sums)), None


def _save_for_penalty_backward(ctx, features: Sequence[Tensor], lengths: Sequence[int],
                               options: Sequence, sums: Tensor) -> None:
    """What the penalty's backward reads: the features, and the call's packed sums, lengths
    and options (chain_weights, then the penalty's options, as the op takes them)."""
    ctx.save_for_backward(sums, *features)
    ctx.lengths, ctx.options = lengths, options


def _penalty_feature_gradients(ctx, grad_penalty: Tensor) -> List[Tensor]:
    """The penalty's backward: the gradient of every feature of the call."""
    sums, *features = ctx.saved_tensors
    return list(torch.ops.ffr_fast.flow_penalty_backward(features, ctx.lengths, sums,
                                                         grad_penalty, *ctx.options))


def _setup_penalty_context(ctx, inputs, output):
    features, lengths, *options = inputs
    sums = output[1]
    ctx.mark_non_differentiable(sums)
    _save_for_penalty_backward(ctx, features, lengths, options, sums)


def _flow_penalty_backward(ctx, grad_penalty, _grad_sums):
    # One gradient per argument of the op: the features', then none for lengths and options.
    return (_penalty_feature_gradients(ctx, grad_penalty),) + (None,) * (1 + len(ctx.options))


class _FlowPenalty(torch.autograd.Function):
    """ffr_fast.flow.penalty's entry point to flow_penalty: the op's backward, without the
    registered autograd's cost per call. That one goes through torch.library's tensor-list
    support, which flattens and rebuilds every argument with pytree on each call: measured
    side by side (bench/bench_penalty.py::test_autograd_paths_at_batch_2, ResNet-56's 27
    features at batch 2, on 2 shared cores), a forward + backward takes 0.35 ms this way and
    0.44 ms through torch.ops at best, 1.25-1.3x; the difference is per call and per feature,
    it does not grow with the batch."""

    @staticmethod
    def forward(ctx, lengths, options, *features):
        penalty, sums = torch.ops.ffr_fast.flow_penalty(list(features), lengths, *options)
        _save_for_penalty_backward(ctx, features, lengths, options, sums)
        return penalty

    @staticmethod
    def backward(ctx, grad_penalty):
        return (None, None, *_penalty_feature_gradients(ctx, grad_penalty))


torch.library.register_autograd("ffr_fast::flow_sums", _flow_sums_backward,
                                setup_context=_save_features)
torch.library.register_autograd("ffr_fast::flow_penalty", _flow_penalty_backward,
                                setup_context=_setup_penalty_context)

HIGHER_ORDER_MESSAGE = (
    "ffr_fast: the flow penalty supports first-order reverse-mode gradients only: a second "
    "backward (create_graph=True, e.g. a gradient penalty) and forward-mode AD "
    "(torch.func.jvp, torch.autograd.forward_ad) are not implemented. Use "
    "ffr_fast.flow.reference.flow_penalty, plain PyTorch, for higher-order derivatives.")


def _refuse_double_backward(ctx, *grads):
    raise RuntimeError(HIGHER_ORDER_MESSAGE)


# With create_graph=True the backward ops are recorded in the graph; differentiating them
# again must fail loudly rather than treat the backward as a constant (torchvision's ops
# refuse it the same way: the autograd of their backward raises).
for _backward_op in ("ffr_fast::flow_sums_backward", "ffr_fast::flow_penalty_backward"):
    torch.library.register_autograd(_backward_op, _refuse_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)


def refuse_forward_mode(features: Sequence[Tensor]) -> None:
    """Raise for forward-mode dual tensors: the ops' autograd has no jvp, and without this
    check the dispatcher would drop the tangents and report a zero derivative."""
    if any(forward_ad.unpack_dual(x).tangent is not None for x in features):
        raise RuntimeError(HIGHER_ORDER_MESSAGE)


# -- device kernels -------------------------------------------------------------------------
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


def _triton(module: str):
    """kernels/<module>.py (installed as ffr_fast.kernels): imports triton, on the first CUDA
    call."""
    return importlib.import_module(f"ffr_fast.kernels.{module}")


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
        lambda features, lengths: _triton("flow_sums").flow_sums(features, lengths), lib=_LIB)
    torch.library.register_kernel(
        "ffr_fast::flow_sums_backward", "cuda",
        lambda features, lengths, grad_sums: _triton("flow_sums").flow_sums_backward(
            features, lengths, grad_sums),
        lib=_LIB)
    torch.library.register_kernel(
        "ffr_fast::flow_penalty", "cuda",
        lambda features, lengths, *options: _triton("flow_penalty").flow_penalty(
            features, lengths, *options),
        lib=_LIB)
    torch.library.register_kernel(
        "ffr_fast::flow_penalty_backward", "cuda",
        lambda features, lengths, sums, grad, *options: _triton(
            "flow_penalty").flow_penalty_backward(features, lengths, sums, grad, *options),
        lib=_LIB)
    _COMPILED_KERNELS.add("cuda")


_load_cpu_kernel()
_register_cuda_kernels()


def has_compiled_kernel(device_type: str) -> bool:
    """Whether the ops have a device-specific kernel (not the reference) for device_type."""
    return device_type in _COMPILED_KERNELS


def require_compiled_cpu_kernel() -> None:
    """Fail loudly when the CPU kernel is missing: `make` and the tests call this."""
    if not has_compiled_kernel("cpu"):
        raise RuntimeError("ffr_fast: the compiled CPU kernel (ffr_fast._C) is not loaded")


def flow_penalty(features: Sequence[Tensor], lengths: List[int], chain_weights: List[float],
                 grad_weight: float, curv_weight: float, norm: str, curvature: str, eps: float,
                 delta: float) -> Tensor:
    """The op ffr_fast::flow_penalty's penalty, differentiable with respect to the features
    (one autograd node). Options are not validated here: see ffr_fast.flow.penalty."""
    refuse_forward_mode(features)
    options = (chain_weights, grad_weight, curv_weight, norm, curvature, eps, delta)
    return _FlowPenalty.apply(lengths, options, *features)


def flow_sums(features: Sequence[Tensor]) -> Tensor:
    """The (B, 3, K-1) flow sums of one chain, through the op (differentiable)."""
    refuse_forward_mode(features)
    packed = torch.ops.ffr_fast.flow_sums(list(features), [len(features)])
    return packed.view(features[0].shape[0], 3, len(features) - 1)
