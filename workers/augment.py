"""Random-resized-crop and flip as batched operations on the training device.

The per-sample draws stay where they were: each sample's crop box and flip come from a generator seeded
by (seed, stage, epoch, index), with torchvision's own algorithm (``v2.RandomResizedCrop.make_params``,
then ``RandomHorizontalFlip``'s one draw), so which pixels a sample becomes is a function of its key,
and a resumed run crops exactly as an uninterrupted one. What moves is the pixel work: the loader hands
over uint8 images cut to their boxes (``crop_to_box``) and packed into one canvas (``pack``), the
in-memory gather (``workers.data.InMemory``) whole images, each with its box, and one
``torchvision.ops.roi_align`` over the batch crops and resizes them all on the device, at the
resolution of the step (a resolution ramp needs no second resize). With ``sampling_ratio=-1`` each
output pixel averages ceil(box / size) samples per axis: an area filter when shrinking, bilinear when
enlarging, within ~1.3/255 mean absolute difference of ``resized_crop(antialias=True)`` on photos
(``tests/test_augment.py``), apart from the box's edge pixels, which see their neighbours outside the box.

Evaluation is the same operation with the centred square of the image (resize + centre crop).
"""

from __future__ import annotations

import math
import sys

import torch
from torchvision.ops import roi_align

from service.tiers import RATIO  # RandomResizedCrop's default aspect-ratio range

# as torchvision computes it: float32 logs, a float32 exp (float64 math moves ~1 box in 10^5 by a pixel)
_LOG_RATIO = torch.log(torch.tensor(RATIO)).tolist()  # float32 values, as Python floats
# params: (top, left, height, width, flip, sample index, tier) per sample, one float64 row each (exact
# indices); tier: the px of the tier of a prepared folder the image was read from (0: the folder itself)
PARAMS = 7
PARAMS_DTYPE = torch.float64
# A box that is not in whole pixels (scaled to a prepared folder's tier) is rounded to 1/BOX_GRID px: then
# its edges, moved by whole pixels into a crop and a canvas (up to 2**16 px), and its width stay exact in
# float32, so ``roi_align`` takes as many samples per output pixel wherever the box is (a width of
# 6.0000005 where 6.0 was meant takes 3 samples a pixel, not 2, at 3 px: up to ~8/255 apart).
BOX_GRID = 256


class Draws:
    """A generator and the one-element tensors ``draw_crop`` draws into, reused: a fresh tensor per draw
    (``torch.empty(1).uniform_``, as torchvision writes it) is most of a draw's cost; the values are the
    same, the generator's stream being consumed alike."""

    def __init__(self):
        self.g = torch.Generator()
        self.real, self.int = torch.empty(1), torch.empty(1, dtype=torch.int64)


def draw_crop(
    key: int, height: int, width: int, scale: tuple[float, float], hflip: bool, draws: Draws
) -> tuple[int, int, int, int, int]:
    """(top, left, height, width, flip) of one sample: the draws ``v2.RandomResizedCrop(size, scale)``
    followed by ``v2.RandomHorizontalFlip()`` make under ``torch.manual_seed(key)``, in the same order,
    from ``draws.g`` (reseeded here: no global RNG state is touched)."""
    g, real, integer = draws.g, draws.real, draws.int
    g.manual_seed(key)
    area = height * width
    for _ in range(10):
        target_area = area * real.uniform_(scale[0], scale[1], generator=g).item()
        aspect = real.uniform_(_LOG_RATIO[0], _LOG_RATIO[1], generator=g).exp_().item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(integer.random_(0, height - h + 1, generator=g).item())  # torch.randint's draw
            left = int(integer.random_(0, width - w + 1, generator=g).item())
            break
    else:  # torchvision's fallback: the central crop, clamped to the ratio range
        in_ratio = width / height
        if in_ratio < RATIO[0]:
            w, h = width, int(round(width / RATIO[0]))
        elif in_ratio > RATIO[1]:
            h, w = height, int(round(height * RATIO[1]))
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    # RandomHorizontalFlip (a _RandomApplyTransform, p=0.5): flipped unless rand(1) >= p
    flip = int(hflip and real.uniform_(0, 1, generator=g).item() < 0.5)  # torch.rand(1)'s draw
    return top, left, h, w, flip


