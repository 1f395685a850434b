"""A user's own model builder and dataset factory, as `model.builder` / `data.factory` import them."""

from __future__ import annotations

import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset


def tiny_net(num_classes: int, width: int = 8) -> nn.Module:
    """A 3-channel stem (so `in_channels: 1` swaps it), BatchNorm, and dropout (draws from the RNG)."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, num_classes),
    )


class _Residual(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        from torchvision.ops import StochasticDepth

        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
        self.drop_path = StochasticDepth(0.0, "row")  # built without: the stages set it

    def forward(self, x):
        return torch.relu(x + self.drop_path(self.body(x)))


def depth_net(num_classes: int, width: int = 8, blocks: int = 2) -> nn.Module:
    """``tiny_net`` with residual blocks under stochastic depth (torchvision's ``StochasticDepth``) and
    a dropout head: every rate ``regularization.dropout`` / ``drop_path`` set."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        *[_Residual(width) for _ in range(blocks)],
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.1),
        nn.Linear(width, num_classes),
    )


class Stripes(Dataset):
    """Greyscale PIL images of horizontal or vertical stripes at one of two frequencies (4 classes),
    plus per-index noise: deterministic in the index, as the data contract asks."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        label = index % 4
        g = torch.Generator().manual_seed(self.seed * 100_003 + index)
        freq = 2 if label < 2 else 4
        wave = (torch.arange(20) * freq * 3.1416 / 20).sin()
        image = wave.view(20, 1).expand(20, 20) if label % 2 else wave.view(1, 20).expand(20, 20)
        image = (image * 0.4 + 0.5 + 0.15 * torch.randn(20, 20, generator=g)).clamp(0, 1)
        return Image.fromarray((image * 255).to(torch.uint8).numpy()), label


def stripes(split: str, size: int = 64) -> Dataset:
    return Stripes(size if split == "train" else 32, seed=0 if split == "train" else 1)


def not_a_dataset(split: str):
    return 42


class _Explodes(nn.Module):
    """``tiny_net`` whose training forward raises on its ``after``-th call in each process: a bug in the
    training code that every attempt meets again."""

    def __init__(self, num_classes: int, after: int):
        super().__init__()
        self.net, self.after, self.calls = tiny_net(num_classes), after, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls >= self.after:
                raise RuntimeError(f"boom at training forward {self.calls}")
        return self.net(x)


def exploding_net(num_classes: int, after: int = 3) -> nn.Module:
    return _Explodes(num_classes, after)
