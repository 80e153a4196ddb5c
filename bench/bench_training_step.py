"""pytest-benchmark: one CIFAR ResNet-56 training step at batch 128, without a regularizer,
with FFRLoss on the fused op, and with FFRLoss on the eager reference (the steps themselves
are built in training_step_table.py, which also writes the results table).

    .venv/bin/python -m pytest -q --benchmark-only bench/bench_training_step.py
"""
import pytest

from training_step_table import VARIANTS, make_training_step


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_resnet56_training_step(benchmark, variant):
    benchmark.group = "ResNet-56 training step, batch 128"
    benchmark.pedantic(make_training_step(variant), rounds=3, warmup_rounds=1)
