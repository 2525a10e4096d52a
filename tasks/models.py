"""Models. All are Opacus-compatible: GroupNorm instead of BatchNorm, no in-place tricks."""

from torch import nn


class MnistCNN(nn.Module):
    """Two conv blocks with GroupNorm; ~99.2% on MNIST trained centrally."""

    def __init__(self, num_classes: int = 10, channels: tuple[int, int] = (32, 64)) -> None:
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.GroupNorm(4, c1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.GroupNorm(4, c2), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c2 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, num_classes)
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def mlp(in_features: int, num_classes: int, hidden: tuple[int, ...] = (64,)) -> nn.Module:
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