def centre_box(height: int, width: int) -> tuple[int, int, int, int, int]:
    """Evaluation's crop: the centred square of the shorter side (resize to the resolution, then centre
    crop, in one resize), no flip."""
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side, 0


def collate(batch: list[tuple[torch.Tensor, int, tuple]]) -> tuple:
    """DataLoader ``collate_fn`` for (image, label, params) samples: uint8 CHW images cut to their boxes
    (``crop_to_box``) and packed into one canvas (``pack``), the boxes moved with them; a batch holding
    encoded JPEGs (1-D byte tensors, ``data.decode_on: device``) is packed by ``pack_encoded``, for
    ``decode_batch`` on the device."""
    batch = [b for b in batch if b is not None]  # None: skipped by the loader (data.on_bad_image: skip)
    if not batch:
        empty = torch.empty(0, PARAMS, dtype=PARAMS_DTYPE)
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long), empty
    labels = torch.tensor([b[1] for b in batch])
    if any(b[0].ndim == 1 for b in batch):  # encoded JPEGs: the boxes are in the images they will be
        params = torch.tensor([b[2] for b in batch], dtype=PARAMS_DTYPE)
        return pack_encoded([b[0] for b in batch]), labels, params
    crops, boxes, edges = zip(*(crop_to_box(b[0], b[2]) for b in batch), strict=True)
    canvas, places = pack(list(crops), list(edges))
    params = [(top + y, left + x, *rest) for (top, left, *rest), (y, x) in zip(boxes, places, strict=True)]
    return canvas, labels, torch.tensor(params, dtype=PARAMS_DTYPE)


def crop_to_box(image: torch.Tensor, params: tuple) -> tuple[torch.Tensor, tuple, tuple]:
    """The part of a CHW ``image`` that ``crop_resize`` reads for the box ``params`` (top, left, height,
    width, ...): the box and one pixel around it, within the image (a view); the box moved into it; and
    the sides (top, bottom, left, right) where the image ends before that pixel. ``roi_align``
    (``aligned=True``) samples inside the box and interpolates with the next pixel at most, and clamps at
    an image's edge: ``pack`` repeats the edge there, so a box reads the same values with a loader's batch
    holding crops instead of whole images (up to float rounding, < 0.1/255: boxes are whole pixels or on
    the ``BOX_GRID``, so the moved box is exact)."""
    top, left, h, w = params[:4]
    height, width = image.shape[-2:]
    r0, c0 = math.floor(top) - 1, math.floor(left) - 1
    r1, c1 = math.ceil(top + h) + 1, math.ceil(left + w) + 1
    edges = (r0 < 0, r1 > height, c0 < 0, c1 > width)
    r0, c0, r1, c1 = max(0, r0), max(0, c0), min(height, r1), min(width, c1)
    return image[:, r0:r1, c0:c1], (top - r0, left - c0, *params[2:]), edges


def pack(images: list[torch.Tensor], edges: list[tuple] | None = None) -> tuple[torch.Tensor, list[tuple]]:
    """CHW images as one (1, C, H, W) canvas, and where each one's top-left pixel is in it. Shelves of the
    tallest first, about as wide as the canvas is high: ~1.1x the images' pixels, where padding each to
    the largest (``pad_stack``) took 1.8x (128 px) to 2.5x (224 px) at the default crop scale. Each image
    has a slot one pixel larger on every side; on its ``edges`` (top, bottom, left, right; default all)
    the image's own edge is repeated there, as ``roi_align`` would clamp at it alone. Pixels that no box
    reads (the others, between slots) are left unset. Stored channels-last (H, W, C), as decoders write
    images: each row of an image is one contiguous copy. ``crop_resize`` reads a canvas's boxes from its
    one image."""
    c, n = images[0].shape[0], len(images)
    slots = [(im.shape[1] + 2, im.shape[2] + 2) for im in images]
    width = max(max(w for _, w in slots), math.isqrt(sum(h * w for h, w in slots)))
    places: list[tuple[int, int]] = [(0, 0)] * n
    x = y = shelf = 0
    for k in sorted(range(n), key=lambda k: -slots[k][0]):
        h, w = slots[k]
        if x + w > width:  # the next shelf
            x, y, shelf = 0, y + shelf, 0
        places[k], x, shelf = (y + 1, x + 1), x + w, max(shelf, h)
    dtype, device = images[0].dtype, images[0].device
    canvas = torch.empty(1, y + shelf, width, c, dtype=dtype, device=device).permute(0, 3, 1, 2)
    for k, (im, (top, left)) in enumerate(zip(images, places, strict=True)):
        h, w = im.shape[1:]
        slot = canvas[0, :, top - 1 : top + h + 1, left - 1 : left + w + 1]
        slot[:, 1:-1, 1:-1] = im
        up, down, before, after = edges[k] if edges is not None else (True,) * 4
        if before:  # columns first, then rows with their corners
            slot[:, 1:-1, 0] = im[:, :, 0]
        if after:
            slot[:, 1:-1, -1] = im[:, :, -1]
        if up:
            slot[:, 0] = slot[:, 1]
        if down:
            slot[:, -1] = slot[:, -2]
    return canvas, places


