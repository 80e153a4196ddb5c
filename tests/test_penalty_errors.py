"""Bad input to flow_penalty and to the op: a clear error naming the problem, and the
caller's tensors left exactly as they were; and a missing compiled kernel, said once."""
import subprocess
import sys
import textwrap

import pytest
import torch

from ffr_fast import ops
from ffr_fast.penalty import flow_penalty


def chain(K=3, shape=(2, 3, 4, 4), dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator).to(dtype) for _ in range(K)]


def assert_rejected(features, error, match, **options):
    on_cpu = [x for x in (features if isinstance(features, list) else [features])
              if x.device.type == "cpu"]
    saved = [x.clone() for x in on_cpu]
    with pytest.raises(error, match=match):
        flow_penalty(features, **options)
    for x, before in zip(on_cpu, saved):
        assert torch.equal(x, before) and x.grad is None


def test_empty_list():
    assert_rejected([], ValueError, r"K >= 2 features.*got 0")


def test_single_tensor():
    (x,) = chain(1)
    assert_rejected(x, TypeError, r"expected a list of K >= 2 tensors, got Tensor")
    assert_rejected([x], ValueError, r"K >= 2 features.*got 1")


def test_shapes_differ_names_index_and_both_shapes():
    features = chain(3)
    features[2] = torch.randn(2, 3, 4, 5)
    assert_rejected(features, ValueError,
                    r"feature 2 has shape \(2, 3, 4, 5\) but feature 0 has shape \(2, 3, 4, 4\)")


def test_mixed_dtypes():
    features = chain(3)
    features[1] = features[1].double()
    assert_rejected(features, TypeError, r"feature 1 has dtype torch.float64 but feature 0 has "
                                         r"torch.float32")


def test_mixed_devices():
    features = chain(3)
    features[1] = torch.empty(features[1].shape, device="meta")
    assert_rejected(features, ValueError, r"feature 1 is on meta but feature 0 is on cpu")


def test_integer_tensors():
    features = [torch.randint(0, 5, (2, 3, 4)) for _ in range(3)]
    assert_rejected(features, TypeError, r"feature 0 has dtype torch.int64.*floating-point")


@pytest.mark.parametrize("option", ["grad_weight", "curv_weight"])
def test_negative_weights(option):
    assert_rejected(chain(3), ValueError, rf"{option} must be >= 0, got -0.5",
                    **{option: -0.5})


@pytest.mark.parametrize("option, value", [("norm", "l1"), ("curvature", "torsion")])
def test_unknown_norm_or_curvature(option, value):
    assert_rejected(chain(3), ValueError, rf"unknown {option} '{value}'", **{option: value})


def test_op_called_directly_checks_its_chain():
    """The C++ kernel validates too: the op is public through torch.ops."""
    ops.require_compiled_cpu_kernel()
    features = chain(3)
    features[1] = torch.randn(2, 3, 4, 5)
    with pytest.raises(RuntimeError, match=r"feature 1 has shape \[2, 3, 4, 5\] but feature 0 "
                                           r"has shape \[2, 3, 4, 4\]"):
        torch.ops.ffr_fast.flow_sums(features)
    with pytest.raises(RuntimeError, match=r"K >= 2 features, got 1"):
        torch.ops.ffr_fast.flow_sums(features[:1])
    with pytest.raises(RuntimeError, match=r"grad_sums has shape \[2, 3\]; expected \(2, 3, 2\)"):
        torch.ops.ffr_fast.flow_sums_backward(chain(3), torch.ones(2, 3))


def test_without_the_compiled_kernel_one_warning_and_the_reference_path():
    """A machine where the extension did not build: one clear warning, correct results."""
    script = textwrap.dedent("""
        import sys, warnings
        sys.modules["ffr_fast._C"] = None  # as if the build had failed: import raises
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch
            from ffr_fast import ops, reference
            from ffr_fast.penalty import flow_penalty
        messages = [str(w.message) for w in caught if "ffr_fast" in str(w.message)]
        assert len(messages) == 1 and "reference" in messages[0], messages
        assert not ops.has_compiled_kernel("cpu")
        xs = [torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True) for _ in range(4)]
        got, want = flow_penalty(xs, 0.5, 0.25), reference.flow_penalty(xs, 0.5, 0.25)
        assert torch.allclose(got, want, rtol=1e-12), (got, want)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
