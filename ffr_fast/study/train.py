"""The training loop shared by `train`, `finetune`, the demo and the sweep.

One loop for one process and for `torchrun` (DDP: gloo on CPU, nccl on CUDA, found from the
RANK / WORLD_SIZE variables torchrun sets). The data order of epoch e depends only on
(seed, e) through DistributedSampler, so a run resumed from its epoch-e checkpoint replays
exactly the batches an uninterrupted run would have seen.

A checkpoint is written atomically after every epoch (and once before the first, so that
Ctrl-C always leaves one to resume from), history.json next to it; see
ffr_fast.study.checkpoint for its contents. The run folder is locked for the whole run: a
second run into it is refused.
"""
import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from ffr_fast import models
from ffr_fast.flow.reference import CURVATURES, NORMS
from ffr_fast.study import checkpoint, regularizers


@dataclass
class TrainConfig:
    """Everything that defines a run; stored in its checkpoint. Defaults are the demo's."""
    model: str = "resnet20"
    data: str = "digits"
    data_root: Optional[str] = None
    image_size: Optional[int] = None  # None: the data set's own size (digits 16, folder 32)
    epochs: int = 10
    batch_size: int = 64  # global: split across DDP processes
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    regularizer: str = "none"
    weight: float = 0.0
    ffr_norm: str = "squared"
    ffr_curvature: str = "diff"
    ffr_curv_ratio: float = 1.0
    seed: int = 0  # initial weights and data order
    split_seed: int = 0  # which images are train / val / test: fixed unless asked
    max_batches: Optional[int] = None  # per epoch, for smoke tests
    amp: Optional[str] = None  # None | "bf16" | "fp16"
    device: str = "cpu"


AMP_MODES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DEVICES = ("cpu", "cuda")


def check_config(config: TrainConfig) -> None:
    """Refuse a config that cannot train as asked, before any data is read or step taken.
    Messages name the command-line flag."""
    def need(ok: bool, flag: str, value, what: str):
        if not ok:
            raise ValueError(f"{flag} must be {what}, got {value!r}")

    need(config.epochs >= 1, "--epochs", config.epochs, "at least 1")
    need(config.batch_size >= 1, "--batch-size", config.batch_size, "at least 1")
    need(math.isfinite(config.lr) and config.lr > 0, "--lr", config.lr, "a finite number > 0")
    need(math.isfinite(config.momentum) and 0 <= config.momentum < 1, "momentum",
         config.momentum, "in [0, 1)")
    need(math.isfinite(config.weight_decay) and config.weight_decay >= 0, "--weight-decay",
         config.weight_decay, "a finite number >= 0")
    need(math.isfinite(config.weight) and config.weight >= 0, "--weight", config.weight,
         "a finite number >= 0")
    need(math.isfinite(config.ffr_curv_ratio) and config.ffr_curv_ratio >= 0,
         "--ffr-curv-ratio", config.ffr_curv_ratio, "a finite number >= 0")
    need(config.max_batches is None or config.max_batches >= 1, "--max-batches",
         config.max_batches, "at least 1 (or left out)")
    need(config.image_size is None or config.image_size >= 1, "--image-size",
         config.image_size, "at least 1")
    need(config.split_seed >= 0, "--split-seed", config.split_seed, "an integer >= 0")
    need(config.model in models.ZOO, "--model", config.model, f"one of {sorted(models.ZOO)}")
    need(config.regularizer in regularizers.REGULARIZERS, "--regularizer", config.regularizer,
         f"one of {regularizers.REGULARIZERS}")
    need(config.ffr_norm in NORMS, "--ffr-norm", config.ffr_norm, f"one of {NORMS}")
    need(config.ffr_curvature in CURVATURES, "--ffr-curvature", config.ffr_curvature,
         f"one of {CURVATURES}")
    need(config.amp is None or config.amp in AMP_MODES, "--amp", config.amp,
         f"one of {tuple(AMP_MODES)}")
    need(config.device in DEVICES, "--device", config.device, f"one of {DEVICES}")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available here")
    if config.amp == "fp16" and config.device != "cuda":
        raise ValueError("--amp fp16 needs CUDA; use bf16 on CPU")
    if config.regularizer == "layerdrop":
        need(config.weight < 1, "--weight", config.weight,
             "a drop probability in [0, 1) for layerdrop")


