"""`python -m ffr_fast sweep`: the accuracy / FLOPs frontier of each regularizer on digits.

Every method trains with the demo's recipe at each weight of its grid (FFR also in its
norm / curvature variants); each trained model is pruned to every FLOPs budget in KEEP with
the demo's rule and fine-tuned as in the demo. Everything is scored on the validation split
only. Per method and budget the frontier keeps the best weight; the weight the demo uses is
the best one at the demo's budget (demo.FLOPS_KEEP), written to sweep.json as "chosen".

Points are saved to sweep.json as they finish and reused by a rerun with the same recipe,
so an interrupted sweep continues where it stopped.
"""
import sys
import time
from dataclasses import replace
from pathlib import Path

from ffr_fast.study import checkpoint, data, demo, pipeline, plots, train

KEEP = (0.5, 0.25, 0.1)  # must include demo.FLOPS_KEEP
# (label, settings) per point. A short run (10 epochs, ~200 steps) needs large weights
# before a penalty zeroes anything; the FFR grid reaches the cliff, where the penalty
# drives the features of a stage to zero.
GRID = [("none", dict(regularizer="none", weight=0.0))]
GRID += [("slimming", dict(regularizer="slimming", weight=w))
         for w in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)]
GRID += [("ffr", dict(regularizer="ffr", weight=w)) for w in (1e-2, 1e-1, 1.0, 3.0, 10.0)]
# The variants at two weights each (their penalties have the same scale as the default's).
GRID += [("ffr l2", dict(regularizer="ffr", weight=w, ffr_norm="l2")) for w in (0.1, 1.0)]
GRID += [("ffr angle", dict(regularizer="ffr", weight=w, ffr_curvature="angle"))
         for w in (0.1, 1.0)]


def _key(label: str, settings: dict) -> str:
    return f"{label} weight={settings['weight']:g}"


def _point(label, settings, arm) -> dict:
    return {"method": label, "settings": settings, "trained": arm["trained"]["val"],
            "sparsity": arm["sparsity"], "history": arm["history"],
            "budgets": {str(keep): {"accuracy": budget["finetuned"]["val"],
                                    "pruned_accuracy": budget["pruned"]["val"],
                                    "flops_kept": budget["report"]["flops_after"]
                                    / budget["report"]["flops_before"],
                                    "params": budget["report"]["params_after"],
                                    "blocks_removed": len(budget["report"]["removed_blocks"])}
                        for keep, budget in arm["budgets"].items()}}


def _point_row(point: dict) -> dict:
    row = {"method": point["method"], "weight": point["settings"]["weight"],
           "val acc. trained": f"{point['trained']:.1%}"}
    for keep, b in point["budgets"].items():
        row[f"at {float(keep):.0%} FLOPs"] = (
            f"{b['accuracy']:.1%} ({b['pruned_accuracy']:.1%}), {b['flops_kept']:.0%}, "
            f"{b['blocks_removed']} blocks")
    return row


def frontier(points: dict, score: str = "accuracy") -> list:
    """Per method and budget, the weight with the best validation `score`: "accuracy" (after
    fine-tuning) or "pruned_accuracy" (straight after pruning)."""
    best = {}
    for key, point in points.items():
        for keep, budget in point["budgets"].items():
            slot = (point["method"], keep)
            if slot not in best or budget[score] > best[slot][score]:
                best[slot] = {"method": point["method"], "keep": float(keep), "key": key,
                              "weight": point["settings"]["weight"], **budget}
    return list(best.values())


def choose_weights(points: dict, keep: float, tie: float) -> dict:
    """Per method, the weight to use at `keep` of the FLOPs: among the weights whose
    validation accuracy after pruning and fine-tuning is within `tie` (one validation image)
    of the method's best, the one with the best accuracy straight after pruning (the model
    that pruning hurt least), then the larger weight (the sparser model)."""
    by_method = {}
    for point in points.values():
        budget = point["budgets"].get(str(keep))
        if budget is not None:
            by_method.setdefault(point["method"], []).append(
                (budget["accuracy"], budget["pruned_accuracy"], point["settings"]["weight"]))
    chosen = {}
    for method, candidates in by_method.items():
        best = max(accuracy for accuracy, _, _ in candidates)
        tied = [c for c in candidates if c[0] >= best - tie - 1e-12]
        accuracy, pruned_accuracy, weight = max(tied, key=lambda c: (c[1], c[2]))
        chosen[method] = {"weight": weight, "accuracy": accuracy,
                          "pruned_accuracy": pruned_accuracy}
    return chosen


