"""Images/s of the ``imagefolder`` input pipeline at each stage resolution, with and without JPEG draft mode.

    .venv/bin/python bench/data.py            # 2000 images, 128/160/224 px, 3 rounds (~1.5-2 min on 2 cores)
    .venv/bin/python bench/data.py --quick    # ~25 s smoke: 500 images, 2 rounds
    .venv/bin/python bench/data.py --loader-workers 8 --images 8000   # a bigger box

Data: real images, not synthetic ones. The first ``--images`` Fashion-MNIST training images (Debian's
``dataset-fashion-mnist``, read from its gzipped IDX files: a 16-byte header for images, 8 for labels),
each upscaled from 28 to 256 px (PIL bicubic), made RGB and saved as JPEG quality 90 in torchvision's
ImageFolder layout ``<dir>/<class>/<i>.jpg``. The folder is built once and reused: it lives under
``--cache`` (default: the system temp dir) and counts only once its ``COMPLETE`` marker exists.

What is measured is stagetrain's own pipeline, as a worker builds it for an ``imagefolder`` stage:
``workers.data.ImageFolderImages(root, channels=3)`` wrapped in ``StageDataset(source, resolution,
train=True, seed=0, stage=0)`` (file read through fsspec, JPEG decode, ``convert("RGB")``, uint8 CHW
tensor, seeded RandomResizedCrop + horizontal flip), batched by a ``torch.utils.data.DataLoader``
(``--batch`` 64, ``--loader-workers`` 0, in order, so every run reads the same sample indices and the
same crops). This process runs torch on ``--threads`` 1 intra-op thread, as every DataLoader worker
does: it is per-sample work, and extra threads spin-waiting on a shared 2-core box only add noise (and
CPU time). Stage resolutions default to those of examples/imagenet-resnet50.yaml (128/160/224).

Per resolution there are two modes: ``draft`` as shipped (``StageDataset`` sets ``source.draft_size =
resolution``) and ``full``, the same with ``source.draft_size = None`` set afterwards. Each (resolution,
mode) cell times two things over the same images: ``pipeline``, its DataLoader's batches (the whole
StageDataset), and ``decode``, the source alone (``source[i]``: file read, decode, ``convert``, tensor;
no crop, flip, seeding or collation) -- the gap says how much of a sample's cost is the decode draft mode
can shrink and how much is the per-sample work it cannot. Both also per second of this process's CPU
time (``pipeline_cpu``, ``decode_cpu``; ``time.process_time``), a second opinion.

Timing. A round reads the whole folder once per cell (6 cells by default) in lockstep: batch by batch,
each cell in turn decodes the batch's images through its source, then draws its next DataLoader batch,
each call timed on its own; the cells' order rotates by one every batch and reverses every len(cells)
batches, so each goes first equally often and follows every other cell (which cell ran just before moved
a no-op draft cell's decode by ~10% when the order only rotated). Interleaving at ~0.1 s matters here:
this shared VM's speed drifts by up to 1.5x within seconds, and whole passes interleaved AB/BA still
disagreed by +-30%; per batch, every cell sees the same drift. The first batch is not counted (warm-up);
img/s = images counted / summed call time. With ``--loader-workers`` > 0 the workers prefetch, so a
call's time is not its cost: the pipeline is then timed as one whole pass per cell (from its first
batch's arrival to its last, cells in an order rotated per round; no ``pipeline_cpu``: the work is in the
workers), while ``decode`` stays in lockstep.

Reported per metric: the median img/s over rounds per (resolution, mode); ``draft_speedup``, the median
over rounds of draft/full within a round; and ``vs_224``, a resolution's median draft img/s over the
median full img/s at 224 px (or the largest resolution given): how much faster a low-resolution stage
reads its images than the full-resolution stage does. The target is >= 2x for each lower resolution,
judged on ``pipeline`` (``meets_2x``, ``target_met``).

What draft mode can and cannot do. ``Image.draft(mode, (s, s))`` asks libjpeg to decode at a reduced
DCT scale; PIL picks the strongest of 1/8, 1/4, 1/2 whose result is still >= the requested size on both
sides, else 1/1. For a 256 px JPEG that is 1/2 (128 px) for a 128 px stage, but 1/1 for 160 and 224 (1/2
would give 128 < 160), so those decode at full size and draft mode saves nothing there. At 1/2 the
inverse DCT, chroma upsampling and colour conversion produce a quarter of the pixels, but the file is
still read, parsed and entropy-decoded in full, so decoding is well under 4x faster; the crop/resize that
follows then starts from a quarter of the pixels. The table's ``decoded`` column shows the
size each resolution actually decodes at. Larger photos (ImageNet's are ~400-500 px) can reach 1/2 at
160 px as well, so this 256 px set is the harder case for the middle stage. The flip side: a draft-decoded
image is only as large as the stage, so RandomResizedCrop's crop (35-100% of its area) is upscaled to the
stage size rather than downscaled from a larger decode -- fewer source pixels per crop than with
``draft_size = None``.
"""

