"""Images/s of a stage's input pipeline reading an image folder's originals vs its resolution tiers
(``stagetrain prepare``), side by side in one run.

    .venv/bin/python bench/tiers.py                    # 200 photos, 128/160/224 px, 3 rounds (~1-2 min)
    .venv/bin/python bench/tiers.py --tiers 160,256,320 --rounds 5

Data: ``--images`` ImageNet-like photos, made from the real photographs installed on this machine
(matplotlib's and scikit-learn's sample images: 512x600 and 640x427 JPEGs); without them, smooth
synthetic scenes. Each is a random crop (55-100% of the area, random place, random flip) of one of them
at an ImageNet-typical size (500x375 for half of them, 375x500, 500x333, 500x500), with camera-like
grain (Gaussian, sigma 3), saved as JPEG quality 90 in an ImageFolder of 4 classes: ~60 KB each, where
ImageNet's average ~110 KB (its photos have more fine texture), so entropy decoding, the part tiers
shrink and draft mode does not, is a smaller share of the cost here than there. ``prepare`` then writes
its tiers (``--tiers``, default ``auto``), timed: that is the one-off cost.

What is measured is ``workers.data.ImageFolderImages`` wrapped in ``StageDataset`` (file read, JPEG
decode in draft mode, ``convert("RGB")``, tensor, seeded RandomResizedCrop + flip for ``train``, resize
+ centre crop for ``eval``), single process, 1 torch thread, per stage resolution, in cells:

- ``orig``: the original folder as stagetrain reads it today (``draft_size`` = the stage's resolution);
- ``orig_exact``: the same with ``draft_size = needed_side(...)`` (train only): nothing decoded smaller
  than the crops need, the detail a tier keeps;
- ``tier``: the folder ``service.tiers.tier_root`` picks, read with ``draft_size = needed_side(...)``
  (train; none when that is ``full``: the same files as ``orig_exact``). For ``eval`` the needed side
  is the resolution itself, so ``draft_size`` is as today.
- ``stage``: what a loader worker did for this stage once crops moved to the device (``augment_on:
  device``) and before the tier was chosen per sample: the folder ``tier_root`` picks for the stage,
  decoded as ``StageDataset`` sets it up, and the crop box drawn on it; no crop, resize or flip on the host.
- ``now``: what a loader worker does today (``workers.data.PreparedImages``): each sample's box drawn on
  the original's size, the smallest tier that covers that box read and decoded, the box scaled to it.
  Its train img/s per resolution over the 224 px stage's is ``now_vs_224``: how much cheaper the host
  makes a low-resolution stage; ``now / stage`` is what choosing the tier per sample gained.

Then, per resolution, the collate a loader worker runs on those samples (batches of ``--batch``): cut to
their boxes and packed into one canvas (``workers.augment.collate``: ``crop_to_box``, ``pack``) vs whole
images padded to the largest (the collate before both), ms and MB per batch; and the loader's whole
work per image (sample + its share of the collate) as img/s and its ratio to the 224 px stage's
(``loader_vs_224``).

Timing: cells advance in lockstep, 8 images each in turn, the order rotated every chunk and reversed
every other pass, each call timed on its own, the first chunk not counted; a round reads every image
once per cell. Reported: median img/s over rounds per cell, and per round the ratios tier/orig
(``vs_today``) and tier/orig_exact (``vs_exact``), median (min..max). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # runnable as `python bench/tiers.py` from a checkout without installing
    sys.path.insert(0, REPO)

CLASSES = ("a", "b", "c", "d")
SHAPES = [(500, 375)] * 5 + [(375, 500)] * 2 + [(500, 333)] * 2 + [(500, 500)]
CHUNK = 8
GRAIN = 3  # sigma of the Gaussian grain, in 8-bit levels


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=int, default=200, help="photos in the folder (default 200)")
    p.add_argument("--resolutions", default="128,160,224", help="stage sizes (default 128,160,224)")
    p.add_argument("--tiers", default="auto", help="prepare's --tiers (default auto)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--batch", type=int, default=64, help="per-worker batch for the collate figures (64)")
    args = p.parse_args(argv)
    args.resolutions = sorted({int(r) for r in args.resolutions.split(",") if r})
    if args.images < 4 * CHUNK or args.rounds < 1:
        p.error(f"--images must be at least {4 * CHUNK} and --rounds at least 1")
    return args


def photos() -> list[str]:
    """Real photographs that ship with installed packages (found through the packages' folders)."""
    found = []
    for package, pattern in (
        ("matplotlib", "mpl-data/sample_data/*.jpg"),
        ("sklearn", "datasets/images/*.jpg"),
    ):
        try:
            module = __import__(package)
        except ImportError:
            continue
        found += sorted(glob.glob(os.path.join(os.path.dirname(module.__file__), pattern)))
    return found


def build_folder(root: str, n: int) -> tuple[str, str]:
    """``n`` ImageNet-like JPEGs in ``root/<class>/<i>.jpg``; what they were made from."""
    import numpy as np
    from PIL import Image

    rng, nprng = random.Random(0), np.random.default_rng(0)
    sources = [Image.open(p).convert("RGB") for p in photos()]
    what = (
        ", ".join(os.path.basename(p) for p in photos()) if sources else "synthetic scenes (no photos found)"
    )
    for cls in CLASSES:
        os.makedirs(f"{root}/{cls}")
    for i in range(n):
        w, h = rng.choice(SHAPES)
        if sources:
            src = rng.choice(sources)
            area = rng.uniform(0.55, 1.0) * src.width * src.height
            cw = min(src.width, round((area * w / h) ** 0.5))
            ch = min(src.height, round(cw * h / w))
            x, y = rng.randint(0, src.width - cw), rng.randint(0, src.height - ch)
            img = src.crop((x, y, x + cw, y + ch)).resize((w, h), Image.Resampling.LANCZOS)
            if rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            pixels = np.asarray(img, dtype=np.float32)
        else:  # smooth gradients and blobs, colours per image
            yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
            pixels = np.stack([128 + 100 * np.sin(6 * xx * rng.random() + 9 * yy * c) for c in (1, 2, 3)], -1)
        pixels = pixels + nprng.normal(0, GRAIN, pixels.shape)
        out = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        out.save(f"{root}/{CLASSES[i % len(CLASSES)]}/{i:04d}.jpg", "JPEG", quality=90)
    return root, what


def open_cells(src: str, dst: str, resolution: int):
    """{(task, cell): StageDataset} for one resolution, and the tier each task reads."""
    from service.tiers import FULL, needed_side, read_manifest, tier_root
    from workers.data import ImageFolderImages, PreparedImages, StageDataset

    manifest = read_manifest(dst)
    cells, picked = {}, {}
    for task, crop_scale in (("train", (0.35, 1.0)), ("eval", None)):
        need = needed_side(resolution, crop_scale)
        folder = tier_root(dst, resolution, crop_scale)
        picked[task] = folder.rsplit("/", 1)[1]
        wanted = {"orig": (src, resolution), "orig_exact": (src, need), "tier": (folder, need)}
        if task == "eval":
            del wanted["orig_exact"]  # need == resolution: the same as orig
        if picked[task] == FULL:
            del wanted["tier"]
        for cell, (root, draft) in wanted.items():
            source = ImageFolderImages(root, channels=3)
            dataset = StageDataset(source, resolution, train=task == "train", seed=0, stage=0)
            source.draft_size = draft  # StageDataset set it to the resolution
            cells[(task, cell)] = dataset
        stage = ImageFolderImages(folder, channels=3, tier=picked[task] != FULL)
        cells[(task, "stage")] = StageDataset(stage, resolution, train=task == "train", on_device=True)
        now = PreparedImages(dst, manifest, picked[task], 3, "host", False)
        cells[(task, "now")] = StageDataset(now, resolution, train=task == "train", on_device=True)
    return cells, picked


def measure_round(cells: dict, images: int, k: int) -> dict:
    """Round ``k``: every cell reads every image once; {cell: img/s}."""
    keys = list(cells)
    spent = dict.fromkeys(keys, 0.0)
    counted = 0
    for b in range(images // CHUNK):
        indices = range(b * CHUNK, (b + 1) * CHUNK)
        shift = (b + k) % len(keys)
        order = keys[shift:] + keys[:shift]
        for key in order[::-1] if (b // len(keys)) % 2 else order:
            dataset = cells[key]
            t0 = time.perf_counter()
            for i in indices:
                dataset[(i, 0)] if key[0] == "train" else dataset[i]
            if b > 0:
                spent[key] += time.perf_counter() - t0
        counted += CHUNK if b > 0 else 0
    return {key: counted / seconds for key, seconds in spent.items()}


def measure_batches(dataset, images: int, batch: int, rounds: int) -> dict:
    """What else a loader worker does with crops on the device: collating ``batch`` samples of the ``now``
    cell, cut to their boxes and packed (``workers.augment.collate``) vs whole images padded to the
    largest (the collate before ``crop_to_box`` and ``pack``), alternating; ms per batch (median) and MB
    per batch (what is pinned and copied to the device)."""
    from workers.augment import collate, pad_stack

    items = [dataset[(i, 0)] for i in range(images)]
    batches = [items[k : k + batch] for k in range(0, images - batch + 1, batch)]
    spent, size = {"crops": [], "whole": []}, {}
    for k in range(rounds):
        for name in ("crops", "whole") if k % 2 else ("whole", "crops"):
            for b in batches:
                t0 = time.perf_counter()
                x = collate(b)[0] if name == "crops" else pad_stack([im for im, _, _ in b])
                spent[name].append(time.perf_counter() - t0)
                size.setdefault(name, []).append(x.numel() / 1e6)
    return {
        f"{name}_{what}": round(statistics.median(v), 2)
        for name in spent
        for what, v in (("ms", [t * 1e3 for t in spent[name]]), ("mb", size[name]))
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import PIL
    import torch

    from service.prepare import parse_tiers, prepare

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    work = tempfile.mkdtemp(prefix="stagetrain-bench-tiers-")
    try:
        src, what = build_folder(f"{work}/src", args.images)
        sizes = [os.path.getsize(p) for p in glob.glob(f"{src}/*/*.jpg")]
        print(
            f"data: {args.images} JPEGs, mean {statistics.mean(sizes) / 1e3:.0f} KB, from {what}", flush=True
        )
        t1 = time.perf_counter()
        done = prepare(src, f"{work}/dst", parse_tiers(args.tiers))
        prepare_s = time.perf_counter() - t1
        m = done.manifest
        print(
            f"prepare: tiers {m.tiers} + full in {prepare_s:.1f} s ({args.images / prepare_s:.0f} img/s, "
            f"{os.cpu_count()} CPUs); MB per tier: "
            + ", ".join(f"{k} {v / 1e6:.1f}" for k, v in m.tier_bytes.items()),
            flush=True,
        )
        for path in glob.glob(f"{work}/**/*.jpg", recursive=True):  # untimed: into the page cache
            with open(path, "rb") as f:
                f.read()
        rows, picked, collates = {}, {}, {}
        for r in args.resolutions:
            cells, picked[r] = open_cells(src, f"{work}/dst", r)
            rows[r] = []
            for k in range(args.rounds):
                rows[r].append(measure_round(cells, args.images, k))
            collates[r] = measure_batches(cells[("train", "now")], args.images, args.batch, args.rounds)
            line = ", ".join(f"{t}/{c} {statistics.median(x[(t, c)] for x in rows[r]):.0f}" for t, c in cells)
            print(
                f"  {r} px (train reads {picked[r]['train']}/, eval {picked[r]['eval']}/): img/s {line}",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    per_stage = {}
    head = ("res", "task", "tier", "orig", "exact", "tier", "vs_today", "vs_exact")
    print("\n{:>4} {:>5} {:>5} {:>7} {:>7} {:>7} {:>18} {:>18}".format(*head))
    for r, per_round in rows.items():
        for task in ("train", "eval"):
            cells = [c for t, c in per_round[0] if t == task]
            med = {c: statistics.median(x[(task, c)] for x in per_round) for c in cells}
            entry = {"tier": picked[r][task], **{f"{c}_img_s": round(v, 1) for c, v in med.items()}}
            shown = []
            for name, ref in (("vs_today", "orig"), ("vs_exact", "orig_exact")):
                if "tier" not in med or ref not in med:
                    shown.append("-")
                    continue
                ratios = [x[(task, "tier")] / x[(task, ref)] for x in per_round]
                entry[name] = round(statistics.median(ratios), 3)
                entry[name + "_range"] = [round(min(ratios), 3), round(max(ratios), 3)]
                shown.append(f"{entry[name]:.2f} ({min(ratios):.2f}..{max(ratios):.2f})")
            entry["now_img_s"] = round(statistics.median(x[(task, "now")] for x in per_round), 1)
            entry["stage_img_s"] = round(statistics.median(x[(task, "stage")] for x in per_round), 1)
            gains = [x[(task, "now")] / x[(task, "stage")] for x in per_round]
            entry["now_vs_stage"] = round(statistics.median(gains), 3)
            entry["now_vs_stage_range"] = [round(min(gains), 3), round(max(gains), 3)]
            if task == "train" and 224 in rows:
                ratios = [
                    x[(task, "now")] / y[(task, "now")] for x, y in zip(per_round, rows[224], strict=True)
                ]
                entry["now_vs_224"] = round(statistics.median(ratios), 3)
                shown_now = (
                    f"now {entry['now_img_s']:.0f} img/s, {entry['now_vs_224']:.2f}x the 224 px stage's"
                )
            else:
                shown_now = f"now {entry['now_img_s']:.0f} img/s"
            shown_now += f" ({entry['now_vs_stage']:.2f}x stage-wide tier, {entry['stage_img_s']:.0f})"
            per_stage[f"{r}_{task}"] = entry
            cols = [f"{med[c]:.0f}" if c in med else "-" for c in ("orig", "orig_exact", "tier")]
            print(
                "{:>4} {:>5} {:>5} {:>7} {:>7} {:>7} {:>18} {:>18}   {}".format(
                    r, task, entry["tier"], *cols, *shown, shown_now
                )
            )
    print(f"\ncollate, batches of {args.batch} (train, per sample tiers): cut to the boxes vs whole images")
    loader = {}
    for r, c in collates.items():
        # a loader worker's whole work per image: the sample (now cell) plus its share of the collate
        per_image = 1 / per_stage[f"{r}_train"]["now_img_s"] + c["crops_ms"] / 1e3 / args.batch
        c["loader_img_s"] = round(1 / per_image, 1)
        loader[r] = c["loader_img_s"]
        print(
            f"  {r} px: {c['crops_ms']:.1f} ms, {c['crops_mb']:.1f} MB vs {c['whole_ms']:.1f} ms, "
            f"{c['whole_mb']:.1f} MB; sample + collate {c['loader_img_s']:.0f} img/s"
        )
    for r, c in collates.items():
        if 224 in loader:
            c["loader_vs_224"] = round(loader[r] / loader[224], 3)
    print(
        "  loader work per image vs the 224 px stage's: "
        + ", ".join(f"{r} px {c.get('loader_vs_224', float('nan')):.2f}x" for r, c in collates.items())
    )
    print()
    summary = {
        "date": datetime.date.today().isoformat(),
        "per_stage": per_stage,
        "collate": {str(r): c for r, c in collates.items()},
        "batch": args.batch,
        "tiers": m.tiers,
        "images": args.images,
        "mean_kb": round(statistics.mean(sizes) / 1e3, 1),
        "data": what,
        "prepare_s": round(prepare_s, 2),
        "prepare_img_s": round(args.images / prepare_s, 1),
        "tier_mb": {k: round(v / 1e6, 2) for k, v in m.tier_bytes.items()},
        "rounds": args.rounds,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "pillow": PIL.__version__,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
