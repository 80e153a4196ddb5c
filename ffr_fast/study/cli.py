"""`python -m ffr_fast` / `ffr-fast`: demo, demo-lm, train, prune, finetune, sweep, bench, report.

Progress bars go to stderr; `--json` prints one JSON object on stdout (rank 0 only under
torchrun). A failure prints `ffr-fast: error: ...` and exits 2; Ctrl-C exits 130 after
saying which checkpoint to resume from. The parser, with every option, is
ffr_fast.study.cli_parser.
"""
import json
import os
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from ffr_fast import metrics
from ffr_fast.study import checkpoint, demo, lm, pipeline, sweep, train
from ffr_fast.study.cli_parser import (
    build_parser,
    non_negative,
    non_negative_int,
    open_fraction,
    positive_int,
)

# The parser's names stay importable from here, where they were first.
__all__ = ["COMMANDS", "PRUNED_FILENAME", "ReportRow", "build_parser", "main", "non_negative",
           "non_negative_int", "open_fraction", "positive_int"]

PRUNED_FILENAME = "pruned.pt"


def _config_from(args) -> train.TrainConfig:
    names = {f.name for f in fields(train.TrainConfig)}
    return train.TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def _check_output_folder(folder, flag: str) -> None:
    """Refuse, before any work, an output folder that is a file or cannot be created or
    written; nothing is created here."""
    folder = Path(folder)
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {folder} cannot be used as a folder: {existing} is a file; "
                         f"choose another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "cannot be written" if existing == folder.absolute() else "cannot be created"
        raise ValueError(f"{flag} {folder} {what}: no permission to write in {existing}; "
                         f"choose a folder you can write to")


def _run_training(model, splits, config, args, extra_summary, extra=None):
    result = train.fit(model, splits, config, out_dir=args.out, resume=args.resume,
                       overwrite=args.force, progress=not args.no_progress, extra=extra)
    digests = _gather_digests(result.model)
    if result.interrupted:
        print(f"interrupted; resume with --resume --out {args.out} "
              f"({len(result.history)} epochs saved)", file=sys.stderr)
        raise SystemExit(130)
    return {"checkpoint": str(result.checkpoint), "epochs": len(result.history),
            "val_accuracy": result.history[-1]["val_accuracy"] if result.history else None,
            "history": result.history, "param_digests": digests, **extra_summary}


def _gather_digests(model):
    import torch.distributed as dist

    digest = train.parameter_digest(model)
    if not dist.is_initialized():
        return [digest]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, digest)
    return gathered


def _resumed_config(state, path, args) -> train.TrainConfig:
    """A run continues under the recipe it started with; only these two flags apply."""
    if os.environ.get("RANK", "0") == "0":  # before the process group exists
        print(f"resuming {path} after epoch {state['epoch']} with its own settings (of the "
              "training flags only --max-batches and --device apply)", file=sys.stderr)
    return replace(train.TrainConfig(**state["config"]), max_batches=args.max_batches,
                   device=args.device)


def cmd_train(args):
    config = _config_from(args)
    _check_output_folder(args.out, "--out")
    path = Path(args.out) / checkpoint.FILENAME
    if args.resume:
        state = checkpoint.load(path)
        source = state["extra"].get("source")
        if source is not None:
            raise checkpoint.CheckpointError(
                f"cannot resume {path} with `train`: it fine-tunes {source['path']}; resume it "
                f"with `finetune --checkpoint {source['path']} --out {args.out} --resume`")
        config = _resumed_config(state, path, args)
    train.check_config(config)
    splits = pipeline.load_splits(config)
    return _run_training(pipeline.seeded_model(config, splits), splits, config, args, {})


def _check_same_source(state, path, source: dict) -> None:
    """Refuse to resume a fine-tuning from another checkpoint than the one it started from:
    the weights would come from the run, the summary would name the other."""
    recorded = state["extra"].get("source")
    if recorded is None:
        raise checkpoint.CheckpointError(
            f"cannot resume {path} as a fine-tuning of {source['path']}: it records no "
            "checkpoint it fine-tunes (a training run: resume it with `train --resume`; or a "
            "fine-tuning by an older ffr_fast); fine-tune into a new --out")
    if recorded["sha256"] != source["sha256"]:
        changed = (f"{source['path']} has changed since that run started from it"
                   if recorded["path"] == source["path"] else
                   f"that run fine-tunes {recorded['path']}, not {source['path']}")
        raise checkpoint.CheckpointError(
            f"cannot resume {path}: {changed} (the files differ); resume with the --checkpoint "
            "it started from, or fine-tune into a new --out")


def cmd_finetune(args):
    _check_output_folder(args.out, "--out")
    source = checkpoint.load(args.checkpoint)
    record = {"path": str(Path(args.checkpoint).resolve()),
              "sha256": checkpoint.file_digest(args.checkpoint)}
    config = replace(train.TrainConfig(**source["config"]), epochs=args.epochs, lr=args.lr,
                     batch_size=args.batch_size, weight_decay=args.weight_decay,
                     regularizer="none", weight=0.0, max_batches=args.max_batches,
                     amp=args.amp, device=args.device)
    state = source
    if args.resume:
        path = Path(args.out) / checkpoint.FILENAME
        state = checkpoint.load(path)
        _check_same_source(state, path, record)
        config = _resumed_config(state, path, args)
    train.check_config(config)
    splits = pipeline.load_splits(config)
    return _run_training(checkpoint.build_model(state), splits, config, args,
                         {"source": args.checkpoint}, extra={"source": record})


