"""Model metrics: parameter count, FLOPs (torch's FlopCounterMode), sparsity, latency."""
import statistics
import time
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ffr_fast.modes import evaluating


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, inputs: Union[torch.Tensor, Sequence[torch.Tensor]]) -> int:
    """FLOPs of one forward pass on `inputs` (a multiply-add counts as 2), in eval mode."""
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    with evaluating(model), torch.no_grad():
        return flops_of(model, *inputs)[1]


def flops_of(fn: Callable[..., Any], *args) -> Tuple[Any, int]:
    """`fn(*args)` and the FLOPs it ran, counted by torch.utils.flop_counter.

    nn.MultiheadAttention's inference fast path is one fused op the counter has no formula
    for (a ViT's attention would count 0 FLOPs), so it is switched off while counting."""
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False) as counter:
            result = fn(*args)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
    return result, counter.get_total_flops()


def _filters(model: nn.Module) -> Iterable[torch.Tensor]:
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            yield module.weight.detach().flatten(1)


def batchnorm_scales(model: nn.Module) -> Dict[str, nn.Parameter]:
    """The scale parameter (gamma) of every affine BatchNorm layer, by module name."""
    return {name: module.weight for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine}


def weight_sparsity(model: nn.Module, tol: float = 0.0) -> float:
    """Fraction of conv/linear weights with |w| <= tol."""
    zero = total = 0
    for w in _filters(model):
        zero += int((w.abs() <= tol).sum())
        total += w.numel()
    return zero / max(total, 1)


def filter_sparsity(model: nn.Module, tol: float = 0.0) -> float:
    """Fraction of conv/linear output filters whose L2 norm is <= tol (structured sparsity)."""
    zero = total = 0
    for w in _filters(model):
        zero += int((w.norm(dim=1) <= tol).sum())
        total += w.shape[0]
    return zero / max(total, 1)


def measure_latency(model: nn.Module, input_shape: Sequence[int],
                    batch_sizes: Sequence[int] = (1, 64), device: str = "cpu",
                    threads: Optional[int] = None, warmup: int = 5, repeats: int = 30,
                    dtype: torch.dtype = torch.float32) -> Dict[int, float]:
    """Median forward latency in seconds per batch size, in eval mode without autograd.

    `input_shape` excludes the batch dimension, e.g. (3, 32, 32). On CUDA the time comes
    from CUDA events; on CPU from perf_counter. `threads` sets torch's intra-op threads for
    the measurement and is restored afterwards. The model's mode is restored too."""
    device = torch.device(device)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with evaluating(model):
            return {b: _median_latency(model, torch.randn(b, *input_shape, device=device,
                                                          dtype=dtype), warmup, repeats)
                    for b in batch_sizes}
    finally:
        torch.set_num_threads(old_threads)


def _median_latency(model, x, warmup, repeats) -> float:
    cuda = x.device.type == "cuda"
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                model(x)
                end.record()
                torch.cuda.synchronize()
                elapsed = start.elapsed_time(end) / 1e3
            else:
                t0 = time.perf_counter()
                model(x)
                elapsed = time.perf_counter() - t0
            if i >= warmup:
                times.append(elapsed)
    return statistics.median(times)