from __future__ import annotations

import argparse
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
SIZE, QUALITY = 256, 90
MODES = ("draft", "full")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--images", type=int, help="JPEGs in the folder, all read by every run (default 2000; quick 500)"
    )
    p.add_argument(
        "--resolutions", default="128,160,224", help="comma-separated stage sizes (default 128,160,224)"
    )
    p.add_argument("--batch", type=int, default=64, help="DataLoader batch size (default 64)")
    p.add_argument("--loader-workers", type=int, default=0, help="DataLoader num_workers (default 0)")
    p.add_argument(
        "--rounds", type=int, help="interleaved rounds, each one run of both modes (default 3; quick 2)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads in this process (default 1, as in each DataLoader worker)",
    )
    p.add_argument(
        "--cache",
        default=None,
        help="folder that holds the JPEG folder between runs (default: the system temp dir)",
    )
    p.add_argument(
        "--fashion-mnist",
        default=FASHION_MNIST,
        help="folder with train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz "
        f"(default {FASHION_MNIST})",
    )
    p.add_argument("--quick", action="store_true", help="~25 s smoke: 500 images, 2 rounds")
    args = p.parse_args(argv)
    # Explicit --images/--rounds win over both presets.
    for name, full, quick in (("images", 2000, 500), ("rounds", 3, 2)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.resolutions = sorted({int(r) for r in args.resolutions.split(",") if r})
    args.cache = args.cache or tempfile.gettempdir()
    problems = []
    if not 1 <= args.images <= 60000:
        problems.append(
            f"--images: must be between 1 and 60000 (Fashion-MNIST's training set), got {args.images}"
        )
    if args.batch < 1 or args.images < 2 * args.batch:
        problems.append(
            f"--batch: must be >= 1 and at most half of --images ({args.images}): the first "
            f"batch of a run is not timed, got {args.batch}"
        )
    if args.rounds < 1:
        problems.append(f"--rounds: must be >= 1, got {args.rounds}")
    if args.threads < 1:
        problems.append(f"--threads: must be >= 1, got {args.threads}")
    if args.loader_workers < 0:
        problems.append(f"--loader-workers: must be >= 0, got {args.loader_workers}")
    if not args.resolutions or min(args.resolutions) < 1 or max(args.resolutions) > SIZE:
        problems.append(
            f"--resolutions: sizes between 1 and {SIZE} px (the JPEGs' size), got {args.resolutions}"
        )
    if problems:
        p.error("; ".join(problems))
    return args


# ------------------------------------------------------------------------------------------- data


def read_idx(path: str, header: int) -> bytes:
    with gzip.open(path, "rb") as f:
        return f.read()[header:]


def build_folder(args) -> str:
    """The ImageFolder of ``args.images`` 256 px RGB JPEGs, built on first use. It is written under a
    temporary name and renamed into place, then marked complete: a half-written folder is never used."""
    from PIL import Image

    root = os.path.join(args.cache, f"stagetrain-bench-fmnist-{SIZE}px-q{QUALITY}-{args.images}")
    if os.path.exists(f"{root}/COMPLETE"):
        return root
    images_gz = f"{args.fashion_mnist}/train-images-idx3-ubyte.gz"
    labels_gz = f"{args.fashion_mnist}/train-labels-idx1-ubyte.gz"
    if not (os.path.exists(images_gz) and os.path.exists(labels_gz)):
        sys.exit(
            f"error: Fashion-MNIST not found in {args.fashion_mnist}; install Debian's "
            "dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or pass --fashion-mnist DIR"
        )
    t0 = time.perf_counter()
    pixels, labels = read_idx(images_gz, 16), read_idx(labels_gz, 8)
    shutil.rmtree(root, ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(root) + ".", dir=args.cache)
    for cls in CLASSES:
        os.makedirs(f"{tmp}/{cls}")
    for i in range(args.images):
        img = Image.frombytes("L", (28, 28), pixels[i * 784 : (i + 1) * 784])
        img = img.resize((SIZE, SIZE), Image.Resampling.BICUBIC).convert("RGB")
        img.save(f"{tmp}/{CLASSES[labels[i]]}/{i}.jpg", "JPEG", quality=QUALITY)
    os.rename(tmp, root)
    with open(f"{root}/COMPLETE", "w") as f:
        f.write(f"{args.images} Fashion-MNIST train images, {SIZE} px RGB, JPEG q{QUALITY}\n")
    print(f"built {root} ({args.images} JPEGs) in {time.perf_counter() - t0:.1f} s", flush=True)
    return root


def decoded_size(path: str, resolution: int) -> int:
    """The width a JPEG decodes at in draft mode for a stage of ``resolution`` px (what PIL picks)."""
    from PIL import Image

    with Image.open(path) as img:
        img.draft("RGB", (resolution, resolution))
        return img.size[0]


# ------------------------------------------------------------------------------------------ timing


def open_cell(root: str, resolution: int, mode: str, args):
    """One (resolution, mode) cell: the stage's source and its DataLoader, built as a worker builds them."""
    from torch.utils.data import DataLoader

    from workers.data import ImageFolderImages, StageDataset

    source = ImageFolderImages(root, channels=3)
    dataset = StageDataset(source, resolution, train=True, seed=0, stage=0)  # sets source.draft_size
    if mode == "full":
        source.draft_size = None
    assert source.draft_size == (resolution if mode == "draft" else None)
    loader = DataLoader(dataset, batch_size=args.batch, shuffle=False, num_workers=args.loader_workers)
    return source, loader


def check_batch(x: torch.Tensor, resolution: int) -> None:
    assert x.shape[1:] == (3, resolution, resolution) and x.dtype == torch.uint8, (x.shape, x.dtype)


def metrics(args) -> tuple[str, ...]:
    if args.loader_workers == 0:
        return ("pipeline", "decode", "pipeline_cpu", "decode_cpu")
    return ("pipeline", "decode", "decode_cpu")  # the pipeline's CPU time is spent in the workers


def measure_round(root: str, args, k: int) -> dict[str, dict[tuple[int, str], float]]:
    """Round ``k``: every cell reads the whole folder; ``{metric: {(resolution, mode): img/s}}``.
    Cells advance in lockstep, one batch each in turn, the order rotated every batch; every call
    is timed on its own and the first batch is not counted. With DataLoader workers (which prefetch) the
    pipeline is instead timed as one whole pass per cell, from its first batch's arrival to its last."""
    cells = [(r, m) for r in args.resolutions for m in MODES]
    opened = {c: open_cell(root, *c, args) for c in cells}
    lockstep = args.loader_workers == 0
    batches = {c: iter(opened[c][1]) for c in cells} if lockstep else {}
    timed = ("decode", "decode_cpu", "pipeline", "pipeline_cpu") if lockstep else ("decode", "decode_cpu")
    wall = {m: dict.fromkeys(cells, 0.0) for m in timed}
    counted = 0
    for b in range(math.ceil(args.images / args.batch)):
        indices = range(b * args.batch, min((b + 1) * args.batch, args.images))
        shift = (b + k) % len(cells)
        order = cells[shift:] + cells[:shift]
        for c in order[::-1] if (b // len(cells)) % 2 else order:  # every cell follows every other
            source, _ = opened[c]
            t0, c0 = time.perf_counter(), time.process_time()
            for i in indices:
                source[i]
            t1, c1 = time.perf_counter(), time.process_time()
            if lockstep:
                x, _ = next(batches[c])
                t2, c2 = time.perf_counter(), time.process_time()
                if b == 0:
                    check_batch(x, c[0])
                else:
                    wall["pipeline"][c] += t2 - t1
                    wall["pipeline_cpu"][c] += c2 - c1
            if b > 0:
                wall["decode"][c] += t1 - t0
                wall["decode_cpu"][c] += c1 - c0
        counted += len(indices) if b > 0 else 0
    out = {m: {c: counted / seconds for c, seconds in per.items()} for m, per in wall.items()}
    if not lockstep:
        out["pipeline"] = {}
        shift = k % len(cells)
        for c in cells[shift:] + cells[:shift]:
            out["pipeline"][c] = pipeline_pass(opened[c][1], c[0])
    return out


def pipeline_pass(loader, resolution: int) -> float:
    """img/s of one whole pass of ``loader``, from its first batch's arrival to its last batch's."""
    start, images = None, 0
    for x, _ in loader:
        if start is None:  # the first batch is untimed: worker start-up and the first files' latency
            check_batch(x, resolution)
            start = time.perf_counter()
        else:
            images += len(x)
    return images / (time.perf_counter() - start)


def measure(root: str, args) -> list[dict]:
    """One row per round: ``row[metric][(resolution, mode)]`` in img/s."""
    rows = []
    for k in range(args.rounds):
        row = {"round": k + 1, **measure_round(root, args, k)}
        rows.append(row)
        line = ", ".join(
            f"{r} px {row['pipeline'][(r, 'draft')]:.0f}/{row['pipeline'][(r, 'full')]:.0f}"
            for r in args.resolutions
        )
        print(f"  round {k + 1}/{args.rounds}: pipeline img/s draft/full {line}", flush=True)
    return rows


# ------------------------------------------------------------------------------------------ report


def summarise(args, rows: list[dict], decoded: dict[int, int]) -> dict:
    ref = 224 if 224 in args.resolutions else max(args.resolutions)
    per_res: dict[str, dict] = {str(r): {"decoded_px": decoded[r]} for r in args.resolutions}
    for metric in metrics(args):
        med = {c: statistics.median(row[metric][c] for row in rows) for c in rows[0][metric]}
        for r in args.resolutions:
            pairs = [row[metric][(r, "draft")] / row[metric][(r, "full")] for row in rows]
            vs_ref = med[(r, "draft")] / med[(ref, "full")]
            per_res[str(r)][metric] = {
                "draft_img_s": round(med[(r, "draft")], 1),
                "full_img_s": round(med[(r, "full")], 1),
                "draft_speedup": round(statistics.median(pairs), 3),
                "draft_speedup_range": [round(min(pairs), 3), round(max(pairs), 3)],
                f"vs_{ref}": round(vs_ref, 3),
                "meets_2x": vs_ref >= 2.0 if r < ref else None,
            }
    lower = [v for r, v in per_res.items() if int(r) < ref]
    return {
        "per_resolution": per_res,
        "reference_resolution": ref,
        "target": f"pipeline draft img/s at each resolution below {ref} >= 2x pipeline full img/s at {ref}",
        "target_met": all(v["pipeline"]["meets_2x"] for v in lower),
        **{f"{m}_target_met": all(v[m]["meets_2x"] for v in lower) for m in metrics(args) if m != "pipeline"},
        "images": args.images,
        "image_px": SIZE,
        "jpeg_quality": QUALITY,
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


def print_table(args, rows: list[dict], summary: dict) -> None:
    ref = summary["reference_resolution"]
    print()
    print(f"{'round':>5} {'res':>5} {'metric':>13} {'draft img/s':>12} {'full img/s':>11} {'draft/full':>11}")
    for row in rows:
        for r in args.resolutions:
            for metric in metrics(args):
                draft, full = row[metric][(r, "draft")], row[metric][(r, "full")]
                print(
                    f"{row['round']:>5} {r:>5} {metric:>13} {draft:>12.1f} {full:>11.1f} "
                    f"{draft / full:>11.3f}"
                )
    print()
    print("Median img/s over rounds. pipeline: StageDataset through the DataLoader; decode: the source")
    print("alone; *_cpu: images per second of this process's CPU time (less moved by other processes' load).")
    vs = f"draft vs {ref} full"
    print(
        f"{'res':>5} {'decoded':>8} {'metric':>13} {'draft img/s':>12} {'full img/s':>11} "
        f"{'draft/full (min..max)':>22} {vs:>18} {'>= 2x':>6}"
    )
    for res, per in summary["per_resolution"].items():
        for metric in metrics(args):
            v = per[metric]
            lo, hi = v["draft_speedup_range"]
            speedup = f"{v['draft_speedup']:.2f} ({lo:.2f}..{hi:.2f})"
            meets = "-" if v["meets_2x"] is None else ("yes" if v["meets_2x"] else "NO")
            print(
                f"{res:>5} {per['decoded_px']:>6}px {metric:>13} {v['draft_img_s']:>12.1f} "
                f"{v['full_img_s']:>11.1f} {speedup:>22} {v[f'vs_{ref}']:>17.2f}x {meets:>6}"
            )
    print()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    root = build_folder(args)
    from workers.data import ImageFolderImages

    paths = [path for path, _ in ImageFolderImages(root, channels=3).samples]
    decoded = {r: decoded_size(paths[0], r) for r in args.resolutions}
    print(
        f"data: {args.images} Fashion-MNIST JPEGs ({SIZE} px RGB, q{QUALITY}) in {root}; resolutions "
        f"{args.resolutions}, {args.rounds} rounds, batch {args.batch}, loader workers "
        f"{args.loader_workers}, {torch.get_num_threads()} torch thread(s), {os.cpu_count()} CPUs",
        flush=True,
    )
    for path in paths:  # untimed: into the page cache
        with open(path, "rb") as f:
            f.read()
    rows = measure(root, args)
    summary = summarise(args, rows, decoded)
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    print_table(args, rows, summary)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
