"""`python -m ffr_fast sweep`: each method's weight grid against accuracy and FLOPs kept, on
the validation split, for the demo's ResNet-20 (results/sweep/) or its ViT
(`--model vit_tiny`, results/sweep-vit/).

Every method of the story (demo.STORIES) trains with the demo's recipe at each weight of its
grid (the same number of points for every weighted method), on each seed given; each trained
model is cut to every budget of the story's sweep_keep by the method's removal rule, its
BatchNorm statistics recomputed, and fine-tuned as in the demo. Everything is scored on the
validation split only. The weight the demo uses is chosen by one rule for every method
(choose_weights) at the story's first budget, written to sweep.json as "chosen".

Points are saved to sweep.json as they finish and reused by a rerun with the same settings
(budgets aside: the points at the budgets asked again are kept), so an interrupted sweep
continues where it stopped.
"""
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ffr_fast.study import checkpoint, demo, pipeline, plots, train

SEEDS = (0,)  # the sweep's default: weights are chosen on one seed (the demo runs three)


@dataclass
class Point(pipeline.CutScores):
    """One method at one weight, seed and budget, on the validation split."""
    weight: float
    seconds: float  # training and cut of this point's training, shared by its budgets


def choose_weights(points: Sequence[Point], keep: float, tie: float) -> Dict[str, dict]:
    """Per method, the weight to use at `keep` of the FLOPs, by one rule for all methods:
    the best validation accuracy after removal and fine-tuning (averaged over the seeds);
    weights within `tie` (one validation image) of that best are tied, and the tie goes to
    the best accuracy straight after removal, then to the larger weight."""
    by_weight: Dict[str, Dict[float, List[Point]]] = {}
    for point in points:
        if point.keep == keep:
            by_weight.setdefault(point.method, {}).setdefault(point.weight, []).append(point)
    chosen = {}
    for method, weights in by_weight.items():
        candidates = [(statistics.fmean(p.finetuned for p in group),
                       statistics.fmean(p.pruned for p in group), weight)
                      for weight, group in weights.items()]
        best = max(accuracy for accuracy, _, _ in candidates)
        tied = [c for c in candidates if c[0] >= best - tie - 1e-12]
        accuracy, pruned, weight = max(tied, key=lambda c: (c[1], c[2]))
        chosen[method] = {"weight": weight, "finetuned": accuracy, "pruned": pruned,
                          "grid_points": len(candidates)}
    return chosen


def frontier(points: Sequence[Point], measure: str = "finetuned") -> List[dict]:
    """Per method and budget, the weight with the best mean validation `measure` over the
    seeds ("finetuned" or "pruned"), with its mean FLOPs kept: one point of each curve."""
    groups: Dict[tuple, List[Point]] = {}
    for point in points:
        groups.setdefault((point.method, point.keep, point.weight), []).append(point)
    best: Dict[tuple, dict] = {}
    for (method, keep, weight), group in groups.items():
        value = statistics.fmean(getattr(p, measure) for p in group)
        if (method, keep) not in best or value > best[(method, keep)][measure]:
            best[(method, keep)] = {
                "method": method, "keep": keep, "weight": weight, measure: value,
                "flops_kept": statistics.fmean(p.flops_kept for p in group),
                "branches_removed": statistics.fmean(p.branches_removed for p in group)}
    return list(best.values())