def pad_stack(images: list[torch.Tensor]) -> torch.Tensor:
    """CHW images as one batch: stacked when of one size, else padded at the bottom and right with each
    image's last row and column, on the images' device: ``roi_align`` then samples a box at an image's
    edge as it would the image alone (clamped there), not blended with padding."""
    if all(im.shape == images[0].shape for im in images):
        return torch.stack(images)
    c = images[0].shape[0]
    h, w = max(im.shape[1] for im in images), max(im.shape[2] for im in images)
    out = torch.empty(len(images), c, h, w, dtype=images[0].dtype, device=images[0].device)
    for k, im in enumerate(images):
        ih, iw = im.shape[1:]
        out[k, :, :ih, :iw] = im
        out[k, :, :ih, iw:] = im[:, :, -1:]
        out[k, :, ih:, :] = out[k, :, ih - 1 : ih, :]
    return out


def bad_image(problem: str, skip: bool) -> ValueError | None:
    """An image that cannot be decoded: the error to raise, naming it; or with ``skip``
    (``data.on_bad_image: skip``) None, after a line in the worker's log: the caller leaves it out."""
    if not skip:
        return ValueError(f"data: {problem}")
    print(f"data: skipped {problem} (data.on_bad_image: skip)", file=sys.stderr, flush=True)
    return None


# JPEG frame headers (SOF0-SOF15 but DHT, JPG and DAC), which hold the size and the component count
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_header(data: bytes | memoryview) -> tuple[int, int, int] | None:
    """(height, width, components) from a JPEG's frame header, read by walking its markers (a few us;
    PIL's ``Image.open`` takes ~20); None if ``data`` is not a JPEG or has no frame header before its
    scan (PIL then reads it, or names it as a bad image)."""
    if bytes(data[:2]) != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # no length: TEM, RSTn, SOI
            i += 2
        elif marker in _SOF:
            if i + 10 > n:
                return None
            height, width = (data[i + 5] << 8) | data[i + 6], (data[i + 7] << 8) | data[i + 8]
            return (height, width, data[i + 9]) if height and width else None  # 0: defined later (DNL)
        elif marker in (0xDA, 0xD9):  # the scan, or the end, before any frame header
            return None
        else:
            i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return None


def jpeg_decoder():
    """(``torchvision.io.decode_jpeg``, ``ImageReadMode``). torchvision 0.29 marks its image codecs
    deprecated in favour of TorchCodec (not a dependency here); decode_jpeg, nvjpeg on CUDA and
    libjpeg-turbo on CPU, is shipped and works: its warning is silenced."""
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    warnings.filterwarnings("ignore", "The image decoding and encoding", DeprecationWarning)
    return decode_jpeg, ImageReadMode


def pack_encoded(images: list[torch.Tensor]) -> dict:
    """A loader batch of encoded JPEGs (1-D byte tensors) and host-decoded images (3-D: files that are not
    JPEGs) as the JPEGs' bytes in one tensor, their sizes and positions, and the others: a loader worker
    hands the training process one shared-memory tensor, not one per image (with one per image, ~2,000
    images/s a worker went through its queue here; packed, ~8,400: the reads and draws set the pace).
    ``unpack_encoded`` gives the list back."""
    jpegs = [k for k, im in enumerate(images) if im.ndim == 1]
    return {
        "jpeg_bytes": torch.cat([images[k] for k in jpegs]) if jpegs else torch.empty(0, dtype=torch.uint8),
        "jpeg_sizes": torch.tensor([images[k].numel() for k in jpegs], dtype=torch.long),
        "jpeg_at": torch.tensor(jpegs, dtype=torch.long),
        "decoded": [im for im in images if im.ndim != 1],
    }


