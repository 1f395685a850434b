"""Data: sources (synthetic, Fashion-MNIST, image folders), per-stage transforms, and the sampler.

Which sample goes to which rank at which optimizer step is a pure function of
(seed, stage, step) -- see :class:`StageSampler` -- and so is every random crop and flip
(each sample's augmentation is seeded by (seed, stage, epoch, index)). That is what lets a run
resume mid-epoch, even on a different number of workers, with no repeated and no skipped samples.
"""

from __future__ import annotations

import gzip
import io
import math
import struct
from collections.abc import Iterator, Sequence

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from fsspec.implementations.local import LocalFileSystem
from torch.utils.data import Dataset, Sampler
from torchvision.transforms import v2

from service.sources import custom_dataset, fashion_mnist_files, image_folder_index
from service.spec import CustomData, DataSpec, FashionMNISTData, ImageFolderData, SyntheticData
from service.tiers import (
    FULL,
    capped_size,
    check_bad_images,
    needed_side,
    pick_tier,
    read_manifest,
    sample_index,
)
from workers.augment import (
    BOX_GRID,
    Draws,
    bad_image,
    centre_box,
    draw_crop,
    jpeg_decoder,
    jpeg_header,
    to_device,
)

MEAN, STD = 0.5, 0.25  # generic; BatchNorm absorbs the rest


