"""The data pipeline without Ray: sources, per-stage transforms, the sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from service.sources import dataset_size
from service.spec import FashionMNISTData, ImageFolderData, SyntheticData
from workers.data import ImageFolderImages, StageDataset, StageSampler, open_source, stage_subset


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("cat", "dog"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.{'jpg' if i % 2 else 'png'}")
    return tmp_path


def test_imagefolder_source_reads_classes_and_decodes_jpeg_near_the_stage_resolution(image_folder):
    spec = ImageFolderData(
        kind="imagefolder", train=str(image_folder / "train"), val=str(image_folder / "val")
    )
    assert dataset_size(spec) == 6
    train = open_source(spec, channels=3, seed=0, split="train")
    assert train.classes == ["cat", "dog"] and [label for _, label in train.samples] == [0, 0, 0, 1, 1, 1]
    stage = StageDataset(train, resolution=24, train=True, seed=0, stage=0)
    x, y = stage[(1, 0)]  # a JPEG: decoded in draft mode at >= 24 px instead of 128 x 96
    assert x.shape == (3, 24, 24) and x.dtype == torch.uint8 and y == 0
    assert train.draft_size == 24
    val = StageDataset(open_source(spec, 3, 0, "val"), resolution=32, train=False)
    assert val[0][0].shape == (3, 32, 32) and len(val) == 4
    grey = open_source(spec, channels=1, seed=0, split="train")
    assert StageDataset(grey, 16, train=False)[0][0].shape == (1, 16, 16)


def test_imagefolder_without_val_is_a_clear_error(image_folder):
    spec = ImageFolderData(kind="imagefolder", train=str(image_folder / "train"))
    with pytest.raises(ValueError, match="data.val: no validation folder"):
        open_source(spec, 3, 0, "val")


def test_fashion_mnist_is_the_real_dataset():
    spec = FashionMNISTData(kind="fashion_mnist")
    assert dataset_size(spec) == 60_000
    train = open_source(spec, channels=1, seed=0, split="train")
    x, y = train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.uint8 and 0 <= y < 10
    assert len(open_source(spec, 1, 0, "val")) == 10_000
    with pytest.raises(ValueError, match="in_channels: 1"):
        open_source(spec, 3, 0, "train")


def test_augmentation_is_a_function_of_seed_stage_epoch_and_index():
    source = open_source(SyntheticData(kind="synthetic", size=64, num_classes=4), 3, seed=1, split="train")
    a = StageDataset(source, 16, train=True, seed=1, stage=0)
    b = StageDataset(source, 16, train=True, seed=1, stage=0)
    torch.manual_seed(123)  # the global RNG does not matter
    assert torch.equal(a[(5, 0)][0], b[(5, 0)][0])
    assert not torch.equal(a[(5, 0)][0], a[(5, 1)][0])  # another epoch, another crop/flip


def test_sampler_gives_each_rank_disjoint_slices_of_every_step():
    subset = stage_subset(1000, 640, seed=0)
    per_rank = [
        list(
            StageSampler(
                subset,
                0,
                0,
                epoch_samples=640,
                global_batch=64,
                micro_batch=16,
                world_size=2,
                rank=r,
                first_step=0,
                last_step=10,
            )
        )
        for r in range(2)
    ]
    ids = [[i for i, _ in rank] for rank in per_rank]
    assert len(ids[0]) == len(ids[1]) == 10 * 32
    assert not set(ids[0]) & set(ids[1]) and set(ids[0]) | set(ids[1]) == set(subset.tolist())
    # later stages' subsets contain earlier ones
    assert set(stage_subset(1000, 300, 0).tolist()) <= set(subset.tolist())


def test_jpegs_that_draft_mode_cannot_shrink_decode_through_torchvision_to_pils_pixels(image_folder):
    """Where PIL's draft mode would not shrink a JPEG (draft size above half its shorter side, or none),
    ImageFolderImages decodes it with torchvision's decode_jpeg (faster); the pixels are PIL's, bit for bit,
    at every draft size, the draft-shrunk ones included."""
    from PIL import Image
    from torchvision.transforms import v2

    source = ImageFolderImages(str(image_folder / "train"), channels=3)
    for draft in (None, 64, 40, 24):  # 96 x 128 images: PIL shrinks by 1, 1, 2, 4
        source.draft_size = draft
        for i, (path, _) in enumerate(source.samples):
            with Image.open(path) as img:
                if draft and img.format == "JPEG":
                    img.draft("RGB", (draft, draft))
                expect = v2.functional.pil_to_tensor(img.convert("RGB"))
            assert torch.equal(source[i][0], expect), (draft, path)


def test_jpeg_header_reads_what_pil_reads_and_nothing_from_other_bytes():
    """The loader's header walk (instead of PIL's Image.open): size and component count of baseline,
    progressive, greyscale and CMYK JPEGs, with EXIF, an ICC profile, restart markers and every chroma
    subsampling; None for a PNG, a truncated header, or bytes that are no JPEG."""
    import io

    from workers.augment import jpeg_header

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (37, 53, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x010F] = "camera"  # Make
    cases = [
        (rgb, {}),
        (rgb, {"progressive": True}),
        (rgb, {"subsampling": 0}),
        (rgb, {"subsampling": 1, "restart_marker_blocks": 2}),
        (rgb, {"exif": exif.tobytes(), "icc_profile": b"\0" * 3000}),  # APP1, a long APP2
        (rgb.convert("L"), {}),
        (rgb.convert("CMYK"), {}),
        (rgb.resize((1, 1)), {}),
    ]
    for image, options in cases:
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=90, **options)
        data = buf.getvalue()
        with Image.open(io.BytesIO(data)) as img:
            expect = (img.height, img.width, len(img.getbands()))
        assert jpeg_header(data) == expect, options
        assert jpeg_header(memoryview(torch.frombuffer(bytearray(data), dtype=torch.uint8).numpy())) == expect
    buf = io.BytesIO()
    rgb.save(buf, "PNG")
    jpeg = io.BytesIO()
    rgb.save(jpeg, "JPEG", exif=exif.tobytes())
    for data in (buf.getvalue(), jpeg.getvalue()[:40], b"", b"\xff\xd8", rng.bytes(500)):
        assert jpeg_header(data) is None
