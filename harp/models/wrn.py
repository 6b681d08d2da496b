"""Wide ResNet (Zagoruyko & Komodakis) with pre-activation blocks, e.g. WRN-28-4."""

from torch import nn


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(act))))
        # the projection sees the pre-activated input, the identity the raw one
        return out + (x if self.shortcut is None else self.shortcut(act))


class WideResNet(nn.Module):
    def __init__(self, channels: int, classes: int, depth: int = 28, widen: int = 4) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(channels, widths[0], 3, 1, 1, bias=False)
        groups, cin = [], widths[0]
        for i, cout in enumerate(widths[1:]):
            stride = 1 if i == 0 else 2
            groups.append(nn.Sequential(*[PreActBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1)
                                          for j in range(n)]))
            cin = cout
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.conv1(x))))  # (N, 64*widen, H/4, W/4)
        return self.fc(self.flatten(self.pool(self.relu(self.bn(x)))))
