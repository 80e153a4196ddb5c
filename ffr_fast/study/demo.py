"""`make demo` (`python -m ffr_fast demo`): the whole story on the embedded digits set.

A CIFAR ResNet-20 is trained three ways with the same recipe, data order and seed: no
regularizer, Network Slimming (L1 on BatchNorm scales) and FFR, each at the weight the
sweep chose. Each trained model is pruned to the same FLOPs budget with the same rule
(every channel and residual branch whose folded filter norm is at most a threshold, the
threshold searched until at most half of the FLOPs remain; see pipeline.prune_to_flops),
fine-tuned briefly without a regularizer, and measured. Accuracies in the table are on the test split, which nothing was tuned on.
Writes results/demo/: table.md, table.json and four PNG figures (filter norms, BatchNorm
scales, channels kept per layer, training curves).
"""
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from ffr_fast import metrics
from ffr_fast.study import checkpoint, pipeline, plots, train

# The recipe shared by every arm (and by the sweep).
RECIPE = train.TrainConfig(model="resnet20", data="digits", epochs=10, batch_size=64, lr=0.1,
                           weight_decay=5e-4, seed=0)
FINETUNE_EPOCHS = 3
FINETUNE_LR = 0.01
FLOPS_KEEP = 0.5  # prune every arm to half of ResNet-20's FLOPs
# The same pruning rule for every arm: remove every channel, and every residual branch, whose
# importance (L2 norm of its filter with the BatchNorm folded in) is at most a threshold, the
# threshold searched until at most FLOPS_KEEP of the FLOPs remain (pipeline.prune_to_flops).
IMPORTANCE = "l2"
# Chosen by `python -m ffr_fast sweep` (results/sweep/sweep.json, "chosen"; the rule is
# sweep.choose_weights): per method, the best validation accuracy after pruning to
# FLOPS_KEEP and fine-tuning, one validation image counted as a tie, then the best accuracy
# straight after pruning.
ARMS = {
    "none": dict(regularizer="none", weight=0.0),
    "slimming": dict(regularizer="slimming", weight=1e-2),
    "ffr": dict(regularizer="ffr", weight=1.0, ffr_norm="squared", ffr_curvature="diff"),
}


def markdown_table(rows) -> str:
    """A markdown table of dicts with the same keys; floats shown with 4 significant digits."""
    if not rows:
        return ""
    show = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(show(row[key]) for key in header) + " |" for row in rows]
    return "\n".join(lines)


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _row(method, arm, budget, latency, baseline_latency):
    report, sparsity = budget["report"], arm["sparsity"]
    return {
        "method": method, "weight": arm["config"]["weight"],
        "test acc. trained": arm["trained"]["test"], "pruned": budget["pruned"]["test"],
        "fine-tuned": budget["finetuned"]["test"],
        "filters <= 1e-2": sparsity["filters_below"],
        "BN scales <= 1e-2": sparsity["bn_scales_below"],
        "blocks removed": len(report["removed_blocks"]), "params": report["params_after"],
        "FLOPs": report["flops_after"],
        "FLOPs kept": report["flops_after"] / report["flops_before"],
        "latency b1 (ms)": 1e3 * latency[1], "latency b64 (ms)": 1e3 * latency[64],
        "speedup b1": baseline_latency[1] / latency[1],
        "speedup b64": baseline_latency[64] / latency[64],
    }


def _display(row: dict) -> dict:
    shown = dict(row)
    for key in ("test acc. trained", "pruned", "fine-tuned", "filters <= 1e-2",
                "BN scales <= 1e-2", "FLOPs kept"):
        if isinstance(row[key], float):
            shown[key] = _percent(row[key])
    for key in ("params", "FLOPs"):
        shown[key] = f"{row[key] / 1e3:,.1f}k" if row[key] < 1e6 else f"{row[key] / 1e6:.2f}M"
    for key in ("latency b1 (ms)", "latency b64 (ms)"):
        shown[key] = f"{row[key]:.2f}"
    for key in ("speedup b1", "speedup b64"):
        if isinstance(row[key], float):
            shown[key] = f"{row[key]:.2f}x"
    shown["weight"] = f"{row['weight']:g}" if isinstance(row["weight"], float) else row["weight"]
    return shown