def run(model: str = "resnet20", out: Optional[str] = None, seeds: Sequence[int] = SEEDS,
        split_seed: int = 0, epochs: Optional[int] = None,
        finetune_epochs: Optional[int] = None, max_batches: Optional[int] = None,
        quick: bool = False, keep: Optional[Sequence[float]] = None,
        progress: bool = True) -> dict:
    """Run (or continue) the sweep of `model`'s story; `quick` takes one weight per method
    (a smoke run)."""
    started = time.perf_counter()
    story = demo.STORIES[model]
    recipe = replace(story.recipe, epochs=epochs or story.recipe.epochs,
                     max_batches=max_batches, split_seed=split_seed)
    train.check_config(recipe)
    demo.check_seeds(seeds)
    finetune_epochs = finetune_epochs or story.finetune_epochs
    keep = tuple(keep or story.sweep_keep)
    settings = {"recipe": train.config_dict(recipe), "seeds": list(seeds),
                "finetune_epochs": finetune_epochs, "finetune_lr": story.finetune_lr,
                "keep": list(keep), "importance": demo.IMPORTANCE,
                "recalibration_batches": pipeline.RECALIBRATION_BATCHES,
                "influence_images": pipeline.INFLUENCE_IMAGES}
    out = Path(out or story.sweep_out)
    path = out / "sweep.json"
    points = _previous_points(path, settings)
    splits = pipeline.load_splits(recipe)
    for seed in seeds:
        for regularizer, weight in _trainings(story, quick):
            done = {(p.method, p.keep) for p in points if p.seed == seed and p.weight == weight}
            if all((method, level) in done for method in methods_of(story, regularizer)
                   for level in keep):
                continue
            points = [p for p in points if not (p.seed == seed and p.weight == weight
                                                 and p.method in methods_of(story, regularizer))]
            print(f"[sweep] seed {seed}: {regularizer} weight={weight:g}", file=sys.stderr)
            points += _train_and_cut(story, replace(recipe, seed=seed), regularizer, weight,
                                     splits, keep, finetune_epochs, progress)
            checkpoint.atomic_write_json(path, {"settings": settings,
                                                "points": [asdict(p) for p in points]})

    chosen = choose_weights(points, keep[0], tie=1 / len(splits.val))
    best, best_pruned = frontier(points), frontier(points, "pruned")
    labels = {m.name: m.label for m in story.methods}
    baseline = statistics.fmean(p.trained for p in points if p.method == story.methods[0].name)
    plots.frontier(best, best_pruned, out / "frontier.png", labels, story.title, baseline)
    plots.weights([asdict(p) for p in points if p.keep == keep[0]], labels,
                  out / "weights.png", keep[0])
    summary = {"settings": settings, "points": [asdict(p) for p in points], "chosen": chosen,
               "frontier": best, "frontier_before_finetuning": best_pruned,
               "seconds_this_run": time.perf_counter() - started}
    checkpoint.atomic_write_json(path, summary)
    table = demo.markdown_table([
        {"method": labels[p["method"]], "FLOPs budget": f"{p['keep']:.0%}",
         "best weight": f"{p['weight']:g}", "val acc. fine-tuned": f"{p['finetuned']:.1%}",
         "FLOPs kept": f"{p['flops_kept']:.1%}",
         "branches removed": f"{p['branches_removed']:.1f}"}
        for p in sorted(best, key=lambda p: (p["method"], -p["keep"]))])
    every_point = demo.markdown_table([
        {"method": labels[p.method], "weight": f"{p.weight:g}", "seed": p.seed,
         "budget": f"{p.keep:.0%}", "trained": f"{p.trained:.1%}",
         "after removal": f"{p.pruned:.1%}", "fine-tuned": f"{p.finetuned:.1%}",
         "FLOPs kept": f"{p.flops_kept:.1%}", "branches removed": p.branches_removed}
        for p in points])
    chosen_text = ", ".join(f"{labels[m]} {c['weight']:g} (of {c['grid_points']})"
                            for m, c in chosen.items())
    minutes = sum({(p.method, p.weight, p.seed): p.seconds for p in points}.values()) / 60
    (out / "frontier.md").write_text(
        f"Validation accuracy ({len(splits.val)} images) of {story.title} on digits, trained "
        f"with the demo's recipe ({recipe.epochs} epochs, seeds {list(seeds)}), cut to each "
        f"FLOPs budget by each method's removal rule, BatchNorm recalibrated, fine-tuned "
        f"{finetune_epochs} epochs; per method and budget the best weight. Weights chosen "
        f"for the demo at {keep[0]:.0%} FLOPs (sweep.choose_weights: best fine-tuned "
        f"accuracy, one validation image counted as a tie, then best accuracy straight after "
        f"removal, then the larger weight): {chosen_text}. The points took {minutes:.1f} "
        f"min.\n\n{table}\n\nEvery point:\n\n{every_point}\n")
    return {**summary, "table": table}


def methods_of(story, regularizer: str) -> List[str]:
    return [m.name for m in story.methods if m.regularizer == regularizer]


def _trainings(story, quick: bool):
    """(regularizer, weight) of every distinct training the story's grids need."""
    seen = {}
    for method in story.methods:
        for weight in method.grid[:1] if quick else method.grid:
            seen.setdefault((method.regularizer, weight), None)
    return list(seen)


def _train_and_cut(story, config, regularizer, weight, splits, keep, finetune_epochs,
                   progress) -> List[Point]:
    """Train once; cut the model by the removal rule of every method that trains this way."""
    started = time.perf_counter()
    config = replace(config, regularizer=regularizer, weight=weight)
    trained = pipeline.train_model(config, splits, ("val",), progress)
    finetune = pipeline.finetune_config(config, finetune_epochs, story.finetune_lr)
    cuts = [(method, pipeline.cut(trained, splits, method.removal, level, finetune,
                                  demo.IMPORTANCE, ("val",), progress))
            for method in story.methods if method.regularizer == regularizer
            for level in keep]
    seconds = time.perf_counter() - started
    return [Point.of(method.name, trained, cut, "val", weight=weight, seconds=seconds)
            for method, cut in cuts]


def _previous_points(path: Path, settings: dict) -> List[Point]:
    """The points of an earlier run whose settings differ at most in the budgets, at the
    budgets asked now (none otherwise)."""
    if not path.is_file():
        return []
    previous = json.loads(path.read_text())

    def same(settings_of: dict) -> dict:  # what must agree: every setting but the budgets
        return {k: v for k, v in settings_of.items() if k != "keep"}

    if same(previous.get("settings", {})) != same(settings):
        return []
    return [Point(**p) for p in previous["points"] if p["keep"] in settings["keep"]]
