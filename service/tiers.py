"""Resolution tiers: which copy of a prepared image folder (``stagetrain prepare``) a stage reads.

A prepared folder ``DST`` holds ``DST/<T>/<class>/<file>`` for each tier ``T`` (every image's shorter side
capped at ``T`` px; images already that small are byte-identical copies), ``DST/full/`` (the originals,
byte for byte) and ``DST/stagetrain-tiers.json``, written last: a folder counts as prepared only once it
exists. Each tier folder is a plain ImageFolder with the same files, so ``image_folder_index`` lists the
same samples, in the same order, with the same labels, in every tier.

The rule (``needed_side``): a stage at ``R`` px reads the smallest tier whose images give every crop
the stage can draw at least ``R`` px on each side, so nothing is upsampled that the original would
have downsampled, and the stage sees the detail the original gives it.

- Training, ``RandomResizedCrop(R, scale=(smin, smax), ratio=(1/rho, rho))``: a crop of area fraction
  ``s`` and aspect ``r`` (``1/rho <= r <= rho``) of an image with shorter side ``S`` and aspect ``a >= 1``
  has shorter side ``sqrt(s * a * S**2 / max(r, 1/r)) >= S * sqrt(s / rho)``; and, as its longer side
  fits in the image (``<= a * S``), shorter side = area / longer side ``>= S * s``. The worst case is a
  square image, the smallest scale ``smin`` and the most elongated crop, so every crop is at least
  ``R`` px when ``S >= R / max(sqrt(smin / rho), smin)``: ``R * sqrt(rho / smin)`` for
  ``smin <= 1 / rho`` (default ``(0.35, 1.0)``, ``rho = 4/3``: ``1.95 R``, so 128 px needs 250, 160
  needs 313, 224 needs 438), ``R / smin`` above (``(1.0, 1.0)``: ``R``). torchvision's fallback crop
  (after 10 rejected draws) has shorter side ``S``. This is the strict bound: the median crop
  (``s ~ 0.68``) would need only ``1.4 R``, but a tier chosen for it would upsample the small crops that
  the original downsamples, and the stage would train on blurrier images than without tiers. ``smax``
  does not enter: larger crops only have more pixels.
- Evaluation, resize of the shorter side to ``R`` then a centre crop: ``S >= R``.

Up to rounding of the crop to whole pixels. No tier large enough: ``full``. Decoding a tier's JPEG in
draft mode at ``R`` would undo the rule (PIL would decode a 256 px tier image at 1/2 scale for a
128 px stage): read a tier with ``draft_size = needed_side(...)``.

That is the stage-wide rule, for stages that crop on the host (RandAugment or random erasing,
``augment_on: host``). With crops on the device (the default) the worst crop no longer sets the tier:
each sample's box is drawn first, on its original's size (``size`` in the samples index), and the sample
reads the smallest tier in which that box is at least ``R`` px on each side (``workers.data.PreparedImages.
tier_for``), the box scaled to it: the same guarantee, per sample, and the region the originals give. At
the default ``crop_scale`` a box needs between ``R`` and ``1.95 R`` of shorter side, ``1.4 R`` for the
median one, hence tiers about 1.3x apart (``--tiers auto``). Evaluation's box is the centred square: the
same tier as the stage-wide rule.

Imports nothing from stagetrain, and neither torch nor PIL: the coordinator uses it too.
"""

from __future__ import annotations

import array
import gzip
import hashlib
import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import fsspec
from pydantic import BaseModel, ConfigDict

MANIFEST = "stagetrain-tiers.json"  # written last: the folder is prepared once it exists
SAMPLES = "stagetrain-samples.jsonl.gz"  # one line per sample, in id order
INTENT = "stagetrain-prepare.json"  # a prepare under way (removed once the manifest is written)
FULL = "full"  # the tier folder of the originals
RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect-ratio range (StageDataset uses it)


class TiersManifest(BaseModel):
    """``DST/stagetrain-tiers.json``: what a prepare wrote, checked against its source."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    source: str  # the source folder's URL (local folders: absolute path)
    source_digest: str  # sha256 of the source listing: relative paths, labels, byte sizes, classes
    tiers: list[int]  # ascending; folders DST/<tier>/, plus DST/full/
    quality: int  # JPEG quality of the resized images
    classes: list[str]
    samples: int
    samples_sha256: str  # of DST/stagetrain-samples.jsonl.gz
    source_bytes: int
    tier_bytes: dict[str, int]  # bytes stored per tier folder (``full`` included)
    # unreadable source images (paths relative to the source) that --on-bad-image skip copied as they are
    bad_images: list[str] = []


def needed_side(
    resolution: int, crop_scale: tuple[float, float] | None, ratio: tuple[float, float] = RATIO
) -> int:
    """The shorter side (px) an image needs so that a stage at ``resolution`` upsamples none of its
    crops (module docstring): train with ``crop_scale = (smin, smax)`` and aspect ``ratio``, or
    ``crop_scale=None`` for evaluation (resize + centre crop)."""
    if crop_scale is None:
        return resolution
    smin = crop_scale[0]
    rho = max(ratio[1], 1 / ratio[0])
    if not (0 < smin <= 1 and rho >= 1):
        raise ValueError(
            f"crop_scale/ratio: need 0 < scale <= 1 and ratio (1/rho, rho), got {crop_scale} {ratio}"
        )
    shrink = max(math.sqrt(smin / rho), smin)  # the smallest crop's shorter side / the image's
    return math.ceil(resolution / shrink - 1e-9)  # 1e-9: 0.75 * 4/3 is not exactly 1 in floats


def pick_tier(
    tiers: list[int],
    resolution: int,
    crop_scale: tuple[float, float] | None,
    ratio: tuple[float, float] = RATIO,
) -> str:
    """The folder name of the smallest tier that covers the stage (``needed_side``), else ``full``."""
    need = needed_side(resolution, crop_scale, ratio)
    return str(min((t for t in tiers if t >= need), default=FULL)) if tiers else FULL


def capped_size(width: int, height: int, tier: int) -> tuple[int, int]:
    """An image's size in tier ``tier``: shorter side ``tier`` if it was longer, else unchanged."""
    short = min(width, height)
    if short <= tier:
        return width, height
    if width <= height:
        return tier, max(1, round(height * tier / width))
    return max(1, round(width * tier / height)), tier