def _mix(*values: int) -> int:
    """A deterministic 63-bit seed from integers (splitmix-style, stable across processes)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h ^= (v + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return h >> 1


# ---------------------------------------------------------------------------------------- sources


class SyntheticImages(Dataset):
    """Deterministic class-conditional images: a per-class low-frequency pattern plus per-sample noise,
    so a model can learn them (accuracy is a meaningful smoke signal) and every index is reproducible."""

    def __init__(self, size: int, num_classes: int, channels: int, seed: int, split: str, base: int = 32):
        self.size, self.num_classes, self.channels, self.base = size, num_classes, channels, base
        self.seed = _mix(seed, 0 if split == "train" else 1)
        g = torch.Generator().manual_seed(_mix(seed, 7))
        low = torch.rand(num_classes, channels, 4, 4, generator=g)
        self.prototypes = torch.nn.functional.interpolate(low, size=(base, base), mode="bilinear")

    def __len__(self) -> int:
        return self.size

    def label(self, index: int) -> int:
        return _mix(self.seed, index) % self.num_classes

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        y = self.label(index)
        g = torch.Generator().manual_seed(_mix(self.seed, index, 1))
        x = self.prototypes[y] + 0.35 * torch.randn(self.channels, self.base, self.base, generator=g)
        return (x.clamp(0, 1) * 255).to(torch.uint8), y


class IDXImages(Dataset):
    """Fashion-MNIST (or MNIST) from its gzipped IDX files, held in memory as uint8."""

    def __init__(self, root: str | None, split: str):
        images, labels = fashion_mnist_files(root, split)
        self.images = _read_idx(images)
        self.labels = _read_idx(labels).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].unsqueeze(0), int(self.labels[index])


def _read_idx(url: str) -> torch.Tensor:
    with fsspec.open(url, "rb") as f:
        data = gzip.decompress(f.read())
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return torch.frombuffer(bytearray(data[4 + 4 * ndim :]), dtype=torch.uint8).reshape(dims)


class ImageFolderImages(Dataset):
    """torchvision's ImageFolder layout (``root/<class>/<image>``) on a local folder or any fsspec URL.
    JPEGs are decoded in draft mode near the stage resolution, so low-resolution stages decode faster;
    with ``encoded`` set (``data.decode_on: device``) a JPEG is its bytes, for the device to decode."""

    def __init__(
        self, root: str, channels: int, tier: bool = False, decode_on: str = "host", skip_bad: bool = False
    ):
        fs, self.classes, self.samples = image_folder_index(root)
        self._reader(root, fs, channels, tier, decode_on, skip_bad)

    def _reader(self, root: str, fs, channels: int, tier: bool, decode_on: str, skip_bad: bool) -> None:
        """What a reader of an image folder holds, listed either way (``PreparedImages``: from its index)."""
        self.root, self.fs, self.tier, self.decode_on = root, fs, tier, decode_on  # tier: of `prepare`
        self.skip_bad = skip_bad  # data.on_bad_image: skip: an image that does not decode is None
        self.local = isinstance(fs, LocalFileSystem)
        self.mode = "L" if channels == 1 else "RGB"
        self.draft_size = None  # set per stage: decode JPEGs at >= this size
        self.encoded = False  # set per stage (decode_on: device, device crops): JPEGs as their bytes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.load(index, self.samples[index][0], self.draft_size)

    def path(self, index: int, tier: int = 0) -> str:
        """Sample ``index``'s file (``tier``: of a prepared folder, ``PreparedImages``)."""
        return self.samples[index][0]

    def label(self, index: int) -> int:
        return self.samples[index][1]

    def load(
        self, index: int, path: str, draft_size: int | None, size: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, int] | None:
        """Sample ``index`` read from ``path`` (its file in one of the folders that hold it): the image
        decoded at no less than ``draft_size`` px a side (JPEG draft mode), or its bytes (``encoded``); None
        if it does not decode and bad images are skipped. ``size``: the (width, height) the file must have
        (a prepared folder's index says it; checked from the header)."""
        if self.local:  # fsspec's cat_file costs ~10 us a call in path handling
            with open(path, "rb") as f:
                data = f.read()
        else:
            data = self.fs.cat_file(path)
        try:
            return self._decode(data, index, path, draft_size, size), self.label(index)
        except (OSError, ValueError, SyntaxError, RuntimeError) as e:  # not an image, truncated, corrupt
            problem = f"image {index} ({path}, {len(data)} bytes) cannot be decoded: {type(e).__name__}: {e}"
            if error := bad_image(problem, self.skip_bad):
                raise error from None
            return None

    def _decode(
        self, data: bytes, index: int, path: str, draft_size: int | None, size: tuple[int, int] | None
    ) -> torch.Tensor:
        header = jpeg_header(data)  # (height, width, components) of a JPEG, else None
        if header is not None:
            height, width, components = header
            _check_size(index, path, (width, height), size)
            if self.encoded:
                return torch.frombuffer(bytearray(data), dtype=torch.uint8)
            if self.mode == "RGB" and components == 3 and _draft_scale(width, height, draft_size) == 1:
                # nothing for draft mode to shrink: torchvision's libjpeg-turbo decode gives PIL's pixels,
                # ~1.5x faster (no PIL image, convert and copy; bench/tiers.py)
                decode_jpeg, modes = jpeg_decoder()
                return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=modes.RGB)
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            if header is None:  # a JPEG's size was checked from its header
                _check_size(index, path, img.size, size)
            if draft_size and img.format == "JPEG":
                img.draft(self.mode, (draft_size, draft_size))
            return v2.functional.pil_to_tensor(img.convert(self.mode))


def _check_size(index: int, path: str, got: tuple[int, int], want: tuple[int, int] | None) -> None:
    if want is not None and tuple(got) != tuple(want):
        raise PreparedFolderChanged(
            f"data: image {index} ({path}) is {got[0]}x{got[1]} px where the index of `stagetrain prepare` "
            f"says {want[0]}x{want[1]}: the folder changed after it was prepared; prepare it again"
        )


class PreparedFolderChanged(Exception):
    """A file of a prepared folder is not the size its index says: not a bad image, a stale index."""


