"""Model metrics: parameter count, FLOPs (torch's FlopCounterMode), sparsity, latency (the
fastest of repeated runs, with how much the runs disagreed)."""
import contextlib
import statistics
import time
import warnings
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

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


@contextlib.contextmanager
def attention_fast_path_off() -> Iterator[None]:
    """torch's inference fast path of nn.MultiheadAttention and the transformer layers off
    inside (torch.backends.mha), as it was after. It computes otherwise than the layers'
    own code: nn.TransformerEncoder's nested tensors write zeros at padded positions, the
    fused kernel turns a float mask of -inf into NaN, and it is one fused op the FLOP
    counter has no formula for (a ViT's attention would count 0 FLOPs). So what prune()
    compares and counts runs with it off."""
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)


@contextlib.contextmanager
def counting_flops() -> Iterator[FlopCounterMode]:
    """A FlopCounterMode over the block (its counts per module too), the fast path off."""
    with attention_fast_path_off(), FlopCounterMode(display=False) as counter:
        yield counter


def flops_of(fn: Callable[..., Any], *args) -> Tuple[Any, int]:
    """`fn(*args)` and the FLOPs it ran, counted by torch.utils.flop_counter."""
    with counting_flops() as counter:
        result = fn(*args)
    return result, counter.get_total_flops()


def _filters(model: nn.Module) -> Iterable[torch.Tensor]:
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            yield module.weight.detach().flatten(1)


# torch's BatchNorm layers, each public class (their shared base class is private).
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
               nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d)


def batchnorm_scales(model: nn.Module) -> Dict[str, nn.Parameter]:
    """The scale parameter (gamma) of every affine BatchNorm layer, by module name."""
    return {name: module.weight for name, module in model.named_modules()
            if isinstance(module, BATCH_NORMS) and module.affine}


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


# A measurement whose median run is this much slower than its fastest was disturbed (a busy
# machine, frequency scaling): its runs disagree too much to compare models by.
NOISY_SPREAD = 1.5


class LatencyWarning(UserWarning):
    """measure_latency's runs at one batch size disagree (Latency.noisy)."""


class Latency(float):
    """Seconds per forward at one batch size: the fastest of the timed runs, as timeit
    reports (interference only ever adds time, so the minimum is the stable figure). A
    float, so that callers can compute with it; it also records `median` (seconds),
    `repeats`, `spread` (median / minimum, 1.0 for runs that agree) and `noisy` (spread >
    NOISY_SPREAD)."""

    median: float
    repeats: int
    spread: float
    noisy: bool

    @classmethod
    def of(cls, times: Sequence[float]) -> "Latency":
        latency = cls(min(times))
        latency.median, latency.repeats = statistics.median(times), len(times)
        latency.spread = latency.median / max(float(latency), 1e-12)
        latency.noisy = latency.spread > NOISY_SPREAD
        return latency


def measure_latency(model: nn.Module, input_shape: Sequence[int],
                    batch_sizes: Sequence[int] = (1, 64), device: str = "cpu",
                    threads: Optional[int] = None, warmup: int = 5, repeats: int = 30,
                    dtype: torch.dtype = torch.float32) -> Dict[int, Latency]:
    """Forward latency per batch size, in eval mode without autograd: a Latency (a float,
    the minimum over `repeats` timed runs after `warmup` untimed ones, in seconds, with the
    median and spread of the runs). A batch size whose runs disagree (spread above
    NOISY_SPREAD) is flagged `noisy` and warned about (LatencyWarning).

    `input_shape` excludes the batch dimension, e.g. (3, 32, 32). On CUDA the time comes
    from CUDA events; on CPU from perf_counter. `threads` sets torch's intra-op threads for
    the measurement and is restored afterwards. The model's mode is restored too."""
    _check_latency_settings(batch_sizes, warmup, repeats)
    device = torch.device(device)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with evaluating(model):
            latencies = {b: Latency.of(_timed_runs(model, torch.randn(
                b, *input_shape, device=device, dtype=dtype), warmup, repeats))
                for b in batch_sizes}
    finally:
        torch.set_num_threads(old_threads)
    for batch, latency in latencies.items():
        if latency.noisy:
            warnings.warn(f"latency at batch {batch} is noisy: the median of {repeats} runs "
                          f"is {latency.spread:.2f}x their minimum (a busy machine?); the "
                          "minimum is reported, compare models measured so with care",
                          LatencyWarning, stacklevel=2)
    return latencies


def _check_latency_settings(batch_sizes, warmup, repeats) -> None:
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1 (the timed runs), got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0 (the untimed runs), got {warmup!r}")
    sizes = list(batch_sizes)
    if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
        raise ValueError(f"batch_sizes must be a non-empty list of ints >= 1, got {batch_sizes!r}")


def _timed_runs(model, x, warmup, repeats) -> List[float]:
    cuda = x.device.type == "cuda"
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            if cuda:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
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
    return times
