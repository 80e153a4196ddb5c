"""gpu_check's measurements (sections 2-4 of its docstring): the timers (CUDA events and the
profiler on a GPU, the wall clock on a dry run), copy and kernel bandwidth, peak memory, and
the op against the eager and compiled reference, alone, over the whole flow and in a
training step; with the helpers the correctness sections share (chains, logging).

gpu_check.py sets TRITON_INTERPRET for a dry run before this module imports Triton.
"""
import statistics
import time

import torch

from ffr_fast import testing
from ffr_fast.flow import reference
from ffr_fast.flow.penalty import flow_penalty, flow_penalty_chains
from ffr_fast.kernels import flow_sums as kernels

from training_step_table import make_training_step  # bench/ is the script's folder

RESNET56_STAGES = [(128, 16, 32, 32), (128, 32, 16, 16), (128, 64, 8, 8)]
START = time.perf_counter()


def log(message):
    print(f"[{time.perf_counter() - START:6.1f}s] {message}", flush=True)


def random_chain(shape, K, dtype, device):
    """A feature flow: each feature a perturbation of the previous one."""
    return testing.random_chain(K, shape, dtype, device, step=0.3)


def resnet56_chains(batch, device):
    return [[x.requires_grad_() for x in random_chain((batch, *shape[1:]), 9, torch.float32,
                                                       device)]
            for shape in RESNET56_STAGES]


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device, reps):
    """Median wall time of one call, after warm-up (CUDA events on a GPU)."""
    for _ in range(3):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def kernel_ms(fn, kernel_name, device, reps):
    """Median device time of the GPU kernel named kernel_name per call (profiler); None on
    CPU, where the interpreter has no kernels to time."""
    if device.type != "cuda":
        return None
    fn()
    synchronize(device)
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        for _ in range(reps):
            fn()
        synchronize(device)
    times = [event.time_range.elapsed_us() / 1e3 for event in profile.events()
             if event.name.startswith(kernel_name)]
    if not times:
        raise RuntimeError(f"the profiler saw no kernel named {kernel_name}; it saw "
                           f"{sorted({event.name for event in profile.events()})}")
    return statistics.median(times)


def copy_bandwidth(p, device):
    x = torch.randn(p["copy_elements"], device=device)
    ms = median_ms(lambda: x.clone(), device, p["reps"])
    return 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9


def measure_bandwidth(p, device, copy_gbps, results):
    chains = [(shape, K, torch.float32, 1024) for shape, K in p["bandwidth"]]
    chains += [(shape, K, torch.bfloat16, 1024) for shape, K in p["bandwidth"]]
    chains += [(shape, K, torch.float32, block) for shape, K in p["sweep"]
               for block in p["block_sizes"] if block != 1024]
    for shape, K, dtype, block in chains:
        features = random_chain(shape, K, dtype, device)
        grad_sums = torch.ones(shape[0] * 3 * (K - 1), device=device,
                               dtype=reference.accumulation_dtype(dtype))
        chain_bytes = K * features[0].numel() * features[0].element_size()
        runs = [("forward", chain_bytes, "_flow_sums_kernel",
                 lambda features=features, K=K, block=block:
                 kernels.flow_sums(features, [K], block_size=block)),
                ("backward", 2 * chain_bytes, "_flow_sums_backward_kernel",
                 lambda features=features, K=K, grad_sums=grad_sums, block=block:
                 kernels.flow_sums_backward(features, [K], grad_sums, block_size=block))]
        for direction, moved, name, fn in runs:
            call = median_ms(fn, device, p["reps"])
            kernel = kernel_ms(fn, name, device, p["reps"])
            gbps = moved / ((kernel if kernel is not None else call) * 1e-3) / 1e9
            row = dict(shape=list(shape), K=K, dtype=str(dtype).split(".")[1],
                       block_size=block, direction=direction, bytes=moved, call_ms=call,
                       kernel_ms=kernel, GBps=gbps, fraction_of_copy=gbps / copy_gbps)
            results["bandwidth"].append(row)
            log(f"{direction:8} {shape} K={K} {row['dtype']} block {block}: call {call:.3f} ms,"
                f" kernel {kernel if kernel is None else round(kernel, 3)} ms, {gbps:.0f} GB/s"
                f" = {gbps / copy_gbps:.0%} of copy")
        if device.type == "cuda" and block == 1024:
            results["memory"].append(peak_extra_memory(features, grad_sums))


