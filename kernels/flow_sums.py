"""Triton kernels of the op ffr_fast::flow_sums (forward) and its backward.

A chain is K same-shape features x_0 .. x_{K-1}, each (B, *S) with n = prod(S) elements per
sample. The forward reduces it to the (B, 3, K-1) flow sums of ffr_fast.reference; the
backward writes the K gradients of <grad_sums, flow_sums(features)>.

The chain is never stacked (that would copy every feature): the kernels get feature 0's
pointer and each feature's offset from it in elements, and read every sample as a flat run
of n elements. That holds for contiguous and channels_last features alike, as long as every
feature lays its samples out the same way; other views are copied first.

Each program handles one block of one sample and walks the chain once, so every element of
every feature is read once (forward and backward) and every gradient element written once.
Arithmetic runs in float32 (float64 for float64 features). The forward writes one partial
sum per (sample, block, statistic, l) and sums them over blocks in a fixed order: no atomics,
so results are identical from run to run.

Launches go through torch.library.wrap_triton. The offsets come from data pointers, which
torch.compile's fake tensors do not have, so compiled code keeps ffr_fast::flow_sums as one
opaque op (see ffr_fast.ops) rather than tracing into these functions.
"""
import math
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from ffr_fast.reference import accumulation_dtype


@triton.jit
def _offset(offsets_ptr, k, ALIGNED: tl.constexpr):
    """Tensor k's offset from tensor 0. ALIGNED: every offset is a multiple of 16 elements.
    Telling the compiler so (Triton already specializes integer arguments and pointers on
    divisibility by 16) lets it use vector loads and stores."""
    offset = tl.load(offsets_ptr + k)
    if ALIGNED:
        offset = tl.multiple_of(offset, 16)
    return offset


