"""`make demo` (`python -m ffr_fast demo`): the whole story on the embedded digits set, for a
CIFAR ResNet-20 (`--model resnet20`, results/demo/) or a small ViT (`--model vit_tiny`,
results/demo-vit/), over several seeds.

Each method (a training regularizer, then a removal rule, see STORIES) trains with the
story's recipe on every seed (the seed sets the initial weights and the data order; the
split stays fixed unless --split-seed is given), is cut to each FLOPs budget, gets its
BatchNorm statistics recomputed on training batches (every method alike), is scored, is
fine-tuned briefly without a regularizer and scored again. Accuracies are on the test split,
which nothing was tuned on; every number in the table is the mean and the standard
deviation over the seeds, and table.json keeps the per-seed numbers. Weights were chosen by
`python -m ffr_fast sweep` on the validation split (sweep.choose_weights states the rule).

Writes table.md, table.json and the figures: the feature flow per block (flow.png), the
accuracy / FLOPs frontier over the seeds (frontier.png), training curves; for the CNN also
filter norms, BatchNorm scales and channels kept.
"""
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ffr_fast import metrics
from ffr_fast.study import checkpoint, pipeline, plots, train


@dataclass(frozen=True)
class Method:
    """One arm of a comparison: train with `regularizer` at `weight` (the sweep's choice among
    `grid`), then cut by `removal` (pipeline.REMOVALS)."""
    name: str  # the key in JSON and plots
    label: str  # as the tables show it
    regularizer: str
    removal: str
    weight: float = 0.0
    grid: Tuple[float, ...] = (0.0,)

    def training(self, weight: Optional[float] = None) -> dict:
        """The TrainConfig fields this method trains with."""
        return dict(regularizer=self.regularizer,
                    weight=self.weight if weight is None else weight)


@dataclass(frozen=True)
class Story:
    """A model, its recipe, the methods compared on it and the budgets they are cut to."""
    title: str
    recipe: train.TrainConfig
    methods: Tuple[Method, ...]
    keep: Tuple[float, ...]  # the demo's FLOPs budgets (shares kept)
    sweep_keep: Tuple[float, ...]  # the sweep's (weights are chosen at the first); one
    # budget each: on 2 shared cores the sweep's time goes to the grids, not the budgets
    finetune_epochs: int
    finetune_lr: float
    demo_out: str
    sweep_out: str


# Every weighted method gets the same number of grid points (four); "none" has no weight to
# tune. Each `weight` is the one `python -m ffr_fast sweep` chose (results/sweep/ and
# results/sweep-vit/, "chosen"; the rule is sweep.choose_weights). FFR runs with the default
# squared norm and difference curvature (curv_weight =
# weight): the smooth variant, whose gradient term pulls each block's output toward its
# input, which is what makes a whole branch removable.
GRID_SIZE = 4
SHORTGPT = Method("shortgpt", "none + Block Influence (ShortGPT)", "none", "influence")
CNN = Story(
    title="ResNet-20",
    recipe=train.TrainConfig(model="resnet20", data="digits", epochs=10, batch_size=64,
                             lr=0.1, weight_decay=5e-4),
    methods=(
        Method("none", "none", "none", "threshold"),
        Method("slimming", "slimming", "slimming", "threshold", 1e-2, (1e-4, 1e-3, 1e-2, 1e-1)),
        Method("ffr", "FFR", "ffr", "threshold", 1.0, (0.1, 0.3, 1.0, 3.0)),
        SHORTGPT,
        Method("layerdrop", "LayerDrop + Block Influence", "layerdrop", "influence", 0.5,
               (0.1, 0.2, 0.3, 0.5)),
    ),
    keep=(0.5,), sweep_keep=(0.5,), finetune_epochs=3, finetune_lr=0.01,
    demo_out="results/demo", sweep_out="results/sweep")
VIT = Story(
    title="ViT (vit_tiny)",
    recipe=train.TrainConfig(model="vit_tiny", data="digits", epochs=20, batch_size=64,
                             lr=0.05, weight_decay=5e-4),
    methods=(
        SHORTGPT,
        Method("layerdrop", "LayerDrop + Block Influence", "layerdrop", "influence", 0.2,
               (0.1, 0.2, 0.3, 0.5)),
        Method("ffr", "FFR + Block Influence", "ffr", "influence", 0.01, (0.01, 0.03, 0.1, 0.3)),
    ),
    keep=(0.5, 0.25), sweep_keep=(0.5,), finetune_epochs=3, finetune_lr=0.01,
    demo_out="results/demo-vit", sweep_out="results/sweep-vit")
