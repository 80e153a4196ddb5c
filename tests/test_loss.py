"""FFRLoss: its penalty against the reference on the very features of a forward, gradients,
when it captures, what it holds on to, and its errors."""
import gc
import weakref

import pytest
import torch
from torch import nn

from ffr_fast import FFRLoss, models
from ffr_fast.flow import reference
from ffr_fast.testing import counted_forward_hooks

MODELS = {
    "resnet20": (models.resnet20, (2, 3, 32, 32)),
    # torchvision-style: ReLU(inplace=True) inside BasicBlock and Bottleneck
    "resnet18": (lambda: models.resnet18(width=8), (2, 3, 64, 64)),
    "resnet50": (lambda: models.resnet50(width=8), (2, 3, 64, 64)),
    "vgg16_bn": (models.vgg16_bn, (2, 3, 32, 32)),
    "mobilenet_v2": (lambda: models.mobilenet_v2(width_mult=0.5), (2, 3, 32, 32)),
}
OPTIONS = dict(grad_weight=0.3, curv_weight=0.7)


def build(name, seed=0):
    factory, input_shape = MODELS[name]
    torch.manual_seed(seed)
    return factory().train(), torch.randn(input_shape)


def watch_outputs(model, names, transform):
    """Hooks, registered after FFRLoss's, that record transform(output) for each layer call."""
    modules = dict(model.named_modules())
    seen = []
    handles = [modules[name].register_forward_hook(lambda m, i, out: seen.append(transform(out)))
               for name in names]
    return seen, handles


def reference_penalty(ffr, features, **options):
    """Sum over the chains ffr formed of reference.flow_penalty on the given features."""
    total = 0.0
    by_name = {name: index for index, name in enumerate(ffr.layer_names)}
    assert len(by_name) == len(features)  # one call per hooked layer in these models
    for chain in ffr.chains:
        chain_features = [features[by_name[name]] for name in chain.names]
        total = total + reference.flow_penalty(chain_features, **options)
    return total


@pytest.mark.parametrize("name", sorted(MODELS))
def test_penalty_equals_reference_on_detached_clones(name):
    model, x = build(name)
    ffr = FFRLoss(model, example_inputs=x, **OPTIONS)
    # clones taken the moment each layer returns: a later in-place change would show here
    clones, _ = watch_outputs(model, ffr.layer_names, lambda out: out.detach().clone().double())
    out = model(x)
    penalty = ffr()
    assert penalty.dtype == torch.float32 and penalty.dim() == 0
    expected = reference_penalty(ffr, clones, **OPTIONS)
    torch.testing.assert_close(penalty.double(), expected, rtol=1e-5, atol=0)
    (out.sum() + penalty).backward()  # autograd is intact around inplace ReLUs


@pytest.mark.parametrize("name", ["resnet20", "resnet18"])
def test_parameter_gradients_equal_autograd_of_reference(name):
    model, x = build(name)
    ffr = FFRLoss(model, example_inputs=x, **OPTIONS)
    model(x)
    ffr().backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    ffr.remove()

    model.zero_grad()
    outputs, _ = watch_outputs(model, ffr.layer_names, lambda out: out)
    model(x)
    reference_penalty(ffr, outputs, **OPTIONS).backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert fused.keys() == expected.keys()
    assert "layer1.0.conv1.weight" in fused  # the penalty reaches the first stage
    assert any(p.abs().sum() > 0 for p in fused.values())
    for n in expected:
        scale = expected[n].abs().max().item()  # float32 sums in a different order
        torch.testing.assert_close(fused[n], expected[n], rtol=1e-4, atol=1e-5 * scale)


def recording_penalty(received):
    def penalty_fn(features, **options):
        received.append(list(features))
        return reference.flow_penalty(features, **options)
    return penalty_fn


def test_captures_references_not_copies():
    model, x = build("resnet18")
    received = []
    ffr = FFRLoss(model, penalty_fn=recording_penalty(received), example_inputs=x)
    outputs, _ = watch_outputs(model, ffr.layer_names, lambda out: out)
    model(x)
    ffr()
    flat = [feature for chain in received for feature in chain]
    assert len(flat) == len(outputs) == 9  # the stem's output and 8 blocks
    for feature, output in zip(flat, outputs):
        assert feature is output and feature.data_ptr() == output.data_ptr()


