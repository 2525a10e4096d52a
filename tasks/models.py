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
        """Logits of a batch of (1, 28, 28) images."""
        return self.classifier(self.features(x))


class TanhCNN(nn.Module):
    """The small tanh CNN of Tramer & Boneh (2021) / Papernot et al. (2020) for DP-SGD on MNIST:
    ~26k parameters, bounded activations; learns well under per-sample clipping and noise."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 8, stride=2, padding=3), nn.Tanh(), nn.MaxPool2d(2, 1),
            nn.Conv2d(16, 32, 4, stride=2), nn.Tanh(), nn.MaxPool2d(2, 1),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 32), nn.Tanh(),
                                        nn.Linear(32, num_classes))

    def forward(self, x):
        """Logits of a batch of (1, 28, 28) images."""
        return self.classifier(self.features(x))


def mlp(in_features: int, num_classes: int, hidden: tuple[int, ...] = (64,)) -> nn.Module:
    """A ReLU MLP with the ``hidden`` widths."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
