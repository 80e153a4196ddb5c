"""ffr_fast.prune against Torch-Pruning (the reference tool), side by side in one run.

Both tools prune the same randomly initialised model by L2 magnitude at `ratio` per layer
(Torch-Pruning: MagnitudePruner, pruning_ratio=ratio, not global, the layers that write the
output ignored, attention pruned by whole heads where it is told the heads). A tool that
fails on a model (an exception, a pruned model that no longer runs or answers in another
shape, more than --timeout seconds) is reported with its error, not dropped.

--family torchvision (the default): torchvision models, ffr_fast also with `fold_bn=True`;
for each result FLOPs (torch.utils.flop_counter) and parameters kept, the time the tool
took, and CPU latency at each batch size, measured in interleaved rounds (every variant
once per round, the median over rounds), so that the ratios are side by side in time.

--family timm / hf (FLOPs cut only; timm_hf_models.py builds the models, nothing is
downloaded): ffr_fast with its torch.export analysis (`analysis="export"`, every ATen op;
it keeps the output's channels itself, cuts attention by whole heads or key/value groups
and verifies the result) and, on timm, its torch.fx analysis (`analysis="fx"`) beside it;
Torch-Pruning told the heads of timm's qkv attention and of Hugging Face's query/key/value
projections, the head counts it keeps written back into the layers and the config as its
examples do. Each tool runs on each model in its own process (a hang or a memory blow-up
costs that row only); a row also says whether heads were cut (a head count the layers or
the config state went down).

Writes bench/results/OUT.json and .md. Needs the bench extra
(`pip install ".[bench]"`: torch-pruning). From the repository root:
    .venv/bin/python bench/vs_torch_pruning.py                       # the four latency models
    .venv/bin/python bench/vs_torch_pruning.py --rounds 0 --models resnet18 vit_b_16 ... \
        --out vs_torch_pruning_zoo                                   # FLOPs cut only
    nice -n 10 .venv/bin/python bench/vs_torch_pruning.py --family timm hf --threads 1
                                                  # -> vs_torch_pruning_timm_hf
"""
import argparse
import copy
import platform
import re
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch_pruning as tp
from torch import nn

import ffr_fast
from ffr_fast.metrics import count_flops, count_params, flops_of, measure_latency
from ffr_fast.modes import run_evaluating
from ffr_fast.torchvision_loader import load_torchvision

import timm_hf_models as zoo  # bench/ is the script's folder
from isolation import isolated  # bench/ is the script's folder
from results_io import publish_results  # bench/ is the script's folder

LATENCY_MODELS = ("resnet50", "mobilenet_v2", "efficientnet_b0", "convnext_tiny")


