"""Images/s of a stage's host input pipeline at each stage resolution, and its ratio to the 224 px stage's.

    .venv/bin/python bench/data.py            # 500 ImageNet-like photos, 128/160/224 px, 3 rounds (~1 min)
    .venv/bin/python bench/data.py --quick    # ~15 s smoke: 200 photos, 2 rounds
    .venv/bin/python bench/data.py --source fashion-mnist --images 2000   # 256 px JPEGs (the earlier set)
    .venv/bin/python bench/data.py --loader-workers 8 --images 4000       # a bigger box

Data (``--source``): ``photos`` (default), ImageNet-like JPEGs (~500x375, q90) made from the real photos
installed on this machine (``bench/tiers.py``'s ``build_folder``); ``fashion-mnist``, the first
``--images`` Fashion-MNIST training images (Debian's ``dataset-fashion-mnist``) upscaled to 256 px RGB
JPEGs q90. Either folder is built once under ``--cache`` (default: the system temp dir) with its
resolution tiers (``stagetrain prepare --tiers auto``), and counts only once its ``COMPLETE`` marker exists.

What is measured is what a training worker's DataLoader does for a stage of an ``imagefolder`` job,
built with the worker's own code (``open_source`` with the job's ``data`` settings, ``StageDataset``, the
loader's collate): batches of ``--batch`` read in order, ``--loader-workers`` 0 (this process, one torch
thread, as in each DataLoader worker). Modes, each at each resolution:

- ``tiers``: the prepared folder, crops on the device (the default ``augment_on: device``): each sample
  reads the smallest tier its own crop box needs and the loader batches the boxes' pixels
  (``workers.augment.collate``); what the README recommends for image folders;
- ``device``: the original folder, crops on the device: each JPEG decoded in draft mode no smaller than
  its box needs, the same collate;
- ``host``: the original folder with ``augment_on: host``: random-resized-crop, resize and flip per
  sample in the loader (draft mode at the stage's size): the pipeline before the device crops.

Timing: cells advance in lockstep, one batch each in turn, the order rotated every batch and reversed
every len(cells) batches, each call timed on its own, the first batch not counted (with loader workers,
which prefetch, one whole pass per cell instead). Reported per (resolution, mode): the median img/s over
rounds (also per second of this process's CPU time, ``_cpu``), and ``vs_224``: the median over rounds
of its img/s over the same mode's at 224 px (or the largest resolution) in that round. The issue's target
on the 2-core developer machine: the 128 px stage's host pipeline >= 2.5x the 224 px stage's, judged on
``tiers`` (``target_met``). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import PIL
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # runnable as `python bench/data.py` from a checkout without installing
    sys.path.insert(0, REPO)

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
FMNIST_PX, QUALITY = 256, 90
MODES = ("tiers", "device", "host")
TARGET = 2.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--source", choices=["photos", "fashion-mnist"], default="photos")
    p.add_argument("--images", type=int, help="JPEGs in the folder, all read by every run (default 500)")
    p.add_argument("--resolutions", default="128,160,224", help="stage sizes (default 128,160,224)")
    p.add_argument("--batch", type=int, default=64, help="DataLoader batch size (default 64)")
    p.add_argument("--loader-workers", type=int, default=0, help="DataLoader num_workers (default 0)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3; quick 2)")
    p.add_argument("--cache", default=None, help="folder that keeps the JPEG folders (default: temp dir)")
    p.add_argument(
        "--fashion-mnist", default=FASHION_MNIST, help=f"IDX files' folder (default {FASHION_MNIST})"
    )
    p.add_argument("--quick", action="store_true", help="~15 s smoke: 200 photos, 2 rounds")
    args = p.parse_args(argv)
    for name, full, quick in (("images", 500, 200), ("rounds", 3, 2)):  # explicit values win
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.resolutions = sorted({int(r) for r in args.resolutions.split(",") if r})
    args.cache = args.cache or tempfile.gettempdir()
    problems = []
    if not 1 <= args.images <= 60000:
        problems.append(f"--images: must be between 1 and 60000, got {args.images}")
    if args.batch < 1 or args.images < 2 * args.batch:
        problems.append(f"--batch: at least 1 and at most half of --images ({args.images}), got {args.batch}")
    if args.rounds < 1:
        problems.append(f"--rounds: must be >= 1, got {args.rounds}")
    if args.loader_workers < 0:
        problems.append(f"--loader-workers: must be >= 0, got {args.loader_workers}")
    if not args.resolutions or min(args.resolutions) < 16:
        problems.append(f"--resolutions: sizes of at least 16 px, got {args.resolutions}")
    if problems:
        p.error("; ".join(problems))
    return args


# ------------------------------------------------------------------------------------------- data


def build_fashion_mnist(root: str, args) -> str:
    """``args.images`` Fashion-MNIST training images as 256 px RGB JPEGs in ``root/<class>/<i>.jpg``."""
    from PIL import Image

    images_gz = f"{args.fashion_mnist}/train-images-idx3-ubyte.gz"
    labels_gz = f"{args.fashion_mnist}/train-labels-idx1-ubyte.gz"
    if not (os.path.exists(images_gz) and os.path.exists(labels_gz)):
        sys.exit(
            f"error: Fashion-MNIST not found in {args.fashion_mnist}; install Debian's "
            "dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or pass --fashion-mnist DIR"
        )
    with gzip.open(images_gz, "rb") as f:
        pixels = f.read()[16:]
    with gzip.open(labels_gz, "rb") as f:
        labels = f.read()[8:]
    for cls in CLASSES:
        os.makedirs(f"{root}/{cls}")
    for i in range(args.images):
        img = Image.frombytes("L", (28, 28), pixels[i * 784 : (i + 1) * 784])
        img = img.resize((FMNIST_PX, FMNIST_PX), Image.Resampling.BICUBIC).convert("RGB")
        img.save(f"{root}/{CLASSES[labels[i]]}/{i}.jpg", "JPEG", quality=QUALITY)
    return f"Fashion-MNIST upscaled to {FMNIST_PX} px"


def build_folders(args) -> tuple[str, str, str]:
    """(originals, their prepared tiers, what the images are), built on first use under ``args.cache``:
    written under a temporary name, prepared, renamed into place, then marked complete."""
    from bench.tiers import build_folder
    from service.prepare import AUTO_TIERS, prepare

    tiers = "-".join(str(t) for t in AUTO_TIERS)
    base = os.path.join(args.cache, f"stagetrain-bench-data-{args.source}-{args.images}-tiers-{tiers}")
    if os.path.exists(f"{base}/COMPLETE"):
        with open(f"{base}/COMPLETE") as f:
            return f"{base}/src", f"{base}/tiers", f.read().strip()
    t0 = time.perf_counter()
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(args.cache, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(base) + ".", dir=args.cache)
    if args.source == "photos":
        what = "ImageNet-like photos from " + build_folder(f"{tmp}/src", args.images)[1]
    else:
        what = build_fashion_mnist(f"{tmp}/src", args)
    os.rename(tmp, base)
    prepare(f"{base}/src", f"{base}/tiers", None)  # --tiers auto; after the rename: it records the path
    with open(f"{base}/COMPLETE", "w") as f:
        f.write(what + "\n")
    print(
        f"built {base} ({args.images} JPEGs and their tiers) in {time.perf_counter() - t0:.0f} s", flush=True
    )
    return f"{base}/src", f"{base}/tiers", what


# ------------------------------------------------------------------------------------------ timing


def open_cell(src: str, tiers: str, resolution: int, mode: str, args):
    """One (resolution, mode) cell's DataLoader, built as a training worker builds it."""
    from torch.utils.data import DataLoader

    from service.spec import ImageFolderData
    from workers.augment import collate
    from workers.data import StageDataset, collate_host, open_source

    root = tiers if mode == "tiers" else src
    on_device = mode != "host"
    data = ImageFolderData(kind="imagefolder", train=root, augment_on="device" if on_device else "host")
    source = open_source(data, 3, 0, "train", resolution)
    dataset = StageDataset(source, resolution, train=True, seed=0, stage=0, on_device=on_device)
    return DataLoader(
        dataset,
        batch_size=args.batch,
        shuffle=False,
        num_workers=args.loader_workers,
        collate_fn=collate if on_device else collate_host,
    )


