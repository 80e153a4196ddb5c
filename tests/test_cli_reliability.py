"""The command line with runs, files and folders that are not what a command expects: a
resume from another source, a model pruned twice, two runs into one folder, crafted CIFAR
pickles, folders too small to split, outputs that cannot be written, checkpoints with
foreign contents. Each is refused with `ffr-fast: error:` and exit 2, or works."""
import io
import os
import pickle
import signal
import struct
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

import ffr_fast
from ffr_fast import load_pruned, models, prune, save_pruned
from ffr_fast.pruning.serialize import record_source
from ffr_fast.study import checkpoint, cli, data
from ffr_fast.testing import kill_channels, pickled_batch, write_cifar10

from test_cli import _refused, _run

TINY = ["--epochs", "1", "--max-batches", "1", "--batch-size", "16", "--no-progress"]


def _train(out, *flags):
    assert cli.main(["train", "--out", str(out), *TINY, *flags]) == 0


@pytest.fixture(scope="module")
def training_run(tmp_path_factory):
    """The checkpoint of a tiny training run (resnet20 on digits)."""
    folder = tmp_path_factory.mktemp("run")
    _train(folder)
    return folder / checkpoint.FILENAME


@pytest.fixture(scope="module")
def trained(training_run):
    """A tiny trained resnet20 whose first residual branch outputs exactly zero: prune
    removes that block (as it removes the branches training drove to zero)."""
    state = checkpoint.load(training_run)
    model = checkpoint.build_model(state)
    kill_channels(model, "layer1.0.conv2", range(16), bn_path="layer1.0.bn2")
    path = training_run.parent.parent / "dead-block" / checkpoint.FILENAME
    checkpoint.save(path, model, state["config"], epoch=state["epoch"])
    return path


def _prune(capsys, source, out, *flags):
    return _run(capsys, "prune", "--checkpoint", str(source), "--out", str(out),
                "--ratio", "0.2", "--no-progress", *flags)


def _finetune(capsys, source, out, *flags):
    return _run(capsys, "finetune", "--checkpoint", str(source), "--out", str(out), *TINY,
                *flags)


# -- a model pruned, fine-tuned and pruned again ------------------------------------------

def test_pruning_a_pruned_model_again_saves_a_file_every_command_loads(trained, tmp_path,
                                                                      capsys):
    first = _prune(capsys, trained, tmp_path / "p1")
    assert [b["block"] for b in first["removed_blocks"]] == ["layer1.0"]
    _finetune(capsys, tmp_path / "p1" / "pruned.pt", tmp_path / "f1")
    second = _prune(capsys, tmp_path / "f1" / checkpoint.FILENAME, tmp_path / "p2")
    assert second["params_after"] < second["params_before"]
    again = tmp_path / "p2" / "pruned.pt"
    tuned = _finetune(capsys, again, tmp_path / "f2")
    assert tuned["epochs"] == 1
    bench = _run(capsys, "bench", str(again), str(tmp_path / "f2" / checkpoint.FILENAME),
                 "--batch-sizes", "1", "--no-progress")
    assert [row["params"] for row in bench["results"]] == [second["params_after"]] * 2


def test_a_model_pruned_three_times_is_rebuilt_from_the_original():
    def original():
        return models.resnet20(num_classes=10, in_channels=1)

    torch.manual_seed(0)
    model = original_model = original().eval()
    kill_channels(model, "layer1.0.conv2", range(16), bn_path="layer1.0.bn2")
    x = torch.randn(2, 1, 16, 16)
    for fold_bn in (False, False, True):  # rewired (a block removed), sliced, folded
        result = prune(model, (x,), ratio=0.2, fold_bn=fold_bn)
        record_source(result, model)
        assert (result.structure.get("base") is not None) == (model is not original_model)
        model = result.model
    buffer = io.BytesIO()
    save_pruned(result, buffer)
    buffer.seek(0)
    loaded = load_pruned(buffer, original).eval()
    assert torch.equal(loaded(x), model.eval()(x))


# -- resuming a fine-tuning -----------------------------------------------------------------

def test_finetune_resume_refuses_a_run_from_another_source(trained, tmp_path, capsys):
    _prune(capsys, trained, tmp_path / "a")
    _prune(capsys, trained, tmp_path / "b", "--importance", "l1")
    run = tmp_path / "run"
    _finetune(capsys, tmp_path / "a" / "pruned.pt", run)
    before = (run / checkpoint.FILENAME).read_bytes()
    err = _refused(capsys, ["finetune", "--checkpoint", str(tmp_path / "b" / "pruned.pt"),
                            "--out", str(run), "--resume", *TINY], "cannot resume")
    assert str(tmp_path / "a" / "pruned.pt") in err and str(tmp_path / "b" / "pruned.pt") in err
    _refused(capsys, ["finetune", "--checkpoint", str(tmp_path / "a" / "pruned.pt"),
                      "--out", str(trained.parent), "--resume", *TINY],
             "records no checkpoint it fine-tunes")
    _refused(capsys, ["train", "--out", str(run), "--resume", *TINY],
             f"finetune --checkpoint {tmp_path / 'a' / 'pruned.pt'}")
    assert (run / checkpoint.FILENAME).read_bytes() == before
    resumed = _finetune(capsys, tmp_path / "a" / "pruned.pt", run, "--resume")
    assert resumed["epochs"] == 1


