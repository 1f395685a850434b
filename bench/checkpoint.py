"""What checkpoints cost: the stall per save, upload throughput, and the cost of periodic checkpoints to
a training run, each measured side by side with a baseline in one process.

    .venv/bin/python bench/checkpoint.py            # ~6 min on 2 cores
    .venv/bin/python bench/checkpoint.py --quick    # ~1 min smoke

Storage: a local temp folder AND a real S3 HTTP server (``moto_server`` in its own process, from
``tests/s3_server.py``; fake credentials and ``AWS_ENDPOINT_URL`` are put in ``os.environ`` before any
``Storage`` is built, which is where ``checkpoints.storage`` reads them).

(a) stall -- the time training is blocked per save. The state is a ResNet-50 (torchvision, 1000
    classes, random weights) plus its SGD momentum buffers after one step, ~200 MB, as the flat dict
    of state dicts ``StageRunner.save`` hands over. Ours: the wall time of
    ``AsyncCheckpointer.save(state, tag, block=False)`` called with no upload pending (after
    ``.wait()``), i.e. the CPU copy plus starting the upload thread; the upload it starts is then
    waited for, untimed. Baseline: ``torch.save`` of the same dict into an ``io.BytesIO``.
    ``stall_ratio = median(ours, local) / median(torch.save)`` (target <= 1.5); the S3 figure is printed
    too (it should not differ: nothing is uploaded before ``save`` returns). One more row times the
    for comparison, ``to_cpu(state)`` under ``torch.set_num_threads(1)`` (measured and rejected: steadier
    copies on overloaded cores, but switching the intra-op pool back costs the loop ~1 s per save).
(b) upload -- ``CheckpointStore.commit(tag, files)`` with the files pre-serialised by ``encode`` (so it
    times sha256 + upload of both payload files + the manifest), against a raw
    ``s3fs.S3FileSystem.put(tmp_file, s3_path)`` of the same two files, one call per file, written to a
    temp dir beforehand (same endpoint and credentials). ``upload_ratio = median(raw) / median(ours)``
    on S3, a throughput ratio (target >= 0.8). Local: ``commit`` against fsspec's
    ``LocalFileSystem.put`` (a file copy), printed for reference. MB/s = payload MB / seconds.
(c) run cost -- an in-process ``StageRunner`` (world size 1, synthetic data, resnet18, no Ray, local
    folder storage) with ``checkpoint.every_n_steps = N`` against ``0`` (stage-boundary checkpoint
    only), rounds interleaved AB, BA, ... A timestamp is taken once per optimizer step, right after
    its ``scheduler.step()`` (by wrapping the runner's scheduler's ``step``, as bench/overhead.py does);
    a step's periodic save comes after that call, so it falls between that step's timestamp and the
    next. The loop time runs from the last warm-up step's timestamp to the last step's, and so holds
    every periodic save and its background upload (checked: ``uploads_done_in_window``) but neither
    setup, evaluation nor the boundary checkpoint, which both sides have.
    ``run_cost_ratio = median(loop time with N) / median(loop time with 0)`` (target <= 1.03). Also
    printed: the cost of one save (loop time difference / saves) in steps, and the ``every_n_steps``
    at which that cost would be 3%.
    To explain a miss, the saves and uploads of the N side are timed by wrapping that runner's
    ``checkpointer.save`` and ``._upload`` (the product code is not changed): the stall of each save,
    the wall and CPU time (``time.thread_time``) of each background upload, and how much slower the
    steps that overlap an upload are than the clean steps (the step a save lands in also holds the
    start of its upload; "steps during upload" are the ones after it). ``--proposed`` adds a third
    side: every N steps with that runner's ``checkpointer.save`` run under ``torch.set_num_threads(1)``
    (the single-threaded CPU copy, measured for comparison; the product does not use it).

The last line of output is one JSON object with the ratios and the raw seconds and MB/s behind them.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # runnable as `python bench/checkpoint.py` from a checkout without installing
    sys.path.insert(0, REPO)

MB = 1e6
META = {
    "job_id": "bench",
    "stage": 1,
    "epoch": 0,
    "step": 1,
    "samples_seen": 2,
    "boundary": False,
    "world_size": 1,
    "plan_hash": "bench",
    "stage_hash": "bench",
    "spec_hash": "bench",
    "versions": {"torch": torch.__version__},
    "git_revision": None,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--state-arch", default="resnet50", help="model whose state (a)/(b) save (default resnet50)"
    )
    p.add_argument(
        "--reps", type=int, help="timed repetitions of (a) and (b), after one untimed (default 7; quick 2)"
    )
    p.add_argument("--run-arch", default="resnet18", help="(c): model trained (default resnet18)")
    p.add_argument("--resolution", type=int, default=48, help="(c): image size (default 48)")
    p.add_argument("--batch", type=int, default=32, help="(c): batch size (default 32)")
    p.add_argument(
        "--every", type=int, help="(c): checkpoint.every_n_steps of the checkpointing side (default 25)"
    )
    p.add_argument(
        "--warmup", type=int, help="(c): untimed steps at the start of each run (default 5; quick 3)"
    )
    p.add_argument("--steps", type=int, help="(c): timed steps per run (default 400; quick 100)")
    p.add_argument(
        "--rounds", type=int, help="(c): interleaved rounds, each one run of both sides (default 3; quick 1)"
    )
    p.add_argument("--loader-workers", type=int, default=0, help="(c): DataLoader workers (default 0)")
    p.add_argument(
        "--proposed",
        action="store_true",
        help="(c): add a third side, every_n_steps N with the proposed single-threaded CPU copy",
    )
    p.add_argument("--quick", action="store_true", help="~1 min smoke: fewer repetitions, shorter runs")
    args = p.parse_args(argv)
    for name, full, quick in (
        ("reps", 7, 2),
        ("every", 25, 25),
        ("warmup", 5, 3),
        ("steps", 400, 100),
        ("rounds", 3, 1),
    ):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    problems = [
        f"--{n}: must be >= 1, got {getattr(args, n)}"
        for n in ("reps", "every", "warmup", "rounds")
        if getattr(args, n) < 1
    ]
    if args.steps < 2 * args.every:
        problems.append(
            f"--steps: must hold at least two checkpoints (>= 2 x --every = {2 * args.every}), got "
            f"{args.steps}"
        )
    if problems:
        p.error("; ".join(problems))
    return args


def median(xs) -> float:
    return statistics.median(list(xs))


@contextlib.contextmanager
def intra_op_threads(n: int):
    """The single-threaded copy (measured for comparison, not used by the product: see
    AsyncCheckpointer.save): run the CPU copy with one intra-op thread. ``to_cpu`` copies each of hundreds
    of tensors in its own OpenMP parallel region; on busy cores every region waits for a descheduled
    thread."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ----------------------------------------------------------------------------- (a) and (b): state


