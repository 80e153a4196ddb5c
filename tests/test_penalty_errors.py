"""Bad input to flow_penalty and to the op: a clear error naming the problem, and the
caller's tensors left exactly as they were; and a missing compiled kernel, said once."""
import subprocess
import sys
import textwrap

import pytest
import torch

from ffr_fast.flow import ops, penalty, reference
from ffr_fast.flow.penalty import flow_penalty, flow_penalty_chains
from ffr_fast.testing import random_chain


def chain(K=3, shape=(2, 3, 4, 4), dtype=torch.float32):
    return random_chain(K, shape, dtype)


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
    assert_rejected(chain(3), ValueError, rf"{option} must be a finite number >= 0, got -0.5",
                    **{option: -0.5})


@pytest.mark.parametrize("option", ["grad_weight", "curv_weight"])
def test_infinite_weights(option):
    # curv_weight=inf on a chain of two (no curvature term) gave NaN: inf * 0
    assert_rejected(chain(2), ValueError, rf"{option} must be a finite number >= 0, got inf",
                    **{option: float("inf")})
    assert_rejected(chain(3), ValueError, r"eps must be a finite number > 0, got inf",
                    eps=float("inf"))


def test_sparse_features_are_refused_before_any_reshape():
    dense = chain(3)
    flow_penalty(dense)  # the strided layout of these shapes is validated (and cached) now
    for features, match in [([x.to_sparse() for x in dense],
                             r"feature 0 has layout torch.sparse_coo.*to_dense\(\)"),
                            (dense[:2] + [dense[2].to_sparse_csr()],
                             r"feature 2 has layout torch.sparse_csr")]:
        with pytest.raises(TypeError, match=match):
            flow_penalty(features)
        for x, original in zip(features, dense):
            assert torch.equal(x.to_dense(), original)


@pytest.mark.parametrize("option, value", [("norm", "l1"), ("curvature", "torsion")])
def test_unknown_norm_or_curvature(option, value):
    assert_rejected(chain(3), ValueError, rf"unknown {option} '{value}'", **{option: value})


def test_op_called_directly_checks_its_chains():
    """The C++ kernels validate too: the ops are public through torch.ops."""
    ops.require_compiled_cpu_kernel()
    features = chain(3)
    features[1] = torch.randn(2, 3, 4, 5)
    with pytest.raises(RuntimeError, match=r"chain 0 feature 1 has shape \[2, 3, 4, 5\] but "
                                           r"feature 0 has shape \[2, 3, 4, 4\]"):
        torch.ops.ffr_fast.flow_sums(features, [3])
    with pytest.raises(RuntimeError, match=r"chain 1 has 1 features; a chain needs K >= 2"):
        torch.ops.ffr_fast.flow_sums(chain(3), [2, 1])
    with pytest.raises(RuntimeError, match=r"lengths add up to 4 features but 3 were given"):
        torch.ops.ffr_fast.flow_sums(chain(3), [2, 2])
    with pytest.raises(RuntimeError, match=r"chain 1 feature 0 has dtype Double but the first "
                                           r"feature has Float; one call takes one dtype"):
        torch.ops.ffr_fast.flow_sums(chain(2) + chain(2, dtype=torch.float64), [2, 2])
    with pytest.raises(RuntimeError, match=r"grad_sums has shape \[2, 3\]; expected \(12\)"):
        torch.ops.ffr_fast.flow_sums_backward(chain(3), [3], torch.ones(2, 3))
    with pytest.raises(RuntimeError, match=r"2 chain weights for 1 chains"):
        torch.ops.ffr_fast.flow_penalty(chain(3), [3], [1.0, 1.0], 1.0, 1.0, "squared",
                                        "diff", 1e-8, 1e-6)
    with pytest.raises(RuntimeError, match=r"unknown norm 'l1'"):
        torch.ops.ffr_fast.flow_penalty(chain(3), [3], [1.0], 1.0, 1.0, "l1", "diff", 1e-8,
                                        1e-6)


def assert_chains_rejected(chains, error, match, **options):
    saved = [[x.clone() for x in c] for c in chains if isinstance(c, list)]
    with pytest.raises(error, match=match):
        flow_penalty_chains(chains, **options)
    for c, before in zip([c for c in chains if isinstance(c, list)], saved):
        assert all(torch.equal(x, b) and x.grad is None for x, b in zip(c, before))


def test_multi_chain_bad_inputs_name_the_chain():
    bad = chain(3)
    bad[2] = torch.randn(2, 3, 4, 5)
    assert_chains_rejected([chain(2), bad], ValueError,
                           r"chain 1: feature 2 has shape \(2, 3, 4, 5\)")
    assert_chains_rejected([chain(2), chain(1)], ValueError, r"chain 1: a chain needs K >= 2")
    assert_chains_rejected([chain(2), chain(2)[0]], TypeError,
                           r"chain 1: expected a list of K >= 2 tensors, got Tensor")
    assert_chains_rejected([], ValueError, r"expected a non-empty list of chains")
    assert_chains_rejected([chain(2), chain(3)], ValueError,
                           r"chain_weights has 1 entries for 2 chains", chain_weights=[1.0])
    assert_chains_rejected([chain(2), chain(3)], ValueError,
                           r"chain_weights must be finite numbers >= 0, got \[1.0, -1.0\]",
                           chain_weights=[1, -1])
    assert_chains_rejected([chain(2), chain(3)], ValueError,
                           r"chain_weights must be finite numbers >= 0, got \[1.0, inf\]",
                           chain_weights=[1, float("inf")])


def test_validation_runs_once_per_layout_and_again_when_it_changes(monkeypatch):
    checked = []
    monkeypatch.setattr(penalty, "check_chain", lambda c, name: checked.append(name))
    monkeypatch.setattr(penalty, "_VALIDATED_LAYOUTS", type(penalty._VALIDATED_LAYOUTS)())
    chains = [chain(3), chain(2, shape=(2, 5))]
    for _ in range(3):
        flow_penalty_chains(chains)
    assert checked == ["chain 0", "chain 1"]
    flow_penalty_chains([chain(3), chain(2, shape=(3, 5))])  # a new batch size: a new layout
    flow_penalty_chains([chain(3), chain(2, shape=(2, 5), dtype=torch.float64)])  # a new dtype
    assert len(checked) == 6


def test_chains_of_different_dtypes_go_to_one_call_each():
    chains = [chain(3), chain(2, dtype=torch.float64)]
    expected = sum(reference.flow_penalty([x.double() for x in c]) for c in chains)
    torch.testing.assert_close(flow_penalty_chains(chains).double(), expected, rtol=1e-5, atol=0)


def test_without_the_compiled_kernel_one_warning_and_the_reference_path():
    """A machine where the extension did not build: one clear warning, correct results."""
    script = textwrap.dedent("""
        import sys, warnings
        sys.modules["ffr_fast._C"] = None  # as if the build had failed: import raises
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch
            from ffr_fast.flow import ops, reference
            from ffr_fast.flow.penalty import flow_penalty
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