def read_manifest(root: str) -> TiersManifest | None:
    """The manifest of the prepared folder ``root``; None if ``root`` is not one. A prepare that has not
    finished there is an error (its tier folders would be read as classes)."""
    fs, path = fsspec.core.url_to_fs(root)
    path = path.rstrip("/")
    try:
        text = fs.cat_file(f"{path}/{MANIFEST}")
    except FileNotFoundError:
        if fs.exists(f"{path}/{INTENT}"):
            raise ValueError(
                f"data: {root} is a stagetrain prepare that has not finished; run the same "
                "`stagetrain prepare` again to finish it"
            ) from None
        return None
    return TiersManifest.model_validate_json(text)


def _samples_lines(root: str, manifest: TiersManifest | None) -> Iterator[bytes]:
    """The lines of the samples index of the prepared folder ``root``, checked against the manifest's
    checksum first, decompressed as they are read."""
    manifest = manifest or read_manifest(root)
    if manifest is None:
        raise ValueError(f"data: {root} is not a folder written by `stagetrain prepare`")
    fs, path = fsspec.core.url_to_fs(root)
    body = fs.cat_file(f"{path.rstrip('/')}/{SAMPLES}")
    if hashlib.sha256(body).hexdigest() != manifest.samples_sha256:
        raise ValueError(f"{root}/{SAMPLES}: does not match its checksum in {MANIFEST}")
    with gzip.GzipFile(fileobj=io.BytesIO(body)) as lines:
        yield from lines


def read_samples(root: str, manifest: TiersManifest | None = None) -> list[dict]:
    """The samples index of the prepared folder ``root``: one dict per sample, in id order (id, path
    relative to the source, label, byte size, size ``[w, h]``, size in each tier). ``SampleIndex`` holds
    what a job reads of it, compactly."""
    return [json.loads(line) for line in _samples_lines(root, manifest)]


@dataclass(frozen=True)
class SampleIndex:
    """What a job reads of a samples index, compact (ImageNet's 1.28M samples: ~100 MB, mostly the
    paths): paths relative to the source, labels, and the originals' sizes as ``w0, h0, w1, h1, ...``."""

    relative: list[str]
    labels: array.array
    sizes: array.array
    bad: dict[int, str]  # id -> why `prepare --on-bad-image skip` found it unreadable (its size: 0 x 0)


_INDEXES: dict[tuple[str, str], SampleIndex] = {}  # (root, samples_sha256): every tier and stage shares one


def sample_index(root: str, manifest: TiersManifest) -> SampleIndex:
    """The ``SampleIndex`` of the prepared folder ``root``, read once per process."""
    key = (root, manifest.samples_sha256)
    if key not in _INDEXES:
        relative, labels, sizes, bad = [], array.array("q"), array.array("i"), {}
        for line in _samples_lines(root, manifest):
            sample = json.loads(line)  # one at a time: no list of 1.28M dicts
            relative.append(sample["path"])
            labels.append(sample["label"])
            sizes.extend(sample["size"])
            if "bad" in sample:
                bad[sample["id"]] = sample["bad"]
        while len(_INDEXES) >= 4:  # a job reads one or two (train, val): a long-lived process, a few
            del _INDEXES[next(iter(_INDEXES))]
        _INDEXES[key] = SampleIndex(relative, labels, sizes, bad)
    return _INDEXES[key]


def check_bad_images(manifest: TiersManifest, skip: bool) -> None:
    """A prepared folder with images ``prepare --on-bad-image skip`` found unreadable is read only by a job
    that skips them (``data.on_bad_image: skip``): else the job stops before it starts, not when its
    sampler first draws one (hours in, maybe)."""
    if manifest.bad_images and not skip:
        more = len(manifest.bad_images) - 1
        raise ValueError(
            f"data: image {manifest.source}/{manifest.bad_images[0]}"
            + (f" and {more} more" if more else "")
            + " cannot be decoded (`stagetrain prepare` found it unreadable); set data.on_bad_image: skip "
            "to leave them out, or replace them in the source and prepare into a new folder"
        )


def is_prepared(root: str) -> bool:
    """``root`` is a finished ``stagetrain prepare`` (its manifest exists)."""
    return read_manifest(root) is not None


def tier_root(
    root: str,
    resolution: int,
    crop_scale: tuple[float, float] | None,
    ratio: tuple[float, float] = RATIO,
) -> str:
    """The folder (URL) a stage at ``resolution`` reads: ``root/<tier>`` (or ``root/full``) for a prepared
    ``root`` by ``pick_tier``, ``root`` itself otherwise. ``crop_scale`` None: evaluation."""
    manifest = read_manifest(root)
    if manifest is None:
        return root
    return f"{root.rstrip('/')}/{pick_tier(manifest.tiers, resolution, crop_scale, ratio)}"
