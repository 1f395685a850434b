"""Crop, resize and flip on the training device (``workers.augment``): the same per-sample draws as the host
transform, the same pixels up to the resize filter, and the in-memory gather reading what the loader reads."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from service.plan import build_plan
from service.sources import dataset_size
from tests.conftest import make_spec
from tests.jobs import TINY_IN_PROCESS
from workers.augment import BOX_GRID, collate, crop_resize, pack
from workers.data import CustomImages, InMemory, StageDataset, SyntheticImages
from workers.train import StageRunner


def photos(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Photo-like uint8 images: smooth colour fields plus fine noise (edges and texture at every scale)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 6, 8, generator=g)
    smooth = torch.nn.functional.interpolate(low, size=(height, width), mode="bicubic").clamp(0, 1)
    return (smooth * 200 + torch.rand(n, 3, height, width, generator=g) * 55).to(torch.uint8)


class Fixed(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], i % 3


def test_the_draws_are_the_host_transforms_for_the_same_key():
    """Each sample's box and flip are exactly those of v2.RandomResizedCrop + RandomHorizontalFlip seeded
    by its key: resized_crop at those params reproduces today's host pixels bit for bit, for wide, tall and
    tiny images (torchvision's fallback to a centre crop included) and small crop scales."""
    images = [photos(1, h, w, seed=h)[0] for h, w in [(40, 56), (64, 48), (5, 90), (90, 5), (33, 33)]]
    fallbacks = 0
    for scale in [(0.35, 1.0), (0.01, 0.05)]:
        host = StageDataset(Fixed(images), 24, train=True, seed=3, stage=1, crop_scale=scale)
        device = StageDataset(
            Fixed(images), 24, train=True, seed=3, stage=1, crop_scale=scale, on_device=True
        )
        for index in range(len(images)):
            for epoch in range(8):
                expect, label = host[(index, epoch)]
                image, label2, (top, left, h, w, flip, sample, tier) = device[(index, epoch)]
                assert torch.equal(image, images[index]) and label == label2 and (sample, tier) == (index, 0)
                got = TF.resized_crop(image, top, left, h, w, [24, 24], antialias=True)
                got = TF.horizontal_flip(got) if flip else got
                assert torch.equal(got, expect), (scale, index, epoch)
                fallbacks += (top, left, h, w) in [(0, 41, 5, 7), (41, 0, 7, 5)]  # centred, 3:4 or 4:3
    assert fallbacks > 0  # the 5 x 90 and 90 x 5 images end in the fallback for some keys


def test_device_crops_match_a_per_sample_resized_crop_within_the_filter_difference():
    """roi_align over the batch vs resized_crop(antialias=True) per sample, on photo-like 375 x 500
    images, shrinking (128 px, 64 px) and enlarging (400 px): mean |difference| under 2 of 255 and the 99th
    percentile under 8 (the filters differ: an area average vs torchvision's triangle; the box's edge
    pixels see their neighbours). Flips are exact mirror images; a loader's batch (each image cut to its
    box, padded to the largest) crops each image as alone."""
    images = photos(6, 375, 500)
    boxes = [(0, 0, 375, 500, 0), (10, 20, 200, 260, 1), (100, 50, 120, 90, 0), (5, 300, 300, 199, 1)]
    boxes += [(150, 150, 60, 80, 1), (0, 100, 375, 375, 0)]
    params = torch.tensor(boxes, dtype=torch.float32)
    for size in (128, 64, 400):
        out = crop_resize(images, params, size)
        ref = []
        for image, (top, left, h, w, flip) in zip(images, boxes, strict=True):
            r = TF.resized_crop(image, top, left, h, w, [size, size], antialias=True).float()
            ref.append(TF.horizontal_flip(r) if flip else r)
        diff = (out - torch.stack(ref)).abs()
        assert diff.mean() < 2.0, (size, diff.mean())
        assert diff.flatten().quantile(0.99) < 8.0, size
    unflipped = crop_resize(images[:2], params[:2] * torch.tensor([1, 1, 1, 1, 0]), 96)
    assert torch.equal(crop_resize(images[:2], params[:2], 96)[1], unflipped[1].flip(-1))

    # a loader's batch: each image cut to its box and a pixel around (within the image), padded with its
    # edge pixels: each crops as it does alone, at the image's edges too (up to float rounding)
    small = photos(1, 90, 120, seed=5)[0]
    items = [(images[1], 0, boxes[1]), (small, 1, (5, 7, 60, 80, 1)), (small, 2, (30.5, 39.25, 60, 80.75, 0))]
    items += [(images[2], 3, (275, 400, 100, 100, 0)), (images[5], 4, boxes[5])]  # bottom right; full height
    batch, labels, p = collate(items)
    assert batch.shape[0] == 1 and labels.tolist() == [0, 1, 2, 3, 4]  # one canvas (pack)
    assert (p[:, :2] % 1).tolist() == [[0, 0], [0, 0], [0.5, 0.25], [0, 0], [0, 0]]  # moved by whole px
    assert p[:, 2:4].tolist() == [list(box[2:4]) for _, _, box in items]
    for k, (image, _, box) in enumerate(items):
        if k != 2:  # the box's own pixels, where the canvas has it
            (top, left), (t, x, h, w) = p[k, :2].int().tolist(), box[:4]
            assert torch.equal(batch[0, :, top : top + h, left : left + w], image[:, t : t + h, x : x + w])
        for size in (32, 96):
            alone = crop_resize(image[None], torch.tensor([box], dtype=torch.float32), size)[0]
            assert torch.allclose(crop_resize(batch, p, size)[k], alone, atol=0.02), (k, size)


def test_pack_places_every_image_whole_with_its_edges_repeated_and_little_space_between():
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(20, 90, (64, 2), generator=g).tolist()
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in sizes]
    canvas, places = pack(images)
    assert canvas.shape[:2] == (1, 3)
    taken = torch.zeros(canvas.shape[2:], dtype=torch.int)
    for im, (top, left) in zip(images, places, strict=True):
        h, w = im.shape[1:]
        slot = canvas[0, :, top - 1 : top + h + 1, left - 1 : left + w + 1]
        assert slot.shape[1:] == (h + 2, w + 2) and torch.equal(slot[:, 1:-1, 1:-1], im)
        assert torch.equal(slot[:, 1:-1, 0], im[:, :, 0]) and torch.equal(slot[:, 1:-1, -1], im[:, :, -1])
        assert torch.equal(slot[:, 0], slot[:, 1]) and torch.equal(slot[:, -1], slot[:, -2])
        taken[top - 1 : top + h + 1, left - 1 : left + w + 1] += 1
    assert taken.max() == 1  # no two slots overlap
    used = sum((h + 2) * (w + 2) for h, w in sizes)
    assert canvas.shape[2] * canvas.shape[3] < 1.25 * used  # padding each to the largest: ~2.4x here
    # a box on the BOX_GRID crops alike alone and anywhere in a canvas: its width stays exact in float32
    # (26.96574359585201 + 6 moved by whole pixels came out 6.0000005: 3 samples a pixel instead of 2)
    image = torch.randint(0, 256, (3, 12, 37), generator=g, dtype=torch.uint8)
    box = (2.0, round(26.96574359585201 * BOX_GRID) / BOX_GRID, 10.0, 6.0, 0)
    batch, _, params = collate([(images[0][:, :30, :30], 0, (0, 0, 30, 30, 0)), (image, 1, box)])
    alone = crop_resize(image[None], torch.tensor([box], dtype=torch.float64), 3)[0]
    assert torch.allclose(crop_resize(batch, params, 3)[1], alone, atol=1e-3)
    one = torch.randint(0, 256, (1, 5, 7), generator=g, dtype=torch.uint8)  # greyscale, alone
    canvas, places = pack([one])
    assert canvas.shape == (1, 1, 7, 9) and places == [(1, 1)] and torch.equal(canvas[0, :, 1:6, 1:8], one)