def run(out="results/sweep", epochs=None, finetune_epochs=None, max_batches=None,
        quick=False, keep=KEEP, progress: bool = True) -> dict:
    """Run (or continue) the sweep; `quick` trains one weight of none, slimming and FFR."""
    started = time.perf_counter()
    recipe = replace(demo.RECIPE, epochs=epochs or demo.RECIPE.epochs, max_batches=max_batches)
    finetune_epochs = finetune_epochs or demo.FINETUNE_EPOCHS
    settings = {"recipe": train.config_dict(recipe), "finetune_epochs": finetune_epochs,
                "finetune_lr": demo.FINETUNE_LR, "keep": list(keep),
                "importance": demo.IMPORTANCE}
    out = Path(out)
    path = out / "sweep.json"
    points = {}
    if path.is_file():  # continue a sweep of the same recipe
        import json

        previous = json.loads(path.read_text())
        if previous.get("settings") == settings:
            points = previous["points"]
    grid = GRID if not quick else [next(g for g in GRID if g[0] == label)
                                   for label in ("none", "slimming", "ffr")]
    splits = pipeline.load_splits(recipe)
    for label, arm_settings in grid:
        key = _key(label, arm_settings)
        if key in points:
            continue
        print(f"[sweep] {key}", file=sys.stderr)
        point_started = time.perf_counter()
        arm = pipeline.run_arm(replace(recipe, **arm_settings), splits, keep, finetune_epochs,
                               demo.FINETUNE_LR, demo.IMPORTANCE, splits_to_score=("val",),
                               progress=progress)
        points[key] = dict(_point(label, arm_settings, arm),
                           seconds=time.perf_counter() - point_started)
        checkpoint.atomic_write_json(path, {"settings": settings, "points": points})

    best, best_pruned = frontier(points), frontier(points, "pruned_accuracy")
    chosen = choose_weights(points, demo.FLOPS_KEEP, tie=1 / len(splits.val))
    baseline = next(p for p in points.values() if p["method"] == "none")
    plots.frontier(best, best_pruned, out / "frontier.png", {"accuracy": baseline["trained"]})
    plots.weights([{"method": p["method"], "weight": p["settings"]["weight"],
                    "trained": p["trained"],
                    "finetuned": p["budgets"][str(demo.FLOPS_KEEP)]["accuracy"]}
                   for p in points.values() if str(demo.FLOPS_KEEP) in p["budgets"]],
                  out / "weights.png", demo.FLOPS_KEEP)
    summary = {"settings": settings, "points": points, "frontier": best,
               "frontier_before_finetuning": best_pruned, "chosen": chosen,
               "seconds_this_run": time.perf_counter() - started}
    checkpoint.atomic_write_json(path, summary)
    rows = [{"method": p["method"], "FLOPs budget": p["keep"], "best weight": p["weight"],
             "val acc. pruned": p["pruned_accuracy"], "val acc. fine-tuned": p["accuracy"],
             "FLOPs kept": p["flops_kept"], "blocks removed": p["blocks_removed"]}
            for p in sorted(best, key=lambda p: (p["method"], -p["keep"]))]
    table = demo.markdown_table(rows)
    every_point = demo.markdown_table([_point_row(p) for p in points.values()])
    seconds = sum(p.get("seconds", 0.0) for p in points.values())
    chosen_text = ", ".join(f"{m} {c['weight']:g}" for m, c in chosen.items())
    (out / "frontier.md").write_text(
        f"Validation accuracy ({len(splits.val)} images) of ResNet-20 on digits, trained with "
        f"the demo's recipe ({recipe.epochs} epochs), pruned to each FLOPs budget by "
        f"the demo's rule ({demo.IMPORTANCE!r} importance, threshold) and fine-tuned "
        f"{finetune_epochs} epochs; per method and budget the best of {len(points)} trained points. Weights chosen for the demo "
        f"at {demo.FLOPS_KEEP:.0%} FLOPs (sweep.choose_weights: best fine-tuned accuracy, "
        f"one validation image counted as a tie, then best accuracy straight after "
        f"pruning): {chosen_text}. The {len(points)} points took "
        f"{seconds / 60:.1f} min.\n\n{table}\n\nEvery point, per FLOPs budget: accuracy "
        f"fine-tuned (straight after pruning), FLOPs kept, blocks removed.\n\n{every_point}\n")
    return {**summary, "table": table}