STORIES = {"resnet20": CNN, "vit_tiny": VIT}
DEMO_SEEDS = (0, 1, 2)
IMPORTANCE = "l2"  # the threshold rule's unit: filter L2 norm with BatchNorm folded in


@dataclass
class SeedResult(pipeline.CutScores):
    """One method on one seed at one budget, on the test split, and the cut model's size."""
    params: int


@dataclass
class Spread:
    """Mean, sample standard deviation (0 for one value) and range of per-seed values."""
    mean: float
    std: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> "Spread":
        values = [float(v) for v in values]
        if not values:
            raise ValueError("a spread needs at least one value")
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(statistics.fmean(values), std, min(values), max(values), len(values))


@dataclass
class Summary:
    """One method at one budget over the seeds."""
    method: str
    keep: float
    seeds: List[int]
    trained: Spread
    pruned: Spread
    finetuned: Spread
    flops_kept: Spread
    params: Spread
    branches_removed: Spread


def aggregate(results: Sequence[SeedResult]) -> List[Summary]:
    """Per (method, budget), in order of first appearance, the spread of every measure over
    the seeds. Refuses a method and budget seen twice on one seed."""
    groups: Dict[Tuple[str, float], List[SeedResult]] = {}
    for result in results:
        group = groups.setdefault((result.method, result.keep), [])
        if any(r.seed == result.seed for r in group):
            raise ValueError(f"{result.method} at {result.keep:g}: seed {result.seed} twice")
        group.append(result)
    measures = ("trained", "pruned", "finetuned", "flops_kept", "params", "branches_removed")
    return [Summary(method, keep, [r.seed for r in group],
                    **{m: Spread.of([getattr(r, m) for r in group]) for m in measures})
            for (method, keep), group in groups.items()]


def within_spread(a: Spread, b: Spread) -> bool:
    """Whether two means differ by no more than the larger of the two standard deviations:
    the wording rule of the comparison lines (not a significance test)."""
    return abs(a.mean - b.mean) <= max(a.std, b.std)


def comparisons(summaries: Sequence[Summary], reference: str = "ffr") -> List[str]:
    """One sentence per other method and budget: the reference's lead (or deficit) in mean
    test accuracy straight after removal and after fine-tuning, and whether it is within
    the spread over seeds."""
    by_slot = {(s.method, s.keep): s for s in summaries}
    lines = []
    for summary in summaries:
        ours = by_slot.get((reference, summary.keep))
        if summary.method == reference or ours is None:
            continue
        parts = []
        for measure in ("pruned", "finetuned"):
            a, b = getattr(ours, measure), getattr(summary, measure)
            verdict = "within the spread" if within_spread(a, b) else (
                "FFR ahead" if a.mean > b.mean else f"{summary.method} ahead")
            parts.append(f"{measure} {100 * (a.mean - b.mean):+.1f} points ({verdict})")
        lines.append(f"at {summary.keep:.0%} FLOPs, {reference} - {summary.method}: "
                     + ", ".join(parts))
    return lines


@dataclass
class Latency:
    """Median CPU forward time in ms of one method's model at one budget (first seed)."""
    method: str
    keep: float
    batch1_ms: float
    batch64_ms: float


def check_seeds(seeds: Sequence[int]) -> None:
    if not seeds:
        raise ValueError("--seed needs at least one seed")
    repeated = sorted({seed for seed in seeds if list(seeds).count(seed) > 1})
    if repeated:
        raise ValueError(f"--seed lists {repeated} more than once")


