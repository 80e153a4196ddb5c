"""Test-only networks for the pruner, each exercising one dependency rule, and a small
torchvision ViT; the helpers that make a random model look trained or give it dead filters
live in ffr_fast.testing."""
import torch
import torch.fx
from torch import nn

from ffr_fast.testing import kill_channels, look_trained  # noqa: F401 (re-exported)
from ffr_fast.torchvision_loader import load_torchvision


def conv_bn_relu(cin, cout, k=3, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, 1, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DenseLayer(nn.Module):
    """Pre-activation BN-ReLU-conv whose output is concatenated to its input (DenseNet)."""

    def __init__(self, cin, growth):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, 1, 1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv(torch.relu(self.bn(x)))], 1)


class TinyDenseNet(nn.Module):
    """stem (8) -> three dense layers (growth 4) -> BN -> 1x1 transition -> pool -> fc."""

    def __init__(self, growth=4):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.dense = nn.Sequential(*[DenseLayer(8 + i * growth, growth) for i in range(3)])
        self.bn = nn.BatchNorm2d(8 + 3 * growth)
        self.transition = nn.Conv2d(8 + 3 * growth, 12, 1)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.dense(self.stem(x))))
        x = torch.relu(self.transition(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class ResNeXtBlock(nn.Module):
    """1x1 -> grouped 3x3 (groups=4) -> 1x1, with an identity shortcut."""

    def __init__(self, channels=16, width=32, groups=4):
        super().__init__()
        self.reduce = conv_bn_relu(channels, width, 1)
        self.grouped = conv_bn_relu(width, width, 3, groups)
        self.expand = nn.Conv2d(width, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(x + self.bn(self.expand(self.grouped(self.reduce(x)))))


class TinyResNeXt(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn_relu(3, 16)
        self.blocks = nn.Sequential(ResNeXtBlock(), ResNeXtBlock())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def channel_shuffle(x, groups: int):
    """ShuffleNet's channel permutation: a custom op that mixes channel positions."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


torch.fx.wrap("channel_shuffle")  # one opaque call_function node in the trace


class ShuffleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = conv_bn_relu(3, 16)
        self.conv2 = conv_bn_relu(16, 16)
        self.conv3 = conv_bn_relu(16, 24)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = self.conv3(self.conv2(channel_shuffle(self.conv1(x), 4)))
        return self.fc(x.mean((2, 3)))


class Gate(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        if x.mean() > 0:
            return self.conv(x)
        return x


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = conv_bn_relu(3, 16)
        self.gate = Gate(16)
        self.conv2 = conv_bn_relu(16, 32)
        self.conv3 = conv_bn_relu(32, 32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.conv3(self.conv2(self.gate(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def small_vit(num_layers: int = 4, patch_size: int = 8):
    """torchvision's VisionTransformer on 32x32 inputs (width 32, 4 heads, MLP 64, 10
    classes), in eval mode, its head drawn at random: torchvision zero-initialises it, and a
    model whose output is zero cannot show that pruning changed nothing."""
    torch.manual_seed(0)
    model = load_torchvision().models.VisionTransformer(
        image_size=32, patch_size=patch_size, num_layers=num_layers, num_heads=4,
        hidden_dim=32, mlp_dim=64, num_classes=10).eval()
    nn.init.normal_(model.heads.head.weight)
    return model


TEST_NETS = {"densenet": (TinyDenseNet, ()), "resnext": (TinyResNeXt, ()),
             "shuffle": (ShuffleNet, ()), "gated": (GatedNet, ("gate",))}


# ---- one net per rule of today's layers (test_prune_rules.py) ----------------------------

class ChannelsLastMLP(nn.Module):
    """conv -> (B, H, W, C) -> LayerNorm -> Linear -> GELU -> Linear -> back -> conv."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv1(x).permute(0, 2, 3, 1)
        y = self.fc2(nn.functional.gelu(self.fc1(self.norm(y))))
        return self.conv2(y.permute(0, 3, 1, 2))


class TracedShuffle(nn.Module):
    """ShuffleNet's channel shuffle written out (view, transpose, view): traced, not opaque."""

    def __init__(self):
        super().__init__()
        self.conv1 = conv_bn_relu(3, 8)
        self.conv2 = conv_bn_relu(8, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.conv1(x)
        b, c, h, w = x.size()
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, c, h, w)
        return self.fc(self.conv2(x).mean((2, 3)))


class SqueezeExcite(nn.Module):
    def __init__(self, channels, squeeze):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)
        self.act, self.gate = nn.SiLU(), nn.Sigmoid()

    def forward(self, x):
        return x * self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))


