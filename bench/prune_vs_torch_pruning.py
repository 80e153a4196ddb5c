"""ffr_fast's pruner and Torch-Pruning side by side on torchvision's zoo, in one run.

Writes bench/results/prune_vs_torch_pruning.json and .md. Needs the reference tool, a
bench-only dependency installed beside the pinned torch without pulling another one:
    .venv/bin/python -m pip install --no-deps torch-pruning==1.6.1
    .venv/bin/python bench/prune_vs_torch_pruning.py        (about 5 minutes on 2 cores)

Both tools at ratio 0.5 per layer, L2 magnitude importance, random init, the final
classifier kept, as a new user would call them:
    ffr_fast.prune(model, x, ratio=0.5, scope="layer")
    torch_pruning.pruner.MetaPruner(model, x, MagnitudeImportance(p=2), pruning_ratio=0.5,
                                    ignored_layers=[classifier]).step()
1. FLOPs cut, parameters cut, time to prune, for every model of the zoo (224x224).
2. CPU latency at batch 1 (one thread, interleaved rounds) of the original, both pruned
   models and ffr_fast's with fold_bn, on the four models the issue names.
"""
import argparse
import copy
import json
import platform
import statistics
import time

import torch
from torch import nn

from ffr_fast.metrics import count_flops, count_params, measure_latency
from ffr_fast.pruning import prune
from ffr_fast.torchvision_loader import load_torchvision
from results_io import RESULTS, write_results  # bench/ is the script's folder

ZOO = ["resnet18", "resnext50_32x4d", "wide_resnet50_2", "mobilenet_v2", "mobilenet_v3_large",
       "efficientnet_b0", "efficientnet_v2_s", "regnet_x_400mf", "regnet_y_400mf",
       "mnasnet1_0", "shufflenet_v2_x1_0", "densenet121", "googlenet", "squeezenet1_1",
       "vgg11_bn", "convnext_tiny", "vit_b_16", "swin_t", "maxvit_t"]
# Torch-Pruning ran out of memory on swin_t in the probe (and maxvit_t was not
# reported): not attempted here.
REFERENCE_SKIPPED = {"swin_t": "out of memory in the issue's probe",
                     "maxvit_t": "not attempted (no reference figure)"}
LATENCY = ["resnet50", "mobilenet_v2", "efficientnet_b0", "convnext_tiny"]
SIZE = 224


def build(name: str) -> nn.Module:
    tv = load_torchvision()
    kwargs = dict(aux_logits=False, init_weights=True) if name == "googlenet" else {}
    torch.manual_seed(0)
    return getattr(tv.models, name)(**kwargs).eval()