# -- one run folder, two runs ---------------------------------------------------------------

def test_a_second_run_into_a_busy_folder_is_refused_and_a_dead_holders_lock_is_taken(
        tmp_path, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from ffr_fast.study import checkpoint\n"
         f"with checkpoint.run_lock({str(run)!r}):\n    print('held', flush=True)\n"
         "    sys.stdin.read()"],
        cwd=Path(ffr_fast.__file__).parents[1], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        _refused(capsys, ["train", "--out", str(run), *TINY],
                 f"{run} is in use by another run (process {holder.pid} holds")
        _refused(capsys, ["train", "--out", str(run), "--force", *TINY], "is in use")
        assert not (run / checkpoint.FILENAME).exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding it: its lock file stays behind
        holder.wait()
    assert (run / checkpoint.LOCK_FILENAME).exists()
    _train(run)
    assert checkpoint.load(run / checkpoint.FILENAME)["epoch"] == 1
    assert not (run / checkpoint.LOCK_FILENAME).exists()


def test_the_run_lock_is_exclusive_and_released(tmp_path):
    with checkpoint.run_lock(tmp_path):
        with pytest.raises(checkpoint.RunFolderBusyError, match=f"process {os.getpid()}"):
            with checkpoint.run_lock(tmp_path):
                pass
    with checkpoint.run_lock(tmp_path):
        pass


# -- CIFAR pickles --------------------------------------------------------------------------

def _python2_batch(images, labels):
    """A batch as the CIFAR-10 python files hold it: pickled by Python 2 (protocol 2, the
    pixels a byte string), the array named through numpy.core.multiarray._reconstruct."""
    def short(text):
        return b"U" + bytes([len(text)]) + text

    count, width = images.shape
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + short(b"b")
             + b"\x87R(K\x01K" + bytes([count]) + b"M" + struct.pack("<H", width) + b"\x86"
             + b"cnumpy\ndtype\n" + short(b"u1") + b"K\x00K\x01\x87R(K\x03" + short(b"|")
             + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89T"
             + struct.pack("<I", images.nbytes) + images.tobytes() + b"tb")
    label_list = b"](" + b"".join(b"K" + bytes([label]) for label in labels) + b"e"
    return b"\x80\x02}(" + short(b"data") + array + short(b"labels") + label_list + b"u."


@pytest.mark.parametrize("batch_bytes", [
    _python2_batch, partial(pickled_batch, protocol=2), partial(pickled_batch, protocol=5),
], ids=["python2", "protocol2", "protocol5"])
def test_cifar_batches_as_python_and_numpy_versions_write_them_load(tmp_path, batch_bytes):
    test_images = write_cifar10(tmp_path, batch_bytes)
    splits = data.load("cifar10", tmp_path)
    assert len(splits.train) + len(splits.val) == 50
    assert torch.equal(splits.test.images, torch.from_numpy(test_images).view(-1, 3, 32, 32))
    assert splits.test.labels.tolist() == list(range(10))


class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("name", ["batches.meta", "data_batch_1"])
def test_a_cifar_pickle_that_would_run_code_is_refused_unrun(tmp_path, capsys, name):
    write_cifar10(tmp_path)
    marker = tmp_path / "ran"
    (tmp_path / name).write_bytes(pickle.dumps({"data": _RunsACommand(marker)}))
    err = _refused(capsys, ["train", "--out", str(tmp_path / "run"), "--data", "cifar10",
                            "--data-root", str(tmp_path), *TINY],
                   "not a readable CIFAR")
    assert "system, which CIFAR files never do" in err and name in err
    assert not marker.exists() and not (tmp_path / "run").exists()


# -- image folders ----------------------------------------------------------------------------

def _image_folder(root, per_class, classes=("cat", "dog")):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
                    root / split / name / f"{i}.png")


