"""The demo's and the sweep's figures, drawn on matplotlib Figures with an Agg canvas of
their own: no display is needed, and pyplot's global backend (the caller's, say a notebook's)
is neither used nor switched.

Every function takes plain data (dicts of lists, as stored in the JSON results) and writes
one PNG, so a figure can be redrawn from results/*.json without training again."""
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# Methods take matplotlib's colour cycle in the order they are given (C0, C1, ...), the same
# order in every figure of a story.


def _subplots(*grid, **options):
    """A Figure on its own Agg canvas (never registered with pyplot) and its axes."""
    figure = Figure(figsize=options.pop("figsize"))
    FigureCanvasAgg(figure)
    return figure, figure.subplots(*grid, **options)


def _save(figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def per_layer(norms: Dict[str, Dict[str, Sequence[float]]], path,
              ylabel: str = "filter L2 norm") -> Path:
    """One panel per method, one column of dots per layer: e.g. the L2 norm of every conv
    filter, or every |gamma| of the BatchNorms (log scale; values <= 1e-6 drawn at 1e-6)."""
    figure, axes = _subplots(len(norms), 1, figsize=(11, 2.6 * len(norms)), sharex=True,
                                sharey=True, squeeze=False)
    rng = np.random.default_rng(0)  # jitter only
    for index, (ax, (method, layers)) in enumerate(zip(axes[:, 0], norms.items())):
        for i, values in enumerate(layers.values()):
            values = np.maximum(np.asarray(values), 1e-6)
            ax.scatter(i + rng.uniform(-0.25, 0.25, len(values)), values, s=4, alpha=0.6,
                       color=f"C{index}")
        ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.set_title(method, loc="left", fontsize=10)
    labels = list(next(iter(norms.values())))
    axes[-1, 0].set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    return _save(figure, path)


def channels_kept(channels: Dict[str, Dict[str, Tuple[int, int]]], path) -> Path:
    """Per layer: channels before pruning (outline) and kept by each method (bars).
    `channels` maps method -> layer -> (before, after), the layers in forward order."""
    methods = list(channels)
    conv_layers = list(next(iter(channels.values())))
    width = 0.8 / len(methods)
    figure, ax = _subplots(figsize=(12, 4))
    x = np.arange(len(conv_layers))
    before = [channels[methods[0]].get(name, (0, 0))[0] for name in conv_layers]
    ax.bar(x, before, 0.9, fill=False, edgecolor="black", linewidth=0.6, label="before")
    for i, method in enumerate(methods):
        kept = [channels[method].get(name, (0, 0))[1] for name in conv_layers]
        ax.bar(x - 0.4 + width * (i + 0.5), kept, width, color=f"C{i}", label=method)
    ax.set_xticks(x, conv_layers, rotation=90, fontsize=7)
    ax.set_ylabel("output channels")
    ax.legend(fontsize=8)
    return _save(figure, path)


def training_curves(histories: Dict[str, List[dict]], path, finetune_from: int = None) -> Path:
    """Validation accuracy, training loss and regularizer penalty per epoch, per method;
    epochs after `finetune_from` (a dashed line) are the fine-tuning of the pruned model."""
    figure, axes = _subplots(1, 3, figsize=(13, 3.6))
    keys = (("val_accuracy", "validation accuracy"), ("train_loss", "training loss (task)"),
            ("train_penalty", "penalty (weighted)"))
    for index, (method, history) in enumerate(histories.items()):
        epochs = np.arange(1, len(history) + 1)
        for ax, (key, label) in zip(axes, keys):
            ax.plot(epochs, [record[key] for record in history], marker=".",
                    color=f"C{index}", label=method)
            ax.set_title(label, fontsize=10)
            ax.set_xlabel("epoch")
    if finetune_from is not None:
        for ax in axes:
            ax.axvline(finetune_from + 0.5, linestyle="--", color="black", linewidth=0.6)
    axes[1].set_yscale("log")
    axes[2].set_yscale("symlog", linthresh=1e-4)
    axes[2].set_ylim(bottom=0)
    axes[0].legend(fontsize=8)
    return _save(figure, path)


def frontier(finetuned: List[dict], pruned: List[dict], path, labels: Dict[str, str],
             title: str, baseline: float = None) -> Path:
    """The sweep's frontier: validation accuracy against the share of FLOPs kept, after
    removal + fine-tuning (left, `finetuned` points with a "finetuned" value) and straight
    after removal (right, `pruned` points): one curve per method, each point the method's
    best weight at that budget, and a star at the unpruned no-regularizer model."""
    figure, axes = _subplots(1, 2, figsize=(11, 4.5))
    panels = ((finetuned, "finetuned", "after removal + fine-tuning"),
              (pruned, "pruned", "straight after removal (BN recalibrated)"))
    for ax, (points, key, panel_title) in zip(axes, panels):
        for method in dict.fromkeys(p["method"] for p in points):
            mine = sorted((p for p in points if p["method"] == method), key=lambda p: p["keep"])
            ax.plot([p["flops_kept"] for p in mine], [p[key] for p in mine], marker="o",
                    label=labels.get(method, method))
        if baseline is not None:
            ax.scatter([1.0], [baseline], marker="*", s=150, color="black",
                       label="no regularizer, unpruned", zorder=3)
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel(f"FLOPs kept (share of {title})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation accuracy")
    axes[0].legend(fontsize=8)
    return _save(figure, path)


def weights(points: List[dict], labels: Dict[str, str], path, keep: float) -> Path:
    """Validation accuracy against the regularizer's weight, trained (left) and after cutting
    to `keep` of the FLOPs and fine-tuning (right), one dot per seed: where each penalty
    falls off its cliff. A method without a weight is a horizontal line at its mean."""
    figure, axes = _subplots(1, 2, figsize=(11, 4), sharey=True)
    for method in dict.fromkeys(p["method"] for p in points):
        mine = sorted((p for p in points if p["method"] == method), key=lambda p: p["weight"])
        for ax, key in zip(axes, ("trained", "finetuned")):
            if all(p["weight"] == 0 for p in mine):
                ax.axhline(np.mean([p[key] for p in mine]), linestyle="--",
                           label=labels.get(method, method), color="tab:gray")
            else:
                ax.plot([p["weight"] for p in mine], [p[key] for p in mine], marker="o",
                        linestyle=":", label=labels.get(method, method))
    for ax, title in zip(axes, ("trained, unpruned", f"cut to {keep:.0%} FLOPs + fine-tuned")):
        ax.set_xscale("log")
        ax.set_xlabel("regularizer weight (LayerDrop: drop rate)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation accuracy")
    axes[0].legend(fontsize=8)
    return _save(figure, path)


def flow(flows: Dict[str, List[Dict[str, Optional[float]]]], path, title: str) -> Path:
    """The feature flow per residual block: ||x_out - x_in|| / ||x_in|| averaged over the test
    set, one line per method (its mean over seeds; the band spans the seeds). Blocks whose
    output shape differs from the input's have no such step and are left out (a gap)."""
    figure, ax = _subplots(figsize=(9, 4))
    for method, per_seed in flows.items():
        blocks = list(per_seed[0])
        values = np.array([[np.nan if seed[b] is None else seed[b] for b in blocks]
                           for seed in per_seed])
        x = np.arange(len(blocks))
        line, = ax.plot(x, values.mean(0), marker="o", label=method)
        ax.fill_between(x, values.min(0), values.max(0), alpha=0.2, color=line.get_color())
    ax.set_xticks(x, blocks, rotation=60, fontsize=7, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("||x_out - x_in|| / ||x_in||")
    ax.set_title(f"{title}: how far each residual block moves the features (test set)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(figure, path)


def budget_frontier(summaries: List[dict], labels: Dict[str, str], path) -> Path:
    """The demo's test accuracy against the share of FLOPs kept, straight after removal
    (left) and after fine-tuning (right): per method and budget the mean over seeds, error
    bars one standard deviation in each direction."""
    figure, axes = _subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, key, title in ((axes[0], "pruned", "straight after removal (BN recalibrated)"),
                           (axes[1], "finetuned", "after fine-tuning")):
        for method in dict.fromkeys(s["method"] for s in summaries):
            mine = sorted((s for s in summaries if s["method"] == method),
                          key=lambda s: s["keep"])
            ax.errorbar([s["flops_kept"]["mean"] for s in mine],
                        [s[key]["mean"] for s in mine],
                        xerr=[s["flops_kept"]["std"] for s in mine],
                        yerr=[s[key]["std"] for s in mine], marker="o", capsize=3,
                        label=labels.get(method, method))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("FLOPs kept (share of the unpruned model)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (mean over seeds)")
    axes[0].legend(fontsize=8)
    return _save(figure, path)