def classifier(model: nn.Module) -> nn.Module:
    """The last Linear (or the last conv of squeezenet's classifier): both tools keep it."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return layers[-1]


def ours(model, x, **options):
    start = time.perf_counter()
    result = prune(model, x, ratio=0.5, scope="layer", **options)
    return result.model, time.perf_counter() - start


def reference(model, x):
    import torch_pruning as tp

    model = copy.deepcopy(model)
    start = time.perf_counter()
    pruner = tp.pruner.MetaPruner(model, x, tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=0.5, ignored_layers=[classifier(model)])
    pruner.step()
    return model, time.perf_counter() - start


def zoo_rows(x) -> list:
    rows = []
    for name in ZOO:
        model = build(name)
        flops, params = count_flops(model, x), count_params(model)
        row = {"model": name, "flops": flops, "params": params}
        pruned, row["ffr_fast_seconds"] = ours(model, x)
        row["ffr_fast_flop_cut"] = flops / count_flops(pruned, x)
        row["ffr_fast_param_cut"] = params / count_params(pruned)
        if name not in REFERENCE_SKIPPED:
            try:
                pruned, row["reference_seconds"] = reference(model, x)
                row["reference_flop_cut"] = flops / count_flops(pruned, x)
                row["reference_param_cut"] = params / count_params(pruned)
            except Exception as error:  # recorded in the table, not hidden
                row["reference_error"] = f"{type(error).__name__}: {str(error)[:120]}"
        print(row, flush=True)
        rows.append(row)
    return rows


def latency_rows(x, rounds: int) -> list:
    variants = []
    for name in LATENCY:
        model = build(name)
        variants += [(name, "original", model), (name, "Torch-Pruning", reference(model, x)[0]),
                     (name, "ffr_fast", ours(model, x)[0]),
                     (name, "ffr_fast + fold_bn", ours(model, x, fold_bn=True)[0])]
    samples = [[] for _ in variants]
    for _ in range(rounds):  # interleaved: every variant sees the same load swings
        for i, (_, _, net) in enumerate(variants):
            samples[i].append(measure_latency(net, x.shape[1:], (1,), threads=1, warmup=1,
                                              repeats=3)[1])
    rows = []
    for (name, variant, net), times in zip(variants, samples):
        rows.append({"model": name, "variant": variant, "flops": count_flops(net, x),
                     "latency_ms": 1e3 * statistics.median(times)})
    return rows


def markdown(table: dict) -> str:
    lines = [
        "# ffr_fast's pruner and Torch-Pruning side by side",
        "",
        f"torchvision models, random init, input 1x3x{SIZE}x{SIZE}, both tools at ratio 0.5 "
        f"per layer (L2 magnitude), classifier kept; torch {table['torch']}, Torch-Pruning "
        f"{table['reference_version']}, {table['machine']}, one run. The machine's 2 cores "
        "were shared with other jobs: times are noisy, ratios come from the same run.",
        "",
        f"Rerun: `{table['command']}`",
        "",
        "| model | FLOPs cut ffr_fast | FLOPs cut Torch-Pruning | params cut ffr_fast | "
        "params cut Torch-Pruning | prune s ffr_fast | prune s Torch-Pruning |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in table["zoo"]:
        if r["model"] in REFERENCE_SKIPPED:
            ref = [f"not run: {REFERENCE_SKIPPED[r['model']]}", "-", "-"]
        elif "reference_error" in r:
            ref = [f"failed: {r['reference_error']}", "-", "-"]
        else:
            ref = [f"{r['reference_flop_cut']:.2f}x", f"{r['reference_param_cut']:.2f}x",
                   f"{r['reference_seconds']:.2f}"]
        lines.append(
            f"| {r['model']} | {r['ffr_fast_flop_cut']:.2f}x | {ref[0]} | "
            f"{r['ffr_fast_param_cut']:.2f}x | {ref[1]} | {r['ffr_fast_seconds']:.2f} | "
            f"{ref[2]} |")
    lines += ["", f"CPU latency, batch 1, one thread, median over {table['rounds']} interleaved "
              "rounds (each the median of 3 runs after 1 warm-up):", "",
              "| model | variant | GFLOPs | latency ms |", "|---|---|---:|---:|"]
    for r in table["latency"]:
        lines.append(f"| {r['model']} | {r['variant']} | {r['flops'] / 1e9:.2f} | "
                     f"{r['latency_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--table-only", action="store_true",
                        help="rewrite the markdown from the last run's JSON, measuring nothing")
    args = parser.parse_args(argv)
    if args.table_only:
        table = json.loads((RESULTS / "prune_vs_torch_pruning.json").read_text())
        write_results("prune_vs_torch_pruning", table, markdown(table))
        return
    import torch_pruning

    torch.set_num_threads(1)
    x = torch.randn(1, 3, SIZE, SIZE)
    table = {"torch": torch.__version__, "reference_version": torch_pruning.__version__,
             "machine": platform.machine(), "rounds": args.rounds,
             "command": f"python bench/prune_vs_torch_pruning.py --rounds {args.rounds}"}
    table["zoo"] = zoo_rows(x)
    table["latency"] = latency_rows(x, args.rounds)
    write_results("prune_vs_torch_pruning", table, markdown(table))
    print(markdown(table))


if __name__ == "__main__":
    main()
