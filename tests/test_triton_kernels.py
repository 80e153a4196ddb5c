"""The Triton kernels of ffr_fast::flow_sums against the reference, and those of
ffr_fast::flow_penalty against the C++ op, forward and backward.

Without a GPU they run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 before Triton is imported); with one, compiled on CUDA tensors.
"""
import os
import subprocess
import sys

import pytest
import torch

from ffr_fast import testing
from ffr_fast.flow import ops, reference
from ffr_fast.kernels import flow_penalty as triton_penalty
from ffr_fast.kernels import flow_sums as triton_kernels
from ffr_fast.testing import TOLERANCE, relative_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Small blocks keep the interpreter fast and split each sample (n = 105) into several blocks,
# the last one partial.
BLOCK = 32
SHAPE = (2, 3, 5, 7)


def random_chain(K, shape=SHAPE, dtype=torch.float32, seed=0, step=None):
    return testing.random_chain(K, shape, dtype, DEVICE, seed, step)


def check_against_reference(features, tolerance, block_size=BLOCK, lengths=None):
    """Kernels vs the float64 reference of the (upcast) features; returns the gradients.
    lengths: the chains' K (default: one chain of every feature)."""
    lengths = [len(features)] if lengths is None else lengths
    upcast = [x.double() for x in features]
    expected = ops._sums_reference(upcast, lengths)
    sums = triton_kernels.flow_sums(features, lengths, block_size=block_size)
    assert sums.dtype == reference.accumulation_dtype(features[0].dtype)
    assert sums.shape == expected.shape
    assert relative_error(sums, expected) <= tolerance

    generator = torch.Generator().manual_seed(1)
    grad_sums = torch.randn(expected.shape, generator=generator, dtype=torch.float64)
    grad_sums = grad_sums.to(DEVICE, sums.dtype)
    grads = triton_kernels.flow_sums_backward(features, lengths, grad_sums,
                                              block_size=block_size)
    expected_grads = ops._sums_backward_reference(upcast, lengths, grad_sums.double())
    assert len(grads) == len(features)
    for k, (grad, x, want) in enumerate(zip(grads, features, expected_grads)):
        assert grad.dtype == x.dtype and grad.shape == x.shape, k
        # Half-precision gradients carry their own rounding (the interpreter truncates to
        # bfloat16, at most 2**-7 relative; GPUs round to nearest).
        assert relative_error(grad, want) <= tolerance, k
    return grads


# Chains of different shapes, lengths and batch sizes in one launch.
MULTI = [(4, (2, 3, 5, 7)), (2, (3, 4, 8)), (6, (1, 9))]


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
def test_several_chains_in_one_launch(dtype):
    chains = testing.random_chains(MULTI, dtype, DEVICE)
    check_against_reference([x for c in chains for x in c], TOLERANCE[dtype],
                            lengths=[K for K, _ in MULTI])


def test_several_chains_with_mixed_layouts():
    chains = testing.random_chains(MULTI, device=DEVICE)
    chains[0] = [x.contiguous(memory_format=torch.channels_last) for x in chains[0]]
    chains[1][1] = chains[1][1].transpose(1, 2).contiguous().transpose(1, 2)
    grads = check_against_reference([x for c in chains for x in c], TOLERANCE[torch.float32],
                                    lengths=[K for K, _ in MULTI])
    assert all(g.stride() == x.stride() for g, x in zip(grads[:4], chains[0]))


def test_tables_are_built_once_per_layout():
    triton_kernels._cached_layout.cache_clear()
    for seed in range(3):  # new tensors, same layout: the tables are reused
        chains = testing.random_chains(MULTI, device=DEVICE, seed=seed)
        triton_kernels.flow_sums([x for c in chains for x in c], [K for K, _ in MULTI],
                                 block_size=BLOCK)
    info = triton_kernels._cached_layout.cache_info()
    assert (info.misses, info.hits) == (1, 2)


