"""Throughput of stagetrain's worker loop against a minimal hand-written DDP loop, measured side by side.

    .venv/bin/python bench/overhead.py            # CPU: 2 gloo processes, resnet18 at 32 px (~2-3 min)
    .venv/bin/python bench/overhead.py --quick    # ~30 s smoke
    .venv/bin/python bench/overhead.py --device cuda --world 1 --backend cpu:gloo,cuda:nccl \\
        --arch resnet50 --resolutions 128,160,224 --batch 128 --loader-workers 8   # see bench/gpu_smoke.sh

Both sides run in the same spawned processes (one per rank, one process group, no Ray) and share:
the model (``torchvision.models.get_model(arch)``, seeded alike), the per-worker batch, the data
source (``workers.data.StageDataset`` over the same ``SyntheticImages``: identical per-sample decode,
crop, flip and normalisation; DataLoader with the same ``num_workers``, ``pin_memory`` and
``prefetch_factor``), SGD (nesterov, momentum 0.9, weight decay 5e-5), cross-entropy, a OneCycle LR
curve stepped every step, DDP when world > 1 (StageRunner's own rule), and on CUDA bf16 autocast and
channels_last. What differs is exactly what is being measured:

- stagetrain: ``StageRunner(...).run()`` on a one-stage spec (``checkpoint.every_n_steps: 0``, storage
  in a temp dir, ``metrics.every_n_steps`` at its default): its ``StageSampler``, ``PlanScheduler``,
  per-step ``Progress``/record, the report every few steps (loss all-reduce; ``report`` is a no-op here,
  not ``ray.train.report``) and the per-step stop-flag all-reduce.
- plain: ``DistributedSampler`` + ``DDP(model)`` + ``OneCycleLR``, nothing logged.

Timing (both sides alike): a timestamp right after each step's ``scheduler.step()`` -- for StageRunner
through its ``on_step`` hook (called once per optimizer step, right after ``scheduler.step()``;
``stop_requested`` is left at its default). StageRunner gets the device injected (``device=``). The
timed window runs from the last warm-up step's timestamp to the last step's, so it holds ``--steps``
whole loop iterations (data, forward, backward, optimizer, schedule, and StageRunner's per-step
bookkeeping, reports and stop check) and excludes setup, the warm-up steps, evaluation and the stage-
boundary checkpoint. On CUDA the device is synchronised at the two window edges only (never per step,
which would hide the loop's own syncs). img/s is global images per second (per-worker batch x world).
Rounds interleave the two sides (AB, BA, AB, ...), each with a fresh model. A resolution's ratio is the
median over rounds of (stagetrain img/s / plain img/s) within the round -- the two runs of a round are
seconds apart, so slow drifts in load from other processes cancel; the ratio of the two medians is shown
beside it. ``overhead_ratio`` in the final JSON line is the geometric mean of the per-resolution ratios.

Beside them: each side's CPU time per timed step on rank 0 (``time.process_time``: the rank's own
threads, not DataLoader workers) and ``cpu_ratio`` (plain CPU per step / stagetrain CPU per step). It
moves less than wall time when other processes load the machine, though not nothing (+-15% seen on a
shared 2-core box), so read it as a second opinion on the loop's extra work. On CUDA it counts kernel
launches and waiting in syncs.

For comparison the table also shows the img/s StageRunner reports itself (its records'
``images_per_s``, report windows that start after the warm-up): those windows leave out the time
spent in the report call itself, and on CUDA they end before the loss sync, so they can read high.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # runnable as `python bench/overhead.py` from a checkout without installing
    sys.path.insert(0, REPO)

NUM_CLASSES = 10
SEED = 0
MAX_LR, PCT_START, DIV, FINAL_DIV, BASE_MOM, MAX_MOM = 0.05, 0.25, 25.0, 1e4, 0.85, 0.95
MOMENTUM, WEIGHT_DECAY = 0.9, 5e-5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--arch", default="resnet18", help="torchvision model name (default resnet18)")
    p.add_argument("--resolutions", default="32", help="comma-separated image sizes (default 32)")
    p.add_argument("--batch", type=int, default=32, help="per-worker batch (default 32)")
    p.add_argument("--world", type=int, default=2, help="processes, one rank each (default 2)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--backend",
        default=None,
        help="init_process_group backend, passed verbatim (default gloo on CPU, cpu:gloo,cuda:nccl on CUDA)",
    )
    p.add_argument(
        "--loader-workers", type=int, default=0, help="DataLoader num_workers, both sides (default 0)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads per rank (default: usable cores // world, at least 1)",
    )
    p.add_argument("--warmup", type=int, help="untimed steps at the start of every run (default 5; quick 2)")
    p.add_argument("--steps", type=int, help="timed steps per run (default 40; quick 8)")
    p.add_argument(
        "--rounds", type=int, help="interleaved rounds, each one run of both sides (default 6; quick 4)"
    )
    p.add_argument("--no-amp", action="store_true", help="CUDA: no bf16 autocast (both sides)")
    p.add_argument("--no-channels-last", action="store_true", help="CUDA: contiguous NCHW (both sides)")
    p.add_argument("--quick", action="store_true", help="~30 s smoke: 4 rounds of 2 warm-up + 8 timed steps")
    args = p.parse_args(argv)
    # Explicit --warmup/--steps/--rounds win over both presets.
    for name, full, quick in (("warmup", 5, 2), ("steps", 40, 8), ("rounds", 6, 4)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.resolutions = [int(r) for r in args.resolutions.split(",") if r]
    args.backend = args.backend or ("gloo" if args.device == "cpu" else "cpu:gloo,cuda:nccl")
    if args.threads is None:
        args.threads = max(1, len(os.sched_getaffinity(0)) // args.world)
    problems = []
    if args.warmup < 1:
        problems.append(f"--warmup: must be >= 1, got {args.warmup}")
    if args.steps < 2 or args.warmup + args.steps < 5:  # OneCycle needs pct_start (0.25) x steps > 1
        problems.append(
            f"--steps: must be >= 2 and --warmup + --steps >= 5, got {args.warmup} + {args.steps}"
        )
    if args.rounds < 1:
        problems.append(f"--rounds: must be >= 1, got {args.rounds}")
    if args.world < 1 or args.batch < 1 or not args.resolutions:
        problems.append("--world, --batch and --resolutions must be positive")
    if problems:
        p.error("; ".join(problems))
    return args


def total_steps(args) -> int:
    """Optimizer steps per run: the warm-up ones, then the timed ones."""
    return args.warmup + args.steps


class StepClock:
    """Timestamps after each optimizer step; on CUDA it synchronises at the timed window's two edges.
    It also reads this process's CPU time (all its threads), which other processes' load barely moves."""

    def __init__(self, args, device: torch.device):
        self.first, self.last = args.warmup - 1, total_steps(args) - 1  # marks[i]: after step i
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[float, float]] = []

    def tick(self) -> None:
        if self.cuda and len(self.marks) in (self.first, self.last):
            torch.cuda.synchronize()
        self.marks.append((time.perf_counter(), time.process_time()))

    def result(self, global_batch: int) -> dict:
        assert len(self.marks) >= self.last + 1, f"only {len(self.marks)} step marks"
        steps = self.last - self.first
        (wall0, cpu0), (wall1, cpu1) = self.marks[self.first], self.marks[self.last]
        return {
            "img_s": steps * global_batch / (wall1 - wall0),
            "cpu_ms_per_step": (cpu1 - cpu0) / steps * 1e3,
        }


# ------------------------------------------------------------------------------------------ sides


def spec_for(args, resolution: int, storage: str):
    from service.spec import validate_spec

    global_batch = args.batch * args.world
    return validate_spec(
        {
            "version": 1,
            "name": "overhead-bench",
            "seed": SEED,
            "model": {"arch": args.arch, "num_classes": NUM_CLASSES, "in_channels": 3},
            # Exactly total_steps optimizer steps in one epoch; validation is one image per rank.
            "data": {
                "kind": "synthetic",
                "size": total_steps(args) * global_batch,
                "num_classes": NUM_CLASSES,
                "val_size": args.world,
                "loader_workers": args.loader_workers,
            },
            "optimizer": {
                "name": "sgd",
                "momentum": MOMENTUM,
                "nesterov": True,
                "weight_decay": WEIGHT_DECAY,
            },
            "schedule": {
                "strategy": "global_onecycle",
                "max_lr": MAX_LR,
                "pct_start": PCT_START,
                "div_factor": DIV,
                "final_div_factor": FINAL_DIV,
                "anneal": "cos",
                "cycle_momentum": True,
                "base_momentum": BASE_MOM,
                "max_momentum": MAX_MOM,
                "progress": "steps",
            },
            "lr_scaling": {"rule": "none"},
            "stages": [
                {"resolution": resolution, "epochs": 1, "batch_size": args.batch, "workers": args.world}
            ],
            "checkpoint": {"storage": storage, "every_n_steps": 0},
            "resources": {"use_gpu": args.device == "cuda"},
            "train": {"amp": not args.no_amp, "channels_last": not args.no_channels_last},
        }
    )


def run_stagetrain(args, resolution: int, storage: str, job_id: str, device: torch.device) -> dict:
    from service.plan import build_plan
    from workers.train import StageRunner

    spec = spec_for(args, resolution, storage)
    plan = build_plan(spec, spec.data.size)
    assert plan.total_steps == total_steps(args), plan.total_steps
    clock = StepClock(args, device)
    windows: list[list[dict]] = []

    def report(metrics: dict) -> None:
        if metrics["records"]:
            windows.append(metrics["records"])

    # on_step: called once per optimizer step, right after scheduler.step()
    runner = StageRunner(
        spec, plan, 0, job_id, storage, report=report, device=device, on_step=lambda step: clock.tick()
    )
    runner.run()
    assert len(clock.marks) == plan.total_steps, (
        f"{len(clock.marks)} scheduler steps in a {plan.total_steps}-step run"
    )
    global_batch = args.batch * args.world
    # StageRunner's own figure, over its report windows that start after the warm-up.
    steady = [w for w in windows if w[0]["step"] >= args.warmup]
    images = sum(len(w) * global_batch for w in steady)
    seconds = sum(len(w) * global_batch / w[0]["images_per_s"] for w in steady)
    return {**clock.result(global_batch), "records_img_s": images / seconds if seconds else None}


def run_plain(args, resolution: int, device: torch.device, rank: int) -> dict:
    """The minimal DDP loop: what a person would write by hand for the same training."""
    import torch.distributed as dist
    import torch.nn.functional as F
    import torchvision
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data import DataLoader, DistributedSampler

    from workers.data import StageDataset, SyntheticImages, to_input

    cuda = device.type == "cuda"
    steps, global_batch = total_steps(args), args.batch * args.world
    # The same source and per-sample pipeline StageRunner builds (crop_scale, hflip: the spec defaults).
    data = spec_for(args, resolution, "unused").data
    source = SyntheticImages(data.size, data.num_classes, 3, SEED, "train")
    dataset = StageDataset(
        source, resolution, train=True, seed=SEED, stage=0, crop_scale=data.crop_scale, hflip=data.hflip
    )
    sampler = DistributedSampler(
        dataset, num_replicas=args.world, rank=rank, shuffle=True, seed=SEED, drop_last=True
    )
    loader = DataLoader(
        dataset,
        batch_size=args.batch,
        sampler=sampler,
        num_workers=args.loader_workers,
        pin_memory=cuda,
        prefetch_factor=4 if args.loader_workers else None,
    )
    assert len(loader) == steps, (len(loader), steps)

    torch.manual_seed(SEED)
    model = torchvision.models.get_model(args.arch, weights=None, num_classes=NUM_CLASSES).to(device)
    channels_last = cuda and not args.no_channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=MAX_LR, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=MAX_LR,
        total_steps=steps,
        pct_start=PCT_START,
        anneal_strategy="cos",
        cycle_momentum=True,
        base_momentum=BASE_MOM,
        max_momentum=MAX_MOM,
        div_factor=DIV,
        final_div_factor=FINAL_DIV,
    )
    if dist.get_world_size() > 1:  # StageRunner's rule: no DDP wrapper for a world of one
        model = DDP(model, device_ids=[device.index] if cuda else None)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if cuda and not args.no_amp else contextlib.nullcontext()
    )
    clock = StepClock(args, device)
    model.train()
    for x, y in loader:
        x, y = to_input(x, device, channels_last), y.to(device, non_blocking=True)
        with autocast:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        clock.tick()
    return {**clock.result(global_batch), "records_img_s": None}


# ----------------------------------------------------------------------------------------- worker


def worker(rank: int, args, port: int, tmp: str) -> None:
    import torch.distributed as dist

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(args.world),
    )
    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # what StageRunner's seed_everything sets; both sides alike
    dist.init_process_group(args.backend, rank=rank, world_size=args.world)

    results = []
    for resolution in args.resolutions:
        for k in range(args.rounds):
            order = ("plain", "stagetrain") if k % 2 == 0 else ("stagetrain", "plain")  # AB, BA, ...
            row = {"resolution": resolution, "round": k + 1, "order": "/".join(order)}
            for side in order:
                dist.barrier()
                if side == "plain":
                    out = run_plain(args, resolution, device, rank)
                else:
                    out = run_stagetrain(args, resolution, f"{tmp}/storage", f"r{resolution}-{k}", device)
                    row["records"] = out["records_img_s"]
                row[side], row[f"{side}_cpu_ms"] = out["img_s"], out["cpu_ms_per_step"]
                dist.barrier()
                if rank == 0:
                    shutil.rmtree(f"{tmp}/storage", ignore_errors=True)  # ~3x the model size per run
            results.append(row)
            if rank == 0:
                print(
                    f"  {resolution}px round {k + 1}/{args.rounds} ({row['order']}): plain "
                    f"{row['plain']:.1f}, "
                    f"stagetrain {row['stagetrain']:.1f} img/s",
                    flush=True,
                )
    if rank == 0:
        with open(f"{tmp}/results.json", "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------- report


def summarise(args, rows: list[dict]) -> dict:
    per_res = {}
    for resolution in args.resolutions:
        mine = [r for r in rows if r["resolution"] == resolution]
        plain = statistics.median(r["plain"] for r in mine)
        st = statistics.median(r["stagetrain"] for r in mine)
        records = [r["records"] for r in mine if r["records"]]
        pairs = [r["stagetrain"] / r["plain"] for r in mine]
        per_res[str(resolution)] = {
            "plain_img_s": round(plain, 2),
            "stagetrain_img_s": round(st, 2),
            "ratio": round(statistics.median(pairs), 4),
            "median_ratio": round(st / plain, 4),
            "round_ratio_range": [round(min(pairs), 4), round(max(pairs), 4)],
            "records_img_s": round(statistics.median(records), 2) if records else None,
            "records_ratio": round(statistics.median(records) / plain, 4) if records else None,
            # CPU time per step of rank 0 (this process's threads; DataLoader workers not included).
            "plain_cpu_ms_per_step": round(statistics.median(r["plain_cpu_ms"] for r in mine), 2),
            "stagetrain_cpu_ms_per_step": round(statistics.median(r["stagetrain_cpu_ms"] for r in mine), 2),
            "cpu_ratio": round(
                statistics.median(r["plain_cpu_ms"] / r["stagetrain_cpu_ms"] for r in mine), 4
            ),
        }
    ratios = [v["ratio"] for v in per_res.values()]
    return {
        "overhead_ratio": round(math.exp(statistics.fmean(math.log(r) for r in ratios)), 4),
        "min_ratio": min(ratios),
        "per_resolution": per_res,
        "arch": args.arch,
        "device": args.device,
        "backend": args.backend,
        "world": args.world,
        "batch_per_worker": args.batch,
        "loader_workers": args.loader_workers,
        "threads_per_rank": args.threads,
        "rounds": args.rounds,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "amp": args.device == "cuda" and not args.no_amp,
        "channels_last": args.device == "cuda" and not args.no_channels_last,
        "torch": torch.__version__,
    }


def print_table(args, rows: list[dict], summary: dict) -> None:
    print()
    print(
        f"{'res':>5} {'round':>5} {'order':>17} {'plain img/s':>12} {'stagetrain':>11} {'ratio':>7} "
        f"{'st records':>11}"
        f" {'cpu ms/step plain':>18} {'stagetrain':>11}"
    )
    for r in rows:
        rec = f"{r['records']:.1f}" if r["records"] else "-"
        print(
            f"{r['resolution']:>5} {r['round']:>5} {r['order']:>17} {r['plain']:>12.1f} "
            f"{r['stagetrain']:>11.1f} "
            f"{r['stagetrain'] / r['plain']:>7.3f} {rec:>11} {r['plain_cpu_ms']:>18.1f} "
            f"{r['stagetrain_cpu_ms']:>11.1f}"
        )
    print()
    print(
        f"{'res':>5} {'median plain':>13} {'median stagetrain':>18} {'ratio of medians':>17} "
        f"{'median ratio (min..max)':>28} {'st records':>11} {'cpu ratio':>10}"
    )
    for res, v in summary["per_resolution"].items():
        rec = f"{v['records_img_s']:.1f}" if v["records_img_s"] else "-"
        lo, hi = v["round_ratio_range"]
        spread = f"{v['ratio']:.3f} ({lo:.3f}..{hi:.3f})"
        print(
            f"{res:>5} {v['plain_img_s']:>13.1f} {v['stagetrain_img_s']:>18.1f} {v['median_ratio']:>17.3f} "
            f"{spread:>28} {rec:>11} {v['cpu_ratio']:>10.3f}"
        )
    print()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit(
                "error: --device cuda but torch.cuda.is_available() is False "
                f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); run on a GPU machine or use "
                "--device cpu"
            )
        if torch.cuda.device_count() < args.world:
            sys.exit(
                f"error: --world {args.world} needs {args.world} GPUs, found {torch.cuda.device_count()}"
            )
    print(
        f"overhead: {args.arch}, {args.device} x{args.world} ({args.backend}), batch {args.batch}/worker, "
        f"resolutions {args.resolutions}, {args.rounds} rounds x ({args.warmup} warm-up + {args.steps} "
        "timed) steps, "
        f"{args.threads} thread(s)/rank, loader workers {args.loader_workers}",
        flush=True,
    )
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="stagetrain-overhead-") as tmp:
        torch.multiprocessing.spawn(worker, args=(args, free_port(), tmp), nprocs=args.world, join=True)
        with open(f"{tmp}/results.json") as f:
            rows = json.load(f)
    summary = summarise(args, rows)
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    print_table(args, rows, summary)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
