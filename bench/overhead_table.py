"""What one FFR step costs beyond its memory traffic: the penalty of the three CIFAR
ResNet-56 chains ((B,16,32,32), (B,32,16,16), (B,64,8,8); K = 9 block outputs each),
forward + backward through FFRLoss, at B = 1, 2, 8 and 128:

- op: FFRLoss as shipped, every chain in one call of ffr_fast::flow_penalty
  (ffr_fast.flow.penalty.flow_penalty_chains);
- eager reference: FFRLoss(penalty_fn=ffr_fast.flow.reference.flow_penalty);
- torch.compile(reference): the same with torch.compile(reference.flow_penalty);
each both through FFRLoss and called directly on the chains (the penalty alone, without
FFRLoss's hooks; the compiled reference then compiles the sum over all chains at once).

The features come from a stand-in model whose layers return fixed leaf tensors, so a step
times FFRLoss's hooks, ffr() and the backward to those leaves, and nothing of a network.
Methods are timed in interleaved rounds of one run (a shared machine drifts); each cell is
the median over rounds of each round's median step. At B = 128 the table adds the traffic
floor (bench/penalty_table.py: K*N reads forward, K*N reads + K*N writes backward, over the
machine's copy bandwidth).

Targets (the README's measured-speed table): at B = 2, the op <= 0.2x the eager reference and
<= 0.5x the compiled
one; at B = 128, the op <= the compiled reference and within 1.2x of the traffic floor.

    .venv/bin/python bench/overhead_table.py [--threads 1] [--rounds 7]

writes bench/results/overhead.json and bench/results/overhead.md.
"""
import os
import platform
import statistics

import torch
from torch import nn

from ffr_fast import FFRLoss
from ffr_fast.flow import ops, reference
from ffr_fast.flow.penalty import flow_penalty_chains

from penalty_table import CHAIN_LENGTH, CHAIN_SHAPES, copy_bandwidth
from results_io import publish_results, target_lines
from timing import interleaved_medians, table_parser

BATCHES = (1, 2, 8, 128)
OPTIONS = dict(grad_weight=1e-3, curv_weight=1e-3)
OP, EAGER, COMPILED = "op", "eager reference", "torch.compile(reference)"


def _reference_total(chains):
    return sum(reference.flow_penalty(chain, **OPTIONS) for chain in chains)


def penalty_functions():
    """Fresh per batch size (after torch.compiler.reset()): compiled code is specialised on
    shapes, and four batch sizes of three chains would pass torch.compile's recompile limit
    and silently run the reference eagerly."""
    return {
        # name -> (FFRLoss's penalty_fn, the whole-flow function for a direct call)
        OP: (None, lambda chains: flow_penalty_chains(chains, **OPTIONS)),
        EAGER: (reference.flow_penalty, _reference_total),
        COMPILED: (torch.compile(reference.flow_penalty, dynamic=False),
                   torch.compile(_reference_total, dynamic=False)),
    }


class FeatureSource(nn.Module):
    """A stand-in network: layer i returns feature i, a fixed leaf, so FFRLoss captures the
    given chains (consecutive equal shapes form a chain) at the cost of its hooks only."""

    def __init__(self, features):
        super().__init__()
        self.features = features
        self.layers = nn.ModuleList(nn.Identity() for _ in features)

    def forward(self):
        for layer, x in zip(self.layers, self.features):
            layer(x)
        return self.features[-1]


def make_steps(batch: int, seed: int = 0):
    """Closures computing the gradients of every feature, as a training step would: through
    FFRLoss (the stand-in model's forward with FFRLoss's hooks, then ffr()) and by a direct
    call of the whole-flow function, for each method."""
    generator = torch.Generator().manual_seed(seed)
    chains = [[torch.randn((batch, *shape), generator=generator).requires_grad_()
               for _ in range(CHAIN_LENGTH)] for shape in CHAIN_SHAPES]
    features = [x for chain in chains for x in chain]
    layers = [f"layers.{i}" for i in range(len(features))]
    steps = {}
    for name, (penalty_fn, whole_flow) in penalty_functions().items():
        # A model of its own for each method: hooks of the other methods' losses on a shared
        # model would run in every method's forward and blur the comparison.
        model = FeatureSource(features).train()
        ffr = FFRLoss(model, layers=layers, penalty_fn=penalty_fn, **OPTIONS)

        def through_ffrloss(model=model, ffr=ffr):
            model()
            return torch.autograd.grad(ffr(), features)

        steps[f"FFRLoss ({name})"] = through_ffrloss
        steps[f"direct ({name})"] = (
            lambda whole_flow=whole_flow: torch.autograd.grad(whole_flow(chains), features))
    return steps


