"""One-call check of the Triton flow-sums kernels on a CUDA machine.

    python bench/gpu_check.py [--out bench/results/gpu_check.json]
    python bench/gpu_check.py --dry-run    # no GPU: Triton interpreter, CPU, tiny shapes

1. Correctness: the kernels (and the op ffr_fast::flow_sums on CUDA tensors) against the
   float64 reference, forward and backward, float64/float32/float16/bfloat16, from tiny
   chains to the ResNet-56 stages at batch 128; run-to-run bitwise determinism.
2. Bandwidth: forward moves K*N elements (reads), backward 2*K*N (reads + writes); achieved
   bandwidth from the Triton kernels' device time (profiler) and from the whole call (CUDA
   events), against a device-to-device copy of a large tensor measured in the same run; a
   block-size sweep; peak memory beyond the K gradients.
3. The penalty forward+backward: the op vs the eager reference vs torch.compile(reference).
4. The multi-chain op: the ResNet-56 stages as chains of one call, kernels and
   penalty variants against the reference; the whole flow's penalty fwd+bwd at batch 2 and
   128 (op, eager, compiled reference); capture of the op's forward + backward in a CUDA
   graph, replayed against eager; a ResNet-56 training step at batch 128 with and without
   FFRLoss (the target: FFRLoss adds <= 3%).

The correctness sections and the run itself live here, the measurements in gpu_speed.py.
Prints a table, writes JSON to --out. Each section records its errors and the script goes
on, so one run yields everything it can (the JSON is rewritten after every section); it
exits non-zero if any check failed. Estimated at 2 to 4 minutes on an H200, most of it
compiling (Triton specializations, torch.compile of the reference). Needs ffr_fast installed
(`pip install --no-build-isolation -e .`), with triton and a CUDA build of torch.
"""
import argparse
import json
import os
import platform
import sys
import time
import traceback

# Triton reads TRITON_INTERPRET when first imported, so a dry run sets it before any import.
if "--dry-run" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402  (after TRITON_INTERPRET is set)
import triton  # noqa: E402  (after TRITON_INTERPRET is set)

from ffr_fast import ops, reference  # noqa: E402  (after TRITON_INTERPRET is set)
from ffr_fast.flow.penalty import flow_penalty_chains  # noqa: E402  (after TRITON_INTERPRET is set)
from ffr_fast.kernels import flow_penalty as penalty_kernels  # noqa: E402  (after TRITON_INTERPRET is set)
from ffr_fast.kernels import flow_sums as kernels  # noqa: E402  (after TRITON_INTERPRET is set)
from ffr_fast.testing import TOLERANCE, relative_error  # noqa: E402  (after TRITON_INTERPRET is set)

from gpu_speed import (  # noqa: E402  (after TRITON_INTERPRET is set)
    RESNET56_STAGES,
    START,
    copy_bandwidth,
    log,
    measure_bandwidth,
    random_chain,
    resnet56_chains,
    time_flow,
    time_penalty,
    time_training_step,
)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results/gpu_check.json")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the script without a GPU: CPU tensors, Triton "
                             "interpreter, tiny shapes (timings meaningless)")
    return parser.parse_args()


def plan(dry_run):
    """The shapes each section uses: (shape, K) chains, block sizes, repetitions."""
    if dry_run:
        tiny = [((2, 3, 5, 7), 2), ((2, 3, 5, 7), 3), ((2, 3, 4, 4), 5)]
        return dict(correctness=tiny, channels_last=[((2, 3, 4, 4), 4)],
                    bandwidth=[((2, 3, 5, 7), 4)], sweep=[((2, 3, 5, 7), 4)],
                    block_sizes=[32, 64], penalty=[((2, 3, 5, 7), 4)], copy_elements=2**20,
                    reps=3, multi_chain=[((2, 3, 5, 7), 4), ((3, 6), 2), ((1, 2, 4, 4), 5)],
                    flow_batches=[2], step_batch=2, step_reps=2)
    stages = [(shape, 9) for shape in RESNET56_STAGES]
    big = ((64, 256, 56, 56), 4)
    multi = dict(multi_chain=[((2, *shape[1:]), 9) for shape in RESNET56_STAGES[:2]]
                 + [((3, 7), 4), ((128, 16, 32, 32), 2)],
                 flow_batches=[2, 128], step_batch=128, step_reps=10)
    return dict(correctness=[((2, 3, 5, 7), 2), ((2, 3, 5, 7), 3), ((2, 3, 5, 7), 32),
                             ((1, 3, 5, 7), 64)] + stages,
                channels_last=[((32, 64, 14, 14), 4), ((128, 16, 32, 32), 9)],
                bandwidth=stages + [((128, 256, 14, 14), 6), big],
                sweep=[stages[0], big], block_sizes=[512, 1024, 2048, 4096],
                penalty=stages + [big], copy_elements=2**28, reps=20, **multi)


