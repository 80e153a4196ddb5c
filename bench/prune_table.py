"""CIFAR ResNet-56 before and after pruning: params, FLOPs, CPU latency, pruning time.

Writes bench/results/prune_resnet56.json and .md. Run from the repository root:
    .venv/bin/python bench/prune_table.py            (about 3 minutes on 2 cores)

Two starting points:
- `dense`: a random ResNet-56 with trained-looking BN statistics, pruned by `ratio=0.5`
  (global, L2 importance). Nothing is exactly zero, so no block can go.
- `ffr-sparse`: the structure FFR training leaves: a third of the residual branches emit
  zero (their last BN has gamma = beta = 0) and half the first-conv filters of the others
  are zero. Pruned with `threshold=0` (exact: the output does not change), with and
  without block removal, and with BN folding.
"""
import platform
import statistics
import time

import torch

from ffr_fast import models, prune
from ffr_fast.metrics import count_flops, count_params, measure_latency
from ffr_fast.testing import look_trained

from results_io import publish_results  # bench/ is the script's folder
from timing import table_parser

INPUT = (3, 32, 32)


def ffr_sparse_resnet56(seed: int = 0) -> torch.nn.Module:
    """ResNet-56 with every third residual branch dead and half of the other blocks' first
    conv filters zero (filter + BN gamma/beta), as after FFR training."""
    torch.manual_seed(seed)
    model = look_trained(models.resnet56(), seed)
    blocks = [b for stage in (model.layer1, model.layer2, model.layer3) for b in stage]
    with torch.no_grad():
        for i, block in enumerate(blocks):
            if i % 3 == 2 and block.downsample is None:
                block.bn2.weight.zero_()
                block.bn2.bias.zero_()
            else:
                dead = torch.randperm(block.conv1.out_channels)[:block.conv1.out_channels // 2]
                for t in (block.conv1.weight, block.bn1.weight, block.bn1.bias):
                    t[dead] = 0
    return model


def variants():
    """(name, original model, prune kwargs or None for the original itself)."""
    dense, sparse = look_trained(models.resnet56()), ffr_sparse_resnet56()
    return [
        ("dense original", dense, None),
        ("dense ratio=0.5", dense, dict(ratio=0.5)),
        ("dense ratio=0.5 + fold_bn", dense, dict(ratio=0.5, fold_bn=True)),
        ("dense ratio=0.5, round_to=8 + fold_bn", dense, dict(ratio=0.5, round_to=8,
                                                               fold_bn=True)),
        ("ffr-sparse original", sparse, None),
        ("ffr-sparse threshold=0, keep blocks", sparse, dict(threshold=0.0, remove_blocks=False)),
        ("ffr-sparse threshold=0, remove blocks", sparse, dict(threshold=0.0)),
        ("ffr-sparse threshold=0, remove blocks + fold_bn", sparse,
         dict(threshold=0.0, fold_bn=True)),
    ]


def measure(threads: int, rounds: int) -> dict:
    torch.set_num_threads(threads)  # pruning and latency alike
    x = torch.randn(1, *INPUT)
    prune(models.resnet20(), x, ratio=0.5)  # one-off imports and caches, not pruning time
    rows, nets = [], []
    for name, model, kwargs in variants():
        row = {"variant": name, "settings": kwargs}
        if kwargs is None:
            net = model
        else:
            start = time.perf_counter()
            result = prune(model, x, **kwargs)
            row["prune_seconds"] = time.perf_counter() - start
            row["removed_blocks"] = len(result.report.removed_blocks)
            row["relative_output_diff_vs_zeroed"] = result.report.relative_diff
            row["max_abs_diff_vs_original"] = result.report.max_abs_diff_original
            net = result.model
        row["params"], row["flops_b1"] = count_params(net), count_flops(net, x)
        rows.append(row)
        nets.append(net)
    # Interleaved rounds: every variant sees the same share of the machine's load swings.
    samples = {batch: [[] for _ in nets] for batch in (1, 64)}
    for _ in range(rounds):
        for i, net in enumerate(nets):
            lat = measure_latency(net, INPUT, (1, 64), threads=threads, warmup=1, repeats=3)
            for batch in lat:
                samples[batch][i].append(lat[batch])
    for i, row in enumerate(rows):
        row["latency_b1_ms"] = 1e3 * statistics.median(samples[1][i])
        row["latency_b64_ms"] = 1e3 * statistics.median(samples[64][i])
    baseline = None
    for row in rows:
        baseline = row if row["settings"] is None else baseline
        row["flop_reduction"] = baseline["flops_b1"] / row["flops_b1"]
        row["speedup_b1"] = baseline["latency_b1_ms"] / row["latency_b1_ms"]
        row["speedup_b64"] = baseline["latency_b64_ms"] / row["latency_b64_ms"]
        row["speedup_b64_over_flop_reduction"] = row["speedup_b64"] / row["flop_reduction"]
    return {"model": "CIFAR ResNet-56, input 3x32x32", "threads": threads, "rounds": rounds,
            "torch": torch.__version__, "machine": platform.machine(),
            "command": f"python bench/prune_table.py --threads {threads} --rounds {rounds}",
            "rows": rows}


def markdown(table: dict) -> str:
    lines = [
        f"# Pruning {table['model']}",
        "",
        f"CPU latency: median over {table['rounds']} interleaved rounds (each the median of "
        f"3 runs after 1 warm-up), torch.set_num_threads("
        f"{table['threads']}), eval mode, inference_mode; torch {table['torch']}. The "
        "machine's 2 cores were shared with other jobs during the run, so absolute times "
        "are noisy; ratios come from the same run. Speedups are against the variant's own "
        "original. FLOPs from torch.utils.flop_counter at batch 1 (BN and ReLU not counted).",
        "",
        f"Rerun: `{table['command']}`",
        "",
        "| variant | params | MFLOPs | FLOP reduction | b1 ms | b1 speedup | b64 ms | "
        "b64 speedup | b64 speedup / FLOP reduction | blocks removed | prune s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in table["rows"]:
        lines.append(
            f"| {r['variant']} | {r['params']:,} | {r['flops_b1'] / 1e6:.1f} | "
            f"{r['flop_reduction']:.2f}x | {r['latency_b1_ms']:.2f} | {r['speedup_b1']:.2f}x | "
            f"{r['latency_b64_ms']:.1f} | {r['speedup_b64']:.2f}x | "
            f"{r['speedup_b64_over_flop_reduction']:.2f} | {r.get('removed_blocks', '')} | "
            f"{r.get('prune_seconds', float('nan')):.3f} |")
    rows = {r["variant"]: r for r in table["rows"]}
    dense, folded = rows["dense ratio=0.5"], rows["dense ratio=0.5 + fold_bn"]
    lines += [
        "",
        "Targets: pruning ResNet-56 < 1 s: max "
        f"{max(r.get('prune_seconds', 0) for r in table['rows']):.3f} s (warm process; the "
        "first call in a process also pays one-off imports). At ratio=0.5, batch 64, "
        "speedup / FLOP reduction >= 0.7: "
        f"{dense['speedup_b64_over_flop_reduction']:.2f} plain, "
        f"{folded['speedup_b64_over_flop_reduction']:.2f} with fold_bn. Block removal on the "
        "FFR-sparse model: b64 speedup "
        f"{rows['ffr-sparse threshold=0, keep blocks']['speedup_b64']:.2f}x without, "
        f"{rows['ffr-sparse threshold=0, remove blocks']['speedup_b64']:.2f}x with, "
        f"{rows['ffr-sparse threshold=0, remove blocks + fold_bn']['speedup_b64']:.2f}x with "
        "fold_bn as well.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = table_parser(__doc__, threads=1).parse_args(argv)
    table = measure(args.threads, args.rounds)
    publish_results("prune_resnet56", table, markdown(table))


if __name__ == "__main__":
    main()
