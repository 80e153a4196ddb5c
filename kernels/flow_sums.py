"""Triton kernels of the op ffr_fast::flow_sums (forward) and its backward, for every chain
of a forward in one launch each.

The call takes chains one after the other (`features`, with lengths[c] the K of chain c);
chain c is K same-shape features x_0 .. x_{K-1}, each (B, *S) with n = prod(S) elements per
sample; chains may differ in shape and length, and share one dtype and device. The forward
reduces every chain to its flow sums (ffr_fast.flow.reference.flow_sums), packed chain after
chain as row-major (B, 3, K-1) blocks; the backward writes the gradients of
<grad_sums, flow_sums(features)> for every feature.

Like a multi-tensor apply, one launch covers all chains: program p looks up its (chain,
sample, block) in a work table, and its chain's K, n and offsets in a chain table. Both
tables depend on the shapes and layouts only, so they are built once per layout (cached)
and reused. The features are never stacked (that would copy them): the kernels get the
first feature's pointer and each feature's offset from it in elements, a table that depends
on the features' addresses: it is cached by address (a training loop often gets the same
addresses step after step; a CUDA graph always does), and otherwise built on the host and
sent to the device from pinned memory without waiting for the GPU. Each sample is read as a
flat run of n elements, which holds for contiguous and channels_last features alike, as long
as every feature of a chain lays its samples out the same way; other views are copied first.

Each program handles one block of one sample and walks its chain once, so every element of
every feature is read once (forward and backward) and every gradient element written once.
Arithmetic runs in float32 (float64 for float64 features). The forward writes one partial
sum per (sample, block, statistic, l) and sums them over blocks in a fixed order: no atomics,
so results are identical from run to run.

Launches go through torch.library.wrap_triton. The offsets come from data pointers, which
torch.compile's fake tensors do not have, so compiled code keeps ffr_fast::flow_sums as one
opaque op (see ffr_fast.flow.ops) rather than tracing into these functions.
"""
import functools
import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from ffr_fast.flow.reference import accumulation_dtype

# The chain table has one int64 row per chain: K, n, sample stride, index of its first
# feature, offset of its partial sums, blocks per sample, offset of its packed sums, batch.
_CHAIN_COLUMNS = 8


@triton.jit
def _offset(offsets_ptr, k, ALIGNED: tl.constexpr):
    """Tensor k's offset from tensor 0. ALIGNED: every offset, n and sample stride is a
    multiple of 16 elements. Telling the compiler so lets it use vector loads and stores."""
    offset = tl.load(offsets_ptr + k)
    if ALIGNED:
        offset = tl.multiple_of(offset, 16)
    return offset


@triton.jit
def chain_entry(chains_ptr, chain, column):
    return tl.load(chains_ptr + chain * 8 + column)  # 8: _CHAIN_COLUMNS