def test_offsets_table_is_reused_for_the_same_addresses():
    """Same tensors (as in a CUDA graph, or a loop whose allocator repeats addresses): no
    new host table; new addresses: a new one, with the right offsets."""
    triton_kernels._offsets_table.cache_clear()
    chains = testing.random_chains(MULTI, device=DEVICE)
    features, lengths = [x for c in chains for x in c], [K for K, _ in MULTI]
    first = triton_kernels.flow_sums(features, lengths, block_size=BLOCK)
    second = triton_kernels.flow_sums(features, lengths, block_size=BLOCK)
    assert torch.equal(first, second)
    assert triton_kernels._offsets_table.cache_info().hits == 1
    check_against_reference([x.clone() for x in features], TOLERANCE[torch.float32],
                            lengths=lengths)


def test_chains_of_different_dtypes_are_rejected():
    chains = [random_chain(2), random_chain(2, dtype=torch.float64)]
    with pytest.raises(ValueError, match=r"chain 1 is torch.float64 on .* but chain 0 is "
                                         r"torch.float32"):
        triton_kernels.flow_sums(chains[0] + chains[1], [2, 2])


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
# K = 9: a ResNet-56 stage's chain; test_long_chain takes K = 64 (the interpreter's time grows
# with K times the elements, so the long chain is the one of small features).
@pytest.mark.parametrize("K", [2, 3, 9])
def test_matches_reference(K, dtype):
    check_against_reference(random_chain(K, dtype=dtype), TOLERANCE[dtype])


@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (2, 4, 8), (3, 1)],
                         ids=["batch_of_one", "n_equals_block", "n_equals_one"])
def test_edge_shapes(shape):
    check_against_reference(random_chain(3, shape=shape), TOLERANCE[torch.float32])


def test_long_chain():
    check_against_reference(random_chain(64, shape=(2, 2, 3)), TOLERANCE[torch.float32])


def test_default_block_size():
    check_against_reference(random_chain(4, dtype=torch.float64), TOLERANCE[torch.float64],
                            block_size=1024)


def test_channels_last_is_read_in_place_and_gradients_keep_its_strides():
    features = [x.contiguous(memory_format=torch.channels_last) for x in random_chain(3)]
    grads = check_against_reference(features, TOLERANCE[torch.float32])
    for x, grad in zip(features, grads):
        assert grad.stride() == x.stride()


@pytest.mark.parametrize("view", ["batch_slice", "permuted_sample", "strided_slice",
                                  "mixed_layouts"])
def test_views(view):
    """Dense samples are read in place (any stride between samples, any order inside one);
    the rest are copied to contiguous first."""
    if view == "batch_slice":
        features = [x[::2] for x in random_chain(3, shape=(4, 3, 5, 7))]
    elif view == "permuted_sample":
        features = [x.transpose(2, 3) for x in random_chain(3)]
    elif view == "strided_slice":
        features = [x[:, :, ::2] for x in random_chain(3, shape=(2, 3, 10, 7))]
    else:
        features = random_chain(3)
        features[1] = features[1].contiguous(memory_format=torch.channels_last)
    grads = check_against_reference(features, TOLERANCE[torch.float32])
    if view == "permuted_sample":
        assert all(grad.stride() == x.stride() for grad, x in zip(grads, features))


def test_nearly_equal_neighbours_keep_float32_accuracy():
    """Differences are formed element-wise: expanding |a - b|^2 would cancel catastrophically."""
    check_against_reference(random_chain(5, seed=2, step=1e-4), TOLERANCE[torch.float32])


LENGTHS = [4, 2]  # the chains _KernelFlowSums splits its features into


class _KernelFlowSums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *features):
        ctx.save_for_backward(*features)
        return triton_kernels.flow_sums(features, LENGTHS, block_size=4)

    @staticmethod
    def backward(ctx, grad_sums):
        return tuple(triton_kernels.flow_sums_backward(ctx.saved_tensors, LENGTHS, grad_sums,
                                                       block_size=4))


def test_backward_kernel_is_the_gradient_of_the_forward_kernel():
    chains = testing.random_chains([(4, (2, 2, 3)), (2, (1, 5))], torch.float64, DEVICE)
    features = [x.requires_grad_() for chain in chains for x in chain]
    assert torch.autograd.gradcheck(_KernelFlowSums.apply, features, fast_mode=True)


