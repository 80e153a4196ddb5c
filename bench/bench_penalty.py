"""pytest-benchmark: the FFR penalty forward + backward over the three ResNet-56 chains
(K = 9 each).

- At batch 128, the fused op vs the eager reference vs torch.compile(reference). The steps
  are built in penalty_table.py, which also prints the side-by-side table with the machine's
  copy bandwidth, the traffic floor and peak memory.
- At batch 2, the fused op through its two autograd entry points: ffr_fast.flow.penalty's
  (ffr_fast.flow.ops._FlowPenalty) and a torch.ops call's (the autograd registered on the op),
  the measured reason ffr_fast.flow.penalty keeps its own.

    .venv/bin/python -m pytest -q --benchmark-only bench/bench_penalty.py
"""
import pytest
import torch

from ffr_fast.flow.penalty import flow_penalty_chains

from penalty_table import METHODS, make_step

AUTOGRAD_PATHS = {
    "ffr_fast.flow.penalty (_FlowPenalty)": flow_penalty_chains,
    "torch.ops (registered autograd)": lambda chains: torch.ops.ffr_fast.flow_penalty(
        [x for chain in chains for x in chain], [len(chain) for chain in chains],
        [1.0] * len(chains), 1.0, 1.0, "squared", "diff", 1e-8, 1e-6)[0],
}


@pytest.mark.parametrize("method", list(METHODS))
def test_penalty_forward_backward(benchmark, method):
    benchmark.group = "FFR penalty fwd+bwd, ResNet-56 chains, batch 128"
    benchmark.pedantic(make_step(METHODS[method]), rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("path", list(AUTOGRAD_PATHS))
def test_autograd_paths_at_batch_2(benchmark, path):
    benchmark.group = "fused op fwd+bwd by autograd entry point, ResNet-56 chains, batch 2"
    benchmark.pedantic(make_step(AUTOGRAD_PATHS[path], batch=2), rounds=500, warmup_rounds=50)
