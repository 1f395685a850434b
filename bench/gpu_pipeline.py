"""Per stage resolution: the model's own ceiling vs stagetrain's loop on in-memory data and on a JPEG folder.

    python bench/gpu_pipeline.py          # one GPU: ResNet-50, bf16, 128/160/224 px (bench/gpu_smoke.sh)
    python bench/gpu_pipeline.py --device cpu --arch resnet18 --resolutions 32,48 --batch 8 --images 64 \\
        --warmup 1 --steps 3 --rounds 1 --loader-workers 1   # the same code on a CPU: a smoke test

Cells, per resolution, each a few warm-up and then timed optimizer steps on one worker (this process):

- ``ceiling``: the model alone on data already on the device (random float batches, channels_last and
  bf16 autocast on CUDA, the same SGD step and batch): what the model itself allows;
- ``memory``: stagetrain's loop (``StageRunner``, timed as ``plan --calibrate`` times it) on synthetic data
  held on the device (``data.device_cache_bytes``): gather + ``roi_align`` crops on the device;
- ``folder``: the same loop on an ImageFolder of ``--images`` ImageNet-sized JPEGs (``bench/tiers.py``'s
  photos, ~500x375) read by ``--loader-workers`` DataLoader workers as bytes and decoded per batch on the
  device (``data.decode_on: device``; nvjpeg on CUDA);
- ``folder_host``: the same folder decoded in the loader workers (PIL, draft mode), the default;
- ``folder_tiers``: the same folder after ``stagetrain prepare`` (``--tiers auto``; the prepare is timed
  and printed, not counted), decoded in the loader workers, each sample from the smallest tier its own
  crop box needs: what the README recommends for image folders.

Before them, on CUDA, ``host_syncs_per_step`` (memory and folder_tiers, first resolution): how often a
step makes the host wait for the GPU (expected 0: the data path copies from pinned memory, non-blocking).

Rounds interleave the cells (the order rotates each round); figures are medians of img/s over rounds,
and each loop cell's ratio to the ceiling. The issue's targets on one H200 (ResNet-50 bf16 channels_last):
memory >= 0.9x the ceiling at every resolution, folder >= 0.8x at 128 px, 224 px >= 5,000 img/s. Ends
with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

CELLS = ("ceiling", "memory", "folder", "folder_host", "folder_tiers")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--resolutions", default="128,160,224")
    p.add_argument("--batch", type=int, default=128, help="per-worker batch (default 128)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model in every cell")
    p.add_argument("--images", type=int, default=1024, help="JPEGs in the folder (default 1024)")
    p.add_argument("--loader-workers", type=int, default=8)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    args.resolutions = [int(r) for r in args.resolutions.split(",") if r]
    return args


def job(args, resolution: int, data: dict, samples: int, storage: str):
    """A one-stage job at ``resolution`` whose one epoch (or more) covers the timed steps."""
    from service.spec import validate_spec

    steps = args.warmup + args.steps
    epochs = max(1, math.ceil(steps * args.batch / samples))
    cuda = args.device == "cuda"
    return validate_spec(
        {
            "version": 1,
            "name": "gpu-pipeline",
            "seed": 0,
            "model": {"arch": args.arch, "num_classes": 1000 if cuda else 10, "in_channels": 3},
            "data": data,
            "optimizer": {"name": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 5e-5},
            "schedule": {"strategy": "global_onecycle", "max_lr": 0.1, "pct_start": 0.5},
            "lr_scaling": {"rule": "none"},
            "stages": [
                {"resolution": resolution, "epochs": epochs, "batch_size": args.batch, "workers": 1}
                | ({"compile": True} if args.compile else {})
            ],
            "checkpoint": {"storage": storage, "every_n_steps": 0},
            "resources": {"use_gpu": cuda},
            "train": {"precision": "bf16", "channels_last": True},
        }
    )


def loop_img_s(args, spec, device) -> float:
    """One worker's img/s through StageRunner, timed as ``plan --calibrate`` times it."""
    from service.plan import build_plan
    from service.sources import dataset_size
    from workers.calibrate import _measure_plan

    plan = build_plan(spec, dataset_size(spec.data))
    (speed,) = _measure_plan(spec, plan, device, args.warmup, args.steps, lambda line: None)
    return speed.images_per_s_per_worker


