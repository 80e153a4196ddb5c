"""Deployment: BN folding, whole-module pickling, state dict + structure, torch.export."""
import pytest
import torch
from torch import nn

from ffr_fast import load_pruned, models, prune, save_pruned
from ffr_fast.testing import outputs, relative_error

from nets import TinyResNeXt, kill_channels, look_trained

X = torch.randn(2, 3, 32, 32)


def add_targets(graph) -> list:
    """The name of every add a graph calls, in order: "add_" for the in-place method, "add"
    for operator.add or torch.add (matched by name: a function's repr holds its address)."""
    names = [n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
             for n in graph.nodes if n.op in ("call_function", "call_method")]
    return [name for name in names if name in ("add", "add_", "iadd")]


@pytest.fixture(scope="module")
def sparse_resnet():
    """A resnet20 with some dead filters and one dead block, as FFR training leaves it."""
    torch.manual_seed(0)
    model = look_trained(models.resnet20())
    kill_channels(model, "layer1.0.conv1", [1, 2], "layer1.0.bn1")
    kill_channels(model, "layer3.1.bn2", list(range(64)))
    return model


def test_fold_bn_equivalence(sparse_resnet):
    plain = prune(sparse_resnet, X, threshold=0.0)
    folded = prune(sparse_resnet, X, threshold=0.0, fold_bn=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.model.modules())
    # stem + 9 blocks x 2 + 2 downsamples = 21 conv-bn pairs, less the removed block's 2
    assert len(folded.report.folded_bn) == 21 - 2
    assert relative_error(outputs(folded.model, X), outputs(plain.model, X)) <= 1e-5
    assert folded.report.relative_diff <= 1e-5
    # FlopCounterMode counts convs and matmuls only, so folding shows in the parameters.
    assert folded.report.flops_after == plain.report.flops_after
    assert folded.report.params_after < plain.report.params_after
    assert not folded.model.training


def test_a_sync_batch_norm_folds_as_a_batch_norm():
    """SyncBatchNorm in eval mode is a BatchNorm: it folds into its convolution."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.SyncBatchNorm(8), nn.ReLU(),
                          nn.Conv2d(8, 4, 3)).eval()
    model[1].running_mean.normal_()
    model[1].running_var.uniform_(0.5, 2.0)
    model[1].weight.data.normal_()
    model[1].bias.data.normal_()
    x = torch.randn(2, 3, 16, 16)
    result = prune(model, x, ratio=0.5, fold_bn=True)
    assert result.report.folded_bn == [("0", "1")]
    assert isinstance(result.model[1], nn.Identity)
    assert result.report.relative_diff <= 1e-5


def test_whole_module_pickle(sparse_resnet, tmp_path):
    result = prune(sparse_resnet, X, ratio=0.5, fold_bn=True)
    torch.save(result.model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert torch.equal(outputs(loaded, X), outputs(result.model, X))


@pytest.mark.parametrize("fold_bn", [False, True])
def test_state_dict_and_structure_round_trip(sparse_resnet, tmp_path, fold_bn):
    result = prune(sparse_resnet, X, ratio=0.4, fold_bn=fold_bn)
    assert result.report.removed_blocks  # the round trip must replay a graph edit
    save_pruned(result, tmp_path / "pruned.pt")
    from_factory = load_pruned(tmp_path / "pruned.pt", models.resnet20)
    from_instance = load_pruned(tmp_path / "pruned.pt", sparse_resnet)
    for loaded in (from_factory, from_instance):
        assert torch.equal(outputs(loaded, X), outputs(result.model, X))
        assert loaded.state_dict().keys() == result.model.state_dict().keys()
    save_pruned(from_factory, tmp_path / "again.pt")  # a loaded model saves again
    assert torch.equal(outputs(load_pruned(tmp_path / "again.pt", models.resnet20), X),
                       outputs(result.model, X))


def test_load_into_wrong_architecture_is_an_error(sparse_resnet, tmp_path):
    save_pruned(prune(sparse_resnet, X, ratio=0.4), tmp_path / "pruned.pt")
    with pytest.raises(ValueError, match="does not match the architecture of CifarResNet"):
        load_pruned(tmp_path / "pruned.pt", models.resnet56)
    with pytest.raises(ValueError, match="save_pruned needs a PruneResult"):
        save_pruned(models.resnet20(), tmp_path / "plain.pt")


def test_torch_export_of_pruned_model():
    model = look_trained(TinyResNeXt())
    kill_channels(model, "blocks.1.bn", list(range(16)))
    x = torch.randn(2, 3, 16, 16)
    result = prune(model, x, ratio=0.5, fold_bn=True)
    assert result.report.removed_blocks
    exported = torch.export.export(result.model, (x,))
    assert torch.allclose(exported.module()(x), outputs(result.model, x), atol=1e-6)


@pytest.mark.parametrize("fold_bn", [False, True])
def test_residual_adds_run_in_place_and_the_model_still_trains(fold_bn):
    """fx turns `out += identity` into an out-of-place add; the pruner writes it back in
    place into the conv/BN output (which autograd does not save), as the eager model did,
    when it emits the GraphModule."""
    model = look_trained(models.resnet20())
    result = prune(model, X, ratio=0.3, fold_bn=fold_bn, emit="graph")
    assert add_targets(result.model.graph) == ["add_"] * 9  # one per BasicBlock
    assert result.report.max_abs_diff <= 1e-5 * result.report.reference_max_abs
    result.model.train()
    result.model(X).square().mean().backward()
    assert all(p.grad is not None for p in result.model.parameters())


def test_an_add_whose_operand_is_read_elsewhere_stays_out_of_place():
    class SharedConvOutput(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.other = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 1)

        def forward(self, x):
            y, z = self.conv(x), self.other(x)
            return (y + z) * y * z  # both are read again: writing into either would be wrong

    model = SharedConvOutput()
    result = prune(model, X, ratio=0.0, emit="graph")
    assert add_targets(result.model.graph) == ["add"]
    torch.testing.assert_close(outputs(result.model, X), outputs(model, X))


def test_residual_adds_in_place_through_layer_scale_and_stochastic_depth():
    """ConvNeXt's `layer_scale * block(x)` and EfficientNet's BN output reach their adds
    through StochasticDepth: written in place too, with the original's gradients."""
    from ffr_fast.torchvision_loader import load_torchvision

    tv = load_torchvision()
    x = torch.randn(2, 3, 32, 32)
    for model in (tv.models.efficientnet_b0().eval(),
                  tv.models.ConvNeXt([tv.models.convnext.CNBlockConfig(16, None, 2)]).eval()):
        pruned = prune(model, x, ratio=0.0, emit="graph").model
        adds = add_targets(pruned.graph)
        assert adds and set(adds) == {"add_"}
        for net in (model, pruned):
            net.zero_grad()
            net(x).square().sum().backward()
        grads = dict(model.named_parameters())
        for name, param in pruned.named_parameters():
            torch.testing.assert_close(param.grad, grads[name].grad, rtol=1e-4, atol=1e-6)