def big_state(arch: str) -> dict:
    """The flat dict ``StageRunner.save`` passes: model and optimizer state dicts (SGD with momentum,
    after one step so the momentum buffers exist) plus the small ones."""
    import torch.nn.functional as F
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-5)
    F.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.randint(0, 1000, (2,))).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": {"step": 1},
        "data": {"step": 1},
    }


def tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def torch_save_s(state: dict) -> float:
    t0 = time.perf_counter()
    buf = io.BytesIO()
    torch.save(state, buf)
    return time.perf_counter() - t0


def stall_s(ck, state: dict, tag: str) -> tuple[float, float]:
    """(wall time of save() with nothing pending, the checkpointer's own stall_s: the CPU copy alone)."""
    ck.wait()
    t0 = time.perf_counter()
    ck.save(state, tag, block=False, **META)
    wall = time.perf_counter() - t0
    copy = ck.stall_s
    ck.wait()  # the upload, untimed
    assert not ck.failures, ck.failures
    return wall, copy


def commit_s(store, files: dict[str, bytes], tag: str) -> float:

    t0 = time.perf_counter()
    store.commit(tag, files, **META)
    seconds = time.perf_counter() - t0
    store.storage.remove(tag)  # untimed; moto keeps objects in memory
    return seconds


def raw_put_s(fs, tmp_files: dict[str, str], remote_dir: str) -> float:
    fs.makedirs(remote_dir, exist_ok=True)  # untimed; a no-op on S3, needed by LocalFileSystem.put
    t0 = time.perf_counter()
    for name, local in tmp_files.items():
        fs.put(local, f"{remote_dir}/{name}")
    seconds = time.perf_counter() - t0
    fs.rm(remote_dir, recursive=True)
    return seconds


