"""Architectures of the model zoo, built only from layers the scanner supports.

Leaf layers used: ``Conv2d, Linear, ReLU, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d,
BatchNorm2d, Dropout, Flatten, Identity``; residual blocks add their branches with ``+``.
Every ReLU is its own module (never reused), so each has one name in ``named_modules()``.
Layers carry readable names (``features.conv1``, ``classifier.fc1``, ``layer2.0.conv1``…).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = [
    "ResidualBlock", "FCN", "FCNRes", "SmallCNN", "LeNet5", "VGGCifar", "AlexNetCifar",
    "BasicBlock", "ResNetCifar", "flat_features", "init_relu_net",
]


def init_relu_net(module: nn.Module) -> nn.Module:
    """He initialisation (``kaiming_normal_``, fan-in, ReLU gain) of every Conv2d / Linear
    weight, zero biases. PyTorch's default initialisation shrinks activations layer by layer;
    on the cluttered digits the small nets then sit on a loss plateau for many epochs."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def flat_features(features: nn.Module, in_channels: int, input_size: Union[int, Tuple[int, int]]) -> int:
    """Number of features after ``features`` for an input of ``in_channels × H × W``.

    Raises
    ------
    ValueError
        If the input is too small for the feature extractor (naming the size).
    """
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    try:
        with torch.no_grad():
            out = features(torch.zeros(1, in_channels, h, w))
    except RuntimeError as e:
        raise ValueError(f"input size {h}x{w} is too small for this architecture: {e}") from e
    return int(out[0].numel())


class ResidualBlock(nn.Module):
    """``out = body(x) + shortcut(x)`` (``shortcut`` defaults to the identity).

    Parameters
    ----------
    body : nn.Module
    shortcut : nn.Module, optional
    """

    def __init__(self, body: nn.Module, shortcut: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.body = body
        self.shortcut = shortcut if shortcut is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class FCN(nn.Sequential):
    """The thesis's fully connected network (Chapter 3): ``in-500-500-classes``.

    Parameters
    ----------
    in_features : int
        Product of the input shape (784 for 1×28×28 MNIST, 3072 for 3×32×32).
    num_classes : int
    hidden : int

    Input ``[B, *]`` (flattened), output ``[B, num_classes]``. Modules: ``flatten, fc1,
    relu1, fc2, relu2, fc3``.
    """

    def __init__(self, in_features: int = 784, num_classes: int = 10, hidden: int = 500) -> None:
        super().__init__(OrderedDict([
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(in_features, hidden)), ("relu1", nn.ReLU()),
            ("fc2", nn.Linear(hidden, hidden)), ("relu2", nn.ReLU()),
            ("fc3", nn.Linear(hidden, num_classes)),
        ]))
        init_relu_net(self)


class FCNRes(nn.Sequential):
    """FCN with one residual block (thesis §3.3.3, Fig. 3-11).

    ``flatten, fc1, relu1, block (body: fc1, relu, fc2; identity shortcut; "+"), relu2, fc2``.
    Input ``[B, *]``, output ``[B, num_classes]``.
    """

    def __init__(self, in_features: int = 784, num_classes: int = 10, hidden: int = 500) -> None:
        body = nn.Sequential(OrderedDict([
            ("fc1", nn.Linear(hidden, hidden)), ("relu", nn.ReLU()),
            ("fc2", nn.Linear(hidden, hidden)),
        ]))
        super().__init__(OrderedDict([
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(in_features, hidden)), ("relu1", nn.ReLU()),
            ("block", ResidualBlock(body)), ("relu2", nn.ReLU()),
            ("fc2", nn.Linear(hidden, num_classes)),
        ]))
        init_relu_net(self)