def run(model: str = "resnet20", out: Optional[str] = None, seeds: Sequence[int] = DEMO_SEEDS,
        split_seed: int = 0, epochs: Optional[int] = None,
        finetune_epochs: Optional[int] = None, max_batches: Optional[int] = None,
        latency_repeats: int = 30, progress: bool = True) -> dict:
    """Run the story of `model` (a key of STORIES) on every seed; write the table, the JSON
    and the figures to `out` (default: the story's)."""
    started = time.perf_counter()
    story = STORIES[model]
    recipe = replace(story.recipe, epochs=epochs or story.recipe.epochs,
                     max_batches=max_batches, split_seed=split_seed)
    train.check_config(recipe)
    check_seeds(seeds)
    finetune_epochs = finetune_epochs or story.finetune_epochs
    out = Path(out or story.demo_out)
    splits = pipeline.load_splits(recipe)
    results, flows, histories, first_seed = [], {}, {}, {}
    for seed in seeds:
        for config, methods in _trainings(story, replace(recipe, seed=seed)):
            print(f"[demo] seed {seed}: training {config.regularizer} "
                  f"(weight {config.weight:g}) for {', '.join(m.name for m in methods)}",
                  file=sys.stderr)
            trained = pipeline.train_model(config, splits, progress=progress)
            finetune = pipeline.finetune_config(config, finetune_epochs, story.finetune_lr)
            for method in methods:
                flows.setdefault(method.name, []).append(trained.flow)
                for keep in story.keep:
                    cut = pipeline.cut(trained, splits, method.removal, keep, finetune,
                                       IMPORTANCE, progress=progress)
                    results.append(SeedResult.of(method.name, trained, cut, "test",
                                                 params=cut.params))
                    if seed == seeds[0]:
                        first_seed[(method.name, keep)] = (trained, cut)
                        histories[method.name] = trained.history + cut.finetune_history

    order = {method.name: index for index, method in enumerate(story.methods)}
    summaries = sorted(aggregate(results), key=lambda s: (order[s.method], -s.keep))
    unpruned = first_seed[(story.methods[0].name, story.keep[0])][0].model
    latencies = [_latency(method, keep, cut.model, splits, latency_repeats)
                 for (method, keep), (_, cut) in first_seed.items()]
    baseline = _latency("unpruned", 1.0, unpruned, splits, latency_repeats)
    inputs = pipeline.example_inputs(splits)
    reference = {"params": metrics.count_params(unpruned),
                 "flops": metrics.count_flops(unpruned, inputs), "latency": asdict(baseline)}
    table = markdown_table(_rows(story, summaries, latencies, baseline, reference))
    per_seed = markdown_table([_seed_row(story, r) for r in results])
    lines = comparisons(summaries)
    out.mkdir(parents=True, exist_ok=True)
    _figures(story, out, summaries, flows, histories, first_seed, recipe.epochs)
    seconds = time.perf_counter() - started
    (out / "table.md").write_text(
        f"{_describe(story, recipe, splits, seeds, finetune_epochs)}\n\n{table}\n\n"
        + "".join(f"- {line}\n" for line in lines)
        + f"\nPer seed (test accuracy, %):\n\n{per_seed}\n"
        + f"\nThe demo took {seconds:.0f} s ({_threads()}).\n")
    summary = {
        "table": table, "comparisons": lines, "seconds": seconds,
        "settings": {"recipe": train.config_dict(recipe), "seeds": list(seeds),
                     "methods": [asdict(m) for m in story.methods], "keep": list(story.keep),
                     "finetune_epochs": finetune_epochs, "finetune_lr": story.finetune_lr,
                     "importance": IMPORTANCE,
                     "recalibration_batches": pipeline.RECALIBRATION_BATCHES,
                     "influence_images": pipeline.INFLUENCE_IMAGES},
        "unpruned": reference,
        "summaries": [asdict(s) for s in summaries],
        "per_seed": [asdict(r) for r in results],
        "latency": [asdict(latency) for latency in latencies],
        "flow": flows,
    }
    checkpoint.atomic_write_json(out / "table.json", summary)
    return summary


def _trainings(story: Story, recipe: train.TrainConfig):
    """The distinct trainings the story's methods need (methods that share a regularizer
    and weight share the trained model), each with the methods that use it."""
    groups: Dict[Tuple, List[Method]] = {}
    for method in story.methods:
        groups.setdefault(tuple(method.training().items()), []).append(method)
    return [(replace(recipe, **dict(key)), methods) for key, methods in groups.items()]


def _latency(method: str, keep: float, model, splits, repeats: int) -> Latency:
    seconds = metrics.measure_latency(model, splits.input_shape, (1, 64), repeats=repeats)
    return Latency(method, keep, 1e3 * seconds[1], 1e3 * seconds[64])


def markdown_table(rows) -> str:
    """A markdown table of dicts with the same keys; floats shown with 4 significant digits."""
    if not rows:
        return ""
    def show(value) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(show(row[key]) for key in header) + " |" for row in rows]
    return "\n".join(lines)


def _percent(spread: Spread) -> str:
    return f"{100 * spread.mean:.1f} ± {100 * spread.std:.1f}"


def _count(value: float) -> str:
    return f"{value / 1e3:,.1f}k" if value < 1e6 else f"{value / 1e6:.2f}M"


