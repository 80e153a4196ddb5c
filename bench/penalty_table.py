"""The FFR penalty, forward + backward, over the three chains of a CIFAR ResNet-56 at batch 128
((128,16,32,32), (128,32,16,16), (128,64,8,8); K = 9 block outputs each): the fused op
(ffr_fast.flow.penalty.flow_penalty_chains: all three chains in one call of the C++ kernels) vs
the eager reference vs torch.compile(reference), timed
in interleaved rounds of one run, against this machine's memory traffic floor.

- copy bandwidth: a torch copy_ of a 256 MiB float32 tensor into a preallocated one, counted
  as bytes read + bytes written per second;
- traffic floor: what one fused fwd+bwd must move (forward K*N reads; backward K*N reads and
  K*N writes; N elements per feature, summed over chains) divided by the copy bandwidth;
- peak extra memory: the rise of the process's resident-set high-water mark (VmHWM, reset
  through /proc/self/clear_refs) during one step, above the resident size before it, after
  malloc_trim has handed freed heap memory back to the OS; it includes the K gradients of
  every chain (the step's output, 132 MB here), so "beyond the gradients" is that rise minus
  their size.
Targets: fused >= 10x faster than eager and >= 3x faster than torch.compile(reference), and
within 3.5x of the traffic floor.

    .venv/bin/python bench/penalty_table.py [--rounds 7] [--batch 128] [--threads N]

writes bench/results/penalty_cpu.json and bench/results/penalty_cpu.md.
"""
import ctypes
import gc
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch

from ffr_fast.flow import ops, reference
from ffr_fast.flow.penalty import flow_penalty_chains

from results_io import publish_results, target_lines
from timing import table_parser

CHAIN_SHAPES = [(16, 32, 32), (32, 16, 16), (64, 8, 8)]  # ResNet-56 stages, per sample
CHAIN_LENGTH = 9


def _total(penalty_fn):
    return lambda chains: sum(penalty_fn(chain) for chain in chains)


# name -> a function from the list of chains to the summed penalty
METHODS = {
    "fused op": flow_penalty_chains,
    "eager reference": _total(reference.flow_penalty),
    "torch.compile(reference)": torch.compile(_total(reference.flow_penalty), dynamic=False),
}


def make_chains(batch: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn((batch, *shape), generator=generator).requires_grad_()
             for _ in range(CHAIN_LENGTH)] for shape in CHAIN_SHAPES]


def make_step(penalty_fn, batch: int = 128):
    """A closure running penalty_fn over all chains and their gradients, as training would."""
    chains = make_chains(batch)
    leaves = [x for chain in chains for x in chain]

    def step():
        return torch.autograd.grad(penalty_fn(chains), leaves)

    return step


def copy_bandwidth(rounds: int = 7) -> float:
    """Bytes read + written per second by a torch copy of a 256 MiB tensor."""
    source = torch.randn(64 * 2**20)
    target = torch.empty_like(source).fill_(0)  # touched: no page faults in the timing
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        target.copy_(source)
        times.append(time.perf_counter() - start)
    return 2 * source.numel() * source.element_size() / statistics.median(times)


def _kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())[1])