@pytest.mark.parametrize("mode", ["eval", "no_grad"])
def test_inference_forward_captures_nothing(mode):
    model, x = build("resnet20")
    received = []
    ffr = FFRLoss(model, penalty_fn=recording_penalty(received))
    if mode == "eval":
        model.eval()
        model(x)
    else:
        with torch.no_grad():
            model(x)
    assert ffr._captured == [] and ffr._pending == []
    penalty = ffr()
    assert received == [] and penalty.item() == 0 and not penalty.requires_grad
    assert "not formed yet" in ffr.describe()


def test_ffr_before_any_forward_and_twice_for_one_forward():
    model, x = build("resnet20")
    ffr = FFRLoss(model)
    with pytest.raises(RuntimeError, match="before any forward"):
        ffr()
    model(x)
    ffr()
    with pytest.raises(RuntimeError, match="already called after the last training forward"):
        ffr()
    model(x)
    assert ffr().item() > 0


def test_ffr_after_a_forward_that_raised():
    model, x = build("resnet20")
    ffr = FFRLoss(model)

    def fail(module, args, output):
        raise KeyError("stop")

    model.layer2[0].register_forward_hook(fail)
    with pytest.raises(KeyError):
        model(x)
    with pytest.raises(RuntimeError, match="last training forward pass did not finish"):
        ffr()
    assert ffr._captured == []


def test_features_are_released_after_ffr():
    model, x = build("resnet20")
    ffr = FFRLoss(model)
    refs, _ = watch_outputs(model, ffr.layer_names, weakref.ref)
    out = model(x)
    assert all(ref() is not None for ref in refs)
    penalty = ffr()
    (out.sum() + penalty).backward()
    del out, penalty
    gc.collect()
    assert all(ref() is None for ref in refs)


def test_remove_and_context_manager():
    model, x = build("resnet20")
    with counted_forward_hooks() as hook_calls:
        with FFRLoss(model, example_inputs=x) as ffr:
            hook_calls.clear()  # finding the layers ran the export's own hooks
            model(x)
            # the stem's output and the blocks, and the model's start and end of forward
            assert len(hook_calls) == 1 + 9 + 2
        hook_calls.clear()
        model(x)
        assert hook_calls == []
        with pytest.raises(RuntimeError, match=r"after remove\(\)"):
            ffr()
        ffr = FFRLoss(model)  # its layers are found, and hooked, in this forward
        model(x)
        ffr.remove()
        hook_calls.clear()
        model(x)
        assert hook_calls == [] and ffr._pending == []
    assert "(removed)" in ffr.describe()


def test_output_modified_in_place_after_capture_is_an_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), models.BasicBlock(4, 4),
                          nn.ReLU(inplace=True), models.BasicBlock(4, 4), models.BasicBlock(4, 4))
    model[1].relu = nn.Identity()  # the block output can be negative, so ReLU changes it
    x = torch.randn(2, 3, 8, 8)
    ffr = FFRLoss(model, example_inputs=x)
    assert ffr.layer_names == ("0", "1", "3", "4")  # the stream enters at the conv's output
    model(x)
    with pytest.raises(RuntimeError, match=r"outputs of \['1'\] were modified in place"):
        ffr()


def test_chain_weights():
    model, x = build("resnet20")
    plain = FFRLoss(model, penalty_fn=lambda features, **o: reference.flow_penalty(
        [f.detach() for f in features], **o))
    weighted = FFRLoss(model, chain_weights=[0.5, 2.0, 0.0])
    received = []
    per_chain = FFRLoss(model, penalty_fn=recording_penalty(received))
    model(x)
    per_chain()
    parts = [reference.flow_penalty(chain, 1e-3, 1e-3) for chain in received]
    torch.testing.assert_close(weighted(), 0.5 * parts[0] + 2.0 * parts[1], rtol=1e-5, atol=0)
    torch.testing.assert_close(plain(), sum(parts), rtol=1e-5, atol=0)

    wrong = FFRLoss(model, chain_weights=[1.0, 1.0])
    model(x)
    with pytest.raises(ValueError, match="chain_weights has 2 entries but the forward formed 3"):
        wrong()
    with pytest.raises(ValueError, match="chain_weights must be finite numbers >= 0"):
        FFRLoss(model, chain_weights=[1.0, -1.0, 1.0])


