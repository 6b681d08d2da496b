"""A small CNN sized for digits (8x8) and MNIST (28x28): three conv-ReLU-pool stages, two linear layers.

Pooling after every conv keeps MNIST adversarial training affordable on two CPU cores
(about 8 M multiply-adds per image) while the first conv still sees full resolution.
"""

from torch import nn


class SmallCNN(nn.Module):
    def __init__(self, channels: int, size: tuple[int, int], classes: int, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(channels, w, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # (N, w, H/2, W/2)
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # (N, 2w, H/4, W/4)
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # (N, 4w, H/8, W/8)
        )
        flat = 4 * w * (size[0] // 8) * (size[1] // 8)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, 8 * w), nn.ReLU(inplace=True),
            nn.Linear(8 * w, classes),
        )

    def forward(self, x):  # (N, C, H, W) normalised
        return self.classifier(self.features(x))