class SENet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = conv_bn_relu(3, 8)
        self.se = SqueezeExcite(8, 4)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.se(self.conv1(x)))


class LayerScaleNet(nn.Module):
    """conv -> gamma * x (a (C, 1, 1) parameter) -> conv: the parameter is sliced."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)
        self.gamma = nn.Parameter(torch.rand(8, 1, 1) + 0.5)

    def forward(self, x):
        return self.conv2(self.gamma * torch.relu(self.conv1(x)))


class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.norm = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.relu(self.norm(self.conv1(x))))


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn = nn.Conv1d(3, 8, 3, padding=1), nn.BatchNorm1d(8)
        self.act = nn.PReLU(8)
        self.conv2 = nn.Conv1d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.act(self.bn(self.conv1(x))))


class TransposedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.relu(self.up(torch.relu(self.conv1(x)))))


@torch.library.custom_op("ffr_tests::channel_softmax", mutates_args=())
def channel_softmax(x: torch.Tensor) -> torch.Tensor:
    """A user's op (torch.library.custom_op) that mixes the channels: the export capture
    keeps it as one node that no table of the pruner describes."""
    return torch.softmax(x, 1)


@channel_softmax.register_fake
def _(x):
    return torch.empty_like(x)


class SoftmaxNet(nn.Module):
    """A custom op mixes conv2's channels and has no rule: it pins them, the rest is
    pruned."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.conv3(channel_softmax(self.conv2(torch.relu(self.conv1(x)))))


class ChannelScale(nn.Module):
    """A user's layer: y = x * weight per channel (through a view of the parameter)."""

    def __init__(self, channels):
        super().__init__()
        self.channels = channels
        self.weight = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x):
        return x * self.weight.view(1, -1, 1, 1)


class ScaleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.scale = nn.Conv2d(3, 8, 3, padding=1), ChannelScale(8)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.scale(torch.relu(self.conv1(x))))


class TokenNet(nn.Module):
    """A ViT's input: patches -> tokens, a class token concatenated, a position embedding
    added; the class token's output feeds a Linear."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.pos = nn.Parameter(torch.randn(1, 5, 8))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.fc(torch.relu(x)[:, 0])


class FixedView(nn.Module):
    """x.view(n, 8, -1): the 8 is a constant of the graph, which must shrink with conv1."""

    def __init__(self, literal: bool):
        super().__init__()
        self.literal = literal
        self.conv1, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        y = y.view(y.shape[0], 8, -1) if self.literal else y.view(y.shape[0], y.shape[1], -1)
        return self.fc(y.mean(2))


def post_norm_bert():
    """A 2-layer BertModel whose layer 1 has its branches' last layers zeroed: the layer
    scores zero, but its post-norm still normalises x, so removing it is not exact."""
    import transformers  # a test extra: imported by the tests that build this net

    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4)).eval()
    layer = bert.encoder.layer[1]
    with torch.no_grad():
        for dense in (layer.attention.output.dense, layer.output.dense):
            dense.weight.zero_()
            dense.bias.zero_()
    return bert


class AuxiliaryHead(nn.Module):
    """Like Inception's auxiliary classifier: a head that only training runs, on the channels
    of conv1, which an eval-mode capture or trace prunes without ever seeing it."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.aux = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3), nn.Linear(8, 2)

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        out = self.conv2(y).mean((2, 3))
        return (out, self.aux(y.mean((2, 3)))) if self.training else out
