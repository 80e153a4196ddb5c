"""Training checkpoints: written atomically, checksummed, read with errors that say what is
wrong.

A checkpoint is one torch.save file {"format": FORMAT, "sha256": ..., "payload": uint8 tensor}:
the payload is itself a torch.save of plain data (both read with weights_only=True), and its
SHA-256 is checked on every load, so that flipped bytes anywhere in it are refused instead of
loading as different weights. The payload holds
    config        the TrainConfig of the run, as a dict
    architecture  {"kind": "zoo", name, num_classes, in_channels} to rebuild a zoo model;
                  {"kind": "pruned", ..., "pruned": bytes} adds what save_pruned wrote
    model_state   the state dict
    optimizer, scheduler   their state dicts (None for a freshly pruned model)
    epoch         epochs completed; history  one dict per completed epoch
    rng           torch / CUDA / numpy / python random states
    extra         anything the writer adds (the pruning report, the checkpoint a
                  fine-tuning started from, ...)
A payload with other fields (a newer version's) or without these is refused, not guessed at.

A run folder is held by the process training into it (run_lock): a second run into the same
folder is refused while the first lives.
"""
import contextlib
import fcntl
import hashlib
import io
import json
import os
import pickle
import random
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ffr_fast import models

FORMAT = "ffr_fast.checkpoint/2"  # /1 had no checksum
FILENAME = "checkpoint.pt"
LOCK_FILENAME = "run.lock"
PAYLOAD_FIELDS = ("config", "architecture", "model_state", "optimizer", "scheduler", "epoch",
                  "history", "rng", "extra")
ZOO_RECIPE_FIELDS = ("kind", "name", "num_classes", "in_channels")
ARCHITECTURE_FIELDS = {"zoo": ZOO_RECIPE_FIELDS, "pruned": ZOO_RECIPE_FIELDS + ("pruned",)}
# Fields that may differ between the run that wrote a checkpoint and the run resuming it.
RESUMABLE_CHANGES = ("max_batches", "device")


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used; the message names the file and the reason."""


def _zoo_recipe(config: dict, model: nn.Module) -> dict:
    """The zoo model (name from the config, sizes from the model's ends) `model` came from."""
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    return {"name": config["model"], "num_classes": last.out_features,
            "in_channels": first.in_channels}


def _build_zoo(recipe: dict) -> nn.Module:
    return models.create(recipe["name"], recipe["num_classes"], recipe["in_channels"])


def architecture_of(model: nn.Module, config: dict) -> dict:
    """How to rebuild `model`: its zoo recipe, plus for a pruned model (shapes differ from
    the zoo's) the bytes save_pruned writes, which load_pruned replays on the zoo model."""
    recipe = _zoo_recipe(config, model)
    with torch.device("meta"):
        reference = _build_zoo(recipe)

    def shapes(module: nn.Module) -> dict:
        return {k: tuple(v.shape) for k, v in module.state_dict().items()}

    if shapes(reference) == shapes(model):
        return {"kind": "zoo", **recipe}
    from ffr_fast.pruning import save_pruned

    buffer = io.BytesIO()
    save_pruned(model, buffer)
    return {"kind": "pruned", **recipe, "pruned": buffer.getvalue()}


def rng_state() -> dict:
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, keys.tolist(), position, has_gauss, cached],
            "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    random.setstate(state["python"])


def _atomic_write(path, write) -> None:
    """Write through `write(handle)` to a temporary file in the same folder, then rename it
    over `path`: a crash or Ctrl-C mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_save(obj, path) -> None:
    _atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write_json(path, obj) -> None:
    text = json.dumps(obj, indent=1, default=str) + "\n"
    _atomic_write(path, lambda handle: handle.write(text.encode()))


def save(path, model: nn.Module, config, optimizer=None, scheduler=None, epoch: int = 0,
         history=(), **extra) -> None:
    config = config if isinstance(config, dict) else asdict(config)
    write(path, {
        "config": config, "architecture": architecture_of(model, config),
        "model_state": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": epoch, "history": list(history), "rng": rng_state(), "extra": extra,
    })


def write(path, payload: dict) -> None:
    """Write `payload` (the PAYLOAD_FIELDS) to `path` as a checksummed checkpoint."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    raw = buffer.getvalue()
    # A uint8 tensor, not bytes: its storage is kept raw in the file, so damage to it reaches
    # the checksum instead of breaking the unpickler with an unrelated error.
    atomic_save({"format": FORMAT, "sha256": hashlib.sha256(raw).hexdigest(),
                 "payload": torch.frombuffer(bytearray(raw), dtype=torch.uint8)}, path)


def _read(source, path: Path):
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, AttributeError,
            ImportError, IndexError, KeyError, OSError) as error:
        raise CheckpointError(f"checkpoint {path} cannot be read: truncated, corrupt or not a "
                              f"checkpoint ({type(error).__name__}: {error}); it was left as "
                              "it is") from error