def runner(tmp_path, resolution: int = 20, **data) -> StageRunner:
    """A one-stage runner on TINY_IN_PROCESS's synthetic data with ``data`` merged in (a ``kind``:
    replaced), 2 epochs of micro-batches of 4 x 2."""
    data = {"loader_workers": 0, **data} if "kind" in data else {**TINY_IN_PROCESS["data"], **data}
    stage = {"resolution": resolution, "epochs": 2, "batch_size": 4, "workers": 1, "grad_accum": 2}
    spec = make_spec(**{**TINY_IN_PROCESS, "data": data, "stages": [stage]})
    return StageRunner(spec, build_plan(spec, dataset_size(spec.data)), 0, "j", str(tmp_path), restore=None)


def test_the_in_memory_gather_reads_what_the_loader_reads(tmp_path):
    """Synthetic data held on the device: the batches of a stage (its second epoch included) are the
    loader path's, sample for sample (labels exactly; pixels up to float rounding, < 0.1/255: the loader
    cuts each image to its box first, ``crop_to_box``, and its box moves with it); evaluation too. The
    host path (augment_on: host) reads the same labels and pixels up to the resize filter."""
    memory = runner(tmp_path / "m")
    loader = runner(tmp_path / "l", device_cache_bytes=0)
    host = runner(tmp_path / "h", augment_on="host")
    assert memory._source("train", 20)[1] is not None and loader._source("train", 20)[1] is None
    steps = memory.stage.steps
    batches = [list(r.train_data(0)[1]) for r in (memory, loader, host)]
    assert len(batches[0]) == len(batches[1]) == len(batches[2]) == steps * 2  # micro-batches
    for (xm, ym), (xl, yl), (xh, yh) in zip(*batches, strict=True):
        assert torch.equal(ym, yl) and torch.equal(ym, yh)
        assert torch.allclose(xm, xl, rtol=0, atol=1.5e-3)  # normalised units: 0.1/255
        assert (xm - xh).abs().mean() < 0.1  # normalised units (std 0.25): ~6/255
    # resuming mid-stage reads the same remaining batches
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches[0][6:], memory.train_data(3)[1], strict=True))
    assert memory.validate(memory.raw_model) == pytest.approx(loader.validate(loader.raw_model), rel=1e-5)