def bench_save_and_upload(args, tmp: str) -> dict:
    """(a) and (b), local and S3, repetitions interleaved (the order rotates every repetition)."""
    import fsspec
    import s3fs

    from checkpoints.checkpointer import AsyncCheckpointer, encode, to_cpu
    from checkpoints.storage import Storage
    from checkpoints.store import CheckpointStore
    from tests.s3_server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, S3Server, _free_port, make_bucket

    state = big_state(args.state_arch)
    files = encode(state)
    payload = sum(len(d) for d in files.values())
    tmp_files = {}
    for name, data in files.items():
        tmp_files[name] = os.path.join(tmp, "raw-src", name)
        os.makedirs(os.path.dirname(tmp_files[name]), exist_ok=True)
        with open(tmp_files[name], "wb") as f:
            f.write(data)
    print(
        f"state: {args.state_arch} + SGD momentum, {tensor_bytes(state) / MB:.1f} MB of tensors, "
        f"payload {payload / MB:.1f} MB ({', '.join(f'{n} {len(d) / MB:.1f} MB' for n, d in files.items())})",
        flush=True,
    )

    server = S3Server(_free_port())
    server.start()
    try:
        os.environ.update(server.env)
        for k in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
            os.environ.pop(k, None)
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        make_bucket(server, bucket)
        stores = {
            "local": CheckpointStore(Storage(os.path.join(tmp, "storage")).child("bench", "checkpoints")),
            "s3": CheckpointStore(Storage(f"s3://{bucket}/storage").child("bench", "checkpoints")),
        }
        raw_fs = {
            "local": (fsspec.filesystem("file"), os.path.join(tmp, "raw-dst")),
            "s3": (
                s3fs.S3FileSystem(
                    key=ACCESS_KEY_ID,
                    secret=SECRET_ACCESS_KEY,
                    endpoint_url=server.endpoint,
                    skip_instance_cache=True,
                ),
                f"{bucket}/raw",
            ),
        }
        ckpts = {
            where: AsyncCheckpointer(store, keep_last=1, keep_stage_checkpoints=False)
            for where, store in stores.items()
        }
        tasks = {
            "torch_save": lambda k: {"s": torch_save_s(state)},
            **{
                f"save_{w}": (
                    lambda k, w=w: dict(
                        zip(("s", "copy_s"), stall_s(ckpts[w], state, f"step-{k:09d}"), strict=True)
                    )
                )
                for w in stores
            },
            **{
                f"commit_{w}": (lambda k, w=w: {"s": commit_s(stores[w], files, f"commit-{k:09d}")})
                for w in stores
            },
            **{
                f"raw_{w}": (lambda k, w=w: {"s": raw_put_s(raw_fs[w][0], tmp_files, f"{raw_fs[w][1]}/{k}")})
                for w in stores
            },
            "copy_1thread": lambda k: {"s": _timed_1thread(lambda: to_cpu(state))},
            "encode": lambda k: {"s": _timed(lambda: encode(state))},
            "sha256": lambda k: {
                "s": _timed(lambda: [hashlib.sha256(d).hexdigest() for d in files.values()])
            },
        }
        names = list(tasks)
        rows: dict[str, list[dict]] = {n: [] for n in names}
        for k in range(args.reps + 1):  # repetition 0 is a warm-up, not kept
            order = names[k % len(names) :] + names[: k % len(names)]
            for name in order:
                out = tasks[name](k)
                if k:
                    rows[name].append(out)
            if k:
                print(
                    f"  rep {k}/{args.reps}: " + ", ".join(f"{n} {rows[n][-1]['s']:.3f}s" for n in names),
                    flush=True,
                )
            else:
                print("  rep 0 (warm-up) done", flush=True)
    finally:
        server.stop()

    med = {n: median(r["s"] for r in rows[n]) for n in names}
    out = {
        "state_MB": round(tensor_bytes(state) / MB, 1),
        "payload_MB": round(payload / MB, 1),
        "torch_save_s": round(med["torch_save"], 4),
        "encode_s": round(med["encode"], 4),
        "sha256_s": round(med["sha256"], 4),
        "copy_1thread_s": round(med["copy_1thread"], 4),
        "reps": args.reps,
    }
    for w in ("local", "s3"):
        out[f"stall_{w}_s"] = round(med[f"save_{w}"], 4)
        out[f"copy_{w}_s"] = round(median(r["copy_s"] for r in rows[f"save_{w}"]), 4)
        out[f"commit_{w}_s"] = round(med[f"commit_{w}"], 4)
        out[f"raw_put_{w}_s"] = round(med[f"raw_{w}"], 4)
        out[f"commit_{w}_MB_s"] = round(payload / MB / med[f"commit_{w}"], 1)
        out[f"raw_put_{w}_MB_s"] = round(payload / MB / med[f"raw_{w}"], 1)
    out["rows"] = {n: [round(r["s"], 4) for r in rows[n]] for n in names}
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _timed_1thread(fn) -> float:
    t0 = time.perf_counter()
    with intra_op_threads(1):
        fn()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------- (c) run cost