def run(out="results/demo", epochs=None, finetune_epochs=None, max_batches=None,
        latency_repeats: int = 30, progress: bool = True) -> dict:
    started = time.perf_counter()
    recipe = replace(RECIPE, epochs=epochs or RECIPE.epochs, max_batches=max_batches)
    finetune_epochs = finetune_epochs or FINETUNE_EPOCHS
    splits = pipeline.load_splits(recipe)
    results = {}
    for method, settings in ARMS.items():
        print(f"[demo] {method}: training {recipe.epochs} epochs, pruning to "
              f"{FLOPS_KEEP:.0%} of the FLOPs, fine-tuning {finetune_epochs}", file=sys.stderr)
        results[method] = pipeline.run_arm(replace(recipe, **settings), splits, (FLOPS_KEEP,),
                                           finetune_epochs, FINETUNE_LR, IMPORTANCE,
                                           progress=progress)

    unpruned = results[next(iter(results))]["model"]
    latency = lambda model: metrics.measure_latency(  # noqa: E731
        model, splits.input_shape, (1, 64), repeats=latency_repeats)
    baseline_latency = latency(unpruned)
    inputs = pipeline.example_inputs(splits)
    rows = [{"method": "ResNet-20, unpruned", "weight": "-", "test acc. trained": "-",
             "pruned": "-", "fine-tuned": "-", "filters <= 1e-2": "-",
             "BN scales <= 1e-2": "-", "blocks removed": 0,
             "params": metrics.count_params(unpruned),
             "FLOPs": metrics.count_flops(unpruned, inputs), "FLOPs kept": 1.0,
             "latency b1 (ms)": 1e3 * baseline_latency[1],
             "latency b64 (ms)": 1e3 * baseline_latency[64], "speedup b1": 1.0,
             "speedup b64": 1.0}]
    for method, arm in results.items():
        budget = arm["budgets"][FLOPS_KEEP]
        rows.append(_row(method, arm, budget, latency(budget["model"]), baseline_latency))

    table = markdown_table([_display(row) for row in rows])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _figures(results, out, recipe.epochs)
    seconds = time.perf_counter() - started
    (out / "table.md").write_text(f"{_describe(recipe, splits, finetune_epochs)}\n\n{table}\n\n"
                                  f"The demo took {seconds:.0f} s.\n")
    summary = {"table": table, "rows": rows, "seconds": seconds,
               "settings": {"recipe": train.config_dict(recipe), "arms": ARMS,
                            "finetune_epochs": finetune_epochs, "finetune_lr": FINETUNE_LR,
                            "flops_keep": FLOPS_KEEP, "importance": IMPORTANCE,
                            "sparsity_threshold": pipeline.SPARSITY_THRESHOLD},
               "arms": {method: _jsonable(arm) for method, arm in results.items()}}
    checkpoint.atomic_write_json(out / "table.json", summary)
    return summary


def _describe(recipe, splits, finetune_epochs) -> str:
    return (f"ResNet-20 on digits (16x16, {recipe.epochs} epochs, SGD lr {recipe.lr} cosine, "
            f"batch {recipe.batch_size}, seed {recipe.seed}); pruned to {FLOPS_KEEP:.0%} of "
            f"the FLOPs (at most) by one rule for all: channels and residual branches whose "
            f"filter norm, BatchNorm folded in, is under a threshold searched for the budget; "
            f"fine-tuned {finetune_epochs} "
            f"epochs at lr {FINETUNE_LR}. Accuracies on the test split ({len(splits.test)} "
            f"images: one image is {100 / len(splits.test):.2f} points). 'filters' and "
            f"'BN scales' are the shares of conv filters (L2 norm) and BatchNorm scales at or "
            f"below {pipeline.SPARSITY_THRESHOLD:g} after training, before pruning. Latency: "
            f"median CPU forward time ({torch.get_num_threads()} threads); speedup against the "
            "unpruned model in the same run. Weights: chosen by `python -m ffr_fast sweep` on "
            "the validation split (results/sweep/).")


def _figures(results, out: Path, epochs: int) -> None:
    plots.per_layer({m: arm["filter_norms"] for m, arm in results.items()},
                    out / "filter_norms.png")
    plots.per_layer({m: arm["bn_scales"] for m, arm in results.items()}, out / "bn_scales.png",
                    ylabel="BatchNorm |gamma|")
    # A layer missing from a prune report went with a removed block: 0 channels kept.
    plots.channels_kept({m: {layer: tuple(arm["budgets"][FLOPS_KEEP]["report"]["channels"]
                                          .get(layer, (len(norms), 0)))
                             for layer, norms in arm["filter_norms"].items()}
                         for m, arm in results.items()}, out / "channels_kept.png")
    plots.training_curves({m: arm["history"] + arm["budgets"][FLOPS_KEEP]["finetune_history"]
                           for m, arm in results.items()}, out / "training_curves.png",
                          finetune_from=epochs)


def _jsonable(arm: dict) -> dict:
    """An arm's results without its models (the JSON keeps numbers only)."""
    keep = {k: v for k, v in arm.items() if k != "model"}
    keep["budgets"] = {str(level): {k: v for k, v in budget.items() if k != "model"}
                       for level, budget in arm["budgets"].items()}
    return keep
