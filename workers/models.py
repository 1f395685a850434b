"""Models: any ``torchvision.models`` classification builder, by name, randomly initialised."""

from __future__ import annotations

from torch import nn


def build_model(arch: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """``torchvision.models.get_model(arch, weights=None, num_classes=...)``, with the first convolution
    replaced by a 1-channel one when ``in_channels == 1`` (greyscale data such as Fashion-MNIST)."""
    import torchvision

    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    if in_channels != 3:
        _replace_stem(model, in_channels)
    return model


def _replace_stem(model: nn.Module, in_channels: int) -> None:
    # The stem is the first Conv2d taking 3 channels, wherever the architecture keeps it
    # (resnet.conv1, mobilenet.features[0][0], vit.conv_proj, ...).
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.in_channels == 3:
                new = nn.Conv2d(
                    in_channels,
                    child.out_channels,
                    kernel_size=child.kernel_size,
                    stride=child.stride,
                    padding=child.padding,
                    dilation=child.dilation,
                    groups=1,
                    bias=child.bias is not None,
                    padding_mode=child.padding_mode,
                )
                setattr(parent, name, new)
                return
    raise ValueError(
        f"model.in_channels: found no 3-channel stem convolution to replace in {type(model).__name__}"
    )