def run_spec(args, every: int, storage: str):
    from service.spec import validate_spec

    total = args.warmup + args.steps
    return validate_spec(
        {
            "version": 1,
            "name": "checkpoint-bench",
            "seed": 0,
            "model": {"arch": args.run_arch, "num_classes": 10, "in_channels": 3},
            "data": {
                "kind": "synthetic",
                "size": total * args.batch,
                "num_classes": 10,
                "val_size": 64,
                "loader_workers": args.loader_workers,
            },
            "optimizer": {"name": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 5e-5},
            "schedule": {
                "strategy": "global_onecycle",
                "max_lr": 0.05,
                "pct_start": 0.25,
                "div_factor": 25,
                "final_div_factor": 1e4,
                "anneal": "cos",
                "cycle_momentum": True,
                "base_momentum": 0.85,
                "max_momentum": 0.95,
                "progress": "steps",
            },
            "lr_scaling": {"rule": "none"},
            "stages": [{"resolution": args.resolution, "epochs": 1, "batch_size": args.batch, "workers": 1}],
            "checkpoint": {"storage": storage, "every_n_steps": every, "keep_last": 2},
        }
    )


def train_run(args, every: int, storage: str, job_id: str, proposed: bool = False) -> dict:
    from service.plan import build_plan
    from workers.train import StageRunner

    spec = run_spec(args, every, storage)
    plan = build_plan(spec, spec.data.size)
    total = args.warmup + args.steps
    assert plan.total_steps == total, (plan.total_steps, total)
    marks: list[
        float
    ] = []  # marks[i]: right after step i's scheduler.step(); step i's save (if any) follows it
    runner = StageRunner(
        spec, plan, 0, job_id, storage, on_step=lambda step: marks.append(time.perf_counter())
    )
    ck = runner.checkpointer
    if proposed:  # the single-threaded copy, wrapped around this runner's saves only
        save = ck.save

        def save_one_thread(*a, **kw):
            with intra_op_threads(1):
                save(*a, **kw)

        ck.save = save_one_thread
    t0 = time.perf_counter()
    summary = runner.run()
    saves, uploads = (
        ck.saves,
        ck.uploads,
    )  # start, end (and upload-thread CPU s) of each, from the checkpointer
    wall = time.perf_counter() - t0
    assert not ck.failures, ck.failures
    first, last = args.warmup - 1, total - 1
    assert len(marks) == total, f"{len(marks)} scheduler steps in a {total}-step run"
    lo, hi = marks[first], marks[last]
    periodic_saves = [s for s in saves if lo < s[0] < hi]
    periodic_uploads = [u for u in uploads if lo < u[0] < hi]
    steps = [(marks[i] - marks[i - 1], marks[i - 1], marks[i]) for i in range(first + 1, last + 1)]

    def overlaps(a, b, spans):
        return any(s < b and e > a for s, e, *_ in spans)

    clean = [d for d, a, b in steps if not overlaps(a, b, saves) and not overlaps(a, b, uploads)]
    with_save = [d for d, a, b in steps if overlaps(a, b, saves)]
    during_upload = [d for d, a, b in steps if overlaps(a, b, uploads) and not overlaps(a, b, saves)]
    return {
        "loop_s": hi - lo,
        "wall_s": wall,
        "steps": last - first,
        "every": every,
        "saves": len(periodic_saves),
        "uploads_done_in_window": all(e <= hi for _, e, _ in periodic_uploads),
        "save_stall_s": [e - s for s, e in periodic_saves],
        "upload_wall_s": [e - s for s, e, _ in periodic_uploads],
        "upload_cpu_s": [c for *_, c in periodic_uploads],
        "clean_step_s": median(clean) if clean else None,
        "save_step_s": with_save,
        "upload_step_s": during_upload,
        "stall_s": summary.stall_s,
    }


