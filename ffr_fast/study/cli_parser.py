"""`python -m ffr_fast` / `ffr-fast`: demo, demo-lm, train, prune, finetune, sweep, bench, report.

Its parser (the first line above is the program's description): every subcommand's options,
and the types that check their values. ffr_fast.study.cli runs the commands.
"""
import argparse
import math
from dataclasses import replace

from ffr_fast import models
from ffr_fast.flow.reference import CURVATURES, NORMS
from ffr_fast.pruning.importance import IMPORTANCES
from ffr_fast.pruning.pruner import SCOPES
from ffr_fast.study import data, demo, lm, pipeline, regularizers, sweep, train


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