def peak_extra_memory(features, grad_sums):
    """Peak memory of forward+backward beyond what exists before, in units of the chain's
    size: the K gradients make 1.0; anything feature-sized on top would show."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    kernels.flow_sums(features, [len(features)])
    grads = kernels.flow_sums_backward(features, [len(features)], grad_sums)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    chain_bytes = sum(x.numel() * x.element_size() for x in features)
    del grads
    return dict(shape=list(features[0].shape), K=len(features),
                dtype=str(features[0].dtype).split(".")[1], extra_bytes=extra,
                extra_over_chain_size=extra / chain_bytes)



def time_methods(methods, run, device, reps, row, what):
    """Time `run(method)` for each (label, method) of `methods` into row[label + "_ms"], and
    log the three against each other under `what`."""
    for label, method in methods:
        row[f"{label}_ms"] = median_ms(run(method), device, reps)
    log(f"{what}: op {row['op_ms']:.3f} ms, eager {row['eager_reference_ms']:.3f} ms, "
        f"compiled {row['compiled_reference_ms']:.3f} ms")
    return row


def time_penalty(p, device, results):
    """Penalty forward+backward as a user runs it: the op, eager reference, compiled reference."""
    methods = [("op", flow_penalty), ("eager_reference", reference.flow_penalty),
               ("compiled_reference", torch.compile(reference.flow_penalty))]
    for shape, K in p["penalty"]:
        features = [x.requires_grad_() for x in random_chain(shape, K, torch.float32, device)]

        def step(penalty, features=features):
            def run():
                for x in features:
                    x.grad = None
                penalty(features).backward()
            return run

        row = time_methods(methods, step, device, p["reps"],
                           dict(shape=list(shape), K=K, dtype="float32"),
                           f"penalty {shape} K={K}")
        row["speedup_vs_eager"] = row["eager_reference_ms"] / row["op_ms"]
        row["speedup_vs_compiled"] = row["compiled_reference_ms"] / row["op_ms"]
        results["penalty"].append(row)


def time_flow(p, device, results):
    """The whole flow's penalty (three ResNet-56 chains) fwd+bwd: one op call vs the eager
    and compiled reference, at small batch (per-call overhead) and at 128 (traffic)."""
    def reference_total(chains):
        return sum(reference.flow_penalty(chain) for chain in chains)

    methods = [("op", flow_penalty_chains), ("eager_reference", reference_total),
               ("compiled_reference", torch.compile(reference_total, dynamic=False))]
    for batch in p["flow_batches"]:
        chains = resnet56_chains(batch, device)
        leaves = [x for chain in chains for x in chain]
        row = time_methods(
            methods, lambda penalty, chains=chains, leaves=leaves:
            lambda: torch.autograd.grad(penalty(chains), leaves),
            device, p["reps"],
            dict(batch=batch, chains=[[batch, *shape[1:]] for shape in RESNET56_STAGES], K=9),
            f"flow batch {batch}")
        row["op_over_eager"] = row["op_ms"] / row["eager_reference_ms"]
        row["op_over_compiled"] = row["op_ms"] / row["compiled_reference_ms"]
        results["flow"].append(row)


def time_training_step(p, device, results):
    """A ResNet-56 training step with and without FFRLoss, interleaved (target: <= 3%)."""
    steps = {name: make_training_step(name, p["step_batch"], device=device)
             for name in ("no regularizer", "FFRLoss (fused op)")}
    times = {name: [] for name in steps}
    for _ in range(p["step_reps"]):
        for name, step in steps.items():
            times[name].append(median_ms(step, device, 3))
    base, ffr = (statistics.median(times[name]) for name in steps)
    results["training_step"] = dict(batch=p["step_batch"], no_regularizer_ms=base,
                                    ffrloss_ms=ffr, overhead=ffr / base - 1)
    log(f"training step batch {p['step_batch']}: {base:.2f} ms, with FFRLoss {ffr:.2f} ms "
        f"({ffr / base - 1:+.1%})")