def side_breakdown(runs: list[dict]) -> dict:
    """Where a checkpointing side's time went, all rounds pooled, per save."""
    clean = median(r["clean_step_s"] for r in runs if r["clean_step_s"])
    save_steps = [d for r in runs for d in r["save_step_s"]]
    upload_steps = [d for r in runs for d in r["upload_step_s"]]
    saves = sum(r["saves"] for r in runs)
    return {
        "clean_step_s": round(clean, 4),
        "save_stall_s": round(median(s for r in runs for s in r["save_stall_s"]), 4),
        "save_step_s": round(median(save_steps), 4) if save_steps else None,
        "upload_wall_s": round(median(u for r in runs for u in r["upload_wall_s"]), 4),
        "upload_cpu_s": round(median(u for r in runs for u in r["upload_cpu_s"]), 4),
        "steps_during_upload_per_save": round(len(upload_steps) / saves, 2) if saves else None,
        "upload_step_s": round(median(upload_steps), 4) if upload_steps else None,
        # Excess over a clean step, summed per save: in the save's own step, in the steps overlapping
        # its upload.
        "excess_save_step_s": round(sum(d - clean for d in save_steps) / saves, 4) if saves else None,
        "excess_upload_steps_s": round(sum(d - clean for d in upload_steps) / saves, 4) if saves else None,
    }