def syncs_per_step(args, spec, device) -> float | None:
    """Host syncs per optimizer step of the loop (``torch.cuda.set_sync_debug_mode``, which sees copies
    and ``.item()``): a sync a step lets the GPU run dry while the host prepares the next one. Counted
    over two runs of different lengths, so the set-up's and the timing's own syncs cancel out. None on
    a CPU."""
    import warnings

    import torch

    if device.type != "cuda":
        return None
    counts = []
    spec = spec.model_copy(
        update={"stages": [st.model_copy(update={"compile": False}) for st in spec.stages]}
    )
    for steps in (2, 6):  # eager: the data path's syncs are the same, without compiling twice
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                short = argparse.Namespace(**{**vars(args), "warmup": 1, "steps": steps})
                loop_img_s(short, spec, device)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        counts.append(sum("synchronizing CUDA operation" in str(w.message) for w in caught))
    return (counts[1] - counts[0]) / 4


def ceiling_img_s(args, resolution: int, device) -> float:
    """The model alone: random batches already on the device, the same step."""
    import torch

    from service.spec import ModelSpec
    from workers.models import build_model

    cuda = device.type == "cuda"
    model = build_model(ModelSpec(arch=args.arch, num_classes=1000 if cuda else 10, in_channels=3)).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if args.compile else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-5)
    x = torch.randn(args.batch, 3, resolution, resolution, device=device)
    x = x.contiguous(memory_format=torch.channels_last) if cuda else x
    y = torch.randint(0, 10, (args.batch,), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def step():
        with autocast:
            loss = torch.nn.functional.cross_entropy(step_model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    return args.steps * args.batch / (time.perf_counter() - start)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from bench.tiers import build_folder
    from service.prepare import prepare

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_pipeline: no CUDA device; use --device cpu for a smoke test")
    name = (
        torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    )
    work = tempfile.mkdtemp(prefix="stagetrain-bench-gpu-")
    try:
        t0 = time.perf_counter()
        folder, what = build_folder(f"{work}/photos", args.images)
        print(
            f"{args.images} JPEGs from {what} in {time.perf_counter() - t0:.0f} s; measuring on {name}",
            flush=True,
        )
        t0 = time.perf_counter()
        tiers = f"{work}/tiers"
        prepare(folder, tiers, None)  # --tiers auto
        print(f"prepare --tiers auto: {args.images / (time.perf_counter() - t0):,.0f} img/s", flush=True)
        synthetic = args.batch * (args.warmup + args.steps)
        datas = {
            "memory": ({"kind": "synthetic", "size": synthetic, "val_size": 1, "num_classes": 10}, synthetic),
            "folder": (
                {"kind": "imagefolder", "train": folder, "val": folder, "decode_on": "device"},
                args.images,
            ),
            "folder_host": ({"kind": "imagefolder", "train": folder, "val": folder}, args.images),
            "folder_tiers": ({"kind": "imagefolder", "train": tiers, "val": tiers}, args.images),
        }
        for cell, (data, _) in datas.items():  # in-memory data needs no loader processes
            data["loader_workers"] = 0 if cell == "memory" else args.loader_workers
        syncs = {}  # cell -> host syncs per step at the first resolution (CUDA only)
        for cell in ("memory", "folder_tiers"):
            data, samples = datas[cell]
            syncs[cell] = syncs_per_step(
                args, job(args, args.resolutions[0], data, samples, f"{work}/runs"), device
            )
            print(f"{cell}: host syncs per step {syncs[cell]}", flush=True)
        rows: dict[int, dict[str, list[float]]] = {r: {c: [] for c in CELLS} for r in args.resolutions}
        for k in range(args.rounds):
            for r in args.resolutions:
                order = CELLS[k % len(CELLS) :] + CELLS[: k % len(CELLS)]
                for cell in order:
                    if cell == "ceiling":
                        value = ceiling_img_s(args, r, device)
                    else:
                        data, samples = datas[cell]
                        value = loop_img_s(args, job(args, r, data, samples, f"{work}/runs"), device)
                    rows[r][cell].append(value)
                    print(f"round {k + 1} {r} px {cell}: {value:,.0f} img/s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summary = {
        "device": name,
        "arch": args.arch,
        "batch": args.batch,
        "compile": args.compile,
        "host_syncs_per_step": syncs,
        "per_resolution": {},
    }
    print(f"\n{'px':>4} " + " ".join(f"{c:>12}" for c in CELLS) + "   (img/s, median; ratio to the ceiling)")
    for r, cells in rows.items():
        med = {c: statistics.median(v) for c, v in cells.items()}
        entry = {f"{c}_img_s": round(v, 1) for c, v in med.items()}
        entry |= {f"{c}_vs_ceiling": round(med[c] / med["ceiling"], 3) for c in CELLS[1:]}
        summary["per_resolution"][str(r)] = entry
        shown = [f"{med['ceiling']:,.0f}"] + [
            f"{med[c]:,.0f} {med[c] / med['ceiling']:.2f}" for c in CELLS[1:]
        ]
        print(f"{r:>4} " + " ".join(f"{s:>12}" for s in shown))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
