"""pytest-benchmark: the whole flow's FFR penalty (three ResNet-56 chains, K = 9) forward +
backward at batch 1, 2, 8 and 128, through FFRLoss and called directly: the one-call op vs the
eager reference vs torch.compile(reference). The steps are built in overhead_table.py, which
also writes the side-by-side table with the traffic floor and the targets.

    .venv/bin/python -m pytest -q --benchmark-only bench/bench_overhead.py
"""
import pytest
import torch

from overhead_table import BATCHES, make_steps


@pytest.fixture(scope="module", params=BATCHES, ids=lambda b: f"batch{b}")
def steps(request):
    torch.compiler.reset()  # compiled code is specialised on shapes: one batch at a time
    return request.param, make_steps(request.param)


@pytest.mark.parametrize("method", ["FFRLoss (op)", "FFRLoss (eager reference)",
                                    "FFRLoss (torch.compile(reference))", "direct (op)",
                                    "direct (eager reference)",
                                    "direct (torch.compile(reference))"])
def test_whole_flow_forward_backward(benchmark, steps, method):
    batch, by_method = steps
    benchmark.group = f"FFR whole flow fwd+bwd, batch {batch}"
    benchmark.pedantic(by_method[method], rounds=3 if batch == 128 else 20, warmup_rounds=2)