def test_in_memory_holds_only_what_fits_and_keeps_the_sources_pixels():
    source = SyntheticImages(20, 4, 3, seed=1, split="train")
    memory = InMemory.load(source, torch.device("cpu"), max_bytes=20 * 3 * 32 * 32)
    assert memory is not None and len(memory) == 20
    images, labels = memory.gather(torch.tensor([7, 3]))
    assert torch.equal(images[0], source[7][0]) and labels.tolist() == [source[7][1], source[3][1]]
    assert InMemory.load(source, torch.device("cpu"), max_bytes=20 * 3 * 32 * 32 - 1) is None
    same = CustomImages(Fixed([photos(1, 8, 8)[0], photos(1, 8, 8, seed=1)[0]]), 3, "tests:same")
    assert torch.equal(InMemory.load(same, torch.device("cpu"), 10**6).images[1], same[1][0])
    mixed = CustomImages(Fixed([photos(1, 8, 8)[0], photos(1, 9, 8)[0]]), 3, "tests:mixed")
    assert InMemory.load(mixed, torch.device("cpu"), max_bytes=10**6) is None  # sizes differ: the loader


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a host sync exists only with a CUDA device")
def test_a_device_batch_does_not_make_the_host_wait_for_the_gpu():
    """The gather, the crop boxes' copy and the normalisation queue on the GPU: a blocking copy from
    pageable memory here (``.to("cuda")``) would stall the host once a step (``to_device``)."""
    from workers.augment import PARAMS_DTYPE
    from workers.data import to_input

    device = torch.device("cuda")
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    memory = InMemory(images.to(device), torch.arange(8, device=device))
    params = torch.tensor([[2, 3, 20, 24, 1, 4, 0], [0, 0, 32, 32, 0, 1, 0]], dtype=PARAMS_DTYPE)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x, y = memory.gather(torch.tensor([4, 1]))
        out = to_input(crop_resize(x, params, 16), device)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    expected = crop_resize(images[[4, 1]], params, 16)
    assert y.tolist() == [4, 1] and torch.allclose(
        out.cpu(), to_input(expected, torch.device("cpu")), atol=1e-4
    )