class PreparedImages(ImageFolderImages):
    """A folder written by ``stagetrain prepare`` (``service.tiers``), listed from its samples index. Read
    by index (``source[i]``, host crops), a sample comes from the stage's tier, ``folder``, which covers
    every crop the stage can draw; with crops on the device, ``StageDataset`` draws each sample's box on
    the original's size first and reads the smallest tier that covers that box (``tier_for``)."""

    def __init__(self, root: str, manifest, folder: str, channels: int, decode_on: str, skip_bad: bool):
        fs, path = fsspec.core.url_to_fs(root)
        self._reader(root, fs, channels, folder != FULL, decode_on, skip_bad)
        self.base, self.folder, self.tiers = path.rstrip("/"), folder, manifest.tiers
        self.folder_tier = 0 if folder == FULL else int(folder)  # ``folder`` as ``path`` takes it
        self.index = sample_index(root, manifest)  # shared by every tier and stage of this folder
        self.source_url = manifest.source
        self.classes = manifest.classes
        self.samples = _PreparedSamples(self)

    def size(self, index: int) -> tuple[int, int]:
        """(width, height) of sample ``index``'s original."""
        return self.index.sizes[2 * index], self.index.sizes[2 * index + 1]

    def path(self, index: int, tier: int = 0) -> str:
        """Sample ``index``'s file in tier ``tier`` (px; 0: ``full/``, the originals)."""
        return f"{self.base}/{tier or FULL}/{self.index.relative[index]}"

    def label(self, index: int) -> int:
        return self.index.labels[index]

    def unreadable(self, index: int) -> None:
        """Sample ``index`` is an image ``prepare --on-bad-image skip`` found unreadable (size 0 x 0 in the
        index): the error naming it, or with ``data.on_bad_image: skip`` None (the loader leaves it out)."""
        problem = (
            f"image {index} ({self.source_url}/{self.index.relative[index]}) cannot be decoded: "
            f"{self.index.bad[index]} (found by `stagetrain prepare`, which copied it as it is)"
        )
        if error := bad_image(problem, self.skip_bad):
            raise error

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        width, height = self.size(index)
        if not width:
            return self.unreadable(index)
        tier = self.folder_tier
        size = capped_size(width, height, tier) if tier else (width, height)
        return self.load(index, self.path(index, tier), self.draft_size, size)

    def tier_for(
        self, index: int, width: int, height: int, box_h: int, box_w: int, resolution: int
    ) -> tuple[int, int, int]:
        """(tier, width, height) of sample ``index`` (a ``width`` x ``height`` original) in the smallest tier
        where its crop box (``box_h`` x ``box_w`` px of the original) is at least ``resolution`` px on each
        side; else the original's (tier 0: ``full/``). Up to the rounding of the tier's longer side
        (``capped_size``): the box is scaled by the shorter side's exact factor."""
        short, box = min(width, height), min(box_h, box_w)
        for t in self.tiers:
            if t >= short:  # the original's size: a byte copy of it (and so are larger tiers)
                break
            if box * t >= resolution * short:
                return (t, *capped_size(width, height, t))
        return 0, width, height


class _PreparedSamples(Sequence):
    """``PreparedImages.samples``: (path in the stage's folder, label) per sample, made when asked for
    (a list of them would hold every path once more)."""

    def __init__(self, images: PreparedImages):
        self.images = images

    def __len__(self) -> int:
        return len(self.images.index.labels)

    def __getitem__(self, index: int) -> tuple[str, int]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.images.path(index, self.images.folder_tier), self.images.label(index)


class CustomImages(Dataset):
    """A user's dataset (``data.kind: custom``) as uint8 CHW tensors with ``channels`` channels: PIL images
    are converted (``L`` or ``RGB``), tensors are checked."""

    def __init__(self, dataset, channels: int, factory: str):
        self.dataset, self.channels, self.factory = dataset, channels, factory
        self.mode = "L" if channels == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[index]
        if not isinstance(image, torch.Tensor):
            image = v2.functional.pil_to_tensor(image.convert(self.mode))
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != self.channels:
            raise ValueError(
                f"data.factory: {self.factory} item {index} is a {image.dtype} tensor of shape "
                f"{tuple(image.shape)}; expected uint8 (C, H, W) with C = model.in_channels = "
                f"{self.channels}, or a PIL image"
            )
        return image, int(label)


