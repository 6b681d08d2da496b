"""CIFAR-style VGG16 with BatchNorm: 13 3x3 conv layers, then a two-layer classifier."""

from torch import nn

VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    def __init__(self, channels: int, size: tuple[int, int], classes: int, cfg=VGG16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c, h, w = channels, *size
        for item in cfg:
            if item == "M":
                if min(h, w) >= 2:  # small inputs (8x8 digits) skip the pools they cannot afford
                    layers.append(nn.MaxPool2d(2))
                    h, w = h // 2, w // 2
            else:
                layers += [nn.Conv2d(c, item, 3, padding=1, bias=False), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
                c = item
        self.features = nn.Sequential(*layers)  # (N, 512, h, w)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c * h * w, 512), nn.ReLU(inplace=True),
            nn.Linear(512, classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))