def test_an_image_folder_of_mixed_sizes_trains_through_the_device_path_and_a_corrupt_file_is_named(tmp_path):
    """Folders stream through the loader (never in memory): full decoded images of mixed sizes and their
    boxes, padded into one batch, cropped on the device; a mid-stage resume reads the same batches. A
    truncated JPEG stops training with an error naming its index and file."""
    from PIL import Image

    for split in ("train", "val"):
        for label, cls in enumerate(("cat", "dog")):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(16):
                size = (64, 48) if (i + label) % 2 else (40, 56)
                pixels = photos(1, size[1], size[0], seed=i)[0].permute(1, 2, 0).numpy()
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.jpg", quality=90)
    data = {"kind": "imagefolder", "train": str(tmp_path / "train"), "val": str(tmp_path / "val")}
    a, b = runner(tmp_path / "a", **data), runner(tmp_path / "b", **data)
    assert a._source("train", 20)[1] is None  # a folder is read through the loader
    batches = list(a.train_data(0)[1])
    assert len(batches) == 2 * a.stage.steps == 16 and batches[0][0].shape == (4, 3, 20, 20)
    assert all(torch.equal(x, y[0]) for (x, _), y in zip(batches[4:], b.train_data(2)[1], strict=True))
    assert 0 <= a.validate(a.raw_model)["val_acc"] <= 1

    bad = tmp_path / "train" / "dog" / "3.jpg"  # sample 16 + 9 (0, 1, 10-15, 2, 3: sorted names)
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    with pytest.raises(ValueError, match=r"data: image 25 \(.*dog/3.jpg, 200 bytes\) cannot be decoded"):
        list(runner(tmp_path / "c", **data).train_data(0)[1])


def test_a_batch_of_encoded_jpegs_crosses_from_a_loader_worker_as_one_byte_tensor():
    """decode_on: device: the JPEGs' bytes in one tensor (one shared-memory segment through the loader's
    queue, not one per image), a host-decoded image (not a JPEG) beside them, all back in their places."""
    from workers.augment import unpack_encoded

    g = torch.Generator().manual_seed(0)
    jpegs = [torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8) for n in (50, 7, 300)]
    png = photos(1, 9, 11)[0]
    items = [(jpegs[0], 0, (0, 0, 5, 5, 0)), (png, 1, (1, 1, 4, 4, 1)), (jpegs[1], 2, (0, 0, 3, 3, 0))]
    items.append((jpegs[2], 3, (2, 2, 6, 6, 0)))
    packed, labels, params = collate(items)
    assert packed["jpeg_bytes"].shape == (357,) and packed["jpeg_at"].tolist() == [0, 2, 3]
    assert labels.tolist() == [0, 1, 2, 3] and params[:, :5].tolist()[1] == [1, 1, 4, 4, 1]
    back = unpack_encoded(packed)
    assert [torch.equal(a, b) for a, b in zip(back, [jpegs[0], png, jpegs[1], jpegs[2]], strict=True)] == [
        True
    ] * 4
    loader = torch.utils.data.DataLoader(items, batch_size=4, num_workers=1, collate_fn=collate)
    ((from_worker, _, _),) = list(loader)  # through a real loader worker (a separate process)
    assert torch.equal(from_worker["jpeg_bytes"], packed["jpeg_bytes"])
    assert torch.equal(from_worker["decoded"][0], png)


def test_jpegs_decoded_on_the_device_give_the_host_decodes_batches_and_a_corrupt_one_is_named(tmp_path):
    """data.decode_on: device: the loader sends JPEG bytes (a PNG among them is decoded on the host), the
    device decodes each batch in one decode_jpeg call (here the CPU: libjpeg, as PIL); the batches equal
    the host-decoded path's (images too small for draft mode to shrink them at 24 px; up to float rounding:
    the host path's batch holds crops, ``crop_to_box``). A JPEG truncated
    after its header fails on the device, naming its index and file."""
    from PIL import Image

    for split in ("train", "val"):
        for label, cls in enumerate(("cat", "dog")):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(16):
                w, h = (40, 46) if (i + label) % 2 else (44, 36)
                pixels = photos(1, h, w, seed=i + 20 * label)[0].permute(1, 2, 0).numpy()
                ext = "png" if i == 5 else "jpg"
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.{ext}", quality=90)
    data = {"kind": "imagefolder", "train": str(tmp_path / "train"), "val": str(tmp_path / "val")}
    host = runner(tmp_path / "h", 24, **data)
    device = runner(tmp_path / "d", 24, **data, decode_on="device")
    a, b = list(host.train_data(0)[1]), list(device.train_data(0)[1])
    assert device._source("train", 24)[0].encoded and not host._source("train", 24)[0].encoded
    assert len(a) == len(b) == 16
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(ya, yb) and torch.allclose(xa, xb, rtol=0, atol=1.5e-3)
    assert host.validate(host.raw_model) == pytest.approx(device.validate(device.raw_model), rel=1e-5)

    bad = tmp_path / "train" / "cat" / "7.jpg"  # sample 13 (0, 1, 10-15, 2, 3, ..., 7: sorted names)
    bad.write_bytes(bad.read_bytes()[:-600])  # its header whole: the loader passes it on
    with pytest.raises(
        ValueError, match=r"data: image 13 \(.*cat/7.jpg, \d+ bytes\) cannot be decoded on cpu"
    ):
        list(runner(tmp_path / "c", **data, decode_on="device").train_data(0)[1])