def load(path) -> dict:
    """The checkpoint's payload at `path`, its checksum and fields verified; CheckpointError
    (FileNotFoundError if absent) otherwise."""
    path = Path(path)
    if path.is_dir():
        inside = path / FILENAME
        hint = f"; did you mean {inside}?" if inside.is_file() else ""
        raise CheckpointError(f"{path} is a folder, not a checkpoint file{hint}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    container = _read(path, path)
    if not isinstance(container, dict) or container.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an ffr_fast checkpoint (no {FORMAT!r} marker; "
                              "checkpoints of format /1, without checksum, are no longer read); "
                              "it was left as it is")
    payload = container.get("payload")
    payload = payload.numpy().tobytes() if isinstance(payload, torch.Tensor) else b""
    if hashlib.sha256(payload).hexdigest() != container.get("sha256"):
        raise CheckpointError(f"checkpoint {path} is corrupt: its payload does not match the "
                              "SHA-256 stored with it (damaged on disk or in transfer); it was "
                              "left as it is")
    state = _read(io.BytesIO(payload), path)
    _check_fields(state, path)
    return state


def _check_fields(state, path: Path) -> None:
    """Refuse a payload that is not what save() writes: a field this version does not know
    (a newer version's) would otherwise be ignored, a missing one fail deep in a command."""
    def refuse(what: str):
        raise CheckpointError(f"checkpoint {path} {what}; it was left as it is")

    def check_keys(found, known, where: str, required=True):
        unknown = sorted(set(found) - set(known), key=str)
        if unknown:
            refuse(f"has {where} {unknown} that this version of ffr_fast does not know "
                   "(written by a newer version?); update ffr_fast to use it")
        missing = [key for key in known if key not in found]
        if required and missing:
            refuse(f"lacks the {where} {missing}: it was not written by ffr_fast's "
                   "checkpoint.save")

    if not isinstance(state, dict):
        refuse(f"holds a {type(state).__name__}, not the fields of an ffr_fast checkpoint")
    check_keys(state, PAYLOAD_FIELDS, "fields")
    architecture, config = state["architecture"], state["config"]
    if not isinstance(architecture, dict) or architecture.get("kind") not in ARCHITECTURE_FIELDS:
        kind = architecture.get("kind") if isinstance(architecture, dict) else architecture
        refuse(f"has an architecture of kind {kind!r}, not one of {sorted(ARCHITECTURE_FIELDS)}")
    check_keys(architecture, ARCHITECTURE_FIELDS[architecture["kind"]], "architecture fields")
    if not isinstance(config, dict):
        refuse(f"has a config that is a {type(config).__name__}, not a dict")
    from ffr_fast.study.train import TrainConfig  # train imports this module

    # A config may lack a setting added since it was written: the setting's default is what
    # runs did before it existed.
    check_keys(config, [f.name for f in fields(TrainConfig)], "settings", required=False)
    if not isinstance(state["extra"], dict):
        refuse(f"has extra fields that are a {type(state['extra']).__name__}, not a dict")


def build_model(state: dict) -> nn.Module:
    """The model a checkpoint holds, with its weights loaded."""
    recipe = state["architecture"]
    if recipe["kind"] == "zoo":
        model = _build_zoo(recipe)
    else:
        from ffr_fast.pruning import load_pruned

        model = load_pruned(io.BytesIO(recipe["pruned"]), lambda: _build_zoo(recipe))
    try:
        model.load_state_dict(state["model_state"])
    except RuntimeError as error:
        raise CheckpointError(f"the checkpoint's weights do not fit its architecture "
                              f"({recipe['name']}): {error}") from error
    return model


def file_digest(path) -> str:
    """The SHA-256 of a file's bytes: what a fine-tuning run records of its source."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def check_resumable(state: dict, config) -> None:
    """Refuse to resume a run under a different recipe: the schedule and data order would
    silently differ from the run that wrote the checkpoint."""
    config = config if isinstance(config, dict) else asdict(config)
    changed = {key: (state["config"].get(key), value) for key, value in config.items()
               if key not in RESUMABLE_CHANGES and state["config"].get(key) != value}
    if changed:
        listed = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in changed.items())
        raise CheckpointError(f"cannot resume: the run's settings changed ({listed})")
    if state["optimizer"] is None:
        raise CheckpointError("cannot resume: the checkpoint has no optimizer state (a pruned "
                              "model: fine-tune it with `finetune --checkpoint` instead)")


def refuse_overwrite(path) -> None:
    if Path(path).exists():
        raise FileExistsError(f"{path} already exists; pass --resume to continue that run or "
                              "--force to start over in its place")


class RunFolderBusyError(CheckpointError):
    """Another process is training into the run folder."""


@contextlib.contextmanager
def run_lock(folder):
    """Hold the run folder `folder` (created if need be) for this process: while it is held,
    another run_lock on it, from any process, raises RunFolderBusyError naming the holder,
    instead of two runs writing one checkpoint and history.

    The lock is an flock on folder/run.lock, which the kernel releases when its holder exits,
    however it exits: a lock file a killed run left behind is not locked, and is taken over.
    The holder removes the file on release; a process that opened it just before checks,
    once locked, that its file is still the one at the path, and starts over if not."""
    path = Path(folder) / LOCK_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunFolderBusyError(
                f"{folder} is in use by another run ({holder} holds {path}); wait for it to "
                "finish, or choose another --out") from None
        try:
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()
    try:
        handle.truncate(0)
        handle.write(f"process {os.getpid()}\n")
        handle.flush()
        yield
    finally:
        path.unlink(missing_ok=True)
        handle.close()