def test_bad_grad_sums_shape_is_named():
    features = random_chain(3)
    with pytest.raises(ValueError, match=r"grad_sums has shape \(2, 3, 3\).*\(12,\)"):
        triton_kernels.flow_sums_backward(features, [3], torch.ones(2, 3, 3, device=DEVICE))


def test_chain_of_one_feature_is_rejected():
    with pytest.raises(ValueError, match="K >= 2"):
        triton_kernels.flow_sums(random_chain(3), [2, 1])


def test_empty_batch():
    features = random_chain(3, shape=(0, 3, 5, 7))
    assert triton_kernels.flow_sums(features, [3]).shape == (0,)
    grads = triton_kernels.flow_sums_backward(features, [3], torch.ones(0, device=DEVICE))
    assert [grad.shape for grad in grads] == [(0, 3, 5, 7)] * 3


def test_feature_unlike_feature_0_is_rejected():
    features = random_chain(3)
    features[2] = features[2][..., :6]
    with pytest.raises(ValueError, match=r"chain 0 feature 2 is \(2, 3, 5, 6\) .* feature 0 "
                                         r"is \(2, 3, 5, 7\)"):
        triton_kernels.flow_sums(features, [3])


def test_block_size_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="block_size must be a power of two, got 48"):
        triton_kernels.flow_sums(random_chain(2), [2], block_size=48)


def test_feature_not_aligned_with_feature_0_is_rejected():
    # Two float32 features 2 bytes apart: no element offset reaches the second one.
    buffer = bytearray(4 * 13)
    features = [torch.frombuffer(buffer, dtype=torch.float32, count=12, offset=offset)
                .view(2, 6) for offset in (0, 2)]
    with pytest.raises(ValueError, match="feature 1 starts 2 bytes from feature 0"):
        triton_kernels.flow_sums(features, [2])


VARIANTS = [(norm, curvature) for norm in reference.NORMS for curvature in reference.CURVATURES]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm, curvature", VARIANTS)
def test_penalty_epilogue_matches_the_op_on_cpu(dtype, norm, curvature):
    """The Triton penalty and its backward (main kernels plus epilogue) against the C++ op,
    itself tested against the float64 reference, for every variant."""
    chains = testing.random_chains(MULTI, dtype, DEVICE, step=0.5)
    features, lengths = [x for c in chains for x in c], [K for K, _ in MULTI]
    options = ([0.5, 1.0, 2.0], 0.7, 1.3, norm, curvature, 1e-3, 1e-6)
    penalty, sums = triton_penalty.flow_penalty(features, lengths, *options, block_size=BLOCK)
    on_cpu = [x.cpu() for x in features]
    expected, expected_sums = torch.ops.ffr_fast.flow_penalty(on_cpu, lengths, *options)
    tolerance = TOLERANCE[dtype if dtype == torch.float64 else torch.float32]
    assert relative_error(penalty.cpu(), expected) <= tolerance
    assert relative_error(sums.cpu(), expected_sums) <= tolerance
    grad = torch.tensor(1.7, dtype=sums.dtype)
    grads = triton_penalty.flow_penalty_backward(features, lengths, sums, grad.to(DEVICE),
                                                 *options, block_size=BLOCK)
    expected_grads = torch.ops.ffr_fast.flow_penalty_backward(on_cpu, lengths, expected_sums,
                                                              grad, *options)
    for got, want in zip(grads, expected_grads):
        assert got.dtype == dtype
        assert relative_error(got.cpu(), want) <= TOLERANCE[dtype]


