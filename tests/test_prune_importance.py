"""A callable importance on the torch.export path: the scorer sees the modules the torch.fx
path passes it (a producer with the batch norm that alone reads it, a batch norm or a
LayerNorm that follows no producer), the channels it scores lowest go, attention heads keep
the L2 rule, bad returns are refused by layer, and "auto" stays on torch.export."""
import pytest
import torch
from torch import nn

import ffr_fast
from ffr_fast.torchvision_loader import load_torchvision

from nets import look_trained

torchvision = load_torchvision()  # before transformers, on a CPU-only torch
transformers = pytest.importorskip("transformers")


def first_weights(module, bn):
    """A deterministic score per output channel that survives a deep copy: the magnitude of
    each channel's first weight, times the following batch norm's |weight|."""
    scores = module.weight.detach().reshape(len(module.weight), -1)[:, 0].abs().double()
    return scores if bn is None else scores * bn.weight.detach().abs().double()


class ResidualNet(nn.Module):
    """c1 -> bn1 -> relu, plus c2 of that, then bn2 on the sum (one class: c1, bn1, c2, bn2),
    then c3 -> bn3 (a class of its own) and a linear head."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c3, self.bn3 = nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        a = torch.relu(self.bn1(self.c1(x)))
        y = torch.relu(self.bn2(a + self.c2(a)))
        return self.head(torch.relu(self.bn3(self.c3(y))).mean((2, 3)))


def residual_net():
    torch.manual_seed(0)
    model = ResidualNet()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2, model.bn3):
            bn.weight.uniform_(0.2, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


def image():
    return torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))


def top(scores: torch.Tensor, count: int) -> torch.Tensor:
    return scores.topk(count).indices.sort().values


def test_the_channels_scored_lowest_go_with_each_class_scored_by_its_members_max():
    model, calls = residual_net(), []

    def scorer(module, bn):
        calls.append((type(module).__name__, type(bn).__name__ if bn is not None else None))
        return first_weights(module, bn)

    result = ffr_fast.prune(model, image(), ratio=0.5, scope="layer", importance=scorer)
    report = result.report
    assert report.settings["path"] == "torch.export"
    assert report.settings["importance"].endswith("scorer")
    # bn2 reads an add, so it follows no producer: it is scored alone, and c2 without it
    assert set(calls) == {("BatchNorm2d", None), ("Conv2d", "BatchNorm2d"), ("Conv2d", None),
                          ("Linear", None)}
    stream = torch.stack([first_weights(model.c1, model.bn1), first_weights(model.c2, None),
                          first_weights(model.bn2, None)]).amax(0)
    kept_stream, kept_c3 = report.channels["c1"][1], report.channels["c3"][1]
    assert kept_stream < 8 and kept_c3 < 6
    stream_ids, c3_ids = top(stream, kept_stream), top(first_weights(model.c3, model.bn3),
                                                        kept_c3)
    assert torch.equal(result.model.c1.weight, model.c1.weight[stream_ids])
    assert torch.equal(result.model.c2.weight, model.c2.weight[stream_ids][:, stream_ids])
    assert torch.equal(result.model.bn2.weight, model.bn2.weight[stream_ids])
    assert torch.equal(result.model.c3.weight, model.c3.weight[c3_ids][:, stream_ids])
    assert torch.equal(result.model.head.weight, model.head.weight[:, c3_ids])


class NormedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(16, 12), nn.LayerNorm(12), nn.Linear(12, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


def test_a_layer_norm_is_scored_on_its_own():
    torch.manual_seed(0)
    model = NormedMLP().eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
    seen = []

    def scorer(module, bn):
        seen.append(type(module).__name__)
        return first_weights(module, bn)

    result = ffr_fast.prune(model, torch.randn(3, 16), ratio=0.5, scope="layer",
                            importance=scorer, analysis="export")
    assert set(seen) == {"Linear", "LayerNorm"}
    kept = result.report.channels["fc1"][1]
    ids = top(torch.maximum(first_weights(model.fc1, None), first_weights(model.norm, None)),
              kept)
    assert kept < 12 and torch.equal(result.model.fc1.weight, model.fc1.weight[ids])
    assert torch.equal(result.model.norm.weight, model.norm.weight[ids])


def test_a_scorer_without_an_opinion_removes_nothing():
    result = ffr_fast.prune(residual_net(), image(), ratio=0.5,
                            importance=lambda module, bn: None)
    assert result.report.settings["path"] == "torch.export"
    assert result.report.removed_classes == 0


@pytest.mark.parametrize("returned, why", [
    (lambda module: torch.ones(3, dtype=torch.float64), "the wrong length"),
    (lambda module: -torch.ones(len(module.weight)), "negative"),
    (lambda module: torch.full((len(module.weight),), float("nan")), "not finite"),
    (lambda module: [1.0] * len(module.weight), "no tensor")])
def test_a_bad_return_is_refused_naming_the_layer_and_the_shape(returned, why):
    with pytest.raises(ValueError, match=r"returned .* for layer 'c1'; .* 8 finite scores"):
        ffr_fast.prune(residual_net(), image(), ratio=0.5, analysis="export",
                       importance=lambda module, bn: returned(module))


def test_both_paths_keep_the_same_channels_of_a_resnet18():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.weight.uniform_(0.2, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    exported = ffr_fast.prune(model, x, ratio=0.4, importance=first_weights)
    traced = ffr_fast.prune(model, x, ratio=0.4, importance=first_weights, analysis="fx")
    assert exported.report.settings["path"] == "torch.export"
    assert traced.report.settings["path"] == "torch.fx"
    assert exported.report.settings["importance"] == traced.report.settings["importance"]
    assert exported.report.removed_classes > 0
    ours, theirs = exported.model.state_dict(), traced.model.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name


def inverse_norms(module, bn):
    """Ranks a linear layer's rows opposite to the L2 rule: the smallest norms score most."""
    norms = torch.linalg.vector_norm(module.weight.detach().double(), dim=1)
    return norms.max() - norms


