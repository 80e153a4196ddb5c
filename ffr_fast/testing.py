"""Helpers shared by ffr_fast's tests and benchmarks: one home for the tolerances of the op
against the float64 reference, for random chains, for random models that look trained
(and FFR-sparsified) for the pruner and the checks of what it returns, for counting the
forward hooks a model is left with, and for CIFAR-10 folders written on the fly.

Tolerances are relative to the largest reference value (relative_error): float64 1e-10,
float32 1e-5, float16/bfloat16 1e-2 against the float64 reference of the upcast inputs.
"""
import contextlib
import copy
import pickle
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2,
             torch.bfloat16: 1e-2}


def random_chain(K: int, shape: Sequence[int], dtype: torch.dtype = torch.float32,
                 device="cpu", seed: int = 0, step: Optional[float] = None) -> List[Tensor]:
    """K random features of one shape, drawn in float64 and then cast (so every dtype sees
    the same values). step=None: independent features; step=s: a feature flow, each feature
    the previous one plus s * noise (s = 1e-4 makes nearly equal neighbours)."""
    generator = torch.Generator(device).manual_seed(seed)

    def noise():
        return torch.randn(tuple(shape), generator=generator, dtype=torch.float64,
                           device=device)

    chain = [noise()]
    for _ in range(K - 1):
        chain.append(noise() if step is None else chain[-1] + step * noise())
    return [x.to(dtype) for x in chain]


def random_chains(layout: Sequence[Sequence], dtype: torch.dtype = torch.float32, device="cpu",
                  seed: int = 0, step: Optional[float] = None) -> List[List[Tensor]]:
    """One random chain per (K, shape) of layout, each from its own seed."""
    return [random_chain(K, shape, dtype, device, seed + i, step)
            for i, (K, shape) in enumerate(layout)]


def upcast(features: Sequence[Tensor]) -> List[Tensor]:
    """Detached float64 copies: what the reference is evaluated on."""
    return [x.detach().double() for x in features]


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64."""
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


# -- models for the pruner's tests and benchmarks: random, but looking trained ----------
def look_trained(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN affine parameters and running statistics, as after training; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return model.eval()


def zero_rows(layer: nn.Module, rows: Sequence[int]) -> None:
    """Make output `rows` of a layer's weight (and of its bias, if any) exactly zero."""
    with torch.no_grad():
        layer.weight[rows] = 0
        if layer.bias is not None:
            layer.bias[rows] = 0


def kill_channels(model: nn.Module, path: str, channels: Sequence[int],
                  bn_path: Optional[str] = None) -> None:
    """Make output `channels` of layer `path` (and of its BN) exactly zero."""
    for p in (path, bn_path):
        if p is not None:
            zero_rows(model.get_submodule(p), channels)


def zero_heads(qkv_weight: Tensor, qkv_bias: Optional[Tensor], heads: Sequence[int],
               num_heads: int) -> None:
    """Zero the q, k and v rows of attention `heads` in a fused qkv projection (nn.Linear's
    weight and bias, or nn.MultiheadAttention's in_proj_weight and in_proj_bias): q, k and v
    are three blocks of (num_heads, head_dim) rows."""
    inner = qkv_weight.shape[0] // 3
    head_dim = inner // num_heads
    rows = [block * inner + h * head_dim + i for block in range(3) for h in heads
            for i in range(head_dim)]
    with torch.no_grad():
        qkv_weight[rows] = 0
        if qkv_bias is not None:
            qkv_bias[rows] = 0


# -- checks of what the pruner returns -----------------------------------------------------
def outputs(model: nn.Module, x: Tensor) -> Tensor:
    """The model's output on x in eval mode, without autograd."""
    with torch.no_grad():
        return model.eval()(x)


def assert_same_output(original: nn.Module, result, x: Tensor) -> None:
    """prune()'s `result` computes what `original` computes on x, to 1e-5 of its largest
    output, and its report says so without calling itself approximate."""
    assert relative_error(outputs(result.model, x), outputs(original, x)) <= 1e-5
    assert result.report.relative_diff <= 1e-5 and not result.report.approximate


def zeroed_original(model: nn.Module, result) -> nn.Module:
    """A copy of `model` with every parameter position that prune()'s `result` removed set
    to zero: what the pruned model equals, on any input, where no norm was cut."""
    twin = copy.deepcopy(model)
    tensors = dict(twin.named_parameters())
    with torch.no_grad():
        for name, dims in result.structure["kept"].items():
            for dim, kept in enumerate(dims):
                if kept is not None and name in tensors:
                    gone = sorted(set(range(tensors[name].shape[dim])) - set(kept))
                    tensors[name].index_fill_(dim, torch.tensor(gone, dtype=torch.long), 0)
    return twin


def kept_heads(result, path: str, num_heads: int, head_dim: int) -> List[int]:
    """The heads the pruned nn.MultiheadAttention at `path` kept, asserting that its q, k
    and v rows and its output projection's columns kept the same whole heads."""
    kept = result.structure["kept"]
    rows, columns = kept[f"{path}.in_proj_weight"][0], kept[f"{path}.out_proj.weight"][1]
    inner = num_heads * head_dim
    heads = sorted({c // head_dim for c in columns})
    whole = [h * head_dim + i for h in heads for i in range(head_dim)]
    assert columns == whole
    assert rows == [block * inner + c for block in range(3) for c in whole]
    assert kept[f"{path}.in_proj_bias"][0] == rows
    return heads


def snapshot(model: nn.Module) -> dict:
    """A copy of the model's state dict, to show later that nothing in it changed."""
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


# -- forward hooks, counted by what they do ------------------------------------------------
@contextlib.contextmanager
def counted_forward_hooks() -> Iterator[List[Callable]]:
    """Inside the block, every forward hook and pre-hook registered on any module is wrapped
    so that each of its calls appends it to the yielded list, for as long as it stays
    registered: run a forward after the block, and an empty list shows that every hook the
    block registered has been removed."""
    calls: List[Callable] = []
    registrations = {name: getattr(nn.Module, name)
                     for name in ("register_forward_hook", "register_forward_pre_hook")}

    def counting(register):
        def register_counted(module, hook, *args, **kwargs):
            def counted(*hook_args, **hook_kwargs):
                calls.append(hook)
                return hook(*hook_args, **hook_kwargs)
            return register(module, counted, *args, **kwargs)
        return register_counted

    try:
        for name, register in registrations.items():
            setattr(nn.Module, name, counting(register))
        yield calls
    finally:
        for name, register in registrations.items():
            setattr(nn.Module, name, register)


# -- CIFAR-10 folders ------------------------------------------------------------------------
def pickled_batch(images: np.ndarray, labels: List[int], protocol: Optional[int] = None) -> bytes:
    """A CIFAR-10 batch as the python version of the data set stores it."""
    return pickle.dumps({"data": images, "labels": labels}, protocol=protocol)


def write_cifar10(root: Path, batch_bytes: Callable[[np.ndarray, List[int]], bytes] = pickled_batch
                  ) -> np.ndarray:
    """Five training batches and a test batch of 10 random images (one per class) written by
    `batch_bytes`, and the names of the classes; returns the test batch's pixels."""
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, (10, 3072), dtype=np.uint8)
        (root / name).write_bytes(batch_bytes(images, list(range(10))))
    (root / "batches.meta").write_bytes(pickle.dumps({"label_names": list("abcdefghij")}))
    return images
