"""``stagetrain prepare``: resolution tiers hold the source's samples (ids, labels, capped sizes), the
stage-to-tier rule (``service.tiers``) against torchvision's own crops, and the commit protocol: a
prepare killed midway continues where it stopped, a prepared folder is never overwritten, a corrupt
image is named in one line. Tiny JPEGs, local folders, one test on the moto S3 server; no Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import fsspec
import pytest
import torch
from PIL import Image

from service.prepare import AUTO_TIERS, INTENT, PROGRESS, list_source, parse_tiers, prepare
from service.sources import dataset_size, image_folder_index
from service.spec import ImageFolderData
from service.tiers import (
    FULL,
    MANIFEST,
    SAMPLES,
    capped_size,
    is_prepared,
    needed_side,
    pick_tier,
    read_samples,
    tier_root,
)
from tests.helpers import REPO, cli_env, stagetrain
from workers.augment import BOX_GRID

SIZES = [(120, 90), (64, 80), (90, 120), (200, 150)]  # shorter sides 90, 64, 90, 150
TIERS = [48, 72]


def make_folder(root, classes=("ant", "bee", "cat"), per_class=8) -> str:
    """An ImageFolder of small noisy JPEGs of the sizes above (each image its own pixels)."""
    import numpy as np

    rng = np.random.default_rng(0)
    for c, cls in enumerate(classes):
        os.makedirs(f"{root}/{cls}")
        for i in range(per_class):
            w, h = SIZES[(c + i) % len(SIZES)]
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(f"{root}/{cls}/{i:02d}.jpg", quality=90)
    return str(root)


def relative(root: str) -> tuple[list[str], list[tuple[str, int]]]:
    """``image_folder_index(root)`` with paths relative to ``root`` (a local folder or a URL)."""
    _, classes, samples = image_folder_index(root)
    prefix = len(fsspec.core.url_to_fs(root)[1].rstrip("/")) + 1
    return classes, [(p[prefix:], label) for p, label in samples]


def test_tiers_hold_the_sources_ids_labels_and_capped_sizes(tmp_path):
    src, dst = make_folder(tmp_path / "src"), str(tmp_path / "dst")
    done = prepare(src, dst, TIERS, quality=85, workers=3)
    assert (done.written, done.skipped, done.already) == (24, 0, False)
    assert is_prepared(dst) and not is_prepared(src)
    assert sorted(os.listdir(dst)) == ["48", "72", FULL, SAMPLES, MANIFEST]
    want = relative(src)
    for folder in ("48", "72", FULL):
        assert relative(f"{dst}/{folder}") == want, folder  # same ids, same order, same labels
    index = read_samples(dst)
    assert [(s["id"], s["path"], s["label"]) for s in index] == [
        (i, p, y) for i, (p, y) in enumerate(want[1])
    ]
    for sample in index:
        original = f"{src}/{sample['path']}"
        with Image.open(original) as img:
            assert tuple(sample["size"]) == img.size
        for tier in TIERS:
            path = f"{dst}/{tier}/{sample['path']}"
            with Image.open(path) as img:
                assert img.size == capped_size(*sample["size"], tier) == tuple(sample["tiers"][str(tier)])
                assert min(img.size) == min(tier, *sample["size"]) and img.format == "JPEG"
            if min(sample["size"]) <= tier:  # no smaller: the original, byte for byte
                assert open(path, "rb").read() == open(original, "rb").read()
        assert open(f"{dst}/{FULL}/{sample['path']}", "rb").read() == open(original, "rb").read()
    assert done.manifest.tier_bytes[FULL] == done.manifest.source_bytes
    assert done.manifest.tier_bytes["48"] < done.manifest.tier_bytes["72"] < done.manifest.source_bytes
    again = prepare(src, dst, TIERS, quality=85)  # the same prepare again: checked, nothing written
    assert again.already and again.manifest == done.manifest


@pytest.mark.parametrize(
    "resolution, crop_scale, need",
    [
        (128, (0.35, 1.0), 250),  # the default crop_scale: R * sqrt((4/3) / 0.35) = 1.95 R
        (160, (0.35, 1.0), 313),
        (224, (0.35, 1.0), 438),
        (224, (0.08, 1.0), 915),  # torchvision's default scale: 3.9 R
        (120, (0.75, 1.0), 160),  # the boundary smin = 1/rho: sqrt(smin / rho) = smin, both give R / 0.75
        (100, (0.9, 1.0), 112),  # above it the crop must fit in the image: R / smin
        (100, (1.0, 1.0), 100),
        (224, None, 224),  # evaluation: resize the shorter side to R, centre crop
    ],
)
def test_needed_side(resolution, crop_scale, need):
    assert needed_side(resolution, crop_scale) == need


@pytest.mark.parametrize(
    "tiers, resolution, crop_scale, tier",
    [
        ([256, 320], 128, (0.35, 1.0), "256"),
        ([256, 320], 131, (0.35, 1.0), "256"),  # needs 256
        ([256, 320], 132, (0.35, 1.0), "320"),  # needs 258
        ([256, 320], 160, (0.35, 1.0), "320"),
        ([256, 320], 164, (0.35, 1.0), FULL),  # needs 321
        ([256, 320], 224, (0.35, 1.0), FULL),
        ([256, 320], 224, (0.75, 1.0), "320"),  # needs 299
        ([256, 320], 224, None, "256"),
        ([256, 320], 256, None, "256"),
        ([256, 320], 257, None, "320"),
        ([256, 320], 384, None, FULL),
        ([], 32, None, FULL),
    ],
)
def test_pick_tier(tiers, resolution, crop_scale, tier):
    assert pick_tier(tiers, resolution, crop_scale) == tier


def test_the_rule_holds_for_torchvisions_own_crops():
    """With the shorter side ``needed_side`` no RandomResizedCrop draw is smaller than the stage (up to
    one pixel of rounding), on a square image (the worst case) and an elongated one; 10% less and some are."""
    import torch
    from torchvision.transforms import v2

    def shortest(crop, w: int, h: int) -> int:  # the shortest side of 2000 crops of a w x h image
        image = [torch.empty(1, h, w)]
        return min(min(p["height"], p["width"]) for p in (crop.make_params(image) for _ in range(2000)))

    torch.manual_seed(0)
    for resolution, scale in ((128, (0.35, 1.0)), (96, (0.08, 1.0)), (100, (0.9, 1.0))):
        crop = v2.RandomResizedCrop(resolution, scale=scale)
        need = needed_side(resolution, scale)
        for w, h in ((need, need), (need * 3 // 2, need), (need, 2 * need)):
            assert shortest(crop, w, h) >= resolution - 1, (resolution, scale, w, h)
        assert shortest(crop, int(need * 0.9), int(need * 0.9)) < resolution, (resolution, scale)


def test_tier_root_names_the_folder_a_stage_reads(tmp_path):
    src, dst = make_folder(tmp_path / "src"), str(tmp_path / "dst")
    assert tier_root(src, 64, (0.35, 1.0)) == src  # not prepared: the folder itself
    prepare(src, dst, TIERS, workers=2)
    assert tier_root(dst, 24, (0.35, 1.0)) == f"{dst}/48"  # needs 47
    assert tier_root(dst, 25, (0.35, 1.0)) == f"{dst}/72"  # needs 49
    assert tier_root(dst + "/", 37, (0.35, 1.0)) == f"{dst}/{FULL}"  # needs 73
    assert tier_root(dst, 64, None) == f"{dst}/72"
    assert relative(tier_root(dst, 64, None)) == relative(src)
    # The prepared folder itself is no ImageFolder (its tiers would be classes); its size is the source's.
    with pytest.raises(ValueError, match=f"data: {dst} holds the resolution tiers of `stagetrain prepare`"):
        image_folder_index(dst)
    assert dataset_size(ImageFolderData(kind="imagefolder", train=dst)) == 24


def test_a_killed_prepare_continues_where_it_stopped(tmp_path):
    src, dst = make_folder(tmp_path / "src"), str(tmp_path / "dst")
    args = [sys.executable, "-m", "service.cli", "prepare", src, dst, "--tiers", "48,72", "--workers", "1"]
    env = cli_env(STAGETRAIN_TEST_PREPARE_DELAY_S="0.1")  # 2.4 s of work; progress is appended every 1 s
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:  # until the first progress is appended
        if os.path.exists(f"{dst}/{PROGRESS}") and open(f"{dst}/{PROGRESS}").read().endswith("\n"):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # no clean-up of any kind
    out, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, (out, err)
    logged = [json.loads(line) for line in open(f"{dst}/{PROGRESS}")]
    assert 0 < len(logged) < 24 and not os.path.exists(f"{dst}/{MANIFEST}")
    with pytest.raises(ValueError, match="has not finished; run the same `stagetrain prepare` again"):
        tier_root(dst, 32, None)  # a job never reads a half-written prepare
    # Another prepare into it is refused; the same one continues.
    refused = stagetrain("prepare", src, dst, "--tiers", "48,96")
    assert refused.returncode == 2
    assert refused.stderr.strip().startswith(f"error: {dst}/{INTENT}: tiers [48, 72] there, [48, 96] asked")
    again = stagetrain("prepare", src, dst, check=True)  # --tiers auto: the folder's own, 48,72
    finished = len({e["path"] for e in logged})
    assert f"continuing the prepare in {dst}: {finished} of 24 images done" in again.stderr
    assert f"({24 - finished} now, {finished} done before)" in again.stdout
    assert sorted(os.listdir(dst)) == ["48", "72", FULL, SAMPLES, MANIFEST]
    for folder in ("48", "72", FULL):
        assert relative(f"{dst}/{folder}") == relative(src)
        files = [f for _, _, names in os.walk(f"{dst}/{folder}") for f in names]
        assert len(files) == 24, files  # no temporary file left by the kill


def test_a_prepared_folder_is_never_overwritten(tmp_path):
    src, dst = make_folder(tmp_path / "src"), str(tmp_path / "dst")
    other = make_folder(tmp_path / "other", classes=("x", "y"), per_class=2)
    prepare(src, dst, TIERS, workers=2)
    assert "bad_images" not in json.load(open(f"{dst}/{MANIFEST}"))  # readable by earlier versions
    cases = [
        ((other, dst, TIERS, 90), f"{dst}/{MANIFEST}: source {src} there, {other} asked"),
        ((src, dst, [48], 90), f"{dst}/{MANIFEST}: tiers [48, 72] there, [48] asked"),
        ((src, dst, TIERS, 80), f"{dst}/{MANIFEST}: quality 90 there, 80 asked"),
        ((src, str(tmp_path), TIERS, 90), f"{tmp_path}: not empty, and not a stagetrain prepare"),
        ((src, f"{src}/tiers", TIERS, 90), f"{src}/tiers: inside the source folder {src}"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError) as e:
            prepare(*args)
        assert str(e.value).startswith(message), str(e.value)
    # auto (None): a prepared or half-prepared folder keeps its own tiers (an earlier default, maybe),
    # a new one gets AUTO_TIERS
    assert prepare(src, dst, None).already and prepare(src, dst, None).manifest.tiers == TIERS
    assert prepare(src, str(tmp_path / "new"), None, workers=2).manifest.tiers == list(AUTO_TIERS)
    os.remove(f"{src}/bee/03.jpg")  # the source changed since: its prepared folder is stale
    with pytest.raises(ValueError, match=f"{dst}: prepared from an earlier listing of {src}"):
        prepare(src, dst, TIERS)
    assert parse_tiers("auto") is None and parse_tiers("256, 160,160") == [160, 256]
    for bad in ("160,big", "8", ""):
        with pytest.raises(ValueError, match="--tiers: "):
            parse_tiers(bad)


def test_a_corrupt_image_is_named_in_one_line_and_the_rerun_finishes(tmp_path):
    src, dst = make_folder(tmp_path / "src"), str(tmp_path / "dst")
    bad = f"{src}/bee/05.jpg"
    good = open(bad, "rb").read()
    with open(bad, "wb") as f:
        f.write(good[: len(good) // 2])
    proc = stagetrain("prepare", src, dst, "--tiers", "48,72", "--workers", "1")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1].startswith(
        f"error: {bad}: not a readable image (OSError: image file is"
    )
    assert not os.path.exists(f"{dst}/{MANIFEST}")
    position = [p for p, _ in relative(src)[1]].index("bee/05.jpg")  # 13: the first 13 were finished
    with open(bad, "wb") as f:
        f.write(good)
    done = prepare(src, dst, TIERS, workers=2)
    assert done.skipped >= position and done.written == 24 - done.skipped
    assert relative(f"{dst}/72") == relative(src) and is_prepared(dst)
    empty = tmp_path / "src" / "dog"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"{src}/dog: a class folder without images"):
        list_source(src)


def test_on_bad_image_skip_copies_an_unreadable_image_and_jobs_leave_it_out_or_name_it(tmp_path):
    """``--on-bad-image skip``: the corrupt file is named, copied as it is into every tier (the tiers list
    the source's samples), marked in the index and the manifest; a job leaves it out with
    ``data.on_bad_image: skip`` (host and device crops, evaluation too) and names it without."""
    from workers.data import StageDataset, open_source

    src, dst = make_folder(tmp_path / "src"), str(tmp_path / "dst")
    bad = f"{src}/bee/05.jpg"
    good = open(bad, "rb").read()
    with open(bad, "wb") as f:
        f.write(good[: len(good) // 2])
    proc = stagetrain("prepare", src, dst, "--tiers", "48,72", "--on-bad-image", "skip", "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    assert f"{bad}: not a readable image (OSError: image file is truncated" in proc.stderr
    assert "1 unreadable image(s) copied as they are (first: bee/05.jpg)" in proc.stdout
    assert is_prepared(dst) and relative(f"{dst}/48") == relative(f"{dst}/{FULL}") == relative(src)
    for folder in ("48", "72", FULL):
        assert open(f"{dst}/{folder}/bee/05.jpg", "rb").read() == good[: len(good) // 2]
    manifest = json.load(open(f"{dst}/{MANIFEST}"))
    assert manifest["bad_images"] == ["bee/05.jpg"]
    index = [p for p, _ in relative(src)[1]].index("bee/05.jpg")
    sample = read_samples(dst)[index]
    assert sample["size"] == [0, 0] and sample["bad"].startswith("OSError: image file is truncated")
    assert all(s["size"] != [0, 0] for k, s in enumerate(read_samples(dst)) if k != index)

    # without skip a job stops before it starts (plan, submit, a worker opening it), naming the source file
    data = ImageFolderData(kind="imagefolder", train=dst, val=dst)
    first = f"data: image {src}/bee/05.jpg cannot be decoded (`stagetrain prepare` found it unreadable)"
    for check in (lambda: dataset_size(data), lambda: open_source(data, 3, 0, "val", 40)):
        with pytest.raises(ValueError) as e:
            check()
        assert str(e.value).startswith(first + "; set data.on_bad_image: skip"), str(e.value)
    data = ImageFolderData(kind="imagefolder", train=dst, on_bad_image="skip")
    assert dataset_size(data) == 24
    for on_device, train in ((True, True), (True, False), (False, True), (False, False)):
        source = open_source(data, 3, 0, "train", 40)
        dataset = StageDataset(source, 40, train=train, on_device=on_device)
        assert dataset[(index + 1, 0)] is not None and dataset[(index, 0)] is None  # left out, counted
        source.skip_bad = False  # read anyway (not through open_source): named, with what prepare found
        with pytest.raises(ValueError) as e:
            dataset[(index, 0)]
        named = f"data: image {index} ({src}/bee/05.jpg) cannot be decoded: OSError: image file is truncated"
        assert str(e.value).startswith(named), str(e.value)
    # without --on-bad-image skip, a prepare that marked it (then stopped) reads it again and stops there
    os.remove(f"{dst}/{MANIFEST}")
    (tmp_path / "dst" / INTENT).write_text(json.dumps({"source": src, "tiers": TIERS, "quality": 90}))
    (tmp_path / "dst" / PROGRESS).write_text(
        json.dumps(
            {
                "path": "bee/05.jpg",
                "bytes": len(good) // 2,
                "size": None,
                "tier_bytes": [1] * 3,
                "bad": "OSError",
            }
        )
        + "\n"
    )
    with pytest.raises(
        ValueError, match=f"{bad}: not a readable image .*or prepare with --on-bad-image skip"
    ):
        prepare(src, dst, TIERS, workers=1)


@pytest.mark.s3
def test_prepare_from_and_to_s3(s3_url, tmp_path):
    import fsspec

    local = make_folder(tmp_path / "src", per_class=3)
    fs = fsspec.filesystem("s3")
    fs.put(local, f"{s3_url}/src", recursive=True)
    src, dst = f"{s3_url}/src", f"{s3_url}/tiers"
    done = prepare(src, dst, TIERS, workers=4)
    assert (done.written, done.manifest.source) == (9, src)
    assert is_prepared(dst) and tier_root(dst, 64, None) == f"{dst}/72"
    for folder in ("48", "72", FULL):
        assert relative(f"{dst}/{folder}") == relative(src), folder
    assert not fs.exists(f"{dst}/{PROGRESS}.parts") and not fs.exists(f"{dst}/{INTENT}")
    assert prepare(src, dst, TIERS).already


def test_a_job_on_a_prepared_folder_reads_each_stages_tier(tmp_path):
    """Through the worker loop: a stage at 24 px (needs 47 px with crop_scale 0.35) reads tier 48, one at
    32 px (needs 63) tier 72, evaluation at 40 px tier 48; the same samples and labels as the source, the
    tier decoded whole (draft at the needed side), and both stages train."""
    from service.plan import build_plan
    from tests.conftest import make_spec
    from tests.jobs import TINY_IN_PROCESS
    from workers.data import PreparedImages
    from workers.train import StageRunner

    src, dst = make_folder(tmp_path / "src", per_class=16), str(tmp_path / "dst")
    prepare(src, dst, TIERS, quality=85, workers=2)
    spec = make_spec(
        **{
            **TINY_IN_PROCESS,
            "data": {
                "kind": "imagefolder",
                "train": dst,
                "val": src,
                "loader_workers": 0,
                "val_resolution": 40,
            },
            "stages": [
                {"resolution": 24, "epochs": 1, "batch_size": 4, "workers": 1},
                {"resolution": 32, "epochs": 1, "batch_size": 4, "workers": 1},
            ],
        }
    )
    plan = build_plan(spec, dataset_size(spec.data))
    assert plan.dataset_size == 48
    runner = StageRunner(spec, plan, 0, "j", str(tmp_path / "runs"), restore=None)
    end = runner.run()
    source = runner._source("train", 24)[0]
    assert isinstance(source, PreparedImages)  # with device crops, each sample reads its box's tier
    assert source.folder == "48" and source.tier and source.draft_size == needed_side(24, (0.35, 1.0))
    assert [(p.rsplit("/48/", 1)[1], y) for p, y in source.samples] == relative(src)[1]
    runner.next_stage()
    runner.run()
    assert runner._source("train", 32)[0].folder == "72"
    assert runner._source("val", 40)[0].root == src  # not prepared: read as it is
    assert end.val_acc is not None


def smooth_folder(root) -> str:
    """An ImageFolder of photo-like JPEGs (smooth colour fields, mild grain): what a tier keeps of a region
    is then comparable with what the original gives."""
    import numpy as np

    rng = np.random.default_rng(1)
    for c, cls in enumerate(("ant", "bee", "cat")):
        os.makedirs(f"{root}/{cls}")
        for i in range(8):
            w, h = [(124, 90), (64, 80), (90, 124), (200, 150)][(c + i) % 4]  # 124 -> 66 in tier 48, not 66.1
            low = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize(
                (w, h), Image.BICUBIC
            )
            pixels = np.asarray(low, dtype=np.float32) + rng.normal(0, 3, (h, w, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                f"{root}/{cls}/{i:02d}.jpg", quality=95
            )
    return str(root)


def test_with_device_crops_each_sample_reads_the_smallest_tier_its_own_box_needs(tmp_path):
    """Crops on the device: a sample's box is drawn on the original's size (the region reading the
    originals gives, exactly), then read from the smallest tier in which that box is at least the stage's
    resolution on each side (else the original), and scaled to it: the stage at 40 px reads all three
    folders, never upsamples a box a tier could have covered, and crops what the originals crop (mean
    difference under 3/255). ``decode_on: device`` gets the same boxes with the tier's bytes. Evaluation
    at a tier's size reads that tier (its longer side rounded: the box is scaled by the shorter's factor)."""
    from service.tiers import read_manifest
    from workers.augment import crop_resize, decode_batch
    from workers.data import ImageFolderImages, PreparedImages, StageDataset

    src, dst = smooth_folder(tmp_path / "src"), str(tmp_path / "dst")
    prepare(src, dst, TIERS, quality=90, workers=2)
    manifest = read_manifest(dst)
    resolution, crop_scale = 40, (0.35, 1.0)
    folder = pick_tier(manifest.tiers, resolution, crop_scale)  # the stage-wide rule: full (needs 78)
    tiered = StageDataset(
        PreparedImages(dst, manifest, folder, 3, "host", False), resolution, True, 5, 1, on_device=True
    )
    encoded = StageDataset(
        PreparedImages(dst, manifest, folder, 3, "device", False), resolution, True, 5, 1, on_device=True
    )
    originals = StageDataset(ImageFolderImages(src, 3), resolution, True, 5, 1, on_device=True)
    originals.source.draft_size = None  # decoded whole: the box drawn on the original's size
    read, diffs = set(), []
    for index in range(len(originals)):
        for epoch in range(4):
            image, label, params = tiered[(index, epoch)]
            image0, label0, params0 = originals[(index, epoch)]
            assert label == label0 and params[4:6] == params0[4:6]
            (h0, w0), (th, tw) = image0.shape[1:], image.shape[1:]
            sy, sx = th / h0, tw / w0
            top, left, h, w = params0[:4]
            # scaled, then rounded to the BOX_GRID (exact in float32 wherever the canvas puts it)
            assert params[:4] == pytest.approx((top * sy, left * sx, h * sy, w * sx), abs=0.5 / BOX_GRID)
            assert all(v * BOX_GRID == round(v * BOX_GRID) for v in params[:4])
            if (th, tw) != (h0, w0):  # never upsampled (up to the rounding of the tier's longer side)...
                assert min(h, w) * min(th, tw) >= resolution * min(h0, w0)
                assert min(h * sy, w * sx) > resolution - 0.5
            for t in TIERS:  # ...and no smaller tier would have done
                ct = capped_size(w0, h0, t)
                if ct[0] < tw and ct != (w0, h0):
                    assert min(h, w) * min(ct) < resolution * min(h0, w0)
            read.add("full" if (th, tw) == (h0, w0) else str(min(th, tw)))
            assert params[6] == (0 if (th, tw) == (h0, w0) else min(th, tw))  # the tier, to name the file
            got, expect = (
                crop_resize(x[None], torch.tensor([p]), resolution)
                for x, p in ((image, params), (image0, params0))
            )
            diffs.append((got - expect).abs().mean().item())
            raw, _, params_enc = encoded[(index, epoch)]
            assert raw.ndim == 1 and params_enc == params  # the tier's bytes, the same box
            decoded, _ = decode_batch([raw], torch.tensor([params_enc]), torch.device("cpu"), 3, str)
            assert torch.equal(decoded[0], image)
    assert read == {"48", "72", "full"}
    # a tier file that fails to decode on the device is named as the file the sample read
    index, epoch = next(
        (i, e) for i in range(len(originals)) for e in range(4) if encoded[(i, e)][2][6] == 72
    )
    path = encoded.source.path(index, 72)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 300)
    raw, _, params_enc = encoded[(index, epoch)]
    with pytest.raises(ValueError, match=rf"image {index} \({path}, \d+ bytes\) cannot be decoded on cpu"):
        decode_batch([raw], torch.tensor([params_enc]), torch.device("cpu"), 3, encoded.source.path)
    # evaluation (the centred square) at a tier's own size reads that tier: the stage-wide rule, S >= R
    evaluation = PreparedImages(dst, manifest, pick_tier(manifest.tiers, 48, None), 3, "host", False)
    for index in range(len(evaluation)):
        assert min(StageDataset(evaluation, 48, False, on_device=True)[index][0].shape[1:]) == 48
    assert max(diffs) < 3, max(diffs)


def test_a_tier_file_that_is_not_the_size_its_index_says_is_named(tmp_path):
    """A prepared folder edited after its prepare (a tier file of another size): a clear error naming the
    file and what to do, never a box cropped from the wrong place."""
    from service.tiers import read_manifest
    from workers.data import PreparedFolderChanged, PreparedImages, StageDataset

    src, dst = make_folder(tmp_path / "src"), str(tmp_path / "dst")
    prepare(src, dst, TIERS, quality=85, workers=2)
    for rel in relative(f"{dst}/48")[1]:
        Image.new("RGB", (33, 33)).save(f"{dst}/48/{rel[0]}", quality=85)
    source = PreparedImages(dst, read_manifest(dst), "48", 3, "host", False)
    with pytest.raises(
        PreparedFolderChanged,
        match=r"/48/ant/00\.jpg\) is 33x33 px where the index .* says 64x48.*prepare it again",
    ):
        StageDataset(source, 20, train=True, on_device=True)[(0, 0)]
    with pytest.raises(PreparedFolderChanged, match="prepare it again"):
        source[0]  # the host path reads the stage's tier, checked alike


def test_a_large_original_decoded_in_draft_mode_keeps_its_box_in_place(tmp_path):
    """A sample no tier covers reads its original, decoded in draft mode as small as its box allows: the
    box scales by exactly 1/s (libjpeg's DCT scaling), not by the decoded size, whose last partial block
    is rounded up (251 x 171 at 1/2: 126 x 86)."""
    from service.tiers import read_manifest
    from workers.data import PreparedImages, StageDataset

    os.makedirs(tmp_path / "src" / "a")
    Image.new("RGB", (251, 171), (90, 120, 150)).save(tmp_path / "src" / "a" / "0.jpg", quality=90)
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    prepare(src, dst, TIERS, quality=90, workers=1)
    source = PreparedImages(dst, read_manifest(dst), pick_tier(TIERS, 80, None), 3, "host", False)
    image, _, params = StageDataset(source, 80, train=False, on_device=True)[0]  # needs 80 px: full/
    assert tuple(image.shape) == (3, 86, 126)  # draft at 80: 1/2
    assert params == (0, 20, 85.5, 85.5, 0, 0, 0)  # centre_box(171, 251) = (0, 40, 171, 171), halved