@pytest.mark.parametrize("decode_on", ["host", "device"])
def test_on_bad_image_skip_leaves_bad_images_out_names_them_and_counts_them(tmp_path, capfd, decode_on):
    """data.on_bad_image: skip: a file that is no image and a JPEG truncated after its header are left out
    of their batches, each named in the log, and every step's record counts the images it lost (each bad
    image once per epoch: 2 x 2); the stage trains to its end. Host or device decoding alike."""
    from PIL import Image

    from service.records import Report

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(16):
                pixels = photos(1, 36, 44, seed=i)[0].permute(1, 2, 0).numpy()
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.jpg", quality=90)
    (tmp_path / "train" / "cat" / "3.jpg").write_bytes(b"not an image at all")  # sample 9 (sorted names)
    truncated = tmp_path / "train" / "dog" / "5.jpg"
    truncated.write_bytes(truncated.read_bytes()[:-400])
    data = {"kind": "imagefolder", "train": str(tmp_path / "train"), "val": str(tmp_path / "val")}
    bad = runner(tmp_path / "r", 24, **data, decode_on=decode_on, on_bad_image="skip")
    reports = []
    bad.report = lambda r: reports.append(Report.model_validate(r))
    end = bad.run()
    records = [rec for r in reports for rec in r.records]
    assert [rec.step for rec in records] == list(range(bad.stage.steps))
    assert sum(rec.skipped_images for rec in records) == 4 and end.val_acc is not None
    log = capfd.readouterr().err
    assert log.count("data: skipped image 9 (") == 2 and log.count("dog/5.jpg") == 2, log
    assert ("dog/5.jpg, " in log) and ("cannot be decoded on cpu" in log) == (decode_on == "device"), log
    with pytest.raises(ValueError, match=r"data: image 9 \(.*cat/3.jpg, 19 bytes\) cannot be decoded"):
        list(runner(tmp_path / "e", 24, **data, decode_on=decode_on).train_data(0)[1])


def test_a_stage_ramping_out_of_random_erasing_reads_alike_wherever_a_run_starts(tmp_path):
    """Stage 2 ramps random erasing down from stage 1's 0.5 over its first 3 steps: the whole stage stays
    on the per-sample host path (erasing is per image), so a run resumed past the ramp reads exactly the
    batches an uninterrupted one reads there (on the device path they would differ by the resize filter).
    And a box at the edge of a smaller image in a padded batch crops as that image alone."""
    stages = [
        {
            "resolution": 16,
            "epochs": 1,
            "batch_size": 8,
            "workers": 1,
            "regularization": {"random_erasing": 0.5},
        },
        {"resolution": 20, "epochs": 2, "batch_size": 8, "workers": 1, "regularization_ramp_steps": 3},
    ]
    spec = make_spec(**{**TINY_IN_PROCESS, "stages": stages})
    plan = build_plan(spec, spec.data.size)
    r = StageRunner(spec, plan, 0, "j", str(tmp_path), restore=None)
    r.progress.load_state_dict({"step": plan.stages[1].step_start})
    r.scheduler.load_state_dict({"step": plan.stages[1].step_start})
    r.next_stage()
    whole, resumed = list(r.train_data(0)[1]), list(r.train_data(5)[1])
    assert len(resumed) == len(whole) - 5 and all(
        torch.equal(a[0], b[0]) for a, b in zip(whole[5:], resumed, strict=True)
    )

    big, small = photos(1, 60, 80)[0], photos(1, 30, 40, seed=3)[0]
    edge = (10, 12, 20, 28, 0)  # to the bottom-right corner of the small image
    batch, _, params = collate([(big, 0, (0, 0, 60, 80, 0)), (small, 1, edge)])
    alone = crop_resize(small[None], torch.tensor([edge], dtype=torch.float64), 48)
    assert torch.allclose(crop_resize(batch, params, 48)[1], alone[0], atol=1e-3)  # the weights: 1 - l, l