@dataclass
class TrainResult:
    model: nn.Module
    history: List[dict] = field(default_factory=list)
    checkpoint: Optional[Path] = None
    interrupted: bool = False


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Distributed:
    """Join the process group torchrun describes in the environment; a no-op without it."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size())


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def teardown_distributed(succeeded: bool) -> None:
    """Leave the process group. After a run that succeeded on this rank, the ranks first meet
    at a barrier: a rank that tears its gloo connections down while a peer still reads from
    them makes that peer abort ("terminate called without an active exception"). After a
    failure there is no barrier: the peers may never arrive."""
    if not dist.is_initialized():
        return
    if succeeded:
        dist.barrier()
    dist.destroy_process_group()


def resolve_device(config: TrainConfig) -> torch.device:
    if config.device == "cuda":  # one GPU per process, torchrun's LOCAL_RANK picks it
        index = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device(config.device)


def autocast(config: TrainConfig, device: torch.device):
    if config.amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_MODES[config.amp])


def make_optimizer(model: nn.Module, config: TrainConfig, steps_per_epoch: int):
    """SGD with momentum and a per-step cosine schedule over the whole run."""
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay, nesterov=True)
    total = max(1, config.epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
    return optimizer, scheduler


@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch_size: int = 256, device="cpu",
             max_batches: Optional[int] = None) -> dict:
    """Loss and accuracy of `model` on `dataset` (all of it, on every rank)."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for step, (images, labels) in enumerate(DataLoader(dataset, batch_size=batch_size)):
        if max_batches is not None and step >= max_batches:
            break
        images, labels = images.to(device), labels.to(device)
        logits = model(images).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        count += len(labels)
    model.train(was_training)
    return {"loss": loss_sum / max(count, 1), "accuracy": correct / max(count, 1)}


def _train_epoch(model, ddp_model, loader, penalty, optimizer, scheduler, scaler, config,
                 device, dist_info, epoch, on_batch_end, progress) -> dict:
    model.train()
    totals = torch.zeros(4, dtype=torch.float64)  # loss, penalty, correct, count
    steps = len(loader) if config.max_batches is None else min(len(loader), config.max_batches)
    bar = tqdm(loader, total=steps, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
               disable=not (dist_info.is_main and progress))
    for step, (images, labels) in enumerate(bar):
        if step >= steps:
            break
        images, labels = images.to(device), labels.to(device)
        with autocast(config, device):
            logits = ddp_model(images)
            task = F.cross_entropy(logits.float(), labels)
            reg = penalty()
        loss = task + reg
        reg = reg.detach()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"epoch {epoch + 1} step {step}: the loss is {loss.item()} "
                                     f"(task {task.item()}, penalty {float(reg)}); lower the "
                                     "learning rate or the regularizer weight")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        batch = torch.tensor([task.item() * len(labels), float(reg) * len(labels),
                              (logits.argmax(1) == labels).sum().item(), len(labels)],
                             dtype=torch.float64)
        totals += batch
        bar.set_postfix(loss=f"{task.item():.3f}", penalty=f"{float(reg):.3g}",
                        acc=f"{totals[2] / totals[3]:.3f}")
        if on_batch_end is not None:
            on_batch_end(epoch, step)
    if dist_info.world_size > 1:
        dist.all_reduce(totals)
        _average_buffers(model, dist_info.world_size)
    loss, reg, correct, count = totals.tolist()
    count = max(count, 1)
    return {"train_loss": loss / count, "train_penalty": reg / count,
            "train_accuracy": correct / count}


def _average_buffers(model: nn.Module, world_size: int) -> None:
    """DDP syncs parameters, but each rank updates BatchNorm running statistics from its
    own last batches: average them so that every rank validates and saves the same model."""
    for buffer in model.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer /= world_size


HISTORY_FILENAME = "history.json"


