"""The depth-pruning side of the study: LayerDrop, Block Influence removal (ShortGPT) and the
feature-flow measure, on small residual nets whose branch outputs are known exactly."""
import pytest
import torch
from torch import nn

from ffr_fast.pruning import prune, residual_branches
from ffr_fast.study import pipeline, regularizers

# Rotation by 90 degrees in each pair of features: <x, Rx> = 0 and ||Rx|| = ||x|| for every x.
ROTATION = torch.tensor([[0., -1, 0, 0], [1, 0, 0, 0], [0, 0, 0, -1], [0, 0, 1, 0]])


class Rotating(nn.Module):
    """x + a R x: its Block Influence is 1 - cos(x, x + a R x) = 1 - 1 / sqrt(1 + a^2) and its
    flow step ||x_out - x_in|| / ||x_in|| is a, whatever x is."""

    def __init__(self, a: float):
        super().__init__()
        self.branch = nn.Linear(4, 4, bias=False)
        with torch.no_grad():
            self.branch.weight.copy_(a * ROTATION)

    def forward(self, x):
        return x + self.branch(x)


class Shifting(nn.Module):
    """x + shift (a branch of zero weights and bias `shift`): the output tells whether the
    block ran."""

    def __init__(self, shift: float):
        super().__init__()
        self.branch = nn.Linear(3, 3)
        with torch.no_grad():
            self.branch.weight.zero_()
            self.branch.bias.fill_(shift)

    def forward(self, x):
        return x + self.branch(x)


SCALES = (2.0, 0.1, 1.0, 0.5)


def rotating_net() -> nn.Sequential:
    return nn.Sequential(*[Rotating(a) for a in SCALES], nn.Linear(4, 3))


def test_block_influence_of_known_branches():
    x = torch.randn(64, 4, dtype=torch.float64)
    model = rotating_net().double().eval()  # float64: the influence is a float64 reference
    influence = {b.name: b.influence for b in residual_branches(model, (x,))}
    # a block is named by its module path: block i of the Sequential is "i"
    expected = {f"{i}": 1 - (1 + a * a) ** -0.5 for i, a in enumerate(SCALES)}
    assert influence.keys() == expected.keys()
    for name, value in expected.items():
        # the pruner measures cosines in float32 whatever the model's dtype
        assert influence[name] == pytest.approx(value, rel=1e-6), name


def test_influence_removal_takes_the_lowest_influence_first_up_to_the_budget():
    x = torch.randn(64, 4)
    model = rotating_net().eval()
    # FLOPs per image: four branches of 32 and a head of 24 (152); keeping at most 60% means
    # saving 60.8: two branches, the two of lowest influence (a = 0.1, then a = 0.5).
    assert pipeline.influence_removal(model, x, 0.6) == ["1", "3"]
    assert pipeline.influence_removal(model, x, 0.4) == ["1", "3", "2"]
    with pytest.raises(ValueError, match="cannot reach 10%"):
        pipeline.influence_removal(model, x, 0.1)
    result = prune(model, (x,), remove_branches=["1", "3"])
    kept = nn.Sequential(model[0], model[2], model[4])  # the net without blocks 1 and 3
    assert torch.allclose(result.model(x), kept(x), atol=1e-6)


def test_feature_flow_is_each_blocks_step():
    model = rotating_net()
    images = torch.randn(40, 4)
    dataset = torch.utils.data.TensorDataset(images, torch.zeros(40, dtype=torch.long))
    flow = pipeline.feature_flow(model, dataset, batch_size=16)
    assert list(flow) == ["0", "1", "2", "3"]
    for (name, step), a in zip(flow.items(), SCALES):
        assert step == pytest.approx(a, rel=1e-5), name
    assert model.training  # the mode is restored


def _kept_blocks(model, x):
    """Which of the Shifting blocks 1, 2, 4, 8 ran, from the output's shift."""
    code = int(round(float((model(x) - x).detach().mean())))
    return [bool(code & (1 << i)) for i in range(4)]


def test_layerdrop_drops_only_in_training_mode_at_its_rate():
    torch.manual_seed(0)
    model = nn.Sequential(*[Shifting(float(2**i)) for i in range(4)])
    drop = regularizers.build(model, "layerdrop", weight=0.3)
    x = torch.randn(2, 3)
    model.train()
    kept = torch.tensor([_kept_blocks(model, x) for _ in range(400)], dtype=torch.float64)
    for block, rate in enumerate(1 - kept.mean(0)):
        assert abs(float(rate) - 0.3) < 0.08, (block, float(rate))
    assert len({tuple(row.tolist()) for row in kept}) > 4  # independent per block
    with torch.no_grad():  # the training flag decides, not autograd
        assert not all(all(_kept_blocks(model, x)) for _ in range(50))
    model.eval()
    assert all(all(_kept_blocks(model, x)) for _ in range(50))
    assert drop() == 0 and "4 residual blocks" in drop.describe()
    drop.remove()
    model.train()
    assert all(all(_kept_blocks(model, x)) for _ in range(50))


def test_layerdrop_is_seeded_and_refuses_what_it_cannot_do():
    model = nn.Sequential(*[Shifting(float(2**i)) for i in range(4)]).train()
    drop = regularizers.build(model, "layerdrop", weight=0.5)
    x = torch.randn(2, 3)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append([_kept_blocks(model, x) for _ in range(20)])
    assert runs[0] == runs[1]
    drop.remove()
    with pytest.raises(ValueError, match="probability in \\[0, 1\\)"):
        regularizers.build(model, "layerdrop", weight=1.0)
    plain = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    regularizers.build(plain, "layerdrop", weight=0.1)  # the blocks are found at the first call
    with pytest.raises(ValueError, match="needs residual blocks"):
        plain(x)


def test_layerdrop_never_skips_a_block_that_changes_the_shape():
    from ffr_fast.models import resnet20

    model = resnet20(10, 1).train()
    drop = regularizers.build(model, "layerdrop", weight=0.9)
    torch.manual_seed(0)
    for _ in range(5):
        assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    assert drop.shape_keeping["layer2.0"] is False and drop.shape_keeping["layer1.0"] is True
    assert "7 of them keep their input's shape" in drop.describe()
    drop.remove()