def peak_extra_memory(step) -> float:
    """Rise of the resident high-water mark during one step, in bytes (Linux, glibc)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap memory back: the step's
    # allocations must then fault their pages in, so they show in the high-water mark
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current VmRSS
    before = _kib("VmRSS")
    step()
    return (_kib("VmHWM") - before) * 1024.0


def measure(rounds: int, batch: int) -> dict:
    ops.require_compiled_cpu_kernel()
    steps = {name: make_step(penalty_fn, batch) for name, penalty_fn in METHODS.items()}
    for step in steps.values():  # warm-up: compilation, allocator, lazy imports
        step()
    memory = {name: peak_extra_memory(step) for name, step in steps.items()}
    seconds = {name: [] for name in METHODS}
    for _ in range(rounds):  # interleaved: drift on a shared machine hits all methods alike
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            seconds[name].append(time.perf_counter() - start)

    elements = CHAIN_LENGTH * sum(batch * torch.Size(shape).numel() for shape in CHAIN_SHAPES)
    traffic_bytes = 3 * elements * 4  # fwd reads + bwd reads + bwd writes, float32
    bandwidth = copy_bandwidth()
    floor_s = traffic_bytes / bandwidth
    fused = statistics.median(seconds["fused op"])
    methods = {
        name: {
            "median_s": statistics.median(times),
            "min_s": min(times),
            "times_s": times,
            "median_ratio_to_fused": statistics.median(
                t / f for t, f in zip(times, seconds["fused op"])),
            "ratio_to_traffic_floor": statistics.median(times) / floor_s,
            "peak_extra_memory_bytes": memory[name],
        }
        for name, times in seconds.items()
    }
    return {
        "batch": batch,
        "chains": [[batch, *shape] for shape in CHAIN_SHAPES],
        "chain_length": CHAIN_LENGTH,
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "traffic_bytes": traffic_bytes,
        "gradient_bytes": elements * 4,
        "traffic_floor_s": floor_s,
        "methods": methods,
        "targets": {
            "fused >= 10x faster than eager": methods["eager reference"]["median_ratio_to_fused"]
            >= 10,
            "fused >= 3x faster than torch.compile(reference)":
                methods["torch.compile(reference)"]["median_ratio_to_fused"] >= 3,
            "fused within 3.5x of the traffic floor": fused / floor_s <= 3.5,
        },
    }


def _speed_targets_against_floor(report: dict) -> list:
    """What each speed target asks of the fused op, next to the traffic floor: a target that
    asks for less time than the floor cannot be met by any implementation on this machine."""
    floor_ms = report["traffic_floor_s"] * 1e3
    lines = []
    for name, factor in (("eager reference", 10), ("torch.compile(reference)", 3)):
        needed_ms = report["methods"][name]["median_s"] * 1e3 / factor
        verdict = ("below the floor: unattainable here" if needed_ms < floor_ms
                   else "above the floor")
        lines.append(f"- {factor}x faster than {name} needs <= {needed_ms:.1f} ms; the traffic "
                     f"floor is {floor_ms:.1f} ms ({verdict})")
    return lines


def markdown(report: dict) -> str:
    mb = 1e6
    lines = [
        f"# FFR penalty forward + backward, CPU, batch {report['batch']}",
        "",
        f"Chains {report['chains']}, K = {report['chain_length']} each, float32; "
        f"torch threads: {report['threads']}, CPUs: {report['cpus']} ({report['processor']}), "
        f"torch {report['torch']}; median of {report['rounds']} interleaved rounds.",
        "",
        "| method | median (ms) | min (ms) | time / fused | time / traffic floor "
        "| peak extra memory (MB) | beyond the gradients (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in report["methods"].items():
        extra = m["peak_extra_memory_bytes"]
        lines.append(
            f"| {name} | {m['median_s'] * 1e3:.1f} | {m['min_s'] * 1e3:.1f} "
            f"| {m['median_ratio_to_fused']:.2f} | {m['ratio_to_traffic_floor']:.2f} "
            f"| {extra / mb:.0f} | {(extra - report['gradient_bytes']) / mb:.0f} |")
    lines += [
        "",
        f"- copy bandwidth (torch copy_ of 256 MiB, read + write): "
        f"{report['copy_bandwidth_bytes_per_s'] / 1e9:.2f} GB/s",
        f"- traffic floor: {report['traffic_bytes'] / mb:.0f} MB (fwd K*N reads, bwd K*N reads + "
        f"K*N writes) / copy bandwidth = {report['traffic_floor_s'] * 1e3:.1f} ms",
        "- peak extra memory: rise of the resident high-water mark (VmHWM) during one step; "
        f"the gradients alone are {report['gradient_bytes'] / mb:.0f} MB",
        "",
        "Targets:",
        *target_lines(report["targets"]),
        "",
        *_speed_targets_against_floor(report),
        "",
        f"The machine is shared (1-minute load average {report['load_average_1min']:.1f} at the "
        "end of the run, other jobs included), so absolute times are noisy; the rounds are "
        "interleaved so that the ratios are fair. With more OpenMP threads than free cores, "
        "each parallel region waits for a descheduled thread, so a busy machine is measured "
        "with --threads 1. Every method allocates its gradients afresh; in rounds where the "
        "allocator has handed that memory back to the OS, the step also pays its page faults "
        "(the min column shows rounds without).",
        "",
        f"Rerun: `.venv/bin/python bench/penalty_table.py --rounds {report['rounds']} "
        f"--batch {report['batch']} --threads {report['threads']}`",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    args = table_parser(__doc__, threads=None, batch=128).parse_args()
    torch.set_num_threads(args.threads)
    report = measure(args.rounds, args.batch)
    publish_results("penalty_cpu", report, markdown(report))


if __name__ == "__main__":
    main()