def open_source(
    data: DataSpec, channels: int, seed: int, split: str, resolution: int | None = None
) -> Dataset:
    """The split's images. ``resolution``: the stage's (train) or evaluation's, for a folder prepared by
    ``stagetrain prepare``: the smallest tier that covers it (``service.tiers``)."""
    if isinstance(data, SyntheticData):
        return SyntheticImages(
            data.size if split == "train" else data.val_size, data.num_classes, channels, seed, split
        )
    if isinstance(data, FashionMNISTData):
        if channels != 1:
            raise ValueError("model.in_channels: fashion_mnist images are greyscale, set in_channels: 1")
        return IDXImages(data.root, split)
    if isinstance(data, CustomData):
        return CustomImages(custom_dataset(data, split), channels, data.factory)
    assert isinstance(data, ImageFolderData)
    root = data.train if split == "train" else data.val
    if root is None:
        raise ValueError("data.val: no validation folder given")
    skip = data.on_bad_image == "skip"
    if resolution is None:
        return ImageFolderImages(root, channels, decode_on=data.decode_on, skip_bad=skip)
    manifest = read_manifest(root)
    if manifest is None:
        return ImageFolderImages(root, channels, decode_on=data.decode_on, skip_bad=skip)
    check_bad_images(manifest, skip)
    folder = pick_tier(manifest.tiers, resolution, data.crop_scale if split == "train" else None)
    return PreparedImages(root, manifest, folder, channels, data.decode_on, skip)


class InMemory:
    """A split held as one uint8 tensor (N, C, H, W) with its labels on the training device: a batch is
    an index gather there, with no loader processes and no per-sample decode (``data.device_cache_bytes``).
    Its pixels are the source's, item by item."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    @staticmethod
    def load(source: Dataset, device: torch.device, max_bytes: int) -> InMemory | None:
        """``source`` on ``device``, or None where it does not fit in ``max_bytes`` or is not one tensor:
        image folders (files of any size) and custom datasets whose images differ in shape."""
        if isinstance(source, IDXImages):
            images, labels = source.images.unsqueeze(1), source.labels
        elif isinstance(source, (SyntheticImages, CustomImages)) and len(source):
            first = source[0][0]
            if len(source) * first.numel() > max_bytes:
                return None
            images = torch.empty((len(source), *first.shape), dtype=torch.uint8)
            labels = torch.empty(len(source), dtype=torch.long)
            for i in range(len(source)):
                image, labels[i] = source[i]
                if image.shape != first.shape:
                    return None
                images[i] = image
        else:
            return None
        if images.numel() > max_bytes:
            return None
        return InMemory(images.to(device), labels.to(device))

    def gather(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) of the samples ``ids``, on the device."""
        ids = to_device(ids, self.labels.device)  # no host sync: see to_device
        return self.images.index_select(0, ids), self.labels.index_select(0, ids)


# ------------------------------------------------------------------------------------- per stage