def check_batch(batch: tuple, resolution: int, mode: str) -> None:
    x = batch[0]
    assert x.dtype == torch.uint8 and x.shape[1] == 3, (x.shape, x.dtype)
    if mode == "host":
        assert x.shape[2:] == (resolution, resolution), x.shape
    else:
        assert batch[2].shape == (len(batch[1]), 7) and len(x) in (1, len(batch[1])), batch[2].shape


def measure_round(src: str, tiers: str, args, k: int) -> dict[str, dict[tuple[int, str], float]]:
    """Round ``k``: every cell reads the whole folder; ``{"pipeline"[, "pipeline_cpu"]: {cell: img/s}}``."""
    cells = [(r, m) for r in args.resolutions for m in MODES]
    loaders = {c: open_cell(src, tiers, *c, args) for c in cells}
    if args.loader_workers:
        shift = k % len(cells)
        return {"pipeline": {c: pipeline_pass(loaders[c], *c) for c in cells[shift:] + cells[:shift]}}
    batches = {c: iter(loaders[c]) for c in cells}
    wall = {m: dict.fromkeys(cells, 0.0) for m in ("pipeline", "pipeline_cpu")}
    counted = 0
    for b in range(math.ceil(args.images / args.batch)):
        shift = (b + k) % len(cells)
        order = cells[shift:] + cells[:shift]
        for c in order[::-1] if (b // len(cells)) % 2 else order:  # every cell follows every other
            t0, c0 = time.perf_counter(), time.process_time()
            batch = next(batches[c])
            t1, c1 = time.perf_counter(), time.process_time()
            if b == 0:
                check_batch(batch, *c)
            else:
                wall["pipeline"][c] += t1 - t0
                wall["pipeline_cpu"][c] += c1 - c0
        counted += min(args.batch, args.images - b * args.batch) if b > 0 else 0
    return {m: {c: counted / seconds for c, seconds in per.items()} for m, per in wall.items()}


def pipeline_pass(loader, resolution: int, mode: str) -> float:
    """img/s of one whole pass of ``loader``, from its first batch's arrival to its last batch's."""
    start, images = None, 0
    for batch in loader:
        if start is None:  # the first batch is untimed: worker start-up and the first files' latency
            check_batch(batch, resolution, mode)
            start = time.perf_counter()
        else:
            images += len(batch[1])
    return images / (time.perf_counter() - start)


# ------------------------------------------------------------------------------------------ report


def summarise(args, rows: list[dict]) -> dict:
    ref = 224 if 224 in args.resolutions else max(args.resolutions)
    per_res: dict[str, dict] = {}
    for metric in rows[0]["cells"]:
        for r in args.resolutions:
            for mode in MODES:
                values = [row["cells"][metric][(r, mode)] for row in rows]
                ratios = [row["cells"][metric][(r, mode)] / row["cells"][metric][(ref, mode)] for row in rows]
                per_res.setdefault(str(r), {})[f"{mode}_{metric}"] = {
                    "img_s": round(statistics.median(values), 1),
                    f"vs_{ref}": round(statistics.median(ratios), 3),
                    f"vs_{ref}_range": [round(min(ratios), 3), round(max(ratios), 3)],
                }
    lowest = str(min(args.resolutions))
    judged = per_res[lowest]["tiers_pipeline"][f"vs_{ref}"]
    return {
        "source": args.source,
        "per_resolution": per_res,
        "reference_resolution": ref,
        "target": f"tiers pipeline img/s at {lowest} px >= {TARGET}x the {ref} px stage's",
        "target_met": judged >= TARGET if int(lowest) < ref else None,
        "images": args.images,
        "rounds": args.rounds,
        "batch": args.batch,
        "loader_workers": args.loader_workers,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pillow": PIL.__version__,
    }


def print_table(args, summary: dict) -> None:
    ref = summary["reference_resolution"]
    metrics = [m for m in ("pipeline", "pipeline_cpu") if f"tiers_{m}" in summary["per_resolution"][str(ref)]]
    print(
        "\nMedian img/s over rounds (pipeline: the DataLoader's batches; _cpu: per second of this process's"
    )
    print(f"CPU time), and each mode's ratio to its own {ref} px stage, median (min..max) over rounds.")
    print(f"{'res':>5} {'metric':>13} " + " ".join(f"{m:>24}" for m in MODES))
    for res, per in summary["per_resolution"].items():
        for metric in metrics:
            cols = []
            for mode in MODES:
                v = per[f"{mode}_{metric}"]
                lo, hi = v[f"vs_{ref}_range"]
                cols.append(f"{v['img_s']:>7.0f} {v[f'vs_{ref}']:.2f}x ({lo:.2f}..{hi:.2f})")
            print(f"{res:>5} {metric:>13} " + " ".join(f"{c:>24}" for c in cols))
    print(f"\n{summary['target']}: {'met' if summary['target_met'] else 'NOT met'}\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    src, tiers, what = build_folders(args)
    files = glob.glob(f"{os.path.dirname(src)}/**/*.*", recursive=True)
    print(
        f"data: {args.images} JPEGs ({what}) in {src}; resolutions {args.resolutions}, {args.rounds} rounds, "
        f"batch {args.batch}, loader workers {args.loader_workers}, 1 torch thread, {os.cpu_count()} CPUs",
        flush=True,
    )
    for path in files:  # untimed: into the page cache
        with open(path, "rb") as f:
            f.read()
    rows = []
    for k in range(args.rounds):
        rows.append({"round": k + 1, "cells": measure_round(src, tiers, args, k)})
        line = ", ".join(
            f"{r} px " + "/".join(f"{rows[-1]['cells']['pipeline'][(r, m)]:.0f}" for m in MODES)
            for r in args.resolutions
        )
        print(f"  round {k + 1}/{args.rounds}: pipeline img/s {'/'.join(MODES)}: {line}", flush=True)
    summary = summarise(args, rows)
    summary["data"] = what
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    print_table(args, summary)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