def fit(model: nn.Module, splits, config: TrainConfig, out_dir=None, resume: bool = False,
        overwrite: bool = False, on_batch_end: Optional[Callable[[int, int], None]] = None,
        progress: bool = True, extra: Optional[dict] = None) -> TrainResult:
    """Train `model` on splits.train for config.epochs, validating on splits.val after every
    epoch; with `out_dir`, checkpoint to out_dir/checkpoint.pt (resume from it if asked) and
    write the history to out_dir/history.json, holding out_dir against other runs
    (checkpoint.run_lock) until the run ends. `extra` is stored in every checkpoint.

    `model` is built by the caller (a zoo model, or a pruned one for fine-tuning) with
    the config's seed already applied. Ctrl-C stops the run, leaves the last epoch's
    checkpoint in place and returns with `interrupted=True`. `on_batch_end(epoch, step)`
    is called after every optimizer step (tests use it to simulate Ctrl-C); `progress` shows
    a progress bar per epoch on stderr (main process only)."""
    check_config(config)
    device = resolve_device(config)
    dist_info = setup_distributed(config.device)
    if config.batch_size % dist_info.world_size:
        raise ValueError(f"--batch-size {config.batch_size} must be divisible by the "
                         f"{dist_info.world_size} processes")
    writes = out_dir is not None and dist_info.is_main
    with checkpoint.run_lock(out_dir) if writes else contextlib.nullcontext():
        return _fit(model, splits, config, device, dist_info, out_dir, resume, overwrite,
                    on_batch_end, progress, extra or {})


def _fit(model, splits, config, device, dist_info, out_dir, resume, overwrite, on_batch_end,
         progress, extra) -> TrainResult:
    model.to(device)
    path = Path(out_dir) / checkpoint.FILENAME if out_dir is not None else None
    sampler = DistributedSampler(splits.train, num_replicas=dist_info.world_size,
                                 rank=dist_info.rank, shuffle=True, seed=config.seed)
    loader = DataLoader(splits.train, batch_size=config.batch_size // dist_info.world_size,
                        sampler=sampler)
    steps = len(loader) if config.max_batches is None else min(len(loader), config.max_batches)
    optimizer, scheduler = make_optimizer(model, config, steps)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    history, start_epoch = [], 0
    if path is not None and resume:
        state = checkpoint.load(path)
        checkpoint.check_resumable(state, config)
        try:
            model.load_state_dict(state["model_state"])
        except RuntimeError as error:
            raise checkpoint.CheckpointError(f"cannot resume {path}: its weights do not fit "
                                             f"its architecture: {error}") from error
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        checkpoint.set_rng_state(state["rng"])
        history, start_epoch = state["history"], state["epoch"]
    elif path is not None and dist_info.is_main and not overwrite:
        checkpoint.refuse_overwrite(path)

    def save(epoch):
        if path is not None and dist_info.is_main:
            checkpoint.save(path, model, config, optimizer, scheduler, epoch, history, **extra)
            checkpoint.atomic_write_json(path.with_name(HISTORY_FILENAME), history)

    ddp_model = model
    if dist_info.world_size > 1:
        # A block LayerDrop skips gives its parameters no gradient in that step.
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=config.regularizer == "layerdrop")
    penalty = regularizers.build(model, config.regularizer, config.weight, config.ffr_norm,
                                 config.ffr_curvature, config.ffr_curv_ratio)
    if start_epoch == 0:
        save(0)
    result = TrainResult(model, history, path)
    try:
        for epoch in range(start_epoch, config.epochs):
            started = time.perf_counter()
            sampler.set_epoch(epoch)
            record = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"]}
            record.update(_train_epoch(model, ddp_model, loader, penalty, optimizer, scheduler,
                                       scaler, config, device, dist_info, epoch, on_batch_end,
                                       progress))
            val = evaluate(model, splits.val, config.batch_size, device, config.max_batches)
            record.update(val_loss=val["loss"], val_accuracy=val["accuracy"],
                          seconds=time.perf_counter() - started)
            history.append(record)
            save(epoch + 1)
    except KeyboardInterrupt:
        result.interrupted = True
    finally:
        penalty.remove()
    return result


def parameter_digest(model: nn.Module) -> str:
    """A short hash of every parameter and buffer, to compare models across processes."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def config_dict(config: TrainConfig) -> dict:
    return asdict(config)