def unpack_encoded(batch: dict) -> list[torch.Tensor]:
    """``pack_encoded``'s list: each JPEG a view of the one byte tensor, in its place."""
    out: list = [None] * (len(batch["jpeg_at"]) + len(batch["decoded"]))
    views = torch.split(batch["jpeg_bytes"], batch["jpeg_sizes"].tolist())
    for k, view in zip(batch["jpeg_at"].tolist(), views, strict=True):
        out[k] = view
    rest = iter(batch["decoded"])
    return [next(rest) if im is None else im for im in out]


def decode_batch(
    images: list[torch.Tensor] | dict,
    params: torch.Tensor,
    device: torch.device,
    channels: int,
    name,
    skip=False,
) -> tuple[torch.Tensor, list[int]]:
    """A loader batch with encoded JPEGs (a list, or ``pack_encoded``'s) as one uint8 batch on
    ``device``: the JPEGs decoded there in one ``torchvision.io.decode_jpeg`` call (nvjpeg on CUDA), the
    others (decoded on the host) copied; and the positions it holds. A JPEG that does not decode raises
    an error naming it (``name(index, tier)``: its file, ``params``' last two columns), or with ``skip``
    (``data.on_bad_image: skip``) is named in the log and left out."""
    if isinstance(images, dict):
        images = unpack_encoded(images)
    decode_jpeg, modes = jpeg_decoder()
    mode = modes.GRAY if channels == 1 else modes.RGB
    encoded = [k for k, im in enumerate(images) if im.ndim == 1]
    out = [None if im.ndim == 1 else im.to(device, non_blocking=True) for im in images]
    try:
        decoded = decode_jpeg([images[k] for k in encoded], mode=mode, device=device)
    except RuntimeError:  # which one: decode them one by one
        decoded = []
        for k in encoded:
            try:
                decoded.append(decode_jpeg(images[k], mode=mode, device=device))
            except RuntimeError as e:
                index, tier = int(params[k, 5]), int(params[k, 6])
                size = images[k].numel()
                problem = f"image {index} ({name(index, tier)}, {size} bytes) cannot be decoded on {device}: "
                if error := bad_image(problem + str(e).splitlines()[0], skip):
                    raise error from None
                decoded.append(None)
    for k, image in zip(encoded, decoded, strict=True):
        out[k] = image
    kept = [k for k, image in enumerate(out) if image is not None]
    return (pad_stack([out[k] for k in kept]) if kept else torch.empty(0, dtype=torch.uint8)), kept


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` (on the host) on ``device`` without making the host wait for the GPU. A plain
    ``.to("cuda")`` from pageable memory waits until every kernel already queued on the stream is done:
    once a step, that stall lets the GPU run dry while the host draws and launches the next step. From
    pinned memory with ``non_blocking`` the copy is queued like a kernel; the caching host allocator
    keeps the pinned buffer until the copy is done. (A loader with ``pin_memory`` pins it already: a
    pinned ``tensor`` is copied from as it is, so it must not be changed before the copy has run.)"""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return (tensor if tensor.is_pinned() else tensor.pin_memory()).to(device, non_blocking=True)


def crop_resize(images: torch.Tensor, params: torch.Tensor, size: int) -> torch.Tensor:
    """Each box, resized to ``size`` x ``size`` and flipped where its flag says, as float pixels in
    [0, 255]: one ``roi_align`` over the batch on the images' device. ``images``: one image per box, or
    one canvas (``pack``) that holds them all."""
    n = params.shape[0]
    if images.shape[0] not in (1, n):
        raise ValueError(f"crop_resize: {n} boxes, {images.shape[0]} images (expected {n} or one canvas)")
    params = to_device(params, images.device).float()
    images = images.contiguous()  # a canvas is channels-last; made (N, C, H, W) as uint8, not as float
    top, left, h, w, flip = params[:, :5].unbind(1)
    index = torch.arange(n, device=images.device, dtype=torch.float32) * (images.shape[0] > 1)
    rois = torch.stack([index, left, top, left + w, top + h], dim=1)  # (batch index, x1, y1, x2, y2)
    out = roi_align(
        images.float(), rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True
    )
    return torch.where(flip.bool().view(n, 1, 1, 1), out.flip(-1), out)