def bench_run_cost(args, tmp: str) -> dict:
    sides = ["every", "off"] + (["fix"] if args.proposed else [])
    print(
        f"(c) run cost: {args.run_arch} at {args.resolution}px, batch {args.batch}, world 1, "
        f"{args.warmup} warm-up + {args.steps} timed steps, every_n_steps {args.every} vs 0"
        f"{' vs ' + str(args.every) + ' with the proposed single-threaded copy' if args.proposed else ''}, "
        f"{args.rounds} round(s), torch threads {torch.get_num_threads()}, loader workers "
        f"{args.loader_workers}",
        flush=True,
    )
    rows = []
    for k in range(args.rounds):
        order = (
            sides[k % len(sides) :] + sides[: k % len(sides)]
        )  # AB, BA, ... (ABC, BCA, CAB with --proposed)
        row = {}
        for side in order:
            storage = os.path.join(tmp, "run-storage")
            row[side] = train_run(
                args, 0 if side == "off" else args.every, storage, f"round-{k}-{side}", proposed=side == "fix"
            )
            shutil.rmtree(storage, ignore_errors=True)
        rows.append(row)
        off = row["off"]["loop_s"]
        print(
            f"  round {k + 1}/{args.rounds} ({'/'.join(order)}): loop without checkpoints {off:.2f}s; "
            + "; ".join(
                f"{side} {row[side]['loop_s']:.2f}s ({row[side]['saves']} saves, "
                f"ratio {row[side]['loop_s'] / off:.3f})"
                for side in sides
                if side != "off"
            ),
            flush=True,
        )
    loop = {side: median(r[side]["loop_s"] for r in rows) for side in sides}
    ours = [r["every"] for r in rows]
    out = {
        "run_cost_ratio": round(loop["every"] / loop["off"], 4),
        "pair_ratios": [round(r["every"]["loop_s"] / r["off"]["loop_s"], 4) for r in rows],
        "loop_with_s": round(loop["every"], 3),
        "loop_without_s": round(loop["off"], 3),
        "every_n_steps": args.every,
        "timed_steps": args.steps,
        "saves_per_run": ours[0]["saves"],
        "uploads_done_in_window": all(r[side]["uploads_done_in_window"] for r in rows for side in sides),
        "run_wall_with_s": round(median(r["wall_s"] for r in ours), 2),
        "run_wall_without_s": round(median(r["off"]["wall_s"] for r in rows), 2),
        **side_breakdown(ours),
    }
    # What one periodic save costs the loop, and the every_n_steps at which that would be 3% of it.
    saves = out["saves_per_run"]
    out["cost_per_save_s"] = round((loop["every"] - loop["off"]) / saves, 4) if saves else None
    step_s = loop["off"] / args.steps
    out["step_s"] = round(step_s, 4)
    out["every_n_for_3pct"] = (
        max(1, round(out["cost_per_save_s"] / (0.03 * step_s)))
        if saves and out["cost_per_save_s"] > 0
        else None
    )
    if args.proposed:
        out["proposed"] = {
            "run_cost_ratio": round(loop["fix"] / loop["off"], 4),
            "loop_s": round(loop["fix"], 3),
            "pair_ratios": [round(r["fix"]["loop_s"] / r["off"]["loop_s"], 4) for r in rows],
            **side_breakdown([r["fix"] for r in rows]),
        }
    return out


# ----------------------------------------------------------------------------------------- report


