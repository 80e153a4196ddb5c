"""Every CLI subcommand end to end on a budget of a few batches: it exits 0 and writes what
it promises."""
import json
import re
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
    assert {row["split"] for row in report["rows"]} == {"val"}
    assert report["rows"][1]["flops"] < report["rows"][0]["flops"]
    assert "| checkpoint |" in (workdir / "report.md").read_text()


def test_demo_writes_table_and_figures(tmp_path, capsys):
    summary = _run(capsys, "demo", "--out", str(tmp_path), "--finetune-epochs", "1",
                   "--latency-repeats", "2", "--seed", "0", "1", *FAST)
    methods = ["none", "slimming", "ffr", "shortgpt", "layerdrop"]
    assert [s["method"] for s in summary["summaries"]] == methods
    assert len(summary["per_seed"]) == 2 * len(methods)
    for s in summary["summaries"]:
        assert s["seeds"] == [0, 1] and s["flops_kept"]["high"] <= 0.5
    for name in ("table.md", "table.json", "flow.png", "frontier.png", "filter_norms.png",
                 "bn_scales.png", "channels_kept.png", "training_curves.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    table = (tmp_path / "table.md").read_text()
    assert "| FFR | 1 | 50% |" in table and " ± " in table
    assert "ffr - shortgpt" in table


def test_vit_demo_writes_its_own_results(tmp_path, capsys):
    summary = _run(capsys, "demo", "--model", "vit_tiny", "--out", str(tmp_path),
                   "--finetune-epochs", "1", "--latency-repeats", "2", "--seed", "0", *FAST)
    assert {(s["method"], s["keep"]) for s in summary["summaries"]} == {
        (m, k) for m in ("shortgpt", "layerdrop", "ffr") for k in (0.5, 0.25)}
    for s in summary["summaries"]:
        assert s["flops_kept"]["high"] <= s["keep"] and s["branches_removed"]["low"] >= 1
    assert len(summary["flow"]["ffr"][0]) == 8  # one step per encoder block
    for name in ("table.md", "table.json", "flow.png", "frontier.png"):
        assert (tmp_path / name).stat().st_size > 0, name


def test_sweep_writes_frontier(tmp_path, capsys):
    summary = _run(capsys, "sweep", "--out", str(tmp_path), "--quick", "--keep", "0.5",
                   "--finetune-epochs", "1", *FAST)
    methods = {"none", "slimming", "ffr", "shortgpt", "layerdrop"}
    assert set(summary["chosen"]) == methods
    assert {p["method"] for p in summary["frontier"]} == methods
    for name in ("sweep.json", "frontier.png", "weights.png", "frontier.md"):
        assert (tmp_path / name).stat().st_size > 0, name


def test_console_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "ffr_fast", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0
    for command in ("demo", "train", "prune", "finetune", "sweep", "bench", "report"):
        assert command in result.stdout


def _refused(capsys, argv, message):
    """The CLI's promise for bad input: `ffr-fast: error: ...` naming it, exit status 2, no
    traceback (argparse's own errors exit through SystemExit(2), as `ffr-fast COMMAND:
    error: ...`)."""
    capsys.readouterr()
    try:
        status = cli.main(argv)
    except SystemExit as exit_:
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2, err
    assert re.search(r"ffr-fast( \w+)?: error: ", err) and message in err, err
    assert "Traceback" not in err
    return err


TRAIN = ["train", "--epochs", "1", "--max-batches", "1", "--batch-size", "16", "--no-progress"]


@pytest.mark.parametrize("flags, message", [
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--lr", "-1"], "--lr must be a finite number > 0"),
    (["--epochs", "-1"], "--epochs must be at least 1"),
    (["--max-batches", "0"], "--max-batches must be at least 1"),
    (["--weight-decay", "inf"], "--weight-decay"),
    (["--regularizer", "layerdrop", "--weight", "1.0"], "drop probability"),
    (["--model", "vgg16_bn"], "model 'vgg16_bn' cannot take digits images of shape (1, 16, 16)"),
    (["--amp", "fp16"], "--amp fp16 needs CUDA"),
    (["--model", "resnet1"], "invalid choice: 'resnet1'"),
])
def test_bad_training_values_are_refused_before_training(tmp_path, capsys, flags, message):
    _refused(capsys, TRAIN + ["--out", str(tmp_path / "run"), *flags], message)
    assert not (tmp_path / "run").exists()  # refused before the first checkpoint


def test_cuda_without_cuda_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    _refused(capsys, TRAIN + ["--out", str(tmp_path), "--device", "cuda"],
             "--device cuda was asked for but CUDA is not available")


@pytest.mark.parametrize("argv, message", [
    (["bench", "x.pt", "--threads", "0"], "argument --threads: must be at least 1, got 0"),
    (["bench", "x.pt", "--batch-sizes", "-1"], "argument --batch-sizes: must be at least 1"),
    (["prune", "--checkpoint", "x.pt", "--flops-target", "1.5"], "must be a fraction in (0, 1)"),
    (["report", "x.pt", "--threshold", "nan"], "must be a finite number >= 0"),
    (["demo", "--epochs", "0"], "argument --epochs: must be at least 1"),
    (["demo", "--seed", "0", "1", "0"], "--seed lists [0] more than once"),
    (["sweep", "--model", "vit_tiny", "--seed", "2", "2"], "--seed lists [2] more than once"),
    (["demo", "--model", "vgg16_bn"], "invalid choice: 'vgg16_bn'"),
])
def test_bad_command_values_are_refused_by_the_parser(capsys, argv, message):
    _refused(capsys, argv, message)


def test_sweep_refuses_a_bad_budget_before_training(tmp_path, capsys):
    _refused(capsys, ["sweep", "--out", str(tmp_path / "sweep"), "--keep", "0.5", "1.5"],
             "argument --keep: must be a fraction in (0, 1), got 1.5")
    assert not (tmp_path / "sweep").exists()


def _cifar10(root, labels_of_test=None, module_in_meta=None):
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [int(v) for v in rng.integers(0, 10, 6)]
        if name == "test_batch" and labels_of_test is not None:
            labels = labels_of_test
        batch = {"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8), "labels": labels}
        (root / name).write_bytes(pickle.dumps(batch))
    meta = pickle.dumps({"label_names": [str(i) for i in range(10)]})
    if module_in_meta is not None:  # protocol 0: GLOBAL module.Thing, empty tuple, REDUCE
        meta = f"c{module_in_meta}\nThing\n)R.".encode()
    (root / "batches.meta").write_bytes(meta)


@pytest.mark.parametrize("damage, message", [
    (dict(labels_of_test=[0, 1, 2, 3, 4, 12]), "test labels span 0..12, outside 0..9"),
    (dict(module_in_meta="no_such_module"), "not a readable CIFAR meta pickle"),
])
def test_bad_cifar_folders_are_refused_before_training(tmp_path, capsys, damage, message):
    _cifar10(tmp_path, **damage)
    _refused(capsys, TRAIN + ["--out", str(tmp_path / "run"), "--data", "cifar10",
                              "--data-root", str(tmp_path)], message)
    assert not (tmp_path / "run").exists()


def test_image_size_applies_to_digits_and_is_refused_for_cifar(tmp_path, capsys):
    from ffr_fast.study import data

    assert data.load("digits", image_size=24).input_shape == (1, 24, 24)
    assert data.load("digits").input_shape == (1, 16, 16)
    _cifar10(tmp_path)
    _refused(capsys, TRAIN + ["--out", str(tmp_path / "run"), "--data", "cifar10",
                              "--data-root", str(tmp_path), "--image-size", "16"],
             "CIFAR images are 32x32; --image-size 16 is not supported")


def test_train_seed_leaves_the_split_alone_and_split_seed_moves_it(tmp_path, capsys):
    one = _run(capsys, *TRAIN, "--out", str(tmp_path / "a"), "--seed", "1")
    two = _run(capsys, *TRAIN, "--out", str(tmp_path / "b"), "--seed", "2")
    assert one["param_digests"] != two["param_digests"]
    configs = [checkpoint.load(tmp_path / run / checkpoint.FILENAME)["config"]
               for run in ("a", "b")]
    assert [c["split_seed"] for c in configs] == [0, 0] and [c["seed"] for c in configs] == [1, 2]
    _run(capsys, *TRAIN, "--out", str(tmp_path / "c"), "--split-seed", "5")
    assert checkpoint.load(tmp_path / "c" / checkpoint.FILENAME)["config"]["split_seed"] == 5
