"""The model zoo: CIFAR-style networks (and a torchvision-style ResNet) defined here so that
tests, benchmarks and the demo need no torchvision, and one small Vision Transformer taken
from torchvision (imported only when it is built). All of them trace with torch.fx.

`in_channels` lets the same networks run on single-channel data such as the digits set.
"""
from typing import Sequence

import torch
from torch import nn


def conv_bn(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
            groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2,
                  groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class ResidualBlock(nn.Module):
    """What BasicBlock and Bottleneck share: a branch (their `branch` method) summed in place
    onto a shortcut, then a ReLU. The shortcut is the identity, or a 1x1 conv+BN where the
    shape changes; `add_shortcut` registers it and the ReLU after the branch's layers, so
    that the modules keep torchvision's order."""

    def add_shortcut(self, in_channels: int, out_channels: int, stride: int) -> None:
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = conv_bn(in_channels, out_channels, 1, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.branch(x)
        out += identity
        return self.relu(out)


class BasicBlock(ResidualBlock):
    """Two 3x3 convolutions and a shortcut."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.add_shortcut(in_channels, channels, stride)

    def branch(self, x):
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))


class Bottleneck(ResidualBlock):
    """1x1 reduce, 3x3, 1x1 expand (x4), as in torchvision's ResNet-50."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.add_shortcut(in_channels, out_channels, stride)

    def branch(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


def make_stage(block, in_channels: int, channels: int, blocks: int, stride: int):
    layers = [block(in_channels, channels, stride)]
    layers += [block(channels * block.expansion, channels) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: three stages of n BasicBlocks at 16, 32, 64 channels."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3,
                 width: int = 16):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, ...), got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(conv_bn(in_channels, width), nn.ReLU(inplace=True))
        self.layer1 = make_stage(BasicBlock, width, width, n, 1)
        self.layer2 = make_stage(BasicBlock, width, 2 * width, n, 2)
        self.layer3 = make_stage(BasicBlock, 2 * width, 4 * width, n, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(20, num_classes, in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(56, num_classes, in_channels)


class ResNet(nn.Module):
    """torchvision-style ResNet (7x7 stem, max-pool, four stages, ReLU(inplace=True))."""

    def __init__(self, block, layers: Sequence[int], num_classes: int = 1000,
                 in_channels: int = 3, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, channels_in = [], width
        for i, blocks in enumerate(layers):
            channels = width * 2**i
            stages.append(make_stage(block, channels_in, channels, blocks, 1 if i == 0 else 2))
            channels_in = channels * block.expansion
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels_in, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000, in_channels: int = 3, width: int = 64) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels, width)


def resnet50(num_classes: int = 1000, in_channels: int = 3, width: int = 64) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, in_channels, width)


VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class VGG(nn.Module):
    """VGG with BatchNorm for 32x32 inputs: conv-bn-relu units, max-pool between stages."""

    def __init__(self, stages=VGG16_STAGES, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers, channels_in = [], in_channels
        for stage in stages:
            for channels in stage:
                layers += [nn.Conv2d(channels_in, channels, 3, 1, 1, bias=False),
                           nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
                channels_in = channels
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels_in, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def vgg16_bn(num_classes: int = 10, in_channels: int = 3) -> VGG:
    return VGG(VGG16_STAGES, num_classes, in_channels)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 project; residual when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_residual = stride == 1 and in_channels == out_channels
        layers = []
        if expand_ratio != 1:
            layers += [conv_bn(in_channels, hidden, 1), nn.ReLU6(inplace=True)]
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(inplace=True),
                   conv_bn(hidden, out_channels, 1)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


# (expand ratio, channels, repeats, stride) with CIFAR strides: 32x32 -> 4x4.
MOBILENET_V2_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
                         (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0,
                 settings=MOBILENET_V2_SETTINGS):
        super().__init__()
        channels_in = int(32 * width_mult)
        layers = [conv_bn(in_channels, channels_in), nn.ReLU6(inplace=True)]
        for expand_ratio, channels, repeats, stride in settings:
            channels = int(channels * width_mult)
            for i in range(repeats):
                layers.append(InvertedResidual(channels_in, channels, stride if i == 0 else 1,
                                               expand_ratio))
                channels_in = channels
        last = int(1280 * max(1.0, width_mult))
        layers += [conv_bn(channels_in, last, 1), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def mobilenet_v2(num_classes: int = 10, in_channels: int = 3,
                 width_mult: float = 1.0) -> MobileNetV2:
    return MobileNetV2(num_classes, in_channels, width_mult)


# The small ViT for 16x16 images (the digits set): patch 4, so 16 patch tokens and a class
# token; 8 pre-norm encoder blocks of width 64 (4 heads, MLP 128). About 0.27M parameters:
# a couple of minutes of training on 2 CPU cores.
VIT_TINY = dict(image_size=16, patch_size=4, num_layers=8, num_heads=4, hidden_dim=64,
                mlp_dim=128)


def vit_tiny(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """torchvision's VisionTransformer configured small (VIT_TINY), for 16x16 inputs with
    `in_channels` channels: the exact encoder blocks (attention and MLP branches on one
    residual stream) the pruner and FFRLoss see in torchvision's full-size ViTs."""
    from ffr_fast.torchvision_loader import load_torchvision

    load_torchvision()
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(num_classes=num_classes, **VIT_TINY)
    if in_channels != 3:  # the patch embedding is the only layer that sees the channels
        model.conv_proj = nn.Conv2d(in_channels, VIT_TINY["hidden_dim"],
                                    VIT_TINY["patch_size"], VIT_TINY["patch_size"])
    return model


ZOO = {
    "resnet20": resnet20,
    "resnet56": resnet56,
    "vgg16_bn": vgg16_bn,
    "mobilenet_v2": mobilenet_v2,
    "vit_tiny": vit_tiny,
}


def create(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Build a zoo model by name (the names the CLI accepts)."""
    if name not in ZOO:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(ZOO)}")
    return ZOO[name](num_classes=num_classes, in_channels=in_channels)
