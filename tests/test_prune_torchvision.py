"""The pruner on torchvision's classification zoo: the smallest member of each family at
ratio=0.5, scope="layer", on the smallest input each allows. Every model is cut,
keeps its output shape, leaves the original untouched, is exact against the zeroed original
(unless a LayerNorm lost channels, which the report names), and saves, loads and exports.

The floors are the FLOPs cuts measured here at these small inputs, a little rounded down
(224x224 figures, side by side with Torch-Pruning: bench/results/vs_torch_pruning_zoo.md,
written by bench/vs_torch_pruning.py --rounds 0 --out vs_torch_pruning_zoo)."""
import pytest
import torch

from ffr_fast.pruning import load_pruned, prune, save_pruned
from ffr_fast.torchvision_loader import load_torchvision

tv = load_torchvision()

# name: (constructor kwargs, input size, minimum FLOPs cut at ratio 0.5 per layer)
ZOO = {
    "resnet18": ({}, 32, 3.5), "resnext50_32x4d": ({}, 32, 3.5),
    "wide_resnet50_2": ({}, 32, 3.5), "mobilenet_v2": ({}, 32, 3.0),
    "mobilenet_v3_large": ({}, 32, 3.0), "efficientnet_b0": ({}, 32, 3.0),
    "efficientnet_v2_s": ({}, 32, 3.5), "regnet_x_400mf": ({}, 32, 3.5),
    "regnet_y_400mf": ({}, 32, 3.5), "mnasnet1_0": ({}, 32, 3.0),
    "shufflenet_v2_x1_0": ({}, 32, 2.0), "densenet121": ({}, 32, 3.5),
    "googlenet": (dict(aux_logits=False, init_weights=True), 32, 3.5),
    "squeezenet1_1": ({}, 32, 3.0), "vgg11_bn": ({}, 32, 3.5),
    "convnext_tiny": ({}, 32, 3.5), "vit_b_16": (dict(image_size=32), 32, 1.9),
    "swin_t": ({}, 32, 2.5), "maxvit_t": ({}, 224, 2.1),
}
EXPORTED = {"resnet18", "mobilenet_v3_large", "efficientnet_b0", "shufflenet_v2_x1_0",
            "convnext_tiny", "vit_b_16"}


def build(name):
    kwargs, size, _ = ZOO[name]
    torch.manual_seed(0)
    model = getattr(tv.models, name)(**kwargs).eval()
    with torch.no_grad():  # torchvision zero-initialises some heads: a zero output proves nothing
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and not module.weight.any():
                module.weight.normal_(0, 0.02)
    return model, torch.randn(1, 3, size, size)


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_prunes_saves_loads(name, tmp_path):
    model, x = build(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = prune(model, x, ratio=0.5, scope="layer")
    report = result.report
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(m.training for m in model.modules())
    assert report.flop_ratio >= ZOO[name][2], report.flop_ratio
    if not report.approximate:
        assert report.relative_diff <= 1e-5
    with torch.no_grad():
        out = result.model(torch.cat([x, x]))
    assert out.shape == (2, 1000)
    save_pruned(result, tmp_path / "pruned.pt")
    loaded = load_pruned(tmp_path / "pruned.pt", lambda: build(name)[0])
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))
    if name in EXPORTED:
        exported = torch.export.export(result.model, (x,))
        torch.testing.assert_close(exported.module()(x), result.model(x))