def build(name: str, image_size: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    options = {"image_size": image_size} if name.startswith("vit_") else {}  # fixed-size ViT
    return getattr(load_torchvision().models, name)(**options).eval()


def classifier(model: nn.Module) -> nn.Module:
    """The layer that writes the model's output (neither tool may narrow it): the last
    Linear, or the last convolution of a net without one (squeezenet)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else [m for m in model.modules()
                                        if isinstance(m, nn.Conv2d)][-1]


def magnitude_pruner(model: nn.Module, example, ratio: float, heads: Dict[nn.Module, int],
                     ignored: List[nn.Module], **trace) -> tp.pruner.MagnitudePruner:
    """Torch-Pruning's L2 magnitude pruning of `model` (in place) at `ratio` per layer, by
    whole heads where `heads` names them; `trace` (forward_fn, output_transform) tells it
    how to call the model. Returns the pruner, which knows the heads it kept."""
    pruner = tp.pruner.MagnitudePruner(
        model, example, importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio, global_pruning=False, ignored_layers=ignored,
        num_heads=heads, prune_num_heads=bool(heads), prune_head_dims=not heads,
        head_pruning_ratio=ratio if heads else 0.0, **trace)
    pruner.step()
    return pruner


def torch_pruning(model: nn.Module, example: torch.Tensor, ratio: float) -> nn.Module:
    model = copy.deepcopy(model)
    heads = {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    magnitude_pruner(model, example, ratio, heads, [classifier(model)])
    return model


def ffr_fast_prune(fold_bn: bool) -> Callable[[nn.Module, torch.Tensor, float], nn.Module]:
    def run(model: nn.Module, example: torch.Tensor, ratio: float) -> nn.Module:
        return ffr_fast.prune(model, example, ratio=ratio, scope="layer",
                              fold_bn=fold_bn).model.eval()
    return run


TOOLS: Dict[str, Callable[[nn.Module, torch.Tensor, float], nn.Module]] = {
    "Torch-Pruning": torch_pruning,
    "ffr_fast": ffr_fast_prune(fold_bn=False),
    "ffr_fast + fold_bn": ffr_fast_prune(fold_bn=True),
}


def interleaved_latency(models: Dict[str, nn.Module], shape, batch_sizes, rounds: int,
                        repeats: int, threads: int) -> Dict[str, Dict[int, float]]:
    """Median seconds per batch for each model, every model measured once per round."""
    samples = {name: {b: [] for b in batch_sizes} for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            for b, seconds in measure_latency(model, shape, batch_sizes, threads=threads,
                                              warmup=2, repeats=repeats).items():
                samples[name][b].append(seconds)
    return {name: {b: statistics.median(s) for b, s in per_batch.items()}
            for name, per_batch in samples.items()}


def error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"


def compare(name: str, args) -> List[dict]:
    original = build(name, args.image_size)
    example = torch.randn(1, 3, args.image_size, args.image_size)
    flops0, params0 = count_flops(original, example), count_params(original)
    rows, pruned = [], {"original": original}
    for tool, prune in TOOLS.items():
        row = dict(model=name, tool=tool, error=None)
        if tool == "Torch-Pruning" and name in args.no_reference:
            row["error"] = "not run (--no-reference)"
            rows.append(row)
            continue
        start = time.perf_counter()
        try:
            model = prune(original, example, args.ratio)
            row["prune_seconds"] = time.perf_counter() - start
            row["flops_cut"] = flops0 / count_flops(model, example)
            row["params_kept"] = count_params(model) / params0
            pruned[tool] = model
        except Exception as error:  # the table reports a tool that fails, with its reason
            row["error"] = error_text(error)
        rows.append(row)
    if not args.rounds:  # FLOPs and prune time only
        return rows
    latency = interleaved_latency(pruned, (3, args.image_size, args.image_size),
                                  args.batch_sizes, args.rounds, args.repeats, args.threads)
    for row in rows:
        if row["tool"] in latency:
            row["latency_ms"] = {b: 1e3 * s for b, s in latency[row["tool"]].items()}
            row["speedup"] = {b: latency["original"][b] / s
                              for b, s in latency[row["tool"]].items()}
    rows.insert(0, dict(model=name, tool="original", error=None, flops_cut=1.0,
                        params_kept=1.0, prune_seconds=0.0,
                        latency_ms={b: 1e3 * s for b, s in latency["original"].items()},
                        speedup={b: 1.0 for b in args.batch_sizes}))
    return rows


def markdown(rows: List[dict], args, command: str) -> str:
    batches = " / ".join(f"b{b}" for b in args.batch_sizes)
    lines = [f"# ffr_fast.prune vs Torch-Pruning {tp.__version__}, ratio {args.ratio} per layer",
             "", f"Rerun: `{command}`", "",
             f"{args.image_size}x{args.image_size} inputs, random init, {args.threads} threads, "
             f"latency the median of {args.rounds} interleaved rounds "
             f"({platform.processor() or platform.machine()}).",
             "", f"| model | tool | FLOPs cut | params kept | prune time "
                 f"| latency {batches} (ms) | speedup {batches} |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["error"]:
            what = r["error"] if r["error"].startswith("not run") else f"failed: {r['error']}"
            lines.append(f"| {r['model']} | {r['tool']} | {what} | | | | |")
            continue
        lat = (" / ".join(f"{r['latency_ms'][b]:.1f}" for b in args.batch_sizes)
               if args.rounds else "-")
        speed = (" / ".join(f"{r['speedup'][b]:.2f}x" for b in args.batch_sizes)
                 if args.rounds else "-")
        lines.append(f"| {r['model']} | {r['tool']} | {r['flops_cut']:.2f}x | "
                     f"{100 * r['params_kept']:.0f}% | {r['prune_seconds']:.1f} s | {lat} "
                     f"| {speed} |")
    return "\n".join(lines) + "\n"


# --- timm and Hugging Face models: FLOPs cut only, each tool in its own process ---------

@dataclass(frozen=True)
class Family:
    models: Tuple[str, ...]
    case: Callable[[str, int], zoo.Case]  # (model name, image size) -> the model and its call
    attention: Callable[[nn.Module], List[zoo.Attention]]  # the heads Torch-Pruning is told
    analyses: Tuple[str, ...]  # ffr_fast's channel analyses run on it


FAMILIES = {
    "timm": Family(zoo.TIMM_MODELS, zoo.timm_case, zoo.timm_attention, ("export", "fx")),
    "hf": Family(tuple(zoo.HF_MODELS), zoo.hf_case, zoo.hf_attention, ("export",)),
}


def model_output(output) -> torch.Tensor:
    """The tensor both tools keep: a Hugging Face model's logits, else the output."""
    return getattr(output, "logits", output)


def case_flops(model: nn.Module, case: zoo.Case) -> int:
    """FLOPs of the case's call on `model` (eval mode, no gradients), which must still
    answer in the original's shape: a pruned model that does not fails its row."""
    output, flops = flops_of(run_evaluating, model, case.inputs, case.kwargs)
    with torch.no_grad():
        expected = model_output(run_evaluating(case.model, case.inputs, case.kwargs)).shape
    if model_output(output).shape != expected:
        raise RuntimeError(f"the pruned model answers in shape {tuple(model_output(output).shape)}"
                           f", the original in {tuple(expected)}")
    return flops


# A tool on a case: (case, ratio, family) -> the pruned model and what the tool reports
CaseTool = Callable[[zoo.Case, float, "Family"], Tuple[nn.Module, dict]]


def ffr_fast_case(analysis: str) -> CaseTool:
    def run(case: zoo.Case, ratio: float, family: Family) -> Tuple[nn.Module, dict]:
        result = ffr_fast.prune(case.model, case.inputs, ratio=ratio, scope="layer",
                                analysis=analysis, example_kwargs=case.kwargs or None)
        report = result.report
        return result.model.eval(), dict(
            path=report.settings["path"], relative_diff=report.relative_diff,
            warnings=report.warnings,  # first clause of each in the table
            # residual branches removed whole (the fx path takes those that emit exactly zero:
            # timm's ResNet zero-initialises each block's last BatchNorm)
            removed_branches=len(report.removed_blocks),
            kept_because=sorted({re.sub(r" \(node \w+\)", "", why)  # one line per kind
                                 for group in report.unpruned for why in group["reasons"]}))
    return run


def torch_pruning_case(case: zoo.Case, ratio: float, family: Family) -> Tuple[nn.Module, dict]:
    model = copy.deepcopy(case.model)
    attention = family.attention(model)
    pruner = magnitude_pruner(
        model, case.inputs, ratio, {p: n for layer in attention for p, n in layer.heads.items()},
        zoo.output_layers(model), forward_fn=lambda m, inputs: m(*inputs, **case.kwargs),
        output_transform=model_output)
    zoo.state_heads(attention, pruner.num_heads, getattr(model, "config", None))
    return model.eval(), dict(heads_told=bool(attention))


def case_tools(family: Family) -> Dict[str, CaseTool]:
    tools = {f"ffr_fast {analysis}": ffr_fast_case(analysis) for analysis in family.analyses}
    tools["Torch-Pruning"] = torch_pruning_case
    return tools


def heads_cut(before: Dict[str, int], after: Dict[str, int]) -> List[Tuple[int, int]]:
    """The distinct (before, after) head counts that went down, over every count stated."""
    return sorted({(before[k], after[k]) for k in before if after.get(k, before[k]) < before[k]},
                  reverse=True)


def case_row(family_name: str, name: str, tool: str, args) -> dict:
    """One tool on one model: FLOPs and parameters kept, time, heads, or its error."""
    family = FAMILIES[family_name]
    row = dict(family=family_name, model=name, tool=tool, error=None)
    try:
        case = family.case(name, args.image_size)
        flops0, params0 = case_flops(case.model, case), count_params(case.model)
        start = time.perf_counter()
        model, details = case_tools(family)[tool](case, args.ratio, family)
        row["prune_seconds"] = time.perf_counter() - start
        flops1 = case_flops(model, case)
        row.update(flops_before=flops0, flops_after=flops1, flops_cut=flops0 / flops1,
                   params_kept=count_params(model) / params0,
                   heads_cut=heads_cut(zoo.head_counts(case.model), zoo.head_counts(model)),
                   **details)
    except Exception as error:  # the table reports a tool that fails, with its reason
        row["error"] = error_text(error)
    return row


def compare_cases(family_name: str, name: str, args) -> List[dict]:
    rows = []
    for tool in case_tools(FAMILIES[family_name]):
        row = dict(family=family_name, model=name, tool=tool, error=None)
        if tool == "Torch-Pruning" and name in args.no_reference:
            row["error"] = "not run (--no-reference)"
        else:
            row.update(isolated(lambda t=tool: case_row(family_name, name, t, args),
                                args.timeout, args.memory_gb))
        print(f"{name} / {tool}: " + (row["error"] or f"{row['flops_cut']:.2f}x FLOPs cut"),
              flush=True)
        rows.append(row)
    return rows


def heads_text(row: dict) -> str:
    if row["error"]:
        return ""
    cuts = row["heads_cut"]
    return "yes (" + ", ".join(f"{b}→{a}" for b, a in cuts) + ")" if cuts else "no"


def result_text(row: dict) -> str:
    """A row's FLOPs cut (before → after), or its error."""
    if row["error"]:
        return row["error"] if row["error"].startswith("not run") else f"failed: {row['error']}"
    return (f"{row['flops_cut']:.2f}x ({row['flops_before'] / 1e6:,.1f} → "
            f"{row['flops_after'] / 1e6:,.1f} MFLOPs)")


def note_text(row: dict) -> str:
    """What a row's tool says beside its figures: ffr_fast the reasons it kept channel groups,
    the residual branches it removed and its warnings (their first clause), Torch-Pruning
    whether it was told any heads."""
    if "kept_because" in row:
        notes = ["kept: " + ", ".join(row["kept_because"])] if row["kept_because"] else []
        if row["removed_branches"]:
            notes.append(f"removed {row['removed_branches']} residual branches whole")
        return "; ".join(notes + [w.split(":")[0] for w in row["warnings"]])
    return "" if row["heads_told"] else "told no heads (no qkv / q, k, v Linears)"


def cases_markdown(rows: List[dict], args, command: str) -> str:
    tools = list(dict.fromkeys(r["tool"] for r in rows))
    lines = [f"# ffr_fast.prune vs Torch-Pruning {tp.__version__} on {' and '.join(args.family)}"
             f" models, ratio {args.ratio} per layer", "", f"Rerun: `{command}`", "",
             f"Random init, batch 1 ({args.image_size}x{args.image_size} images, "
             f"{zoo.TOKENS} tokens), FLOPs by torch.utils.flop_counter on the example call, "
             f"{args.threads} thread(s), each tool on each model in its own "
             f"process ({args.timeout:.0f} s, {args.memory_gb:g} GB at most). Heads cut: a head "
             "count the layers or the config state went down (the counts before → after).",
             "", "| model | " + " | ".join(f"{t}: FLOPs cut | heads cut" for t in tools) + " |",
             "|---|" + "---|---|" * len(tools)]
    by_model = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["tool"]] = r
    for model, per_tool in by_model.items():
        cells = [f"{result_text(per_tool[t])} | {heads_text(per_tool[t])}" if t in per_tool
                 else "- | -" for t in tools]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += ["", "| model | tool | params kept | prune time | notes |", "|---|---|---|---|---|"]
    for r in rows:
        if not r["error"]:
            lines.append(f"| {r['model']} | {r['tool']} | {100 * r['params_kept']:.0f}% | "
                         f"{r['prune_seconds']:.2f} s | {note_text(r)} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", nargs="+", default=["torchvision"],
                        choices=["torchvision", *FAMILIES],
                        help="torchvision (with latency), or timm and/or hf (FLOPs cut only)")
    parser.add_argument("--models", nargs="+",
                        help="default: the family's list; given, the models of one family")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=5, help="0: no latency")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=180.0,
                        help="timm/hf: seconds one tool may take on one model")
    parser.add_argument("--memory-gb", type=float, default=8.0,
                        help="timm/hf: address space one tool may take on one model")
    parser.add_argument("--out", help="default: vs_torch_pruning, or vs_torch_pruning_FAMILY...")
    parser.add_argument("--no-reference", nargs="*", default=[], metavar="MODEL",
                        help="models Torch-Pruning is not run on (on swin_t it grows past "
                             "21 GB of memory here)")
    args = parser.parse_args(argv)
    torchvision = args.family == ["torchvision"]
    if "torchvision" in args.family and not torchvision:
        parser.error("--family torchvision runs alone (its latency rounds)")
    if args.models and len(args.family) > 1:
        parser.error("--models names the models of one family")
    args.out = args.out or "_".join(["vs_torch_pruning"] + ([] if torchvision else args.family))
    torch.set_num_threads(args.threads)
    if torchvision:
        args.models = args.models or list(LATENCY_MODELS)
        rows = [row for name in args.models for row in compare(name, args)]
    else:
        rows = [row for family in args.family
                for name in (args.models or FAMILIES[family].models)
                for row in compare_cases(family, name, args)]
    command = "python bench/vs_torch_pruning.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if v is not None)
    table = markdown if torchvision else cases_markdown
    publish_results(args.out, dict(settings=vars(args), torch=torch.__version__,
                                   torch_pruning=tp.__version__, rows=rows),
                    table(rows, args, command))


if __name__ == "__main__":
    main()