def test_bad_options_are_rejected_before_hooking():
    model, x = build("resnet20")
    with counted_forward_hooks() as hook_calls:
        for options, message in [(dict(grad_weight=-1.0),
                                  "grad_weight must be a finite number >= 0"),
                                 (dict(norm="l1"), "unknown norm 'l1'"),
                                 (dict(curvature="turn"), "unknown curvature 'turn'")]:
            with pytest.raises(ValueError, match=message):
                FFRLoss(model, **options)
    model(x)
    assert hook_calls == []  # nothing was left attached
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        FFRLoss(lambda x: x)


@pytest.mark.parametrize("norm, curvature", [("l2", "diff"), ("squared", "angle")])
def test_variants_reach_the_penalty(norm, curvature):
    model, x = build("resnet20")
    ffr = FFRLoss(model, norm=norm, curvature=curvature, example_inputs=x, **OPTIONS)
    clones, _ = watch_outputs(model, ffr.layer_names, lambda out: out.detach().double())
    model(x)
    expected = reference_penalty(ffr, clones, norm=norm, curvature=curvature, **OPTIONS)
    torch.testing.assert_close(ffr().double(), expected, rtol=1e-5, atol=0)


def test_autocast_bfloat16_features():
    model, x = build("resnet20")
    ffr = FFRLoss(model, example_inputs=x, **OPTIONS)
    clones, _ = watch_outputs(model, ffr.layer_names, lambda out: out.detach().clone())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        penalty = ffr()
    assert clones[0].dtype == torch.bfloat16 and penalty.dtype == torch.float32
    expected = reference_penalty(ffr, [c.double() for c in clones], **OPTIONS)
    torch.testing.assert_close(penalty.double(), expected, rtol=1e-4, atol=0)
    (out.float().sum() + penalty).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_the_model_is_not_a_submodule_of_the_loss():
    model, _ = build("resnet20")
    ffr = FFRLoss(model)
    assert ffr.model is model
    assert list(ffr.parameters()) == [] and ffr.state_dict() == {}


def test_a_torch_compiled_model_gives_the_eager_penalty_and_gradients():
    """FFRLoss unwraps torch.compile's wrapper; the compiled forward runs the hooks."""
    torch.manual_seed(0)
    model = models.CifarResNet(depth=14, width=4)
    x = torch.randn(2, 3, 16, 16)
    ffr = FFRLoss(torch.compile(model), grad_weight=0.5, curv_weight=0.25, example_inputs=x)
    assert "layer1.0" in ffr.layer_names  # no "_orig_mod." prefix
    parameters = list(model.parameters())

    def penalty_and_grads(forward):
        forward(x)
        penalty = ffr()
        return penalty, torch.autograd.grad(penalty, parameters, allow_unused=True)

    compiled, compiled_grads = penalty_and_grads(torch.compile(model))
    eager, eager_grads = penalty_and_grads(model)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-7)
    for parameter, got, want in zip(parameters, compiled_grads, eager_grads):
        # A parameter the penalty does not reach (the classifier) gets None eagerly and
        # zeros from the compiled graph.
        zero = torch.zeros_like(parameter)
        torch.testing.assert_close(zero if got is None else got,
                                   zero if want is None else want, rtol=1e-4, atol=1e-6)


def test_data_parallel_is_refused_with_a_pointer_to_ddp():
    model = models.resnet20()
    with counted_forward_hooks() as hook_calls, pytest.raises(
            TypeError, match="DataParallel.*DistributedDataParallel"):
        FFRLoss(nn.DataParallel(model))
    model(torch.randn(1, 3, 32, 32))
    assert hook_calls == []  # nothing attached