class SmallCNN(nn.Module):
    """Three 3×3 conv layers (valid padding), two 2×2 max-pools, FC ``fc_width``, output.

    ``filters=(10, 10, 10)`` is the thesis's simple CNN (Chapter 3); ``(32, 64, 64)`` the
    Chapter 6 CNN. For a 32×32 input: 32 → 30 → 15 → 13 → 6 → 4, i.e. ``filters[2]·16``
    features before the FC layer.

    Parameters
    ----------
    in_channels, num_classes : int
    filters : (int, int, int)
    fc_width : int
    input_size : int or (int, int)

    Input ``[B, in_channels, H, W]``, output ``[B, num_classes]``. Modules:
    ``features.{conv1, relu1, pool1, conv2, relu2, pool2, conv3, relu3}``,
    ``classifier.{flatten, fc1, relu1, fc2}``.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10,
                 filters: Sequence[int] = (10, 10, 10), fc_width: int = 64,
                 input_size: Union[int, Tuple[int, int]] = 32) -> None:
        super().__init__()
        f1, f2, f3 = filters
        self.features = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(in_channels, f1, 3)), ("relu1", nn.ReLU()),
            ("pool1", nn.MaxPool2d(2)),
            ("conv2", nn.Conv2d(f1, f2, 3)), ("relu2", nn.ReLU()),
            ("pool2", nn.MaxPool2d(2)),
            ("conv3", nn.Conv2d(f2, f3, 3)), ("relu3", nn.ReLU()),
        ]))
        n = flat_features(self.features, in_channels, input_size)
        self.classifier = nn.Sequential(OrderedDict([
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(n, fc_width)), ("relu1", nn.ReLU()),
            ("fc2", nn.Linear(fc_width, num_classes)),
        ]))
        init_relu_net(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and average pooling: conv 6@5×5, avg-pool, conv 16@5×5, avg-pool,
    FC 120, FC 84, output. 32×32 input → 16·5·5 = 400 features.

    Input ``[B, in_channels, H, W]``, output ``[B, num_classes]``.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10,
                 input_size: Union[int, Tuple[int, int]] = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(in_channels, 6, 5)), ("relu1", nn.ReLU()),
            ("pool1", nn.AvgPool2d(2)),
            ("conv2", nn.Conv2d(6, 16, 5)), ("relu2", nn.ReLU()),
            ("pool2", nn.AvgPool2d(2)),
        ]))
        n = flat_features(self.features, in_channels, input_size)
        self.classifier = nn.Sequential(OrderedDict([
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(n, 120)), ("relu1", nn.ReLU()),
            ("fc2", nn.Linear(120, 84)), ("relu2", nn.ReLU()),
            ("fc3", nn.Linear(84, num_classes)),
        ]))
        init_relu_net(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


VGG_CFGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],
}


class VGGCifar(nn.Module):
    """CIFAR-size VGG: 3×3 convs (padding 1) with BatchNorm and ReLU, five 2×2 max-pools,
    adaptive average pool to 1×1, classifier ``512-512-512-classes`` with dropout.

    Parameters
    ----------
    cfg : {"vgg11", "vgg13", "vgg16"}
    in_channels, num_classes : int
    batch_norm : bool
    dropout : float

    Input ``[B, in_channels, H, W]`` (H, W ≥ 32), output ``[B, num_classes]``. Conv layers
    are ``features.conv{i}`` (1-based), with ``bn{i}``, ``relu{i}``, pools ``pool{j}``.
    """

    def __init__(self, cfg: str = "vgg16", in_channels: int = 3, num_classes: int = 10,
                 batch_norm: bool = True, dropout: float = 0.5) -> None:
        super().__init__()
        layers: List[Tuple[str, nn.Module]] = []
        c, i, j = in_channels, 0, 0
        for v in VGG_CFGS[cfg]:
            if v == "M":
                j += 1
                layers.append((f"pool{j}", nn.MaxPool2d(2)))
            else:
                i += 1
                layers.append((f"conv{i}", nn.Conv2d(c, int(v), 3, padding=1,
                                                     bias=not batch_norm)))
                if batch_norm:
                    layers.append((f"bn{i}", nn.BatchNorm2d(int(v))))
                layers.append((f"relu{i}", nn.ReLU()))
                c = int(v)
        self.features = nn.Sequential(OrderedDict(layers))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(OrderedDict([
            ("flatten", nn.Flatten()),
            ("dropout1", nn.Dropout(dropout)),
            ("fc1", nn.Linear(512, 512)), ("relu1", nn.ReLU()),
            ("dropout2", nn.Dropout(dropout)),
            ("fc2", nn.Linear(512, 512)), ("relu2", nn.ReLU()),
            ("fc3", nn.Linear(512, num_classes)),
        ]))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))


class AlexNetCifar(nn.Module):
    """AlexNet for 32×32 inputs: five conv layers (64, 192, 384, 256, 256; 3×3, the first
    with stride 2), three 2×2 max-pools, classifier ``1024-1024-classes`` with dropout.

    Input ``[B, in_channels, H, W]`` (32×32: 32 → 16 → 8 → 4 → 2), output
    ``[B, num_classes]``.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, hidden: int = 1024,
                 dropout: float = 0.5, input_size: Union[int, Tuple[int, int]] = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(in_channels, 64, 3, stride=2, padding=1)), ("relu1", nn.ReLU()),
            ("pool1", nn.MaxPool2d(2)),
            ("conv2", nn.Conv2d(64, 192, 3, padding=1)), ("relu2", nn.ReLU()),
            ("pool2", nn.MaxPool2d(2)),
            ("conv3", nn.Conv2d(192, 384, 3, padding=1)), ("relu3", nn.ReLU()),
            ("conv4", nn.Conv2d(384, 256, 3, padding=1)), ("relu4", nn.ReLU()),
            ("conv5", nn.Conv2d(256, 256, 3, padding=1)), ("relu5", nn.ReLU()),
            ("pool3", nn.MaxPool2d(2)),
        ]))
        n = flat_features(self.features, in_channels, input_size)
        self.classifier = nn.Sequential(OrderedDict([
            ("flatten", nn.Flatten()),
            ("dropout1", nn.Dropout(dropout)),
            ("fc1", nn.Linear(n, hidden)), ("relu1", nn.ReLU()),
            ("dropout2", nn.Dropout(dropout)),
            ("fc2", nn.Linear(hidden, hidden)), ("relu2", nn.ReLU()),
            ("fc3", nn.Linear(hidden, num_classes)),
        ]))
        init_relu_net(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block: ``relu2(bn2(conv2(relu1(bn1(conv1(x))))) + shortcut(x))``.

    The shortcut is the identity, or ``1×1 conv (stride) + BN`` when the stride or the width
    changes. Two distinct ReLU modules (``relu1``, ``relu2``).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = nn.Sequential(OrderedDict([
                ("conv", nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)),
                ("bn", nn.BatchNorm2d(planes)),
            ]))
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """CIFAR-size ResNet: 3×3 stem (64, stride 1) + BN + ReLU, four stages of basic blocks
    (64, 128, 256, 512; strides 1, 2, 2, 2), adaptive average pool, linear classifier.

    Parameters
    ----------
    blocks : (int, int, int, int)
        ``(1, 1, 1, 1)`` is ResNet-10, ``(2, 2, 2, 2)`` ResNet-18.

    Input ``[B, in_channels, H, W]``, output ``[B, num_classes]``.
    """

    def __init__(self, blocks: Sequence[int] = (2, 2, 2, 2), in_channels: int = 3,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        in_planes = 64
        for i, (planes, n, stride) in enumerate(zip((64, 128, 256, 512), blocks, (1, 2, 2, 2))):
            stage = []
            for k in range(n):
                stage.append(BasicBlock(in_planes, planes, stride if k == 0 else 1))
                in_planes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.avgpool(x)))
