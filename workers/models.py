"""Models: a ``torchvision.models`` classification builder by name, a timm model (``timm/<name>``), or
your own builder (``model.builder: package.module:function``), randomly initialised.

A builder is called as ``function(num_classes=N, **model.kwargs)`` in every worker and returns an
``nn.Module`` that maps an image batch ``(B, 3, H, W)`` to logits ``(B, N)`` at any resolution the
stages use. With ``model.in_channels: 1`` its first 3-channel convolution is replaced by a 1-channel
one, as for torchvision's models.
"""

from __future__ import annotations

from torch import nn


def build_model(spec) -> nn.Module:
    """The model of a ``ModelSpec``: ``torchvision.models.get_model(arch, weights=None, ...)`` or the
    user's builder, with the stem made ``in_channels`` wide."""
    if spec.builder:
        from service.sources import resolve_callable

        model = resolve_callable(spec.builder, "model.builder")(num_classes=spec.num_classes, **spec.kwargs)
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model.builder: {spec.builder} returned {type(model).__name__}, not an nn.Module"
            )
    elif spec.arch.startswith("timm/"):
        return _timm_model(spec)
    else:
        import torchvision

        model = torchvision.models.get_model(
            spec.arch, weights=None, num_classes=spec.num_classes, **spec.kwargs
        )
    if spec.in_channels != 3:
        _replace_stem(model, spec.in_channels, spec.label)
    return model


def set_stage_rates(model: nn.Module, dropout: float | None, drop_path: float | None, label: str) -> None:
    """A stage's dropout and stochastic-depth rates (``regularization.dropout`` / ``drop_path``), set in
    place: no parameter changes, so the optimizer state carries over. ``dropout``: ``p`` of every
    ``nn.Dropout*``. ``drop_path``: the deepest block's rate; each torchvision ``StochasticDepth`` / timm
    ``DropPath`` keeps its share of the schedule the model was built with (``rate_i = drop_path *
    built_i / max(built)``), or grows linearly with depth where it was built with rate 0. None leaves
    the model's own rates. A rate the model has no layers for is an error naming the field (``label``:
    the model, for the message)."""
    if dropout is not None:
        layers = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
        if not layers:
            raise ValueError(f"regularization.dropout: {label} has no dropout layers (nn.Dropout)")
        for m in layers:
            m.p = dropout
    if drop_path is not None:
        layers = [m for m in model.modules() if _drop_path_attr(m)]
        if not layers:
            raise ValueError(
                f"regularization.drop_path: {label} has no stochastic-depth layers (torchvision "
                "StochasticDepth, timm DropPath; timm models build them with model.kwargs.drop_path_rate > 0)"
            )
        for m in layers:  # the rate the model was built with, kept across stages
            if not hasattr(m, "_stagetrain_built_rate"):
                m._stagetrain_built_rate = float(getattr(m, _drop_path_attr(m)))
        built = [m._stagetrain_built_rate for m in layers]
        shares = (
            [b / max(built) for b in built]
            if max(built) > 0
            else [(i + 1) / len(built) for i in range(len(built))]
        )
        for m, share in zip(layers, shares, strict=True):
            setattr(m, _drop_path_attr(m), drop_path * share)


def _drop_path_attr(module: nn.Module) -> str | None:
    """The attribute holding a stochastic-depth layer's rate: torchvision ``StochasticDepth.p``, timm
    ``DropPath.drop_prob``; None for any other module."""
    name = type(module).__name__
    if name == "StochasticDepth" and hasattr(module, "p"):
        return "p"
    if name == "DropPath" and hasattr(module, "drop_prob"):
        return "drop_prob"
    return None


def _timm_model(spec) -> nn.Module:
    """``timm.create_model`` (random init); timm builds the stem for ``in_chans`` itself."""
    import difflib

    import timm

    name = spec.arch.removeprefix("timm/")
    if not timm.is_model(name):
        hint = difflib.get_close_matches(name, timm.list_models(), n=1)
        raise ValueError(
            f"model.arch: unknown timm model {name!r}"
            + (f"; did you mean 'timm/{hint[0]}'?" if hint else "; see timm.list_models()")
        )
    return timm.create_model(
        name, pretrained=False, num_classes=spec.num_classes, in_chans=spec.in_channels, **spec.kwargs
    )


def _replace_stem(model: nn.Module, in_channels: int, label: str) -> None:
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
        f"model.in_channels: {in_channels} needs a 3-channel stem convolution to replace, and {label} "
        f"({type(model).__name__}) has none; build the model with {in_channels} input channels yourself "
        "and set in_channels: 3"
    )


def small_resnet(
    num_classes: int, widths: tuple[int, ...] = (16, 32, 64), blocks: tuple[int, ...] = (1, 1, 1)
) -> nn.Module:
    """A CIFAR-style ResNet from torchvision's ``BasicBlock``: a 3x3 stem without pooling, then one group
    of blocks per width, each group after the first halving the resolution. Made for small images
    (16-64 px), where ImageNet models' 32x downsampling leaves 1x1 feature maps. ``model.builder:
    workers.models:small_resnet``; widths (16, 32, 64) with one block each has 78k parameters."""
    from torchvision.models.resnet import BasicBlock

    stem = nn.Sequential(
        nn.Conv2d(3, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
    )
    layers, cin = [], widths[0]
    for group, (width, count) in enumerate(zip(widths, blocks, strict=True)):
        for k in range(count):
            stride = 2 if group > 0 and k == 0 else 1
            down = None
            if stride != 1 or cin != width:
                down = nn.Sequential(nn.Conv2d(cin, width, 1, stride, bias=False), nn.BatchNorm2d(width))
            layers.append(BasicBlock(cin, width, stride, down))
            cin = width
    return nn.Sequential(stem, *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))


class InputNormalize(nn.Module):
    """``(x - mean) / std`` per channel: images as float in [0, 1] (torchvision's ``ToTensor``) in, the
    model's trained input out."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", _channels(mean))
        self.register_buffer("std", _channels(std))

    def forward(self, x):
        return (x - self.mean) / self.std


def _channels(values: list[float]):
    import torch

    return torch.tensor(values, dtype=torch.float32).view(1, len(values), 1, 1)


DEFAULT_NORMALIZE = {"mean": [0.5], "std": [0.25]}  # exports written before data.normalize existed


def load_exported(path: str, normalized_input: bool = False) -> nn.Module:
    """The module of a ``stagetrain export`` file (a local path or an fsspec URL, e.g. the default
    ``<storage>/<job>/export/<checkpoint>.pt``), weights loaded (weights-only unpickling). The input
    normalisation it was trained with is ``model.input_normalization`` (``{"mean": [...], "std": [...]}``
    on pixels scaled to [0, 1]); with ``normalized_input=True`` it is applied first: the returned module
    takes images as float in [0, 1]."""
    import io

    import fsspec
    import torch

    from service.spec import ModelSpec

    with fsspec.open(path, "rb") as f:
        saved = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    if saved.get("format") != "stagetrain-export/1":
        raise ValueError(f"{path}: not a stagetrain export (format {saved.get('format')!r})")
    model = build_model(ModelSpec.model_validate(saved["model"]))
    model.load_state_dict(saved["state_dict"])
    normalize = saved.get("normalize") or DEFAULT_NORMALIZE
    model.input_normalization = normalize
    if normalized_input:
        wrapped = nn.Sequential(InputNormalize(normalize["mean"], normalize["std"]), model)
        wrapped.input_normalization = normalize
        return wrapped
    return model
