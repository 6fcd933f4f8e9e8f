"""The BU backbones of the larger experiments (paper §4.2): VGG-11 for CLEVR, VGG-7 for CELEB-A and
ResNet-18 for CUB-200, written as a sequence of *stages*.

A stage ends where the resolution drops. Its output is where the paper puts the lateral connections ("at the
end of each stage", §3): BU1->TD additive laterals read stage outputs, and TD->BU2 multiplicative laterals
(and the task vectors of ch-mod / task routing, at the same places, §4.3) multiply them. Every backbone has

- ``stages`` (ModuleList), ``channels`` (output channels per stage), ``stride`` (input size / top size);
- ``taps(x, gates)``: the list of stage outputs, stage k multiplied by ``gates[k]`` when given;
- ``head``: ``features(z) -> [B, F]`` then ``out`` (Linear F -> classes); ``make_head()`` builds a fresh one;
- ``top_down_stage(k)``: a new TD module mapping the TD tensor at stage k's size (channels C_k, already
  resized to stage k-1's size) to C_{k-1} channels: the TD replica of BU stage k (§3, "Top-down stream").

``last_conv(stages)`` finds the last convolution of a trunk (GradNorm's shared layer).

``width`` multiplies every channel and hidden size (tests run at width 1/8); ``input_size`` must be a multiple
of ``stride``. Convolutions use the authors' initialisation (normal, std sqrt(2 / (k^2 C_out))), the VGG
classifiers theirs (normal, std 0.01, zero bias).
"""
import math

import torch.nn as nn
import torch.nn.functional as F


def scaled(channels, width):
    return max(1, int(round(channels * width)))


def last_conv(module):
    """The last ``nn.Conv2d`` of ``module`` in registration order (the last conv of a trunk)."""
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)][-1]


def normal_(tensor, std):
    """``nn.init.normal_(tensor, 0, std)``, skipped on the meta device (models built there only to count their
    parameters: no values to draw, and torch would load its compiler for it, seconds per process)."""
    if not tensor.is_meta:
        nn.init.normal_(tensor, 0.0, std)


def init_convs(module):
    """The authors' initialisation of every conv (He, fan-out) and batch norm in ``module``."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            normal_(m.weight, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Backbone(nn.Module):
    def __init__(self, stages, channels, stride, input_size):
        super().__init__()
        if input_size % stride:
            raise ValueError(f"input size {input_size} must be a multiple of the backbone stride {stride}")
        self.stages = nn.ModuleList(stages)
        self.channels, self.stride, self.input_size = tuple(channels), stride, input_size
        init_convs(self)
        self.head = self.make_head()

    def taps(self, x, gates=None):
        outputs = []
        for k, stage in enumerate(self.stages):
            x = stage(x)
            if gates is not None and k in gates:
                x = x * gates[k]
            outputs.append(x)
        return outputs

    def forward(self, x, gates=None):
        return self.head(self.taps(x, gates)[-1])


# ------------------------------------------------------------------------------------------------
# VGG
# ------------------------------------------------------------------------------------------------

class VGGStage(nn.Module):
    """3x3 convs (padding 1) with a ReLU between two convs, then 2x2 max-pooling. ``relu_in``: a ReLU before
    the first conv (the previous stage ended without one); ``relu_out``: a ReLU after the pooling."""

    def __init__(self, channels, relu_in, relu_out=False):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(channels[:-1], channels[1:]))
        self.relu_in, self.relu_out = relu_in, relu_out

    def forward(self, x):
        for i, conv in enumerate(self.convs):
            x = conv(F.relu(x) if i or self.relu_in else x)
        x = F.max_pool2d(x, 2)
        return F.relu(x) if self.relu_out else x


class VGGHead(nn.Module):
    """[ReLU] [adaptive average pool] flatten, then Linear-ReLU[-Dropout] per hidden size, then ``out``."""

    def __init__(self, in_features, hidden, num_classes, relu_in=False, pool=None, dropout=0.0):
        super().__init__()
        layers = ([nn.ReLU()] if relu_in else []) + ([nn.AdaptiveAvgPool2d(pool)] if pool else []) + [nn.Flatten()]
        for size in hidden:
            layers += [nn.Linear(in_features, size), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
            in_features = size
        self.features = nn.Sequential(*layers)
        self.out = nn.Linear(in_features, num_classes)
        self.num_features = in_features
        for m in self.modules():
            if isinstance(m, nn.Linear):
                normal_(m.weight, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, z):
        return self.out(self.features(z))


class VGG(Backbone):
    """Stages of ``VGGStage``; the TD replica of stage k is conv(C_k -> M) - ReLU - conv(M -> C_{k-1}) with
    M = max(C_k, C_{k-1}): the stage's convs in reverse order, exactly the authors' CLEVR TD layers."""

    def __init__(self, stages, stride, input_size, head_options):
        self.head_options = head_options
        super().__init__(stages, [s.convs[-1].out_channels for s in stages], stride, input_size)

    def make_head(self):
        return VGGHead(**self.head_options)

    def top_down_stage(self, k):
        c_in, c_out = self.channels[k], self.channels[k - 1]
        middle = max(c_in, c_out)
        module = nn.Sequential(nn.Conv2d(c_in, middle, 3, padding=1), nn.ReLU(), nn.Conv2d(middle, c_out, 3, padding=1))
        init_convs(module)
        return module


def vgg11_clevr(num_classes=8, width=1.0, input_size=224):
    """The authors' CLEVR backbone (``BUTD_comp_CLEVR_vgg``): VGG-11's eight 3x3 convs 64, M, 128, M, 256, 256, M,
    512, 512, M, 512, 128, M (the last conv narrowed to 128), the stem ReLU'd, later stages ending before their
    ReLU; classifier: average pool to 7x7, FC 128*49 -> 1024 -> 1024 -> classes with dropout 0.5, and no ReLU
    before it (as released). 8 classes: the largest CLEVR attribute (colour). Below 224 px the top map is smaller
    than 7x7 and the pooling keeps its size (our choice for reduced inputs: a 7x7 pool would only repeat values,
    e.g. 2x2 at 64 px, and multiply the first FC layer by 49/4)."""
    c = [scaled(v, width) for v in (64, 128, 256, 512, 128)]
    side = min(7, input_size // 32)
    stages = [VGGStage([3, c[0]], relu_in=False, relu_out=True),
              VGGStage([c[0], c[1]], relu_in=False),
              VGGStage([c[1], c[2], c[2]], relu_in=True),
              VGGStage([c[2], c[3], c[3]], relu_in=True),
              VGGStage([c[3], c[3], c[4]], relu_in=True)]
    hidden = scaled(1024, width)
    head = dict(in_features=c[4] * side * side, hidden=(hidden, hidden), num_classes=num_classes, pool=(side, side),
                dropout=0.5)
    return VGG(stages, 32, input_size, head)


def vgg7(num_classes=2, width=1.0, input_size=64):
    """VGG-7 (6 convs + 2 FC, the common CIFAR 'VGG-7'): 2x128, M, 2x256, M, 2x512, M, FC 1024, FC classes."""
    c = [scaled(v, width) for v in (128, 256, 512)]
    stages = [VGGStage([3, c[0], c[0]], relu_in=False),
              VGGStage([c[0], c[1], c[1]], relu_in=True),
              VGGStage([c[1], c[2], c[2]], relu_in=True)]
    top = input_size // 8
    head = dict(in_features=c[2] * top * top, hidden=(scaled(1024, width),), num_classes=num_classes, relu_in=True)
    return VGG(stages, 8, input_size, head)


# ------------------------------------------------------------------------------------------------
# ResNet
# ------------------------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the shortcut (1x1 conv + BN when the shape changes), then ReLU unless
    ``relu_out`` is False (the TD blocks' last one, so that TD outputs can be negative as in the VGG TD)."""

    def __init__(self, c_in, c_out, stride=1, relu_out=True):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
        self.relu_out = relu_out

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.shortcut(x)
        return F.relu(out) if self.relu_out else out