def check_correctness(p, device, results):
    cases = [(shape, K, False) for shape, K in p["correctness"]]
    cases += [(shape, K, True) for shape, K in p["channels_last"]]
    for dtype in TOLERANCE:
        for shape, K, channels_last in cases:
            features = random_chain(shape, K, dtype, device)
            if channels_last:
                features = [x.contiguous(memory_format=torch.channels_last) for x in features]
            upcast = [x.double() for x in features]
            expected = reference.flow_sums(upcast).reshape(-1)
            sums = kernels.flow_sums(features, [K])
            generator = torch.Generator(device).manual_seed(1)
            grad_sums = torch.randn(expected.shape, generator=generator, device=device,
                                    dtype=sums.dtype)
            grads = kernels.flow_sums_backward(features, [K], grad_sums)
            expected_grads = reference.flow_sums_backward(upcast, grad_sums.double().view(
                shape[0], 3, K - 1))
            forward_error = relative_error(sums, expected)
            backward_error = max(relative_error(g, e) for g, e in zip(grads, expected_grads))
            deterministic = (torch.equal(sums, kernels.flow_sums(features, [K])) and all(
                torch.equal(a, b) for a, b in
                zip(grads, kernels.flow_sums_backward(features, [K], grad_sums))))
            strides_kept = all(g.stride() == x.stride() for g, x in zip(grads, features))
            # The op on the same chain, through the dispatcher and autograd (on CUDA it runs
            # the same kernels; a dry run gets the CPU kernel).
            leaves = [x.detach().requires_grad_() for x in features]
            op_sums = ops.flow_sums(leaves).reshape(-1)
            op_sums.backward(grad_sums)
            op_error = max([relative_error(op_sums.detach(), expected)] + [
                relative_error(leaf.grad, e) for leaf, e in zip(leaves, expected_grads)])
            ok = (max(forward_error, backward_error, op_error) <= TOLERANCE[dtype]
                  and deterministic and strides_kept)
            row = dict(dtype=str(dtype).split(".")[1], shape=list(shape), K=K,
                       channels_last=channels_last, forward_rel_err=forward_error,
                       backward_rel_err=backward_error, op_rel_err=op_error,
                       tolerance=TOLERANCE[dtype], deterministic=deterministic,
                       gradient_strides_kept=strides_kept, ok=ok)
            results["correctness"].append(row)
            log(f"{'ok  ' if ok else 'FAIL'} {row['dtype']:8} {shape} K={K}"
                f"{' channels_last' if channels_last else ''}: forward {forward_error:.1e}, "
                f"backward {backward_error:.1e}, op {op_error:.1e}, "
                f"deterministic {deterministic}")