@triton.jit
def _work_item(work_ptr, chains_ptr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """This program's chain, sample and element indices, and its chain's K, n, first feature
    and the address of its sample (relative to feature 0) as an offset."""
    p = tl.program_id(0).to(tl.int64)
    chain = tl.load(work_ptr + 3 * p)
    sample = tl.load(work_ptr + 3 * p + 1)
    block = tl.load(work_ptr + 3 * p + 2)
    K = chain_entry(chains_ptr, chain, 0)
    n = chain_entry(chains_ptr, chain, 1)
    sample_stride = chain_entry(chains_ptr, chain, 2)
    if ALIGNED:  # also makes the mask idx < n constant over 16 lanes: vector accesses
        sample_stride = tl.multiple_of(sample_stride, 16)
        n = tl.multiple_of(n, 16)
    idx = block * BLOCK + tl.arange(0, BLOCK)
    return chain, sample, block, K, n, sample * sample_stride + idx, idx


@triton.jit
def _flow_sums_kernel(x_ptr, offsets_ptr, chains_ptr, work_ptr, partials_ptr,
                      BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    # partials: chain c's (B, n_blocks, 3, K-1) block at its partial offset, zero-filled, in
    # the accumulation dtype.
    acc_dtype = partials_ptr.dtype.element_ty
    chain, sample, block, K, n, position, idx = _work_item(work_ptr, chains_ptr, BLOCK, ALIGNED)
    first = chain_entry(chains_ptr, chain, 3)
    n_blocks = chain_entry(chains_ptr, chain, 5)
    out = (partials_ptr + chain_entry(chains_ptr, chain, 4)
           + (sample * n_blocks + block) * 3 * (K - 1))
    mask = idx < n
    x_base = x_ptr + position

    x_prev = tl.load(x_base + _offset(offsets_ptr, first, ALIGNED), mask=mask,
                     other=0.0).to(acc_dtype)
    d_prev = tl.zeros([BLOCK], dtype=acc_dtype)
    for k in range(1, K):
        x = tl.load(x_base + _offset(offsets_ptr, first + k, ALIGNED), mask=mask,
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
def _flow_sums_backward_kernel(x_ptr, offsets_ptr, chains_ptr, work_ptr, g_ptr, grad_ptr,
                               grad_offsets_ptr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    # g is grad_sums, packed like the forward's sums, contiguous in the accumulation dtype;
    # gradients are dense per sample with n elements between samples. Per chain, with
    # gd, gs, gp = g[:, 0], g[:, 1], g[:, 2]:
    #   D_l = 2 gd_l d_l + gp_l d_{l+1} + gp_{l-1} d_{l-1},   S_l = 2 gs_l s_l,
    #   grad_k = D_{k-1} - D_k + S_{k-2} - 2 S_{k-1} + S_k,
    # where d_l exists for 0 <= l <= K-2 and s_l, gs_l, gp_l for 0 <= l <= K-3 (the last
    # column of gs and gp multiplies a sum that is identically zero). A window slides over
    # the chain holding d_{k-1}, d_k and the D and S terms still needed.
    acc_dtype = g_ptr.dtype.element_ty
    chain, sample, block, K, n, position, idx = _work_item(work_ptr, chains_ptr, BLOCK, ALIGNED)
    first = chain_entry(chains_ptr, chain, 3)
    mask = idx < n
    x_base = x_ptr + position
    grad_base = grad_ptr + sample * n + idx
    g_ptr += chain_entry(chains_ptr, chain, 6) + sample * 3 * (K - 1)

    x0 = tl.load(x_base + _offset(offsets_ptr, first, ALIGNED), mask=mask,
                 other=0.0).to(acc_dtype)
    x_prev = tl.load(x_base + _offset(offsets_ptr, first + 1, ALIGNED), mask=mask,
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
        next_offset = _offset(offsets_ptr, first + tl.minimum(k + 2, K - 1), ALIGNED)
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
        grad_offset = _offset(grad_offsets_ptr, first + k, ALIGNED)
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


def _sample_layout(x: Tensor):
    """What the kernels need to read x in place (distance between samples, the strides over
    S that move the address), or None when its samples are not dense."""
    strides = _dense_sample_strides(x)
    if strides is None:
        return None
    # Strides of size-1 dimensions never move the address, so they may differ.
    return (x.stride(0) if x.shape[0] > 1 else 0,
            tuple(st for st, sz in zip(strides, x.shape[1:]) if sz != 1))


class _ChainLayout(NamedTuple):
    K: int
    shape: torch.Size
    n: int
    blocks: int                  # per sample
    copy: bool                   # read contiguous copies (the features' layouts differ)
    strides: Tuple[int, ...]     # strides over S of the features as read (and of the grads)


class _Layout(NamedTuple):
    chains: List[_ChainLayout]
    chain_table: Tensor  # (chains, _CHAIN_COLUMNS) int64 on the device
    work_table: Tensor   # (programs, 3) int64 on the device: chain, sample, block
    sample_table: Tensor  # (samples of all chains, 2) int64 on the device: chain, sample
    l_block: int         # a power of two >= every chain's K - 1
    sums_size: int
    aligned_strides: bool  # every n and sample stride a multiple of 16 elements


def _layout_key(features: Sequence[Tensor], lengths: Sequence[int], block_size: int):
    return (tuple(lengths), block_size,
            tuple((x.shape, x.stride(), x.dtype, x.device) for x in features))


@functools.lru_cache(maxsize=None)
def _cached_layout(key) -> _Layout:
    """The tables of one layout, built once: the key holds everything they depend on. Never
    evicted (a process sees few layouts), so a CUDA graph that reads them stays valid."""
    lengths, block_size, described = key
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"flow_sums: block_size must be a power of two, got {block_size}")
    chains, rows, work = [], [], []
    start = partial = sums = 0
    for c, K in enumerate(lengths):
        if K < 2:
            raise ValueError(f"flow_sums: chain {c} has {K} features; a chain needs K >= 2")
        chain = described[start:start + K]
        shape, _, dtype, device = chain[0]
        for k, (other_shape, _, other_dtype, other_device) in enumerate(chain):
            # The kernels index every feature like feature 0: a mismatch would read out of
            # bounds.
            if (other_shape, other_dtype, other_device) != (shape, dtype, device):
                raise ValueError(
                    f"flow_sums: chain {c} feature {k} is {tuple(other_shape)} {other_dtype} "
                    f"on {other_device} but its feature 0 is {tuple(shape)} {dtype} on "
                    f"{device}; a chain needs one shape, dtype and device")
        first_dtype, first_device = described[0][2], described[0][3]
        if (dtype, device) != (first_dtype, first_device):
            raise ValueError(f"flow_sums: chain {c} is {dtype} on {device} but chain 0 is "
                             f"{first_dtype} on {first_device}; one call takes one dtype "
                             "and device")
        batch, n = shape[0], math.prod(shape[1:])
        layouts = {_sample_layout(torch.empty_strided(s, st, device="meta"))
                   for s, st, _, _ in chain}
        copy = None in layouts or len(layouts) > 1
        if copy:  # contiguous, the one layout every feature can take
            strides = torch.empty(shape, device="meta").stride()[1:]
            sample_stride = n
        else:
            strides = chain[0][1][1:]
            sample_stride = chain[0][1][0] if batch > 1 else n
        n_blocks = triton.cdiv(n, block_size)
        chains.append(_ChainLayout(K, shape, n, n_blocks, copy, strides))
        rows.append([K, n, sample_stride, start, partial, n_blocks, sums, batch])
        work += [[c, b, block] for b in range(batch) for block in range(n_blocks)]
        start += K
        partial += batch * n_blocks * 3 * (K - 1)
        sums += batch * 3 * (K - 1)
    device = described[0][3]
    aligned = all(n % 16 == 0 and sample_stride % 16 == 0
                  for _, n, sample_stride, *_ in rows)
    samples = [[c, b] for c, row in enumerate(rows) for b in range(row[-1])]
    return _Layout(chains, torch.tensor(rows, dtype=torch.int64, device=device),
                   torch.tensor(work, dtype=torch.int64, device=device).reshape(-1, 3),
                   torch.tensor(samples, dtype=torch.int64, device=device).reshape(-1, 2),
                   triton.next_power_of_2(max(lengths) - 1), sums, aligned)


def chain_layout(features: Sequence[Tensor], lengths: Sequence[int],
                 block_size: int) -> Tuple[_Layout, List[Tensor]]:
    """The layout's cached tables, and the features as the kernels read them."""
    layout = _cached_layout(_layout_key(features, lengths, block_size))
    readable, start = [], 0
    for chain in layout.chains:
        readable += [x.contiguous() if chain.copy else x for x in features[start:start + chain.K]]
        start += chain.K
    return layout, readable


def _element_offsets(tensors: Sequence[Tensor], what: str) -> Tuple[Tensor, bool]:
    """Each tensor's data pointer minus tensor 0's, in elements, as an int64 tensor on their
    device; and whether every offset is a multiple of 16 elements (the kernels' ALIGNED)."""
    return _offsets_table(tuple(t.data_ptr() for t in tensors), tensors[0].element_size(),
                          tensors[0].device, what)


@functools.lru_cache(maxsize=16)
def _offsets_table(pointers: Tuple[int, ...], size: int, device: torch.device,
                   what: str) -> Tuple[Tensor, bool]:
    """Cached by address: a training loop whose allocator hands out the same addresses step
    after step (and a CUDA graph, whose addresses are fixed) builds no host table after the
    first step."""
    offsets = []
    for k, pointer in enumerate(pointers):
        distance = pointer - pointers[0]
        if distance % size:
            raise ValueError(
                f"flow_sums: {what} {k} starts {distance} bytes from {what} 0, not a multiple "
                f"of the element size ({size} bytes); the Triton kernels address every "
                f"{what} from {what} 0's pointer, so pass features allocated by PyTorch")
        offsets.append(distance // size)
    # From pinned memory the copy does not wait for the GPU to finish its queued work.
    table = torch.tensor(offsets, dtype=torch.int64, pin_memory=device.type == "cuda")
    on_device = table.to(device, non_blocking=True)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # A CUDA graph replays this copy from `table` and reads `on_device`: both must
        # outlive the graph, whatever the cache evicts.
        _KEPT_FOR_CUDA_GRAPHS.append((table, on_device))
    return on_device, all(offset % 16 == 0 for offset in offsets)


_KEPT_FOR_CUDA_GRAPHS: List[Tuple[Tensor, Tensor]] = []


def partial_sums(features: Sequence[Tensor], layout: _Layout, block_size: int) -> Tensor:
    """The forward kernel's per-block partial sums: chain c's (B, n_blocks, 3, K-1) block
    after the previous chains'."""
    x = features[0]
    offsets, aligned = _element_offsets(features, "feature")
    partials = x.new_zeros(sum(c.shape[0] * c.blocks * 3 * (c.K - 1) for c in layout.chains),
                           dtype=accumulation_dtype(x.dtype))
    if layout.work_table.shape[0]:
        wrap_triton(_flow_sums_kernel)[(layout.work_table.shape[0],)](
            x, offsets, layout.chain_table, layout.work_table, partials, BLOCK=block_size,
            ALIGNED=aligned and layout.aligned_strides)
    return partials


def flow_sums(features: Sequence[Tensor], lengths: Sequence[int],
              block_size: int = 1024) -> Tensor:
    """The packed flow sums of the chains (see ffr_fast.flow.ops), in float32 (float64 for
    float64 features). block_size: elements of one sample per program."""
    layout, features = chain_layout(features, lengths, block_size)
    partials = partial_sums(features, layout, block_size)
    # Each chain's (B, n_blocks, 3, K-1) partials summed over blocks in a fixed order.
    sizes = [c.shape[0] * c.blocks * 3 * (c.K - 1) for c in layout.chains]
    sums = [block.view(c.shape[0], c.blocks, 3 * (c.K - 1)).sum(1).reshape(-1)
            for c, block in zip(layout.chains, partials.split(sizes))]
    return torch.cat(sums)


def flow_sums_backward(features: Sequence[Tensor], lengths: Sequence[int], grad_sums: Tensor,
                       block_size: int = 1024) -> List[Tensor]:
    """The gradients of <grad_sums, flow_sums(features, lengths)> (see
    ffr_fast.flow.reference.flow_sums_backward), each with its feature's dtype and shape, and its
    strides too when the chain's samples are dense (contiguous, channels_last)."""
    layout, features = chain_layout(features, lengths, block_size)
    x = features[0]
    if tuple(grad_sums.shape) != (layout.sums_size,):
        raise ValueError(f"flow_sums_backward: grad_sums has shape {tuple(grad_sums.shape)}; "
                         f"these chains' packed flow sums are ({layout.sums_size},)")
    grad_sums = grad_sums.to(x.device, accumulation_dtype(x.dtype)).contiguous()
    grads = [torch.empty_strided(c.shape, (c.n, *c.strides), dtype=x.dtype, device=x.device)
             for c in layout.chains for _ in range(c.K)]
    offsets, features_aligned = _element_offsets(features, "feature")
    grad_offsets, grads_aligned = _element_offsets(grads, "gradient")
    if layout.work_table.shape[0]:
        wrap_triton(_flow_sums_backward_kernel)[(layout.work_table.shape[0],)](
            x, offsets, layout.chain_table, layout.work_table, grad_sums, grads[0], grad_offsets,
            BLOCK=block_size,
            ALIGNED=features_aligned and grads_aligned and layout.aligned_strides)
    return grads