def print_table(ab: dict, rc: dict) -> None:
    print()
    print(f"(a) stall per save, {ab['state_MB']:.0f} MB of state, median of {ab['reps']}")
    print(f"    {'torch.save -> BytesIO':<44} {ab['torch_save_s']:>8.3f} s")
    for w in ("local", "s3"):
        print(
            f"    {f'AsyncCheckpointer.save, {w} (copy alone)':<44} {ab[f'stall_{w}_s']:>8.3f} s "
            f"({ab[f'copy_{w}_s']:.3f} s)   ratio {ab[f'stall_{w}_s'] / ab['torch_save_s']:.3f}"
        )
    print(
        f"    {'proposed: to_cpu with 1 intra-op thread':<44} {ab['copy_1thread_s']:>8.3f} s "
        f"            ratio {ab['copy_1thread_s'] / ab['torch_save_s']:.3f}"
    )
    print(
        f"(b) upload of {ab['payload_MB']:.0f} MB pre-serialised (encode {ab['encode_s']:.3f} s, "
        f"sha256 {ab['sha256_s']:.3f} s, not included), median of {ab['reps']}"
    )
    print(f"    {'':<10} {'commit s':>9} {'MB/s':>8} {'raw put s':>10} {'MB/s':>8} {'raw/ours':>9}")
    for w in ("local", "s3"):
        print(
            f"    {w:<10} {ab[f'commit_{w}_s']:>9.3f} {ab[f'commit_{w}_MB_s']:>8.1f} "
            f"{ab[f'raw_put_{w}_s']:>10.3f} "
            f"{ab[f'raw_put_{w}_MB_s']:>8.1f} {ab[f'raw_put_{w}_s'] / ab[f'commit_{w}_s']:>9.3f}"
        )
    print(
        f"(c) run cost, every_n_steps {rc['every_n_steps']} ({rc['saves_per_run']} saves in "
        f"{rc['timed_steps']} "
        f"timed steps) vs 0"
    )
    print(
        f"    loop with {rc['loop_with_s']:.2f} s, without {rc['loop_without_s']:.2f} s: ratio "
        f"{rc['run_cost_ratio']:.3f} "
        f"(pairs {rc['pair_ratios']}); uploads finished inside the window: {rc['uploads_done_in_window']}"
    )
    need = (
        f"3% would need every_n_steps >= {rc['every_n_for_3pct']}"
        if rc["every_n_for_3pct"]
        else "no measurable cost"
    )
    print(
        f"    one save costs the loop {rc['cost_per_save_s']} s = "
        f"{rc['cost_per_save_s'] / rc['step_s']:.1f} steps of "
        f"{rc['step_s']:.3f} s: {need}"
    )
    print(
        f"    clean step {rc['clean_step_s']:.3f} s; per save: stall {rc['save_stall_s']:.3f} s, the step "
        "it lands in "
        f"(with the start of its upload) "
        f"+{rc['excess_save_step_s']} s; background upload {rc['upload_wall_s']:.3f} s wall / "
        f"{rc['upload_cpu_s']:.3f} s CPU over {rc['steps_during_upload_per_save']} steps, "
        f"which ran +{rc['excess_upload_steps_s']} s slower in total"
    )
    if "proposed" in rc:
        fx = rc["proposed"]
        print(
            f"    proposed single-threaded copy: loop {fx['loop_s']:.2f} s, ratio {fx['run_cost_ratio']:.3f} "
            f"(pairs {fx['pair_ratios']}); stall {fx['save_stall_s']:.3f} s, its step "
            f"+{fx['excess_save_step_s']} s, "
            f"upload steps +{fx['excess_upload_steps_s']} s per save"
        )
    print()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="stagetrain-ckpt-bench-") as tmp:
        print(f"(a)+(b): {args.reps} repetitions (+1 warm-up), local folder and moto S3", flush=True)
        ab = bench_save_and_upload(args, tmp)
        rc = bench_run_cost(args, tmp)
    print_table(ab, rc)
    result = {
        "stall_ratio": round(ab["stall_local_s"] / ab["torch_save_s"], 4),
        "upload_ratio": round(ab["raw_put_s3_s"] / ab["commit_s3_s"], 4),
        "run_cost_ratio": rc["run_cost_ratio"],
        "stall_ratio_s3": round(ab["stall_s3_s"] / ab["torch_save_s"], 4),
        "stall_ratio_proposed": round(ab["copy_1thread_s"] / ab["torch_save_s"], 4),
        "upload_ratio_local": round(ab["raw_put_local_s"] / ab["commit_local_s"], 4),
        **{k: v for k, v in ab.items() if k != "rows"},
        "run": rc,
        "state_arch": args.state_arch,
        "run_arch": args.run_arch,
        "resolution": args.resolution,
        "batch": args.batch,
        "quick": args.quick,
        "torch": torch.__version__,
        "cores": len(os.sched_getaffinity(0)),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