def check_multi_chain(p, device, results):
    """Several chains of different shapes and lengths in one call: the kernels, and the
    op's penalty (every variant) with its gradients, against the float64 reference."""
    lengths = [K for _, K in p["multi_chain"]]
    variants = [dict(norm=norm, curvature=curvature, grad_weight=0.7, curv_weight=1.3)
                for norm in reference.NORMS for curvature in reference.CURVATURES]
    for dtype in TOLERANCE:
        chains = [random_chain(shape, K, dtype, device) for shape, K in p["multi_chain"]]
        features = [x for chain in chains for x in chain]
        upcast = [x.double() for x in features]
        expected = ops._sums_reference(upcast, lengths)
        sums = kernels.flow_sums(features, lengths)
        grad_sums = torch.randn(expected.shape, device=device, dtype=sums.dtype)
        grads = kernels.flow_sums_backward(features, lengths, grad_sums)
        expected_grads = ops._sums_backward_reference(upcast, lengths, grad_sums.double())
        errors = [relative_error(sums, expected)]
        errors += [relative_error(g, e) for g, e in zip(grads, expected_grads)]
        deterministic = torch.equal(sums, kernels.flow_sums(features, lengths))
        weights = [0.5 + i for i in range(len(chains))]
        for variant in variants:
            leaves = [[x.detach().requires_grad_() for x in chain] for chain in chains]
            value = flow_penalty_chains(leaves, chain_weights=weights, **variant)
            flat = [x for chain in leaves for x in chain]
            op_grads = torch.autograd.grad(value, flat)
            up = [[x.detach().double().requires_grad_() for x in chain] for chain in chains]
            want = sum(w * reference.flow_penalty(c, **variant) for w, c in zip(weights, up))
            want_grads = torch.autograd.grad(want, [x for chain in up for x in chain])
            errors.append(relative_error(value, want))
            errors += [relative_error(g, e) for g, e in zip(op_grads, want_grads)]
            # The Triton penalty itself (on CUDA the op above runs it; a dry run the C++ one).
            options = (weights, variant["grad_weight"], variant["curv_weight"], variant["norm"],
                       variant["curvature"], 1e-8, 1e-6)
            kernel_value, kernel_sums = penalty_kernels.flow_penalty(features, lengths, *options)
            kernel_grads = penalty_kernels.flow_penalty_backward(
                features, lengths, kernel_sums, torch.ones((), device=device), *options)
            errors.append(relative_error(kernel_value, want))
            errors += [relative_error(g, e) for g, e in zip(kernel_grads, want_grads)]
        ok = max(errors) <= TOLERANCE[dtype] and deterministic
        row = dict(dtype=str(dtype).split(".")[1], multi_chain=p["multi_chain"],
                   max_rel_err=max(errors), tolerance=TOLERANCE[dtype],
                   deterministic=deterministic, ok=ok)
        results["correctness"].append(row)
        log(f"{'ok  ' if ok else 'FAIL'} {row['dtype']:8} {len(chains)} chains in one call: "
            f"max error {max(errors):.1e} (kernels and {len(variants)} penalty variants)")


def capture_cuda_graph(p, device, results):
    """Forward + backward of the op on static chains captured in a CUDA graph and replayed:
    possible only without host synchronisation in the op."""
    if device.type != "cuda":
        results["cuda_graph"] = dict(skipped="needs a CUDA device")
        return
    chains = resnet56_chains(p["flow_batches"][0], device)
    leaves = [x for chain in chains for x in chain]

    def step():
        return torch.autograd.grad(flow_penalty_chains(chains), leaves)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: tables, Triton compilation, allocator
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_grads = step()
    with torch.no_grad():
        for x in leaves:
            x.mul_(1.5)  # new values, same addresses
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    error = max(relative_error(g, e.double()) for g, e in zip(static_grads, eager))
    results["cuda_graph"] = dict(max_rel_err=error, ok=error <= TOLERANCE[torch.float32])
    log(f"cuda graph replay vs eager: max error {error:.1e}")


