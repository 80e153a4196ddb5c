"""Every CLI subcommand end to end on a budget of a few batches: it exits 0 and writes what
it promises."""
import json
import subprocess
import sys

import pytest

from ffr_fast.study import checkpoint, cli

FAST = ["--epochs", "1", "--max-batches", "2", "--no-progress"]


def _run(capsys, *argv):
    capsys.readouterr()
    assert cli.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


def test_train_prune_finetune_bench_report(workdir, capsys):
    trained = workdir / "trained"
    summary = _run(capsys, "train", "--out", str(trained), "--batch-size", "16",
                   "--regularizer", "ffr", "--weight", "0.01", *FAST)
    assert summary["epochs"] == 1 and summary["history"][0]["train_penalty"] > 0
    assert json.loads((trained / "history.json").read_text()) == summary["history"]
    assert checkpoint.load(trained / "checkpoint.pt")["epoch"] == 1

    pruned = _run(capsys, "prune", "--checkpoint", str(trained / "checkpoint.pt"),
                  "--flops-target", "0.6", "--no-progress")
    assert pruned["flops_after"] <= 0.6 * pruned["flops_before"]
    assert (trained / "pruned.pt").is_file() and (trained / "prune_report.json").is_file()

    tuned = workdir / "tuned"
    summary = _run(capsys, "finetune", "--checkpoint", str(trained / "pruned.pt"),
                   "--out", str(tuned), "--batch-size", "16", *FAST)
    assert summary["epochs"] == 1 and (tuned / "history.json").is_file()
    state = checkpoint.load(tuned / "checkpoint.pt")
    assert state["architecture"]["kind"] == "pruned" and state["config"]["regularizer"] == "none"

    bench = _run(capsys, "bench", str(trained / "checkpoint.pt"), str(tuned / "checkpoint.pt"),
                 "--batch-sizes", "1", "4", "--out", str(workdir), "--no-progress")
    unpruned, small = bench["results"]
    assert small["flops"] < unpruned["flops"] and small["params"] < unpruned["params"]
    assert set(small["latency_ms"]) == {"1", "4"} and min(small["latency_ms"].values()) > 0
    assert (workdir / "bench.json").is_file()

    report = _run(capsys, "report", str(trained / "checkpoint.pt"), str(tuned / "checkpoint.pt"),
                  "--split", "val", "--out", str(workdir), "--no-progress")
    assert len(report["rows"]) == 2 and report["table"].startswith("| checkpoint |")
    assert "| checkpoint |" in (workdir / "report.md").read_text()


def test_demo_writes_table_and_figures(tmp_path, capsys):
    summary = _run(capsys, "demo", "--out", str(tmp_path), "--finetune-epochs", "1",
                   "--latency-repeats", "3", *FAST)
    assert [row["method"] for row in summary["rows"]][1:] == ["none", "slimming", "ffr"]
    for name in ("table.md", "table.json", "filter_norms.png", "bn_scales.png",
                 "channels_kept.png", "training_curves.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    for row in summary["rows"][1:]:
        assert row["FLOPs kept"] <= 0.5
    assert "| ffr |" in (tmp_path / "table.md").read_text()


def test_sweep_writes_frontier(tmp_path, capsys):
    summary = _run(capsys, "sweep", "--out", str(tmp_path), "--quick", "--keep", "0.5",
                   "--finetune-epochs", "1", *FAST)
    assert set(summary["chosen"]) == {"none", "slimming", "ffr"}
    assert {p["method"] for p in summary["frontier"]} == {"none", "slimming", "ffr"}
    for name in ("sweep.json", "frontier.png", "weights.png", "frontier.md"):
        assert (tmp_path / name).stat().st_size > 0, name


def test_console_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "ffr_fast", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0
    for command in ("demo", "train", "prune", "finetune", "sweep", "bench", "report"):
        assert command in result.stdout