@pytest.mark.parametrize("per_class, classes, message", [
    (1, ("cat", "dog"), "has 2 images over 2 classes (1 to 1 per class): the validation "
                        "split, 10% of each class, gets none"),
    (6, ("cat",), "has images of 1 class ['cat']: a classifier needs at least 2"),
])
def test_an_image_folder_too_small_to_validate_on_is_refused(tmp_path, capsys, per_class,
                                                            classes, message):
    _image_folder(tmp_path, per_class, classes)
    _refused(capsys, ["train", "--out", str(tmp_path / "run"), "--data", "folder",
                      "--data-root", str(tmp_path), "--image-size", "8", *TINY], message)
    assert not (tmp_path / "run").exists()


def test_a_corrupt_image_is_named(tmp_path, capsys):
    _image_folder(tmp_path, 6)
    broken = tmp_path / "train" / "dog" / "3.png"
    broken.write_bytes(broken.read_bytes()[:40])
    _refused(capsys, ["train", "--out", str(tmp_path / "run"), "--data", "folder",
                      "--data-root", str(tmp_path), *TINY],
             f"{broken} is not a readable image")


# -- outputs ----------------------------------------------------------------------------------

def test_an_out_that_cannot_be_a_folder_is_refused_before_work(trained, tmp_path, capsys,
                                                               monkeypatch):
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    for argv in (["train", "--out", str(a_file / "run"), *TINY],
                 ["finetune", "--checkpoint", str(trained), "--out", str(a_file), *TINY],
                 ["bench", str(trained), "--out", str(a_file), "--no-progress"]):
        _refused(capsys, argv, f"{a_file} is a file")

    def no_pruning(*args, **kwargs):
        raise AssertionError("pruned before the output was checked")

    monkeypatch.setattr("ffr_fast.pruning.prune", no_pruning)
    _refused(capsys, ["prune", "--checkpoint", str(trained), "--out", str(a_file),
                      "--no-progress"], f"--out {a_file} cannot be used as a folder")
    assert a_file.read_text() == "mine"


def test_an_out_without_permission_is_refused(tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and real_access(
        path, mode))  # as a user without write permission sees it (root ignores the mode)
    _refused(capsys, ["train", "--out", str(locked / "run"), *TINY],
             f"--out {locked / 'run'} cannot be created: no permission to write in {locked}")
    assert not (locked / "run").exists()


def test_an_unwritable_folder_midway_is_an_error_not_a_traceback(tmp_path, capsys,
                                                                 monkeypatch):
    def read_only(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    _refused(capsys, ["train", "--out", str(tmp_path / "run"), *TINY], "Permission denied")


def test_a_second_prune_into_a_folder_asks_for_force(trained, tmp_path, capsys):
    _prune(capsys, trained, tmp_path)
    first = (tmp_path / "pruned.pt").read_bytes()
    _refused(capsys, ["prune", "--checkpoint", str(trained), "--out", str(tmp_path),
                      "--ratio", "0.5", "--no-progress"],
             f"{tmp_path / 'pruned.pt'} already exists; pass --force")
    assert (tmp_path / "pruned.pt").read_bytes() == first
    replaced = _prune(capsys, trained, tmp_path, "--force")
    assert replaced["options"] == {"importance": "l2", "scope": "global"}
    assert (tmp_path / "pruned.pt").read_bytes() != first


# -- checkpoints with a valid checksum and foreign contents ---------------------------------

@pytest.mark.parametrize("change, message", [
    (lambda state: [state], "holds a list, not the fields of an ffr_fast checkpoint"),
    (lambda state: {k: v for k, v in state.items() if k != "architecture"},
     "lacks the fields ['architecture']"),
    (lambda state: {**state, "ema_state": {}}, "has fields ['ema_state'] that this version"),
    (lambda state: {**state, "config": {**state["config"], "warmup": 5}},
     "has settings ['warmup'] that this version"),
    (lambda state: {**state, "architecture": {**state["architecture"], "kind": "timm"}},
     "has an architecture of kind 'timm'"),
    (lambda state: {**state, "model_state": {}}, "weights do not fit its architecture"),
])
def test_a_checkpoint_with_foreign_contents_is_refused_by_every_command(
        training_run, tmp_path, capsys, change, message):
    path = tmp_path / checkpoint.FILENAME
    checkpoint.write(path, change(checkpoint.load(training_run)))
    for argv in (["train", "--out", str(tmp_path), "--resume", *TINY],
                 ["finetune", "--checkpoint", str(path), "--out", str(tmp_path / "tuned"), *TINY],
                 ["prune", "--checkpoint", str(path), "--no-progress"],
                 ["bench", str(path), "--no-progress"], ["report", str(path), "--no-progress"]):
        _refused(capsys, argv, message)


def test_a_negative_split_seed_names_the_flag(capsys):
    _refused(capsys, ["train", "--out", "unused", "--split-seed", "-5", *TINY],
             "argument --split-seed: must be an integer >= 0, got -5")
    _refused(capsys, ["demo", "--split-seed", "-5"], "argument --split-seed")