def cmd_prune(args):
    state = checkpoint.load(args.checkpoint)
    out = Path(args.out) if args.out else Path(args.checkpoint).parent
    _check_output_folder(out, "--out")
    if (out / PRUNED_FILENAME).exists() and not args.force:
        raise FileExistsError(f"{out / PRUNED_FILENAME} already exists; pass --force to "
                              "replace it, or choose another --out")
    config = train.TrainConfig(**state["config"])
    splits = pipeline.load_splits(config)
    model = checkpoint.build_model(state).eval()
    inputs = pipeline.example_inputs(splits)
    options = {"importance": args.importance, "scope": args.scope}
    from ffr_fast.pruning import prune
    from ffr_fast.pruning.serialize import record_source

    if args.ratio is not None or args.threshold is not None:
        result = prune(model, inputs, ratio=args.ratio, threshold=args.threshold, **options)
    else:
        result = prune(model, inputs, flops_target=args.flops_target, **options)
    record_source(result, model)  # a model pruned before: its file replays both prunings
    before = train.evaluate(model, splits.val)["accuracy"]
    after = train.evaluate(result.model, splits.val)["accuracy"]
    report = {"source": args.checkpoint, "val_accuracy_before": before,
              "val_accuracy_after": after, "options": options, **result.report.to_dict()}
    checkpoint.save(out / PRUNED_FILENAME, result.model, config, prune_report=report)
    checkpoint.atomic_write_json(out / "prune_report.json", report)
    return {"checkpoint": str(out / PRUNED_FILENAME), **report}


def _checkpoints_to_measure(args):
    """For `bench` and `report`: refuse a bad --out before any work, then yield each
    checkpoint's path, model (in eval mode) and data splits."""
    if args.out:
        _check_output_folder(args.out, "--out")
    for path in args.checkpoints:
        state = checkpoint.load(path)
        splits = pipeline.load_splits(train.TrainConfig(**state["config"]))
        yield path, checkpoint.build_model(state).eval(), splits


def cmd_bench(args):
    rows = []
    for path, model, splits in _checkpoints_to_measure(args):
        inputs = pipeline.example_inputs(splits)
        seconds = metrics.measure_latency(model, splits.input_shape, tuple(args.batch_sizes),
                                          threads=args.threads)
        rows.append({"checkpoint": path, "params": metrics.count_params(model),
                     "flops": metrics.count_flops(model, inputs),
                     "latency_ms": {batch: 1e3 * s for batch, s in seconds.items()}})
    if args.out:
        checkpoint.atomic_write_json(Path(args.out) / "bench.json", rows)
    return {"results": rows}


@dataclass
class ReportRow:
    """One checkpoint in `report`: accuracy on the split asked, sparsity below the
    threshold, size."""
    checkpoint: str
    split: str
    accuracy: float
    filters_below: float
    bn_scales_below: float
    params: int
    flops: int

    def display(self) -> dict:
        return {"checkpoint": self.checkpoint, f"{self.split} accuracy": self.accuracy,
                "filters below": self.filters_below, "BN scales below": self.bn_scales_below,
                "params": self.params, "FLOPs": self.flops}


def cmd_report(args):
    rows = []
    for path, model, splits in _checkpoints_to_measure(args):
        sparsity = pipeline.structured_sparsity(model, args.threshold)
        rows.append(ReportRow(
            path, args.split, train.evaluate(model, getattr(splits, args.split))["accuracy"],
            sparsity["filters_below"], sparsity["bn_scales_below"],
            metrics.count_params(model),
            metrics.count_flops(model, pipeline.example_inputs(splits))))
    table = demo.markdown_table([row.display() for row in rows])
    records = [asdict(row) for row in rows]
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(f"Threshold for 'below': {args.threshold:g}\n\n{table}\n")
        checkpoint.atomic_write_json(out / "report.json", records)
    return {"table": table, "rows": records}


def cmd_demo(args):
    return demo.run(args.model, args.out, seeds=args.seed, split_seed=args.split_seed,
                    epochs=args.epochs, finetune_epochs=args.finetune_epochs,
                    max_batches=args.max_batches, latency_repeats=args.latency_repeats,
                    progress=not args.no_progress)


def cmd_demo_lm(args):
    config = lm.LMConfig(**{f.name: tuple(v) if isinstance(v, list) else v
                            for f in fields(lm.LMConfig) for v in [getattr(args, f.name)]})
    return lm.run(config, args.out, seeds=args.seed, progress=not args.no_progress)


def cmd_sweep(args):
    return sweep.run(args.model, args.out, seeds=args.seed, split_seed=args.split_seed,
                     epochs=args.epochs, finetune_epochs=args.finetune_epochs,
                     max_batches=args.max_batches, quick=args.quick, keep=args.keep,
                     progress=not args.no_progress)


COMMANDS = {"demo": cmd_demo, "demo-lm": cmd_demo_lm, "train": cmd_train, "prune": cmd_prune,
            "finetune": cmd_finetune,
            "sweep": cmd_sweep, "bench": cmd_bench, "report": cmd_report}


def _print_summary(summary, as_json: bool):
    if as_json:
        print(json.dumps(summary, indent=1, default=str))
    elif "table" in summary:
        print(summary["table"])
    else:
        shown = {k: v for k, v in summary.items() if k not in ("history", "rows")}
        print("\n".join(f"{k}: {v}" for k, v in shown.items()))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    status = 1  # until the command returns or fails in a known way
    try:
        summary = COMMANDS[args.command](args)
        if train.is_main_process():
            _print_summary(summary, args.json)
        status = 0
    except (OSError, checkpoint.CheckpointError, ValueError, FloatingPointError) as error:
        # OSError: a missing file, a full disk, a folder made read-only mid-run
        print(f"ffr-fast: error: {error}", file=sys.stderr)
        status = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        status = 130
    finally:
        train.teardown_distributed(succeeded=status == 0)
    return status


if __name__ == "__main__":
    sys.exit(main())

