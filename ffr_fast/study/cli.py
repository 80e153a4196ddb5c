"""`python -m ffr_fast` / `ffr-fast`: demo, demo-lm, train, prune, finetune, sweep, bench, report.

Progress bars go to stderr; `--json` prints one JSON object on stdout (rank 0 only under
torchrun). A failure prints `ffr-fast: error: ...` and exits 2; Ctrl-C exits 130 after
saying which checkpoint to resume from.
"""
import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from ffr_fast import metrics, models
from ffr_fast.flow.reference import CURVATURES, NORMS
from ffr_fast.pruning.importance import IMPORTANCES
from ffr_fast.pruning.pruner import SCOPES
from ffr_fast.study import checkpoint, data, demo, lm, pipeline, regularizers, sweep, train

PRUNED_FILENAME = "pruned.pt"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def open_fraction(text: str) -> float:
    """A share of the FLOPs or channels, strictly between 0 and 1."""
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1), got {text}")
    return value


def non_negative(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _add_training_options(parser, defaults: train.TrainConfig, finetune: bool = False):
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=int, default=defaults.epochs)
    group.add_argument("--batch-size", type=int, default=defaults.batch_size,
                       help="global batch size, split across torchrun processes")
    group.add_argument("--lr", type=float, default=defaults.lr)
    group.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    group.add_argument("--max-batches", type=int, default=None,
                       help="stop each epoch (and validation) after this many batches")
    group.add_argument("--amp", nargs="?", const="bf16", default=None,
                       choices=tuple(train.AMP_MODES),
                       help="autocast: bf16 (CPU or CUDA) or fp16 (CUDA)")
    group.add_argument("--device", default="cpu", choices=train.DEVICES)
    group.add_argument("--out", required=True, help="folder for checkpoint.pt and history.json")
    group.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    group.add_argument("--force", action="store_true", help="replace an existing checkpoint")
    if finetune:
        return
    group.add_argument("--model", default=defaults.model, choices=sorted(models.ZOO))
    group.add_argument("--data", default=defaults.data, choices=data.DATASETS)
    group.add_argument("--data-root", default=None, help="folder of cifar10/cifar100/folder")
    group.add_argument("--image-size", type=int, default=defaults.image_size,
                       help="side images are resized to (digits and folder; default: the "
                       "data set's own, 16 for digits, 32 for a folder)")
    group.add_argument("--seed", type=int, default=defaults.seed,
                       help="initial weights and data order")
    group.add_argument("--split-seed", type=non_negative_int, default=defaults.split_seed,
                       help="which images are train / val / test (fixed unless asked)")
    group.add_argument("--regularizer", default="none", choices=regularizers.REGULARIZERS)
    group.add_argument("--weight", type=float, default=0.0,
                       help="the regularizer's weight (layerdrop: the drop probability)")
    group.add_argument("--ffr-norm", default=defaults.ffr_norm, choices=NORMS)
    group.add_argument("--ffr-curvature", default=defaults.ffr_curvature, choices=CURVATURES)
    group.add_argument("--ffr-curv-ratio", type=float, default=defaults.ffr_curv_ratio,
                       help="curv_weight = weight * ratio")


