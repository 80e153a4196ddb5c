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
    extra         anything the writer adds (the pruning report, ...)
"""
import hashlib
import io
import json
import os
import pickle
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ffr_fast import models

FORMAT = "ffr_fast.checkpoint/2"  # /1 had no checksum
FILENAME = "checkpoint.pt"
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
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
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
    payload = io.BytesIO()
    torch.save({
        "config": config, "architecture": architecture_of(model, config),
        "model_state": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": epoch, "history": list(history), "rng": rng_state(), "extra": extra,
    }, payload)
    payload = payload.getvalue()
    # A uint8 tensor, not bytes: its storage is kept raw in the file, so damage to it reaches
    # the checksum instead of breaking the unpickler with an unrelated error.
    atomic_save({"format": FORMAT, "sha256": hashlib.sha256(payload).hexdigest(),
                 "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}, path)


def _read(source, path: Path):
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, AttributeError,
            ImportError, IndexError, KeyError, OSError) as error:
        raise CheckpointError(f"checkpoint {path} cannot be read: truncated, corrupt or not a "
                              f"checkpoint ({type(error).__name__}: {error}); it was left as "
                              "it is") from error


def load(path) -> dict:
    """The checkpoint's payload at `path`, its checksum verified; CheckpointError
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
    return _read(io.BytesIO(payload), path)


def build_model(state: dict) -> nn.Module:
    """The model a checkpoint holds, with its weights loaded."""
    recipe = state["architecture"]
    if recipe["kind"] == "zoo":
        model = _build_zoo(recipe)
    else:
        from ffr_fast.pruning import load_pruned

        model = load_pruned(io.BytesIO(recipe["pruned"]), lambda: _build_zoo(recipe))
    model.load_state_dict(state["model_state"])
    return model


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
