"""pytest-benchmark: CIFAR ResNet-56 forward latency, original vs pruned vs pruned+folded,
and the time prune() itself takes.

    .venv/bin/python -m pytest -q --benchmark-only bench/bench_prune.py

One intra-op thread (the 2-core machine is shared); compare rows of the same run.
"""
import pytest
import torch

from ffr_fast import models, prune

from prune_table import ffr_sparse_resnet56

X1 = torch.randn(1, 3, 32, 32)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def variants():
    torch.set_num_threads(1)
    sparse = ffr_sparse_resnet56()
    return {
        "original": sparse.eval(),
        "pruned": prune(sparse, X1, threshold=0.0).model.eval(),
        "pruned+folded": prune(sparse, X1, threshold=0.0, fold_bn=True).model.eval(),
        "ratio0.5": prune(sparse, X1, ratio=0.5, remove_blocks=False).model.eval(),
    }


@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("variant", ["original", "pruned", "pruned+folded", "ratio0.5"])
def test_resnet56_latency(benchmark, variants, variant, batch):
    net, x = variants[variant], torch.randn(batch, 3, 32, 32)
    benchmark.group = f"resnet56 forward, batch {batch}"
    with torch.inference_mode():
        benchmark.pedantic(net, (x,), rounds=10 if batch == 64 else 50, warmup_rounds=2)


def test_prune_resnet56_time(benchmark):
    model = models.resnet56().eval()
    prune(model, X1, ratio=0.5)  # one-off imports and caches
    benchmark.group = "prune() on resnet56"
    result = benchmark.pedantic(prune, (model, X1), {"ratio": 0.5}, rounds=5)
    assert result.report.flops_after < result.report.flops_before
