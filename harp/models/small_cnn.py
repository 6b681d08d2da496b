"""A small CNN sized for digits (8x8) and MNIST (28x28): three conv-BN-ReLU-pool stages, two linear layers.

Pooling after every conv keeps MNIST adversarial training affordable on two CPU cores
(about 8 M multiply-adds per image) while the first conv still sees full resolution.
BatchNorm after each pruned layer keeps activations at scale when learned masks
leave only 1% of a layer's weights (the exporter folds it away).
"""

from torch import nn


def _conv_block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.MaxPool2d(2)]


class SmallCNN(nn.Module):
    def __init__(self, channels: int, size: tuple[int, int], classes: int, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv_block(channels, w),  # (N, w, H/2, W/2)
            *_conv_block(w, 2 * w),  # (N, 2w, H/4, W/4)
            *_conv_block(2 * w, 4 * w),  # (N, 4w, H/8, W/8)
        )
        flat = 4 * w * (size[0] // 8) * (size[1] // 8)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, 8 * w, bias=False), nn.BatchNorm1d(8 * w), nn.ReLU(inplace=True),
            nn.Linear(8 * w, classes),
        )

    def forward(self, x):  # (N, C, H, W) normalised
        return self.classifier(self.features(x))