class ResNetHead(nn.Module):
    def __init__(self, in_features, num_classes):
        super().__init__()
        self.features = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out = nn.Linear(in_features, num_classes)
        self.num_features = in_features

    def forward(self, z):
        return self.out(self.features(z))


class ResNet(Backbone):
    """ResNet-18 in five stages: the stem (7x7/2 conv, BN, ReLU, 3x3/2 max-pool) and layer1..layer4 (two basic
    blocks each, the first of layer2..4 with stride 2); head: global average pool, FC. BU1 and BU2 share the
    batch-norm layers with everything else. TD replica of stage k: two basic blocks C_k -> C_{k-1} ->
    C_{k-1}, the last without its final ReLU."""

    def __init__(self, num_classes, width, input_size):
        c = [scaled(v, width) for v in (64, 64, 128, 256, 512)]
        stem = nn.Sequential(nn.Conv2d(3, c[0], 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(c[0]), nn.ReLU(),
                             nn.MaxPool2d(3, stride=2, padding=1))
        layers = [nn.Sequential(BasicBlock(c[k - 1], c[k], 1 if k == 1 else 2), BasicBlock(c[k], c[k]))
                  for k in range(1, 5)]
        self.num_classes = num_classes
        super().__init__([stem] + layers, c, 32, input_size)

    def make_head(self):
        return ResNetHead(self.channels[-1], self.num_classes)

    def top_down_stage(self, k):
        c_in, c_out = self.channels[k], self.channels[k - 1]
        module = nn.Sequential(BasicBlock(c_in, c_out), BasicBlock(c_out, c_out, relu_out=False))
        init_convs(module)
        return module


def resnet18(num_classes=15, width=1.0, input_size=224):
    """ResNet-18 (He et al. 2016), written out; 15 classes: the colours of a CUB part."""
    return ResNet(num_classes, width, input_size)


BACKBONES = {"vgg11_clevr": vgg11_clevr, "vgg7": vgg7, "resnet18": resnet18}


def build_backbone(name, num_classes=None, width=1.0, input_size=None):
    """A backbone by name; ``num_classes`` and ``input_size`` default to the paper's data set for it."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)}")
    options = {"width": width}
    if num_classes is not None:
        options["num_classes"] = num_classes
    if input_size is not None:
        options["input_size"] = input_size
    return BACKBONES[name](**options)