@triton.jit
def _flow_sums_kernel(x_ptr, offsets_ptr, partials_ptr, K, n, sample_stride,
                      BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    # partials is (B, n_blocks, 3, K-1), zero-filled, in the accumulation dtype.
    acc_dtype = partials_ptr.dtype.element_ty
    block, sample = tl.program_id(0), tl.program_id(1)
    idx = block * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    x_base = x_ptr + sample.to(tl.int64) * sample_stride + idx
    out = partials_ptr + (sample.to(tl.int64) * tl.num_programs(0) + block) * 3 * (K - 1)

    x_prev = tl.load(x_base + _offset(offsets_ptr, 0, ALIGNED), mask=mask,
                     other=0.0).to(acc_dtype)
    d_prev = tl.zeros([BLOCK], dtype=acc_dtype)
    for k in range(1, K):
        x = tl.load(x_base + _offset(offsets_ptr, k, ALIGNED), mask=mask,
                    other=0.0).to(acc_dtype)
        d = x - x_prev  # d_{k-1}, formed element-wise: no cancellation for close neighbours
        s = d - d_prev  # s_{k-2}
        tl.store(out + k - 1, tl.sum(d * d, axis=0))
        tl.store(out + (K - 1) + k - 2, tl.sum(s * s, axis=0), mask=k >= 2)
        tl.store(out + 2 * (K - 1) + k - 2, tl.sum(d * d_prev, axis=0), mask=k >= 2)
        x_prev, d_prev = x, d


@triton.jit
def _coefficient(g_ptr, K, stat, l, last):
    """grad_sums[b, stat, l] for 0 <= l <= last, else 0: pads the chain's ends with zeros."""
    return tl.load(g_ptr + stat * (K - 1) + l, mask=(l >= 0) & (l <= last), other=0.0)


@triton.jit
def _flow_sums_backward_kernel(x_ptr, offsets_ptr, g_ptr, grad_ptr, grad_offsets_ptr, K, n,
                               sample_stride, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    # g is grad_sums, (B, 3, K-1) contiguous in the accumulation dtype; gradients are dense
    # per sample with n elements between samples. With gd, gs, gp = g[:, 0], g[:, 1], g[:, 2]:
    #   D_l = 2 gd_l d_l + gp_l d_{l+1} + gp_{l-1} d_{l-1},   S_l = 2 gs_l s_l,
    #   grad_k = D_{k-1} - D_k + S_{k-2} - 2 S_{k-1} + S_k,
    # where d_l exists for 0 <= l <= K-2 and s_l, gs_l, gp_l for 0 <= l <= K-3 (the last
    # column of gs and gp multiplies a sum that is identically zero). A window slides over
    # the chain holding d_{k-1}, d_k and the D and S terms still needed.
    acc_dtype = g_ptr.dtype.element_ty
    block, sample = tl.program_id(0), tl.program_id(1)
    idx = block * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    x_base = x_ptr + sample.to(tl.int64) * sample_stride + idx
    grad_base = grad_ptr + sample.to(tl.int64) * n + idx
    g_ptr += sample.to(tl.int64) * 3 * (K - 1)

    x0 = tl.load(x_base + _offset(offsets_ptr, 0, ALIGNED), mask=mask,
                 other=0.0).to(acc_dtype)
    x_prev = tl.load(x_base + _offset(offsets_ptr, 1, ALIGNED), mask=mask,
                     other=0.0).to(acc_dtype)
    d_cur = x_prev - x0  # d_k, starting at k = 0
    d_before = tl.zeros([BLOCK], dtype=acc_dtype)  # d_{k-1}
    D_before = tl.zeros([BLOCK], dtype=acc_dtype)  # D_{k-1}
    S_2before = tl.zeros([BLOCK], dtype=acc_dtype)  # S_{k-2}
    S_before = tl.zeros([BLOCK], dtype=acc_dtype)  # S_{k-1}
    for k in range(0, K):
        # d_{k+1} = x_{k+2} - x_{k+1}, zero past the chain's end.
        # (`mask & has_next` would read better, but the interpreter rejects that mask.)
        has_next = k + 2 < K
        next_offset = _offset(offsets_ptr, tl.minimum(k + 2, K - 1), ALIGNED)
        next_mask = idx < tl.where(has_next, n, 0)
        x_next = tl.load(x_base + next_offset, mask=next_mask, other=0.0).to(acc_dtype)
        d_next = tl.where(has_next, x_next - x_prev, 0.0)

        gd = _coefficient(g_ptr, K, 0, k, K - 2)
        gs = _coefficient(g_ptr, K, 1, k, K - 3)
        gp = _coefficient(g_ptr, K, 2, k, K - 3)
        gp_before = _coefficient(g_ptr, K, 2, k - 1, K - 3)
        D_cur = 2 * gd * d_cur + gp * d_next + gp_before * d_before
        S_cur = 2 * gs * (d_next - d_cur)
        grad = D_before - D_cur + S_2before - 2 * S_before + S_cur
        grad_offset = _offset(grad_offsets_ptr, k, ALIGNED)
        tl.store(grad_base + grad_offset, grad.to(grad_ptr.dtype.element_ty), mask=mask)

        x_prev, d_before, d_cur = x_next, d_cur, d_next
        D_before, S_2before, S_before = D_cur, S_before, S_cur


def _dense_sample_strides(x: Tensor) -> Optional[Tuple[int, ...]]:
    """x's strides over S if each sample fills n consecutive elements (contiguous,
    channels_last or any other permutation of S), else None."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(x.stride()[1:], x.shape[1:])
                               if sz != 1):
        if stride != expected:
            return None
        expected *= size
    return x.stride()[1:]


def _flat_chain(features: Sequence[Tensor]) -> Tuple[List[Tensor], int, int, Tuple[int, ...]]:
    """The chain as the kernels read it: its features, n, the distance between two samples,
    and the strides over S shared by every feature (which the gradients get as well)."""
    if len(features) < 2:
        raise ValueError(f"flow_sums needs a chain of K >= 2 features, got {len(features)}")
    first = features[0]
    for k, x in enumerate(features):
        # The kernels index every feature like feature 0: a mismatch would read out of bounds.
        if (x.shape, x.dtype, x.device) != (first.shape, first.dtype, first.device):
            raise ValueError(
                f"flow_sums: feature {k} is {tuple(x.shape)} {x.dtype} on {x.device} but "
                f"feature 0 is {tuple(first.shape)} {first.dtype} on {first.device}; a chain "
                "needs one shape, dtype and device")
    batch, n = first.shape[0], math.prod(first.shape[1:])

    def layout(x):
        strides = _dense_sample_strides(x)
        if strides is None:
            return None
        # Strides of size-1 dimensions never move the address, so they may differ.
        return (x.stride(0) if batch > 1 else 0,
                tuple(st for st, sz in zip(strides, x.shape[1:]) if sz != 1))

    layouts = {layout(x) for x in features}
    if None in layouts or len(layouts) > 1:
        # A view whose samples are not dense (a slice inside a sample, a transpose of B) or
        # a chain mixing layouts: copy to contiguous, the one layout every feature can take.
        features = [x.contiguous() for x in features]
    x = features[0]
    return list(features), n, (x.stride(0) if batch > 1 else n), x.stride()[1:]


def _element_offsets(tensors: Sequence[Tensor], what: str) -> Tuple[Tensor, bool]:
    """Each tensor's data pointer minus tensor 0's, in elements, as an int64 tensor on their
    device; and whether every offset is a multiple of 16 elements (the kernels' ALIGNED)."""
    base, size = tensors[0].data_ptr(), tensors[0].element_size()
    offsets = []
    for k, t in enumerate(tensors):
        distance = t.data_ptr() - base
        if distance % size:
            raise ValueError(
                f"flow_sums: {what} {k} starts {distance} bytes from {what} 0, not a multiple "
                f"of the element size ({size} bytes); the Triton kernels address every "
                f"{what} from {what} 0's pointer, so pass features allocated by PyTorch")
        offsets.append(distance // size)
    device = tensors[0].device
    # From pinned memory the copy does not wait for the GPU to finish its queued work.
    table = torch.tensor(offsets, dtype=torch.int64, pin_memory=device.type == "cuda")
    return table.to(device, non_blocking=True), all(offset % 16 == 0 for offset in offsets)


def _block_count(n: int, block_size: int) -> int:
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"flow_sums: block_size must be a power of two, got {block_size}")
    return triton.cdiv(n, block_size)


def flow_sums(features: Sequence[Tensor], block_size: int = 1024) -> Tensor:
    """The (B, 3, K-1) flow sums of a chain (see ffr_fast.reference.flow_sums), in float32
    (float64 for float64 features). block_size: elements of one sample per program."""
    features, n, sample_stride, _ = _flat_chain(features)
    x, K, batch = features[0], len(features), features[0].shape[0]
    offsets, aligned = _element_offsets(features, "feature")
    n_blocks = _block_count(n, block_size)
    partials = x.new_zeros((batch, n_blocks, 3, K - 1), dtype=accumulation_dtype(x.dtype))
    # Blocks on grid axis 0 (up to 2**31 - 1), samples on axis 1 (up to 65535 on CUDA).
    wrap_triton(_flow_sums_kernel)[(n_blocks, batch)](
        x, offsets, partials, K, n, sample_stride, BLOCK=block_size, ALIGNED=aligned)
    return partials.sum(1)


def flow_sums_backward(features: Sequence[Tensor], grad_sums: Tensor,
                       block_size: int = 1024) -> List[Tensor]:
    """The K gradients of <grad_sums, flow_sums(features)> (see
    ffr_fast.reference.flow_sums_backward), each with its feature's dtype and shape, and its
    strides too when the feature's samples are dense (contiguous, channels_last)."""
    features, n, sample_stride, strides = _flat_chain(features)
    x, K, batch = features[0], len(features), features[0].shape[0]
    if tuple(grad_sums.shape) != (batch, 3, K - 1):
        raise ValueError(f"flow_sums_backward: grad_sums has shape {tuple(grad_sums.shape)}; "
                         f"a chain of {K} features of batch {batch} needs ({batch}, 3, {K - 1})")
    grad_sums = grad_sums.to(x.device, accumulation_dtype(x.dtype)).contiguous()
    grads = [torch.empty_strided(f.shape, (n, *strides), dtype=f.dtype, device=f.device)
             for f in features]
    offsets, features_aligned = _element_offsets(features, "feature")
    grad_offsets, grads_aligned = _element_offsets(grads, "gradient")
    n_blocks = _block_count(n, block_size)
    wrap_triton(_flow_sums_backward_kernel)[(n_blocks, batch)](
        x, offsets, grad_sums, grads[0], grad_offsets, K, n, sample_stride, BLOCK=block_size,
        ALIGNED=features_aligned and grads_aligned)
    return grads