def _rows(story: Story, summaries, latencies, baseline: Latency, unpruned: dict) -> List[dict]:
    """The table's rows (display text only; the numbers live in the summaries): the
    unpruned model, then each method at each budget."""
    methods = {m.name: m for m in story.methods}
    latency = {(t.method, t.keep): t for t in latencies}
    rows = [{"method": f"{story.title}, unpruned (no regularizer)", "weight": "-",
             "budget": "-", "test acc. trained": _percent(next(
                 s.trained for s in summaries if s.method == story.methods[0].name)),
             "after removal": "-", "fine-tuned": "-",
             "FLOPs kept": f"100 (= {_count(unpruned['flops'])})",
             "branches removed": "0", "params": _count(unpruned["params"]),
             "latency b1 / b64 (ms)": f"{baseline.batch1_ms:.2f} / {baseline.batch64_ms:.2f}",
             "speedup b1 / b64": "1.00x / 1.00x"}]
    for s in summaries:
        method, timing = methods[s.method], latency[(s.method, s.keep)]
        rows.append({
            "method": method.label,
            "weight": f"{method.weight:g}" if method.regularizer != "none" else "-",
            "budget": f"{s.keep:.0%}", "test acc. trained": _percent(s.trained),
            "after removal": _percent(s.pruned), "fine-tuned": _percent(s.finetuned),
            "FLOPs kept": _percent(s.flops_kept),
            "branches removed": f"{s.branches_removed.mean:.1f}",
            "params": _count(s.params.mean),
            "latency b1 / b64 (ms)": f"{timing.batch1_ms:.2f} / {timing.batch64_ms:.2f}",
            "speedup b1 / b64": f"{baseline.batch1_ms / timing.batch1_ms:.2f}x / "
                                f"{baseline.batch64_ms / timing.batch64_ms:.2f}x"})
    return rows


def _seed_row(story: Story, result: SeedResult) -> dict:
    label = next(m.label for m in story.methods if m.name == result.method)
    return {"method": label, "seed": result.seed, "budget": f"{result.keep:.0%}",
            "trained": f"{100 * result.trained:.1f}", "after removal": f"{100 * result.pruned:.1f}",
            "fine-tuned": f"{100 * result.finetuned:.1f}",
            "FLOPs kept": f"{100 * result.flops_kept:.1f}",
            "branches removed": result.branches_removed}


def _threads() -> str:
    count = torch.get_num_threads()
    return f"{count} torch thread{'s' if count > 1 else ''}"


def _describe(story: Story, recipe, splits, seeds, finetune_epochs) -> str:
    return (
        f"{story.title} on digits ({splits.input_shape[-1]}x{splits.input_shape[-1]}, "
        f"{recipe.epochs} epochs, SGD lr {recipe.lr} cosine, batch {recipe.batch_size}); "
        f"seeds {', '.join(map(str, seeds))} (weights and data order; split seed "
        f"{recipe.split_seed}): every accuracy is the mean ± standard deviation over the "
        f"seeds, in %, on the test split ({len(splits.test)} images: one image is "
        f"{100 / len(splits.test):.2f} points). Each method is cut to the budget (share of "
        f"the FLOPs kept, at most) by its removal rule: 'threshold' = channels and residual "
        f"branches under a filter-norm threshold searched for the budget; 'Block Influence' "
        f"= the residual branches with the lowest 1 - cos(x_in, x_out) on "
        f"{pipeline.INFLUENCE_IMAGES} training images. Then BatchNorm statistics are "
        f"recomputed on {pipeline.RECALIBRATION_BATCHES} training batches (every method "
        f"alike; 'after removal'), and the model is fine-tuned {finetune_epochs} epochs at "
        f"lr {story.finetune_lr}. Latency: median CPU forward time of the first seed's "
        f"model ({_threads()}), speedup against the unpruned model in "
        f"the same run. Weights: chosen by `python -m ffr_fast sweep` on the validation "
        f"split, {GRID_SIZE} grid points per weighted method.")


def _figures(story, out: Path, summaries, flows, histories, first_seed, epochs) -> None:
    labels = {m.name: m.label for m in story.methods}
    plots.flow({labels[name]: per_seed for name, per_seed in flows.items()}, out / "flow.png",
               story.title)
    plots.budget_frontier([asdict(s) for s in summaries], labels, out / "frontier.png")
    plots.training_curves({labels[m]: h for m, h in histories.items()},
                          out / "training_curves.png", finetune_from=epochs)
    if story is not CNN:
        return
    trained = {labels[m]: t.model for (m, keep), (t, _) in first_seed.items()
               if keep == story.keep[0]}
    plots.per_layer({m: pipeline.filter_norms(model) for m, model in trained.items()},
                    out / "filter_norms.png")
    plots.per_layer({m: pipeline.bn_scales(model) for m, model in trained.items()},
                    out / "bn_scales.png", ylabel="BatchNorm |gamma|")
    # A layer missing from a prune report went with a removed block: 0 channels kept.
    plots.channels_kept({labels[m]: {layer: tuple(cut.channels.get(layer, (len(norms), 0)))
                                     for layer, norms in pipeline.filter_norms(t.model).items()}
                         for (m, keep), (t, cut) in first_seed.items()
                         if keep == story.keep[0]}, out / "channels_kept.png")