def measure(rounds: int, threads: int) -> dict:
    ops.require_compiled_cpu_kernel()
    torch.set_num_threads(threads)
    rows = []
    for batch in BATCHES:
        torch.compiler.reset()
        steps = make_steps(batch)
        repeats = 3 if batch == 128 else 30  # steps per round: small steps are noisy
        for step in steps.values():  # warm-up: compilation, allocator, layout caches
            for _ in range(2):
                step()
        medians = interleaved_medians(steps, rounds, repeats)
        seconds = {name: statistics.median(m) for name, m in medians.items()}
        row = {"batch": batch, "seconds": seconds, "op_over": {
            f"{way} ({name})": seconds[f"{way} ({OP})"] / seconds[f"{way} ({name})"]
            for way in ("FFRLoss", "direct") for name in (EAGER, COMPILED)}}
        rows.append(row)
        print(f"batch {batch}: " + ", ".join(f"{name} {t * 1e3:.3f} ms"
                                              for name, t in seconds.items()), flush=True)
    elements = CHAIN_LENGTH * sum(128 * torch.Size(shape).numel() for shape in CHAIN_SHAPES)
    floor_s = 3 * elements * 4 / copy_bandwidth()  # fwd reads + bwd reads + bwd writes
    by_batch = {row["batch"]: row for row in rows}
    small, large = by_batch[2]["op_over"], by_batch[128]
    targets = {
        "B=2, through FFRLoss: op <= 0.2x eager reference": small[f"FFRLoss ({EAGER})"] <= 0.2,
        "B=2, through FFRLoss: op <= 0.5x torch.compile(reference)":
            small[f"FFRLoss ({COMPILED})"] <= 0.5,
        "B=128, through FFRLoss: op <= torch.compile(reference)":
            large["op_over"][f"FFRLoss ({COMPILED})"] <= 1.0,
        "B=128, through FFRLoss: op within 1.2x of the traffic floor":
            large["seconds"][f"FFRLoss ({OP})"] <= 1.2 * floor_s,
    }
    return {
        "chains": [list(shape) for shape in CHAIN_SHAPES], "chain_length": CHAIN_LENGTH,
        "rounds": rounds, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "processor": platform.processor() or platform.machine(), "torch": torch.__version__,
        "traffic_floor_b128_s": floor_s, "rows": rows, "targets": targets,
        "command": f".venv/bin/python bench/overhead_table.py --threads {threads} "
                   f"--rounds {rounds}",
    }


def markdown(report: dict) -> str:
    lines = [
        "# FFR overhead: the whole flow's penalty, forward + backward, CPU",
        "",
        f"Three ResNet-56 chains (per sample {report['chains']}), K = {report['chain_length']} "
        f"each, float32; torch threads: {report['threads']}, CPUs: {report['cpus']} "
        f"({report['processor']}), torch {report['torch']}; median over {report['rounds']} "
        "interleaved rounds of each round's median step. Through FFRLoss a step is the "
        "stand-in model's forward (27 hooked layers), ffr() and the gradients of the 27 "
        "features; direct is the whole-flow function called on the chains, and its gradients.",
        "",
    ]
    for way in ("FFRLoss", "direct"):
        lines += [
            f"| batch | {way}: {OP} (ms) | {EAGER} (ms) | {COMPILED} (ms) | op / eager "
            "| op / compiled |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for row in report["rows"]:
            sec, ratio = row["seconds"], row["op_over"]
            lines.append(
                f"| {row['batch']} | "
                + " | ".join(f"{sec[f'{way} ({name})'] * 1e3:.3f}"
                             for name in (OP, EAGER, COMPILED))
                + f" | {ratio[f'{way} ({EAGER})']:.2f} | {ratio[f'{way} ({COMPILED})']:.2f} |")
        lines.append("")
    b128 = report["rows"][-1]["seconds"][f"FFRLoss ({OP})"]
    lines += [
        f"Traffic floor at batch 128: {report['traffic_floor_b128_s'] * 1e3:.1f} ms "
        f"(copy bandwidth at {report['threads']} thread(s)); the op through FFRLoss takes "
        f"{b128 / report['traffic_floor_b128_s']:.2f}x of it.",
        "",
        "Targets (the README's measured-speed table):",
        *target_lines(report["targets"]),
        "",
        f"The machine is shared (1-minute load average {report['load_average_1min']:.1f} at the "
        "end of the run); ratios come from interleaved rounds of one run.",
        "",
        f"Rerun: `{report['command']}`",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    args = table_parser(__doc__, threads=1).parse_args()
    report = measure(args.rounds, args.threads)
    publish_results("overhead", report, markdown(report))


if __name__ == "__main__":
    main()
