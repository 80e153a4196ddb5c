"""The results of the language-model story over its seeds: the table (results.md), the
summary (summary.json), the comparison sentences and the figures."""
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import List, Sequence

from ffr_fast.study import checkpoint, plots
from ffr_fast.study.demo import Spread, markdown_table, within_spread
from ffr_fast.study.lm.config import HEALINGS, REMOVED_FRACTIONS, LMConfig, arms, removed_count


def _show(spread: Spread) -> str:
    return f"{spread.mean:.3f} ± {spread.std:.3f}"


def summarize(config: LMConfig, records: Sequence[dict]) -> List[dict]:
    """Per arm and depth, the test bits per byte over the seeds: unpruned, and for the
    pruned arms the best rule's (per seed, on validation) straight after removal, after
    fine-tune healing and after distillation healing."""
    rows = []
    for arm in arms(config):
        chosen = [r["arms"][arm.name]["chosen"] for r in records]
        base = {"arm": arm.name, "label": arm.label, "lr": [c["lr"] for c in chosen],
                "weight": [c["weight"] for c in chosen]}
        if arm.layers:
            rows.append(base | {"layers": arm.layers, "rule": [None] * len(chosen),
                                "unpruned": Spread.of([c["unpruned"]["test"] for c in chosen])})
            continue
        rows.append(base | {"layers": config.layers, "rule": [None] * len(chosen),
                            "unpruned": Spread.of([c["unpruned"]["test"] for c in chosen])})
        for fraction in REMOVED_FRACTIONS:
            key = f"{fraction:g}"
            rules = [c["best_rule"][key] for c in chosen]
            entries = [c["cuts"][f"{key}/{rule}"] for c, rule in zip(chosen, rules)]
            rows.append(base | {"layers": config.layers - removed_count(config.layers, fraction),
                                "rule": rules,
                                **{stage: Spread.of([e[stage]["test"] for e in entries])
                                   for stage in ("pruned", *HEALINGS)}})
    return rows


def _best_after_healing(row: dict) -> Spread:
    return min((row[h] for h in HEALINGS), key=lambda s: s.mean)


def comparisons(rows: Sequence[dict]) -> List[str]:
    """FFR pruned against the scratch model of its depth and the unregularized model pruned,
    each in test bits per byte after its better healing, within the spread or not."""
    by = {(row["arm"], row["layers"]): row for row in rows}
    lines = []
    for (arm, layers), row in by.items():
        if arm != "ffr" or "pruned" not in row:
            continue
        ours = _best_after_healing(row)
        for other_arm in ("none", "layerdrop", f"scratch{layers}"):
            other = by.get((other_arm, layers))
            if other is None:
                continue
            theirs = _best_after_healing(other) if "pruned" in other else other["unpruned"]
            verdict = "one seed: no spread to judge by" if ours.n < 2 else (
                "within the spread") if within_spread(ours, theirs) else (
                "FFR ahead" if ours.mean < theirs.mean else f"{other_arm} ahead")
            lines.append(f"{layers} layers kept, FFR - {other_arm}: "
                         f"{ours.mean - theirs.mean:+.3f} bits per byte ({verdict})")
    return lines


def _table_rows(rows: Sequence[dict]) -> List[dict]:
    def choice(values):
        shown = sorted(set(map(str, values)))
        return "/".join(shown)

    table = []
    for row in rows:
        healed = "pruned" in row
        table.append({
            "arm": row["label"], "layers kept": row["layers"], "lr": choice(row["lr"]),
            "weight": choice(row["weight"]) if row["arm"] in ("ffr", "layerdrop") else "-",
            "best rule": choice(row["rule"]) if healed else "-",
            "trained (unpruned)": _show(row["unpruned"]) if "unpruned" in row else "-",
            "after removal": _show(row["pruned"]) if healed else "-",
            "fine-tune healed": _show(row["finetune"]) if healed else "-",
            "distilled": _show(row["distill"]) if healed else "-"})
    return table


