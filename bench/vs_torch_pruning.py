"""ffr_fast.prune against Torch-Pruning (the reference tool), side by side in one run.

Both tools prune the same randomly initialised torchvision model by L2 magnitude at
`ratio` per layer (Torch-Pruning: MagnitudePruner, pruning_ratio=ratio, not global, the
classifier ignored, attention pruned by whole heads); ffr_fast also with `fold_bn=True`.
For each result: FLOPs (torch.utils.flop_counter) and parameters kept, the time the tool
took, and CPU latency at each batch size, measured in interleaved rounds (every variant
once per round, the median over rounds), so that the ratios are side by side in time.
A tool that fails on a model is reported with its error, not dropped.

Writes bench/results/vs_torch_pruning.json and .md. Needs the bench extra
(`pip install ".[bench]"`: torch-pruning). From the repository root:
    .venv/bin/python bench/vs_torch_pruning.py                       # the four latency models
    .venv/bin/python bench/vs_torch_pruning.py --rounds 0 --models resnet18 vit_b_16 ... \
        --out vs_torch_pruning_zoo                                   # FLOPs cut only
"""
import argparse
import copy
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch
import torch_pruning as tp
from torch import nn

import ffr_fast
from ffr_fast.metrics import count_flops, count_params, measure_latency
from ffr_fast.torchvision_loader import load_torchvision

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


def torch_pruning(model: nn.Module, example: torch.Tensor, ratio: float) -> nn.Module:
    model = copy.deepcopy(model)
    heads = {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    pruner = tp.pruner.MagnitudePruner(
        model, example, importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio, global_pruning=False, ignored_layers=[classifier(model)],
        num_heads=heads, prune_num_heads=bool(heads), prune_head_dims=not heads,
        head_pruning_ratio=ratio if heads else 0.0)
    pruner.step()
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
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
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


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(LATENCY_MODELS))
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=5, help="0: no latency")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="vs_torch_pruning")
    parser.add_argument("--no-reference", nargs="*", default=[], metavar="MODEL",
                        help="models Torch-Pruning is not run on (on swin_t it grows past "
                             "21 GB of memory here)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [row for name in args.models for row in compare(name, args)]
    command = "python bench/vs_torch_pruning.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items())
    publish_results(args.out, dict(settings=vars(args), torch=torch.__version__,
                                   torch_pruning=tp.__version__, rows=rows),
                    markdown(rows, args, command))


if __name__ == "__main__":
    main()
