"""What prune() hands back (emit.py): the model's own class when only layers and parameters
changed, the GraphModule when residual branches were rewired, and never a model whose own
forward disagrees with its pruned graph."""
import copy
import functools

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ffr_fast import load_pruned, models, prune, save_pruned
from ffr_fast.testing import outputs
from ffr_fast.torchvision_loader import load_torchvision

from nets import AuxiliaryHead, kill_channels, look_trained

X = torch.randn(2, 3, 32, 32)
# emit= chooses what the torch.fx path hands back; the export path always gives the
# model's own class (a training-only branch it cannot serve falls back to torch.fx, below).
prune_fx = functools.partial(prune, analysis="fx")


def sparse_resnet20():
    torch.manual_seed(0)
    model = look_trained(models.resnet20())
    kill_channels(model, "layer1.0.conv1", [1, 2], "layer1.0.bn1")
    return model


@pytest.mark.parametrize("fold_bn", [False, True])
def test_pruning_channels_only_gives_the_models_own_class(fold_bn, tmp_path):
    model = sparse_resnet20()
    result = prune_fx(model, X, ratio=0.4, fold_bn=fold_bn)
    pruned = result.model
    assert type(pruned) is type(model) and not isinstance(pruned, fx.GraphModule)
    assert result.structure["emitted"] == "module"
    assert pruned.layer1[0].conv1.out_channels < model.layer1[0].conv1.out_channels
    assert isinstance(pruned.layer1[0].bn1, nn.Identity) == fold_bn
    assert result.report.relative_diff <= 1e-5
    pruned(X).sum().backward()  # it trains like the original
    save_pruned(result, tmp_path / "p.pt")
    loaded = load_pruned(tmp_path / "p.pt", models.resnet20)
    assert type(loaded) is type(model)
    torch.testing.assert_close(outputs(loaded, X), outputs(pruned, X), rtol=0, atol=0)
    copied = copy.deepcopy(pruned)  # the structure travels with the model
    save_pruned(copied, tmp_path / "copy.pt")
    torch.testing.assert_close(outputs(load_pruned(tmp_path / "copy.pt", models.resnet20), X),
                               outputs(pruned, X), rtol=0, atol=0)


def test_removed_branches_give_the_graph_module_and_emit_module_refuses_them():
    model = sparse_resnet20()
    result = prune_fx(model, X, remove_branches=["layer2.1"])
    assert isinstance(result.model, fx.GraphModule)
    assert result.structure["emitted"] == "graph"
    with pytest.raises(ValueError, match=r"emit='module'.*residual branch layer2.1"):
        prune_fx(model, X, remove_branches=["layer2.1"], emit="module")
    with pytest.raises(ValueError, match="emit must be one of"):
        prune_fx(model, X, ratio=0.5, emit="eager")


def test_inplace_prunes_the_callers_own_model():
    model = sparse_resnet20()
    expected = outputs(prune_fx(model, X, ratio=0.4).model, X)
    result = prune_fx(model, X, ratio=0.4, inplace=True)
    assert result.model is model
    torch.testing.assert_close(outputs(model, X), expected, rtol=0, atol=0)


class LastDimNorm(nn.Module):
    """A norm whose forward reads its width from an int attribute, not from its weight:
    after pruning, the traced graph (which reads the weight's shape) and this forward
    disagree."""

    def __init__(self, width):
        super().__init__()
        self.width = width
        self.weight = nn.Parameter(torch.rand(width) + 0.5)
        self.bias = nn.Parameter(torch.randn(width))

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        return F.layer_norm(x, (self.width,), self.weight, self.bias).permute(0, 3, 1, 2)


def test_a_forward_that_reads_a_stale_width_falls_back_to_the_graph():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), LastDimNorm(8), nn.Conv2d(8, 4, 3)).eval()
    result = prune_fx(model, X, ratio=0.5)
    assert isinstance(result.model, fx.GraphModule)
    assert "own forward cannot serve" in result.report.warnings[0]
    assert result.model(X).shape == (2, 4, 28, 28)
    with pytest.raises(ValueError, match="emit='module'.*own forward cannot serve"):
        prune_fx(model, X, ratio=0.5, emit="module")
    assert model[1].width == 8 and model[0].out_channels == 8  # the caller's model untouched


def test_convnext_keeps_its_class_and_its_layer_norms_read_their_new_width(tmp_path):
    """ConvNeXt's LayerNorm2d is traced into (it has its own forward) yet reads LayerNorm's
    normalized_shape: the model's own class needs it set from the sliced weight."""
    tv = load_torchvision()
    torch.manual_seed(0)
    model = tv.models.ConvNeXt([tv.models.convnext.CNBlockConfig(16, 32, 1),
                                tv.models.convnext.CNBlockConfig(32, None, 1)]).eval()
    x = torch.randn(1, 3, 32, 32)
    result = prune(model, x, ratio=0.5, scope="layer")
    assert type(result.model) is type(model)
    norm = result.model.features[0][1]
    assert norm.normalized_shape == tuple(norm.weight.shape) == (8,)
    save_pruned(result, tmp_path / "p.pt")
    loaded = load_pruned(tmp_path / "p.pt", model)
    torch.testing.assert_close(outputs(loaded, x), outputs(result.model, x), rtol=0, atol=0)


def test_files_of_the_previous_format_still_load(tmp_path):
    model = sparse_resnet20()
    result = prune_fx(model, X, ratio=0.4, emit="graph")
    structure = {k: v for k, v in result.structure.items() if k != "emitted"}
    structure.update(format="ffr_fast.pruned/3", training={})
    torch.save({"structure": structure, "state_dict": result.model.state_dict()},
               tmp_path / "old.pt")
    loaded = load_pruned(tmp_path / "old.pt", models.resnet20)
    assert isinstance(loaded, fx.GraphModule)
    torch.testing.assert_close(outputs(loaded, X), outputs(result.model, X), rtol=0, atol=0)


def test_a_training_only_branch_that_reads_pruned_channels_gives_the_graph():
    torch.manual_seed(0)
    model = AuxiliaryHead().eval()
    result = prune_fx(model, X, ratio=0.5)
    assert isinstance(result.model, fx.GraphModule)
    assert "in training mode it raised" in " ".join(result.report.warnings)
    assert any("reads self.training" in w for w in result.report.warnings)
    result.model.train()(X)  # the graph runs the eval-mode code it was traced with
    with pytest.raises(ValueError, match="in training mode it raised"):
        prune_fx(model, X, ratio=0.5, emit="module")
    assert not any(m.training for m in model.modules())  # the trial ran on a copy