# Compiles the kernels for an H100/H200 (sm_90) without a GPU: the interpreter accepts code
# the compiler rejects. Prints the PTX global loads and stores of each kernel per dtype.
COMPILE_FOR_HOPPER = """
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ffr_fast.kernels import flow_penalty as e
from ffr_fast.kernels import flow_sums as k

for x, acc in (("fp32", "fp32"), ("bf16", "fp32"), ("fp64", "fp64")):
    for kernel in (k._flow_sums_kernel, k._flow_sums_backward_kernel):
        types = {"x_ptr": "*" + x, "grad_ptr": "*" + x, "partials_ptr": "*" + acc,
                 "g_ptr": "*" + acc, "BLOCK": "constexpr", "ALIGNED": "constexpr"}
        signature = {name: types.get(name, "*i64") for name in kernel.arg_names}
        # As Triton specializes arguments at launch: aligned pointers.
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
                 if signature[name] != "constexpr"}
        source = ASTSource(fn=kernel, signature=signature, attrs=attrs,
                           constexprs={"BLOCK": 1024, "ALIGNED": True})
        ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
        print(kernel.__name__, x, sorted(set(re.findall(r"(?:ld|st)\\.global[.\\w]*", ptx))))

# The epilogue kernels: per-sample scalar math, compiled for every option combination.
pointers = {"chains_ptr": "*i64", "samples_ptr": "*i64", "weights_ptr": "*fp64"}
for acc in ("fp32", "fp64"):
    for kernel in (e._penalty_epilogue_kernel, e._penalty_epilogue_backward_kernel):
        for l2 in (False, True):
            for angle in (False, True):
                signature = {name: pointers.get(name, "*" + acc) if name.endswith("_ptr")
                             else "fp32" for name in kernel.arg_names}
                for name in ("L_BLOCK", "L2", "ANGLE"):
                    signature[name] = "constexpr"
                source = ASTSource(fn=kernel, signature=signature, constexprs={
                    "L_BLOCK": 8, "L2": l2, "ANGLE": angle})
                triton.compile(source, target=GPUTarget("cuda", 90, 32))
        print("epilogue", kernel.__name__, acc, "compiled")
"""


def test_kernels_compile_for_hopper_with_vector_memory_access():
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert len(lines) == 10, run.stdout
    assert sum(line.endswith("compiled") for line in lines) == 4, run.stdout
    for line in lines[:6]:
        # 16-byte accesses: what the ALIGNED hint buys over per-element loads.
        vector = "v2.b64" if " fp64 " in line else "v4.b32"
        assert f"ld.global.{vector}" in line, line
        if "backward" in line:
            assert f"st.global.{vector}" in line, line


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA device: only CUDA tensors are routed to Triton")
def test_op_runs_the_triton_kernels_on_cuda():
    assert ops.has_compiled_kernel("cuda")
    features = [x.requires_grad_() for x in random_chain(3)]
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        sums = ops.flow_sums(features)
        sums.backward(torch.ones_like(sums))
        torch.cuda.synchronize()
    names = {event.name for event in profile.events()}
    assert any("_flow_sums_kernel" in name for name in names), names
    assert any("_flow_sums_backward_kernel" in name for name in names), names
    expected = reference.flow_sums([x.detach().double() for x in features])
    assert relative_error(sums.detach(), expected) <= TOLERANCE[torch.float32]


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA device: only CUDA tensors are routed to Triton")
def test_whole_flow_penalty_runs_two_launches_per_pass_on_cuda():
    from ffr_fast.flow.penalty import flow_penalty_chains

    chains = [[x.requires_grad_() for x in chain]
              for chain in testing.random_chains(MULTI, device=DEVICE)]
    leaves = [x for chain in chains for x in chain]
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        value = flow_penalty_chains(chains, norm="l2")
        grads = torch.autograd.grad(value, leaves)
        torch.cuda.synchronize()
    names = [event.name for event in profile.events()]
    for kernel in ("_flow_sums_kernel", "_penalty_epilogue_kernel",
                   "_penalty_epilogue_backward_kernel", "_flow_sums_backward_kernel"):
        # One launch each for the whole flow (the profiler may decorate the name).
        assert sum(name.startswith(kernel + "_") or name == kernel for name in names) == 1, names
    expected = sum(reference.flow_penalty([x.detach().double() for x in chain], norm="l2")
                   for chain in chains)
    assert relative_error(value.detach(), expected) <= TOLERANCE[torch.float32]
    assert all(g.shape == x.shape for g, x in zip(grads, leaves))