def report(config: LMConfig, records: Sequence[dict], out: Path) -> dict:
    rows = summarize(config, records)
    seeds = [r["seed"] for r in records]
    speeds = {depth: statistics.fmean(r["generate_tokens_per_s"][depth] for r in records)
              for depth in records[0]["generate_tokens_per_s"]}
    corpus = records[0]["settings"]["corpus"]
    lines = [
        f"# demo-lm: byte-level LlamaForCausalLM, {config.layers} layers, width {config.hidden}",
        "",
        f"Corpus: {config.data} ({corpus['bytes']['train']:,} / {corpus['bytes']['val']:,} / "
        f"{corpus['bytes']['test']:,} bytes train / val / test, sha256 {corpus['sha256'][:16]}); "
        f"{config.steps} training steps of {config.batch_size} x {config.window} bytes, "
        f"{config.heal_steps} healing steps (lr {config.heal_lr:g}); seeds "
        f"{', '.join(map(str, seeds))}; {config.threads} torch threads.",
        "Test bits per byte (lower is better), mean ± sd over the seeds; learning rate, "
        "weight and rule chosen on validation (docstring of ffr_fast/study/lm/__init__.py).",
        "", markdown_table(_table_rows(rows)), "",
        *[f"- {line}" for line in comparisons(rows)], "",
        "Greedy generate() tokens/s (batch 1, FFR arm): "
        + ", ".join(f"{depth} layers {speed:.0f}" for depth, speed in speeds.items()),
        "", "Seconds per seed, wall (CPU per thread): " + ", ".join(
            f"{r['seconds']:.0f} ({r['cpu_seconds_per_thread']:.0f})" for r in records), ""]
    table = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table)
    summary = {"seeds": seeds, "rows": [_jsonable(row) for row in rows],
               "comparisons": comparisons(rows), "generate_tokens_per_s": speeds,
               "table": table}
    checkpoint.atomic_write_json(out / "summary.json", summary)
    frontier_plot(rows, out / "frontier.png", config.layers)
    plots.flow({config_label: [r["arms"][name]["chosen"]["flow"] for r in records]
                for name, config_label in (("none", "no regularizer"), ("ffr", "FFR"),
                                           ("layerdrop", "LayerDrop"))},
               out / "flow.png", f"LlamaForCausalLM, {config.layers} layers")
    return summary


def _jsonable(row: dict) -> dict:
    return {k: asdict(v) if isinstance(v, Spread) else v for k, v in row.items()}


def frontier_plot(rows: Sequence[dict], path, layers: int) -> Path:
    """Test bits per byte against decoder layers kept: each arm unpruned, then pruned by its
    best rule after fine-tune healing (left) and after distillation (right); the scratch
    models at their depths in both panels. Error bars: one sd over the seeds."""
    figure, axes = plots._subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, healing in zip(axes, HEALINGS):
        for index, arm in enumerate(("none", "ffr", "layerdrop")):
            mine = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["layers"])
            values = [r[healing] if "pruned" in r else r["unpruned"] for r in mine]
            ax.errorbar([r["layers"] for r in mine], [v.mean for v in values],
                        yerr=[v.std for v in values], marker="o", capsize=3,
                        label=mine[0]["label"], color=f"C{index}")
        scratch = sorted((r for r in rows if r["arm"].startswith("scratch")),
                         key=lambda r: r["layers"])
        ax.errorbar([r["layers"] for r in scratch], [r["unpruned"].mean for r in scratch],
                    yerr=[r["unpruned"].std for r in scratch], marker="s", linestyle="none",
                    capsize=3, color="black", label="trained from scratch at that depth")
        healed = "fine-tuned" if healing == "finetune" else "distilled"
        ax.set_title(f"pruned (best rule), then {healed}", fontsize=10)
        ax.set_xlabel(f"decoder layers kept (of {layers})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test bits per byte (mean over seeds)")
    axes[0].legend(fontsize=8)
    return plots._save(figure, path)
