"""MobileNetV2 for small images: 3x3 stem at stride 1 and no early downsampling."""

from torch import nn

# (expansion t, output channels c, repeats n, first stride s); the CIFAR variant keeps
# stride 1 in the first two stages so a 32x32 input ends at 4x4.
CIFAR_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _conv_bn(cin: int, cout: int, k: int, stride: int, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [_conv_bn(cin, hidden, 1, 1)]
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden),  # depthwise
                   _conv_bn(hidden, cout, 1, 1, act=False)]  # linear bottleneck
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, channels: int, size: tuple[int, int], classes: int, settings=CIFAR_SETTINGS) -> None:
        super().__init__()
        layers = [_conv_bn(channels, 32, 3, 1)]
        cin, side = 32, min(size)
        for t, c, n, s in settings:
            for i in range(n):
                stride = s if i == 0 and side >= 2 else 1  # tiny inputs keep their last pixels
                layers.append(InvertedResidual(cin, c, stride, t))
                side = (side + stride - 1) // stride
                cin = c
        layers.append(_conv_bn(cin, 1280, 1, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(1280, classes)

    def forward(self, x):
        return self.fc(self.dropout(self.flatten(self.pool(self.features(x)))))