def print_tables(results):
    print(f"\ncopy bandwidth: {results['copy_GBps']:.0f} GB/s (the kernels' target: "
          ">= 80% of it)")
    print(f"\n{'dir':8} {'shape':20} {'K':>3} {'dtype':8} {'block':>5} {'call ms':>9} "
          f"{'kernel ms':>9} {'GB/s':>6} {'% copy':>6}")
    for r in results["bandwidth"]:
        kernel = "-" if r["kernel_ms"] is None else f"{r['kernel_ms']:.3f}"
        print(f"{r['direction']:8} {str(tuple(r['shape'])):20} {r['K']:>3} {r['dtype']:8} "
              f"{r['block_size']:>5} {r['call_ms']:>9.3f} {kernel:>9} {r['GBps']:>6.0f} "
              f"{r['fraction_of_copy']:>6.0%}")
    for r in results["memory"]:
        print(f"peak extra memory {tuple(r['shape'])} K={r['K']} {r['dtype']}: "
              f"{r['extra_over_chain_size']:.3f} x the chain (the gradients are 1.0)")
    print(f"\n{'penalty fwd+bwd':24} {'K':>3} {'op ms':>8} {'eager ms':>9} {'compiled':>9} "
          f"{'x eager':>8} {'x compiled':>10}")
    for r in results["penalty"]:
        print(f"{str(tuple(r['shape'])):24} {r['K']:>3} {r['op_ms']:>8.3f} "
              f"{r['eager_reference_ms']:>9.3f} {r['compiled_reference_ms']:>9.3f} "
              f"{r['speedup_vs_eager']:>8.1f} {r['speedup_vs_compiled']:>10.1f}")
    print(f"\n{'whole flow fwd+bwd':20} {'op ms':>8} {'eager ms':>9} {'compiled':>9} "
          f"{'op/eager':>9} {'op/compiled':>11}")
    for r in results["flow"]:
        print(f"{'batch ' + str(r['batch']):20} {r['op_ms']:>8.3f} {r['eager_reference_ms']:>9.3f} "
              f"{r['compiled_reference_ms']:>9.3f} {r['op_over_eager']:>9.2f} "
              f"{r['op_over_compiled']:>11.2f}")
    print(f"cuda graph: {results.get('cuda_graph')}")
    print(f"training step: {results.get('training_step')}")
    failed = [r for r in results["correctness"] if not r["ok"]]
    print(f"\ncorrectness: {len(results['correctness']) - len(failed)} of "
          f"{len(results['correctness'])} cases ok; errors: {len(results['errors'])}")


def main():
    args = parse_args()
    if args.dry_run:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); "
                 "run it on a CUDA machine, or pass --dry-run to check the script on CPU")
    else:
        device = torch.device("cuda")

    p = plan(args.dry_run)
    results = dict(
        environment=dict(device=torch.cuda.get_device_name() if device.type == "cuda" else
                         "cpu (Triton interpreter, dry run)", torch=torch.__version__,
                         triton=triton.__version__, python=platform.python_version(),
                         command=" ".join(sys.argv)),
        op_dispatches_to_triton=ops.has_compiled_kernel(device.type) if device.type == "cuda"
        else None,
        correctness=[], bandwidth=[], memory=[], penalty=[], flow=[], errors=[])
    log(f"gpu_check on {results['environment']['device']}; op routed to Triton: "
        f"{results['op_dispatches_to_triton']}")
    if device.type == "cuda" and not results["op_dispatches_to_triton"]:
        results["errors"].append("ffr_fast::flow_sums has no CUDA kernel registered")
    sections = [("correctness", lambda: check_correctness(p, device, results)),
                ("copy bandwidth", lambda: results.update(copy_GBps=copy_bandwidth(p, device))),
                ("bandwidth", lambda: measure_bandwidth(p, device, results["copy_GBps"],
                                                        results)),
                ("penalty timing", lambda: time_penalty(p, device, results)),
                ("multi-chain correctness", lambda: check_multi_chain(p, device, results)),
                ("whole-flow timing", lambda: time_flow(p, device, results)),
                ("cuda graph", lambda: capture_cuda_graph(p, device, results)),
                ("training step", lambda: time_training_step(p, device, results))]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for name, section in sections:
        log(f"== {name}")
        try:
            section()
        except Exception:  # record, go on: one GPU session should yield every section it can
            traceback.print_exc()
            results["errors"].append(f"{name}: {traceback.format_exc(limit=3)}")
        results["seconds"] = time.perf_counter() - START
        with open(args.out, "w") as f:  # after every section: a run cut short keeps its part
            json.dump(results, f, indent=1)
    print_tables({"copy_GBps": float("nan"), **results})
    log(f"wrote {args.out}")
    graph_ok = results.get("cuda_graph", {}).get("ok", True)
    if results["errors"] or not graph_ok or not all(r["ok"] for r in results["correctness"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
