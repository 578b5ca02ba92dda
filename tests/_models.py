"""Small test models covering every supported construct (defined here, independent of the zoo)."""
from __future__ import annotations

import torch
from torch import nn


def fcn(d_in=784, h=500):
    return nn.Sequential(nn.Flatten(), nn.Linear(d_in, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10))


def simple_cnn(c=3, hw=16):
    # thesis Chapter 3: 3 conv x 10 filters, 2 pools, FC 64, 10 outputs
    return nn.Sequential(
        nn.Conv2d(c, 10, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(10, 10, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(10, 10, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(10 * (hw // 4) ** 2, 64), nn.ReLU(), nn.Linear(64, 10))


def lenet5(c=1):
    return nn.Sequential(
        nn.Conv2d(c, 6, 5, padding=2), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))


def small_vgg(c=3):
    return nn.Sequential(
        nn.Conv2d(c, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.5), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Dropout(), nn.Linear(32, 10))


def alexnet_like(c=3):
    # stride-4 stem, overlapping 3/2 max-pools, padded pool, irregular adaptive pool (3x3 -> 2x2); input 51x51
    return nn.Sequential(
        nn.Conv2d(c, 8, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(8, 12, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1),
        nn.Conv2d(12, 12, 3, padding=1, dilation=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d((2, 2)), nn.Flatten(), nn.Linear(12 * 4, 16), nn.ReLU(), nn.Linear(16, 5))


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.short(x)
        return self.relu(out)


class SmallResNet(nn.Module):
    def __init__(self, c=3, w=8, n_cls=10):
        super().__init__()
        self.conv1 = nn.Conv2d(c, w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU()
        self.layer1 = Block(w, w, 1)
        self.layer2 = Block(w, 2 * w, 2)
        self.depthwise = nn.Conv2d(2 * w, 2 * w, 3, 1, 2, dilation=2, groups=2 * w)
        self.lrelu = nn.LeakyReLU(0.1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * w, n_cls)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        x = self.lrelu(self.depthwise(x))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


class Mixed(nn.Module):
    """Inception-style block: branches with different receptive fields (1x1, 1x1 -> 3x3, 5x5,
    3x3/1 max-pool -> 1x1) joined along the channels by ``torch.cat``."""

    def __init__(self, cin):
        super().__init__()
        self.b1 = nn.Conv2d(cin, 3, 1)
        self.b2a = nn.Conv2d(cin, 3, 1)
        self.b2r = nn.ReLU()
        self.b2b = nn.Conv2d(3, 4, 3, padding=1)
        self.b3 = nn.Conv2d(cin, 2, 5, padding=2)
        self.b4p = nn.MaxPool2d(3, 1, 1)
        self.b4 = nn.Conv2d(cin, 2, 1)
        self.r1, self.r2, self.r3, self.r4 = nn.ReLU(), nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.out = nn.Identity()  # a module on the cat's output, so that the oracle can hook it

    def forward(self, x):
        return self.out(torch.cat([self.r1(self.b1(x)), self.r2(self.b2b(self.b2r(self.b2a(x)))),
                                   self.r3(self.b3(x)), self.r4(self.b4(self.b4p(x)))], 1))


class DenseLayer(nn.Module):
    """DenseNet-style layer: the input joined with new features (BN -> ReLU -> 3x3 conv)."""

    def __init__(self, cin, k):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(cin, k, 3, padding=1, bias=False)
        self.out = nn.Identity()

    def forward(self, x):
        return self.out(torch.cat([x, self.conv(self.relu(self.bn(x)))], 1))


class ConcatNet(nn.Module):
    """Channel concatenation (Inception / DenseNet), ceil-mode max-pool, global means (``.mean``
    with and without keepdim) and a concatenation of feature vectors."""

    def __init__(self, c=3):
        super().__init__()
        self.stem = nn.Conv2d(c, 6, 3, stride=2, padding=1)
        self.stem_relu = nn.ReLU()
        self.mixed = Mixed(6)                    # 11 channels
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.dense = DenseLayer(11, 4)           # 15 channels
        self.head = nn.Conv2d(15, 8, 1)
        self.head_relu = nn.ReLU()
        self.fc_a = nn.Linear(8, 6)
        self.fc_b = nn.Linear(15, 6)
        self.join = nn.Identity()
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.mixed(self.stem_relu(self.stem(x)))
        x = self.dense(self.pool(x))
        h = self.head_relu(self.head(x)).mean((2, 3))
        s = x.mean(dim=(-2, -1), keepdim=True).flatten(1)
        return self.fc(self.join(torch.cat([self.fc_a(h), self.fc_b(s)], 1)))


#: (leaf module, the activation that directly follows it) of ConcatNet, from its forward()
CONCAT_LEAVES = [("stem", "relu"), ("stem_relu", None), ("mixed.b1", "relu"), ("mixed.r1", None),
                 ("mixed.b2a", "relu"), ("mixed.b2r", None), ("mixed.b2b", "relu"), ("mixed.r2", None),
                 ("mixed.b3", "relu"), ("mixed.r3", None), ("mixed.b4p", None), ("mixed.b4", "relu"),
                 ("mixed.r4", None), ("mixed.out", None), ("pool", None), ("dense.bn", "relu"),
                 ("dense.relu", None), ("dense.conv", None), ("dense.out", None), ("head", "relu"),
                 ("head_relu", None), ("fc_a", None), ("fc_b", None), ("join", None), ("fc", None)]


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 1.5 + 0.25)
                    m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.4 - 0.2)
    return model


def make(name: str, dtype=torch.float64):
    """(model, input) pairs used across the oracle tests."""
    torch.manual_seed(0)
    if name == "fcn":
        m, x = fcn(), torch.rand(2, 1, 28, 28)
    elif name == "simple_cnn":
        m, x = simple_cnn(), torch.rand(2, 3, 16, 16)
    elif name == "lenet5":
        m, x = lenet5(), torch.rand(2, 1, 28, 28)
    elif name == "small_vgg":
        m, x = small_vgg(), torch.rand(2, 3, 16, 16)
    elif name == "alexnet_like":
        m, x = alexnet_like(), torch.rand(2, 3, 51, 51)
    elif name == "small_resnet":
        m, x = randomize_bn(SmallResNet()), torch.rand(2, 3, 12, 12)
    elif name == "concat_net":
        m, x = randomize_bn(ConcatNet()), torch.rand(2, 3, 13, 13)
    else:
        raise KeyError(name)
    return m.to(dtype).eval(), (x - 0.3).to(dtype)
