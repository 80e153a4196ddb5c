"""pytest-benchmark: the FFR penalty forward + backward over the three ResNet-56 chains at
batch 128 (K = 9 each): the fused op vs the eager reference vs torch.compile(reference). The
steps are built in penalty_table.py, which also prints the side-by-side table with the
machine's copy bandwidth, the traffic floor and peak memory.

    .venv/bin/python -m pytest -q --benchmark-only bench/bench_penalty.py
"""
import pytest

from penalty_table import METHODS, make_step


@pytest.mark.parametrize("method", list(METHODS))
def test_penalty_forward_backward(benchmark, method):
    benchmark.group = "FFR penalty fwd+bwd, ResNet-56 chains, batch 128"
    benchmark.pedantic(make_step(method), rounds=5, warmup_rounds=1)