class StageDataset(Dataset):
    """A source at one stage's resolution, as uint8 CHW. Train: random-resized-crop + horizontal flip (and the
    stage's RandAugment and random erasing, ``regularization``); eval:
    resize + center crop. Each sample's augmentation is seeded by (seed, stage, epoch, index). Batches go
    through :func:`to_input` on the training device."""

    def __init__(
        self,
        source: Dataset,
        resolution: int,
        train: bool,
        seed: int = 0,
        stage: int = 0,
        crop_scale: tuple[float, float] = (0.35, 1.0),
        hflip: bool = True,
        randaugment: tuple[int, int] | None = None,
        random_erasing: float = 0.0,
        augment_at: dict[int, tuple[tuple[int, int], float]] | None = None,
        on_device: bool = False,
    ):
        self.source, self.resolution, self.train = source, resolution, train
        self.seed, self.stage = seed, stage
        # on_device: items are (full image, label, crop params) for workers.augment.crop_resize
        self.on_device, self.crop_scale, self.hflip = on_device, crop_scale, hflip
        if on_device and (augment_at or (randaugment and randaugment[0]) or random_erasing):
            raise ValueError("RandAugment and random erasing run per sample on the host: on_device=False")
        self._draws = Draws()  # for the crop boxes (params)
        if isinstance(source, ImageFolderImages):
            # a tier holds just the detail every crop needs (service.tiers): decode it all
            source.draft_size = (
                needed_side(resolution, crop_scale if train else None) if source.tier else resolution
            )
            source.encoded = on_device and source.decode_on == "device"
        # regularization_ramp_steps: {sampler step: ((num_ops, magnitude), erasing p)} for the steps whose
        # samples get their own (the sampler then yields (id, epoch, step)); the others, the stage's
        self.augment_at = augment_at or {}
        self.stage_augment = (randaugment or (0, 0), random_erasing)
        ramps = bool(self.augment_at)
        self._randaugment = v2.RandAugment(*self.stage_augment[0])
        self._erasing = v2.RandomErasing(random_erasing, value=0)
        if train:
            self.transform = v2.Compose(
                [
                    v2.RandomResizedCrop(resolution, scale=crop_scale, antialias=True),
                    v2.RandomHorizontalFlip() if hflip else v2.Identity(),
                    # (num_ops, magnitude); seeded with the rest: same (seed, stage, epoch, index), same ops
                    self._randaugment if ramps or (randaugment and randaugment[0]) else v2.Identity(),
                    self._erasing if ramps or random_erasing else v2.Identity(),
                ]
            )
        else:
            self.transform = v2.Compose([v2.Resize(resolution, antialias=True), v2.CenterCrop(resolution)])

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int | tuple[int, ...]) -> tuple[torch.Tensor, int]:
        # StageSampler yields (id, epoch), or (id, epoch, step) for a stage that ramps its augmentation
        index, epoch, step = (key + (None,))[:3] if isinstance(key, tuple) else (key, 0, None)
        if self.on_device and isinstance(self.source, PreparedImages):
            return self._from_tier(index, epoch)
        item = self.source[index]
        if item is None:  # a bad image, skipped (data.on_bad_image: skip): left out by the collate
            return None
        image, label = item
        if self.on_device:  # an encoded JPEG (1-D): its size from its header
            size = jpeg_size(image) if image.ndim == 1 else image.shape[-2:]
            return image, label, (*self.params(index, epoch, *size), index, 0)
        if self.augment_at:
            (self._randaugment.num_ops, self._randaugment.magnitude), self._erasing.p = self.augment_at.get(
                step, self.stage_augment
            )
        if self.train:
            with torch.random.fork_rng(devices=[]):
                # The CPU generator only: torch.manual_seed also seeds every accelerator, and while CUDA
                # is uninitialised (DataLoader workers) it records a traceback for each, ~100-200 us.
                torch.default_generator.manual_seed(_mix(self.seed, self.stage, epoch, index))
                image = self.transform(image)
        else:
            image = self.transform(image)
        return image, label  # uint8: 4x less to collate, pin and copy; normalised on the device

    def _from_tier(self, index: int, epoch: int) -> tuple | None:
        """Sample ``index`` of a prepared folder, crops on the device: its box drawn on the original's
        size (the same box as reading the originals), read from the smallest tier that gives the box at
        least the stage's resolution on each side (``PreparedImages.tier_for``), decoded no smaller than
        that (draft mode: a large original), and the box scaled to what was decoded."""
        source = self.source
        width, height = source.size(index)
        if not width:
            return source.unreadable(index)
        top, left, h, w, flip = self.params(index, epoch, height, width)
        tier, tw, th = source.tier_for(index, width, height, h, w, self.resolution)
        draft = math.ceil(self.resolution * min(tw, th) / (min(h * th / height, w * tw / width)) - 1e-9)
        item = source.load(index, source.path(index, tier), draft, size=(tw, th))
        if item is None:
            return None
        image, label = item
        if image.ndim == 3 and tuple(image.shape[-2:]) != (th, tw):
            # shrunk by draft mode: libjpeg scales by 1/s exactly, the last partial block rounded up
            dh, dw = image.shape[-2:]
            s = next((s for s in (2, 4, 8) if (-(-th // s), -(-tw // s)) == (dh, dw)), None)
            th, tw = (th / s, tw / s) if s else (dh, dw)
        sy, sx = th / height, tw / width
        box = (round(v * BOX_GRID) / BOX_GRID for v in (top * sy, left * sx, h * sy, w * sx))
        return image, label, (*box, flip, index, tier)

    def params(self, index: int, epoch: int, height: int, width: int) -> tuple[int, int, int, int, int]:
        """Sample ``index``'s (top, left, height, width, flip) in its ``height`` x ``width`` image: the
        draws the host transform makes for the same key (train), the centred square (eval)."""
        if not self.train:
            return centre_box(height, width)
        key = _mix(self.seed, self.stage, epoch, index)
        return draw_crop(key, height, width, self.crop_scale, self.hflip, self._draws)


def _draft_scale(width: int, height: int, size: int | None) -> int:
    """The factor (1, 2, 4 or 8) by which ``img.draft(mode, (size, size))`` would shrink a ``width`` x
    ``height`` JPEG: PIL's rule, the largest that keeps both sides >= ``size``."""
    if not size:
        return 1
    fits = min(width // size, height // size)
    return next((s for s in (8, 4, 2) if fits >= s), 1)  # smaller than size: not shrunk


def collate_host(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The DataLoader's default collate, without the samples a loader skipped (None)."""
    batch = [b for b in batch if b is not None]
    if not batch:  # every one skipped: StageRunner says so
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long)
    return torch.utils.data.default_collate(batch)


def jpeg_size(data: torch.Tensor) -> tuple[int, int]:
    """(height, width) of the encoded JPEG ``data`` (1-D uint8), from its header."""
    header = jpeg_header(memoryview(data.numpy()))
    if header is None:
        raise ValueError("not a JPEG with a frame header")
    return header[:2]


def to_input(
    images: torch.Tensor,
    device: torch.device,
    channels_last: bool = False,
    mean_std: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """A uint8 batch from ``StageDataset`` as the model's float input, converted on ``device`` (the copy
    to a GPU moves bytes, not floats): ``(x / 255 - mean) / std`` (``normalize_tensors``)."""
    x = images.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mean, std = mean_std if mean_std is not None else (MEAN, STD)
    return (x.float() / 255 - mean) / std


def mix_batch(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    reg,
    seed: int,
    step: int,
    micro: int,
    rank: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or cutmix of one micro-batch on its device (``regularization``: ``reg`` is a
    ``service.spec.Regularization``): each image is mixed with its neighbour (the batch rolled by one, as
    torchvision's ``MixUp``/``CutMix``), targets become the matching mix of one-hot labels.

    Every draw (mix or not, which kind, lambda, the box) comes from a generator seeded by (seed, step,
    micro-batch, rank), never from the global RNG: the same keys mix the same way, so a resumed run mixes
    exactly as an uninterrupted one. Returns (images, soft targets as float probabilities)."""
    target = F.one_hot(y, num_classes).to(x.dtype)
    rng = np.random.default_rng(_mix(seed, step, micro, rank, 17))
    use_cutmix = reg.cutmix_alpha > 0 and (reg.mixup_alpha == 0 or rng.random() < reg.switch_prob)
    if not reg.mixes or rng.random() >= reg.mix_prob:
        return x, target
    other_x, other_t = x.roll(1, 0), target.roll(1, 0)
    if not use_cutmix:
        lam = float(rng.beta(reg.mixup_alpha, reg.mixup_alpha))
        return lam * x + (1 - lam) * other_x, lam * target + (1 - lam) * other_t
    lam = float(rng.beta(reg.cutmix_alpha, reg.cutmix_alpha))
    h, w = x.shape[-2:]
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    y0, y1, x0, x1 = max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)
    x = x.clone()
    x[..., y0:y1, x0:x1] = other_x[..., y0:y1, x0:x1]
    lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually kept
    return x, lam * target + (1 - lam) * other_t


def normalize_tensors(normalize, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``data.normalize`` (or the defaults) as (1, C, 1, 1) tensors on ``device``."""
    mean, std = (normalize.mean, normalize.std) if normalize is not None else ([MEAN], [STD])
    shape = (1, len(mean), 1, 1)
    return (
        torch.tensor(mean, dtype=torch.float32, device=device).view(shape),
        torch.tensor(std, dtype=torch.float32, device=device).view(shape),
    )


def stage_subset(dataset_size: int, subset_size: int, seed: int) -> torch.Tensor:
    """The first ``subset_size`` (= floor(f * N)) entries of one seeded permutation: later (larger)
    stages' subsets contain the earlier ones."""
    perm = torch.randperm(dataset_size, generator=torch.Generator().manual_seed(_mix(seed, 11)))
    return perm[:subset_size]


class StageSampler(Sampler[tuple[int, int]]):
    """The ``(sample id, epoch)`` pairs one rank reads for optimizer steps ``[first_step, last_step)``
    of a stage (steps counted from the stage's start).

    The stage's sample stream is its epochs' seeded permutations of the subset, each cut to
    ``epoch_samples``, end to end. Step k consumes stream positions ``[offset + k*G, offset + (k+1)*G)``
    (G = global batch), laid out as ``[grad_accum, world_size, micro_batch]``: rank r's micro-step a
    reads row (a, r). Ranks therefore see disjoint samples, and which samples a step reads depends on
    the step alone, so a resumed run -- even on another world size -- reads exactly the remaining ones."""

    def __init__(
        self,
        subset: torch.Tensor,
        seed: int,
        stage: int,
        epoch_samples: int,
        global_batch: int,
        micro_batch: int,
        world_size: int,
        rank: int,
        first_step: int,
        last_step: int,
        stream_offset: int = 0,
        with_step: bool = False,
    ):
        if micro_batch * world_size * (global_batch // (micro_batch * world_size)) != global_batch:
            raise ValueError(
                f"global batch {global_batch} is not micro_batch {micro_batch} x world {world_size} x accum"
            )
        self.subset, self.seed, self.stage, self.epoch_samples = subset, seed, stage, epoch_samples
        self.global_batch, self.micro_batch, self.world_size, self.rank = (
            global_batch,
            micro_batch,
            world_size,
            rank,
        )
        self.grad_accum = global_batch // (micro_batch * world_size)
        self.first_step, self.last_step, self.stream_offset = first_step, last_step, stream_offset
        self.with_step = with_step  # yield (id, epoch, step): StageDataset's augment_at
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(_mix(self.seed, self.stage, epoch, 13))
            self._perms = {
                epoch: self.subset[torch.randperm(len(self.subset), generator=g)]
            }  # keep one epoch
        return self._perms[epoch]

    def step_ids(self, step: int) -> list[list[tuple[int, int]]]:
        """This rank's (sample id, epoch) pairs for ``step``, one list per micro-batch."""
        start = self.stream_offset + step * self.global_batch
        pos = torch.arange(start, start + self.global_batch).view(
            self.grad_accum, self.world_size, self.micro_batch
        )
        out = []
        for row in pos[:, self.rank, :].tolist():
            out.append(
                [
                    (
                        int(self._perm(p // self.epoch_samples)[p % self.epoch_samples]),
                        p // self.epoch_samples,
                    )
                    for p in row
                ]
            )
        return out

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        for step in range(self.first_step, self.last_step):
            for micro in self.step_ids(step):
                yield from ((i, epoch, step) for i, epoch in micro) if self.with_step else micro

    def __len__(self) -> int:
        return (self.last_step - self.first_step) * self.grad_accum * self.micro_batch


def split_evenly(items: Sequence, world_size: int, rank: int) -> Sequence:
    """Rank ``rank``'s contiguous share of ``items`` (for evaluation; shares differ by at most one)."""
    per, extra = divmod(len(items), world_size)
    start = rank * per + min(rank, extra)
    return items[start : start + per + (rank < extra)]
