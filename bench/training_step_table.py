"""What FFRLoss adds to a training step: one CIFAR ResNet-56 step (32x32 inputs; forward,
cross-entropy, backward, SGD step) without a regularizer, with FFRLoss on the fused op (all
chains in one call), and with FFRLoss on the eager plain-PyTorch reference. Targets (the
README's measured-speed table): FFRLoss (op) adds <= 2% at batch 128 and <= 5% at batch 8.

The three steps are timed in interleaved rounds, so slow drift of a shared machine hits them
alike (each round's time is the median of 5 steps below batch 64); the table gives each
median and, per round, the ratio to the unregularized step.

    .venv/bin/python bench/training_step_table.py [--rounds 7] [--batch 128] [--threads N]

writes bench/results/training_step.json and bench/results/training_step.md.
"""
import os
import platform
import statistics

import torch
import torch.nn.functional as F

from ffr_fast import FFRLoss, models
from ffr_fast.flow import ops, reference

from results_io import publish_results
from timing import interleaved_medians, table_parser

# name -> (whether FFRLoss is on, its penalty_fn: None is the shipped one-call op)
VARIANTS = {
    "no regularizer": (False, None),
    "FFRLoss (fused op)": (True, None),
    "FFRLoss (eager reference)": (True, reference.flow_penalty),
}
TARGET_OVERHEAD = {128: 0.02, 8: 0.05}  # the README's targets, by batch size


def make_training_step(variant: str, batch: int = 128, seed: int = 0, device="cpu"):
    """A closure running one full training step of a fresh ResNet-56 on a fixed batch
    (gpu_check.py times it on CUDA)."""
    torch.manual_seed(seed)
    model = models.resnet56().to(device).train()
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    regularized, penalty_fn = VARIANTS[variant]
    ffr = FFRLoss(model, penalty_fn=penalty_fn) if regularized else None

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        if ffr is not None:
            loss = loss + ffr()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def steps_per_round(batch: int) -> int:
    return 1 if batch >= 64 else 5  # a short step is noisier


def measure(rounds: int, batch: int) -> dict:
    steps = {name: make_training_step(name, batch) for name in VARIANTS}
    for step in steps.values():  # warm-up: allocator, kernels, lazy imports
        step()
    seconds = interleaved_medians(steps, rounds, steps_per_round(batch))
    baseline = seconds["no regularizer"]
    return {
        name: {
            "median_s": statistics.median(times),
            "min_s": min(times),
            "times_s": times,
            "median_ratio_to_no_regularizer": statistics.median(
                t / b for t, b in zip(times, baseline)),
        }
        for name, times in seconds.items()
    }


def markdown(report: dict) -> str:
    lines = [
        f"# ResNet-56 training step, batch {report['batch']} (32x32), CPU",
        "",
        f"Rerun: `{report['command']}`",
        "",
        f"Machine: {report['machine']}; torch {report['torch']}, {report['threads']} threads; "
        f"compiled CPU kernel: {report['compiled_cpu_kernel']}; load average before/after "
        f"{report['load_before']} / {report['load_after']} (a shared machine: read ratios "
        f"within a few percent as noise). {report['rounds']} interleaved rounds after one "
        f"warm-up step each; a round's time is the median of {report['steps_per_round']} "
        "step(s).",
        "",
        "| step | median (s) | min (s) | median ratio to no regularizer |",
        "|---|---|---|---|",
    ]
    for name, row in report["variants"].items():
        lines.append(f"| {name} | {row['median_s']:.3f} | {row['min_s']:.3f} | "
                     f"{row['median_ratio_to_no_regularizer']:.3f} |")
    target = report["target_overhead"]
    if target is not None:
        lines += ["", f"Target: FFRLoss (fused op) adds <= {target:.0%} to the step at batch "
                      f"{report['batch']}: {'met' if report['target_met'] else 'NOT met'}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = table_parser(__doc__, threads=None, batch=128).parse_args()
    torch.set_num_threads(args.threads)
    load_before = [round(x, 2) for x in os.getloadavg()]
    variants = measure(args.rounds, args.batch)
    report = {
        "command": f".venv/bin/python bench/training_step_table.py --rounds {args.rounds} "
                   f"--batch {args.batch} --threads {args.threads}",
        "batch": args.batch,
        "rounds": args.rounds,
        "steps_per_round": steps_per_round(args.batch),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "compiled_cpu_kernel": ops.has_compiled_kernel("cpu"),
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "variants": variants,
        "target_overhead": TARGET_OVERHEAD.get(args.batch),
    }
    overhead = variants["FFRLoss (fused op)"]["median_ratio_to_no_regularizer"] - 1
    report["target_met"] = (None if report["target_overhead"] is None
                            else overhead <= report["target_overhead"])
    table = markdown(report)
    publish_results("training_step" if args.batch == 128 else f"training_step_b{args.batch}",
                    report, table)


if __name__ == "__main__":
    main()