def _add_lm_options(parser, defaults: lm.LMConfig) -> None:
    parser.add_argument("--data", default=defaults.data, choices=lm.DATA_SOURCES,
                        help="stdlib: this interpreter's standard library sources; text: "
                        "every UTF-8 file under --data-root")
    parser.add_argument("--data-root", default=None, help="the folder for --data text")
    parser.add_argument("--out", default=None, help="default: results/demo-lm")
    parser.add_argument("--seed", type=non_negative_int, nargs="+", default=[0],
                        help="training seeds (default 0; the README's three: 0 1 2); a seed "
                        "whose JSON in --out has the same settings is read back, not rerun")
    for name in ("layers", "hidden", "heads", "kv_heads", "window", "batch_size", "steps",
                 "heal_steps", "eval_windows", "generate_tokens", "threads"):
        parser.add_argument("--" + name.replace("_", "-"), type=positive_int,
                            default=getattr(defaults, name),
                            help=f"default {getattr(defaults, name)}")
    parser.add_argument("--heal-lr", type=float, default=defaults.heal_lr)
    for name in ("lrs", "ffr_weights", "layerdrop_rates"):
        parser.add_argument("--" + name.replace("_", "-"), type=float, nargs="+",
                            default=list(getattr(defaults, name)),
                            help="the grid (default "
                                 f"{' '.join(map(str, getattr(defaults, name)))})")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    common.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser = argparse.ArgumentParser(prog="ffr-fast", description=__doc__.split("\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True)


    def command(name, **options):  # every subcommand takes the common options
        return subparsers.add_parser(name, parents=[common], **options)

    demo_command = command("demo", help="train, cut and fine-tune every method of a story on "
                           "digits over several seeds; report the table")
    sweep_command = command("sweep", help="each method's weights vs accuracy and FLOPs kept")
    for story_command, default_seeds in ((demo_command, demo.DEMO_SEEDS),
                                         (sweep_command, sweep.SEEDS)):
        story_command.add_argument("--model", default="resnet20", choices=tuple(demo.STORIES),
                                   help="the story: the CIFAR ResNet-20 or the small ViT")
        story_command.add_argument("--out", default=None, help="default: results/demo, "
                                   "results/demo-vit, results/sweep or results/sweep-vit")
        story_command.add_argument("--seed", type=int, nargs="+", default=list(default_seeds),
                                   help="training seeds (weights and data order), each run "
                                   f"(default {' '.join(map(str, default_seeds))})")
        story_command.add_argument("--split-seed", type=non_negative_int, default=0,
                                   help="which images are train / val / test (default 0)")
        story_command.add_argument("--epochs", type=positive_int, default=None)
        story_command.add_argument("--finetune-epochs", type=positive_int, default=None)
        story_command.add_argument("--max-batches", type=positive_int, default=None)
    demo_command.add_argument("--latency-repeats", type=positive_int, default=30,
                              help="timed forwards per model and batch size (the median is "
                              "reported)")
    sweep_command.add_argument("--quick", action="store_true",
                               help="the first weight of each method only (a smoke run)")
    sweep_command.add_argument("--keep", type=open_fraction, nargs="+", default=None,
                       help="FLOPs budgets, as fractions kept (default: the story's)")

    _add_lm_options(command("demo-lm", help="a byte-level LlamaForCausalLM on real text made "
                            "shallower: FFR against depth-pruning baselines"), lm.LMConfig())

    _add_training_options(command("train", help="train a model"), train.TrainConfig())

    finetune = command("finetune", help="fine-tune a pruned checkpoint")
    finetune.add_argument("--checkpoint", required=True, help="a pruned.pt written by `prune`")
    _add_training_options(finetune, replace(train.TrainConfig(), epochs=5, lr=0.01),
                          finetune=True)

    prune = command("prune", help="prune a trained checkpoint")
    prune.add_argument("--checkpoint", required=True)
    target = prune.add_mutually_exclusive_group()
    target.add_argument("--flops-target", type=open_fraction, default=0.5,
                        help="fraction of the FLOPs to keep (default 0.5)")
    target.add_argument("--ratio", type=open_fraction, help="fraction of channels to remove")
    target.add_argument("--threshold", type=non_negative,
                        help="remove channels below this importance")
    prune.add_argument("--importance", default="l2", choices=IMPORTANCES)
    prune.add_argument("--scope", default="global", choices=SCOPES)
    prune.add_argument("--out", default=None, help="folder for pruned.pt (default: next to "
                       "the checkpoint)")
    prune.add_argument("--force", action="store_true", help="replace an existing pruned.pt")

    bench = command("bench", help="CPU latency, params and FLOPs of checkpoints")
    bench.add_argument("checkpoints", nargs="+")
    bench.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 64])
    bench.add_argument("--threads", type=positive_int, default=None)
    bench.add_argument("--out", default=None, help="write bench.json here")

    report = command("report", help="accuracy, sparsity, params, FLOPs table")
    report.add_argument("checkpoints", nargs="+")
    report.add_argument("--split", default="test", choices=data.EVALUATION_SPLITS)
    report.add_argument("--threshold", type=non_negative, default=pipeline.SPARSITY_THRESHOLD)
    report.add_argument("--out", default=None, help="write report.md and report.json here")
    return parser


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


def _load_for_measuring(path):
    state = checkpoint.load(path)
    config = train.TrainConfig(**state["config"])
    splits = pipeline.load_splits(config)
    return checkpoint.build_model(state).eval(), splits


def cmd_bench(args):
    if args.out:
        _check_output_folder(args.out, "--out")
    rows = []
    for path in args.checkpoints:
        model, splits = _load_for_measuring(path)
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
    if args.out:
        _check_output_folder(args.out, "--out")
    rows = []
    for path in args.checkpoints:
        model, splits = _load_for_measuring(path)
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