def test_a_decoder_is_cut_by_the_scorer_and_its_heads_by_the_l2_rule():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config).eval()
    head_dim = config.hidden_size // config.num_attention_heads
    with torch.no_grad():  # the first KV group's q, k, v rows have the larger L2 norms
        for layer in model.model.layers:
            attention = layer.self_attn
            attention.q_proj.weight[:2 * head_dim] *= 3
            attention.k_proj.weight[:head_dim] *= 3
            attention.v_proj.weight[:head_dim] *= 3
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    result = ffr_fast.prune(model, ids, ratio=0.5, scope="layer", remove_blocks=False,
                            importance=inverse_norms)
    assert result.report.settings["path"] == "torch.export"
    kept = result.structure["kept"]
    for index, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{index}."
        gate = kept[prefix + "mlp.gate_proj.weight"][0]
        scores = torch.maximum(inverse_norms(layer.mlp.gate_proj, None),
                               inverse_norms(layer.mlp.up_proj, None))
        assert len(gate) < config.intermediate_size
        assert gate == top(scores, len(gate)).tolist()
        # the scorer would keep the second group (its rows' norms are the smaller): the L2
        # rule keeps the first
        assert kept[prefix + "self_attn.q_proj.weight"][0] == list(range(2 * head_dim))
        assert kept[prefix + "self_attn.k_proj.weight"][0] == list(range(head_dim))
    out = result.model(ids).logits
    assert out.shape == (2, 8, 64) and torch.isfinite(out).all()


@pytest.mark.parametrize("analysis", ["export", "fx"])
def test_without_a_threshold_a_block_goes_only_if_it_emits_exactly_zero(analysis):
    """Under "bn" a zero |gamma| scores 0, but the BatchNorm's shift still reaches the
    stream: a ratio cut (no threshold) keeps the block on both paths."""
    model = look_trained(ffr_fast.models.resnet20())
    with torch.no_grad():
        model.layer1[1].bn2.weight.zero_()  # its shift (bias - mean * 0) stays
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    result = ffr_fast.prune(model, x, ratio=0.25, importance="bn", analysis=analysis)
    assert result.report.removed_blocks == []
    assert result.report.relative_diff < 1e-5
