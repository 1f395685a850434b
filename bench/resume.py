"""Time from `stagetrain resume` to the first optimizer step, split into Ray start, checkpoint
download+load and worker start, against the time a fresh `stagetrain run` takes to its first step.

    .venv/bin/python bench/resume.py            # ~2 min on 2 cores (2 rounds), + any wait for quiet
    .venv/bin/python bench/resume.py --quick    # ~1 min (1 round)

Each round runs a real job through the CLI, as subprocesses (synthetic data, 2 workers, 2 stages,
local folder storage, ``metrics.every_n_steps: 1`` so the first step is reported as soon as it ends,
``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.1``; default model resnet50 at 32 px, so the ~190 MB checkpoint
makes the download visible):

1. ``stagetrain run``: launched at t=0 (wall clock taken right before ``Popen``); ``fresh_first_step_s``
   is when the first step record appears in ``<storage>/<job>/metrics.jsonl`` (polled every 20 ms; the
   driver appends a record when the worker's report reaches it). After ``--preempt-after`` steps it is
   sent SIGTERM (a preemption notice) and must exit 75 having committed a checkpoint mid-stage.
2. ``download_s``: ``checkpoints.checkpointer.load(store, tag)`` of that checkpoint, timed in this
   process (read both payload files, check sizes and sha256 against the manifest, ``torch.load`` them),
   median of 3 (the run has exited, so the cores are free; the files are in the page cache, as they are
   for resume).
3. ``stagetrain resume``: launched at t=0; ``resume_first_step_s`` is when the first NEW step record
   appears in metrics.jsonl. Then SIGTERM again (exit 75) to free the cores.
4. ``ray_start_s``: ``service.executor.connect_ray`` (the ``ray.init`` the coordinator makes), timed in
   this process before each round, then ``ray.shutdown()``.

Split of the resume time: Ray start = ``ray_start_s``, download+load = ``download_s``, worker start =
the rest (``resume_first_step_s - ray_start_s - download_s``: CLI start-up and imports, Ray Train's
controller, worker actors, process group, model build, data setup, the first step itself, and any
checkpoint read beyond the one counted in ``download_s``). Target: ``resume_first_step_s <=
fresh_first_step_s + download_s + 5``.

Also shown, as observed (not derived): the time after launch at which the coordinator printed its
"job ... ->" / "resuming ..." line (spec and record handled; for resume, after the driver has verified
the checkpoint) and Ray's "Started a local Ray instance" line (ray.init returned).

Before starting, the benchmark waits until no ``RayTrainWorker`` process has been seen for
``--quiet-s`` seconds (other jobs on the machine would distort every figure).

The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # runnable as `python bench/resume.py` from a checkout without installing
    sys.path.insert(0, REPO)

EXIT_PREEMPTED = 75
RAY_STARTED = "Started a local Ray instance"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--arch", default="resnet50", help="torchvision model (default resnet50: a ~190 MB checkpoint)"
    )
    p.add_argument("--resolution", type=int, default=32, help="stage-1 image size (default 32)")
    p.add_argument("--batch", type=int, default=8, help="per-worker batch (default 8)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers per stage (default 2)")
    p.add_argument(
        "--preempt-after", type=int, default=3, help="steps recorded before the SIGTERM (default 3)"
    )
    p.add_argument("--rounds", type=int, help="fresh run + resume pairs (default 2; quick 1)")
    p.add_argument(
        "--quiet-s",
        type=float,
        default=30.0,
        help="wait until no RayTrainWorker process was seen for this long (default 30; 0: do not wait)",
    )
    p.add_argument(
        "--max-wait-s", type=float, default=900.0, help="give up waiting for a quiet machine (default 900)"
    )
    p.add_argument(
        "--timeout-s", type=float, default=300.0, help="limit for each phase of a run (default 300)"
    )
    p.add_argument("--quick", action="store_true", help="one round")
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 2
    if args.rounds < 1 or args.preempt_after < 1 or args.workers < 1 or args.batch < 1:
        p.error("--rounds, --preempt-after, --workers and --batch must be >= 1")
    return args


def job_spec(args) -> dict:
    steps1 = 40  # stage 1 is long enough that the preemption lands mid-stage
    global_batch = args.batch * args.workers
    return {
        "version": 1,
        "name": "resume-bench",
        "seed": 0,
        "model": {"arch": args.arch, "num_classes": 10, "in_channels": 3},
        "data": {
            "kind": "synthetic",
            "size": steps1 * global_batch,
            "val_size": 64,
            "num_classes": 10,
            "loader_workers": 0,
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
            "progress": "samples",
        },
        "lr_scaling": {"rule": "none"},
        "stages": [
            {
                "resolution": args.resolution,
                "epochs": 1,
                "data_fraction": 1.0,
                "batch_size": args.batch,
                "workers": args.workers,
            },
            {
                "resolution": args.resolution + 8,
                "epochs": 1,
                "data_fraction": 1.0,
                "batch_size": args.batch,
                "workers": args.workers,
            },
        ],
        "metrics": {"every_n_steps": 1},
        "checkpoint": {"every_n_steps": 0, "keep_last": 2},
        "preemption": {"grace_seconds": 120},
    }


# ------------------------------------------------------------------------------------- processes


def ray_workers_running() -> bool:
    return subprocess.run(["pgrep", "-f", "RayTrainWorker"], capture_output=True).returncode == 0


def wait_for_quiet(args) -> float:
    """Seconds waited until no RayTrainWorker was seen for ``--quiet-s``; -1 if ``--max-wait-s`` ran out."""
    if args.quiet_s <= 0:
        return 0.0
    start = last_busy = time.monotonic()
    announced = False
    while time.monotonic() - last_busy < args.quiet_s:
        if ray_workers_running():
            last_busy = time.monotonic()
            if not announced:
                print(
                    f"waiting for other Ray Train workers to finish (quiet for {args.quiet_s:g}s)...",
                    flush=True,
                )
                announced = True
        if time.monotonic() - start > args.max_wait_s:
            print(
                f"warning: the machine was not quiet within {args.max_wait_s:g}s; measuring anyway",
                flush=True,
            )
            return -1.0
        time.sleep(1.0)
    return time.monotonic() - start


class Coordinator:
    """A ``stagetrain`` subprocess in its own session; every output line is timestamped on arrival."""

    def __init__(self, *cli_args: str, env: dict):
        self.lines: list[tuple[float, str]] = []
        self.t0 = time.time()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", *cli_args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.time() - self.t0, line.rstrip("\n")))

    def seen(self, text: str) -> float | None:
        """Seconds after launch of the first output line containing ``text``."""
        return next((t for t, line in self.lines if text in line), None)

    def output(self, last: int = 40) -> str:
        return "\n".join(line for _, line in self.lines[-last:])

    def stop(self, timeout: float) -> int:
        """SIGTERM (a preemption notice), wait for the exit, then make sure the whole session is gone."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        _reap_session(self.proc.pid)  # leftovers of the session: Ray's agents, workers
        if code is None:
            code = self.proc.wait()
        self._reader.join(timeout=5)
        return code


def _reap_session(pgid: int) -> None:
    """Wait for the process group to go (15 s), then SIGTERM it (5 s), then SIGKILL it."""
    for sig, wait_s in ((None, 15.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if sig is not None:
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def step_lines(job_dir: str) -> int:
    path = os.path.join(job_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if line.strip() and '"kind"' not in line)


def wait_steps(coord: Coordinator, job_dir: str, count: int, timeout: float) -> float:
    """Seconds after launch at which metrics.jsonl first held ``count`` step records."""
    deadline = time.monotonic() + timeout
    while True:
        if step_lines(job_dir) >= count:
            return time.time() - coord.t0
        if coord.proc.poll() is not None:
            raise RuntimeError(
                f"stagetrain exited {coord.proc.returncode} before step record {count}:\n{coord.output()}"
            )
        if time.monotonic() > deadline:
            coord.stop(timeout=30)
            raise RuntimeError(f"no step record {count} within {timeout:g}s:\n{coord.output()}")
        time.sleep(0.02)


# ----------------------------------------------------------------------------------- measurements


def time_ray_start(spec_dict: dict) -> float:
    import ray

    from service.executor import connect_ray

    t0 = time.perf_counter()
    connect_ray(None)
    seconds = time.perf_counter() - t0
    ray.shutdown()
    return seconds


def time_download(storage: str, job_id: str) -> tuple[str, float, float, float]:
    """(tag, MB, median seconds of CheckpointStore.load, of which sha256-checked reading)."""
    from checkpoints.checkpointer import decode
    from checkpoints.storage import Storage
    from checkpoints.store import CheckpointStore

    store = CheckpointStore(Storage(storage).child(job_id, "checkpoints"))
    latest = store.latest(verify=False)
    assert latest is not None, f"no committed checkpoint in {storage}/{job_id}"
    manifest = latest[0]
    loads, reads = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        store.load(manifest.tag)
        loads.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        info, payload = store.inspect(manifest.tag, verify=True)
        reads.append(time.perf_counter() - t0)
        decode(payload)
    megabytes = sum(f.size for f in manifest.files.values()) / 1e6
    return manifest.tag, megabytes, statistics.median(loads), statistics.median(reads)


def one_round(args, k: int, tmp: str, env: dict) -> dict:
    spec = job_spec(args)
    job_path = os.path.join(tmp, f"job-{k}.yaml")
    with open(job_path, "w") as f:
        yaml.safe_dump(spec, f)
    storage = os.path.join(tmp, "runs")
    job_id = f"resume-bench-{k}-{uuid.uuid4().hex[:4]}"
    job_dir = os.path.join(storage, job_id)
    row: dict = {"round": k + 1, "job_id": job_id}

    row["ray_start_s"] = time_ray_start(spec)
    print(f"  round {k + 1}: ray.init (in-process) {row['ray_start_s']:.2f}s", flush=True)

    fresh = Coordinator("run", job_path, "--job-id", job_id, "--storage", storage, env=env)
    row["fresh_first_step_s"] = wait_steps(fresh, job_dir, 1, args.timeout_s)
    row["fresh_job_line_s"], row["fresh_ray_line_s"] = fresh.seen(f"job {job_id}"), fresh.seen(RAY_STARTED)
    wait_steps(fresh, job_dir, args.preempt_after, args.timeout_s)
    t0 = time.perf_counter()
    code = fresh.stop(timeout=args.timeout_s)
    row["preempt_exit_s"] = time.perf_counter() - t0
    if code != EXIT_PREEMPTED:
        raise RuntimeError(
            f"stagetrain run exited {code} after SIGTERM, expected {EXIT_PREEMPTED}:\n{fresh.output()}"
        )
    print(
        f"  round {k + 1}: fresh run: first step at {row['fresh_first_step_s']:.2f}s; preempted, exit 75 "
        f"{row['preempt_exit_s']:.1f}s after SIGTERM",
        flush=True,
    )

    row["tag"], row["checkpoint_MB"], row["download_s"], row["read_verify_s"] = time_download(storage, job_id)
    print(
        f"  round {k + 1}: checkpoint {row['tag']} ({row['checkpoint_MB']:.0f} MB): load "
        f"{row['download_s']:.2f}s "
        f"(read + sha256 {row['read_verify_s']:.2f}s)",
        flush=True,
    )

    before = step_lines(job_dir)
    resume = Coordinator("resume", job_id, "--storage", storage, env=env)
    row["resume_first_step_s"] = wait_steps(resume, job_dir, before + 1, args.timeout_s)
    row["resume_line_s"], row["resume_ray_line_s"] = (
        resume.seen(f"resuming {job_id}"),
        resume.seen(RAY_STARTED),
    )
    code = resume.stop(timeout=args.timeout_s)
    if code != EXIT_PREEMPTED:
        raise RuntimeError(
            f"stagetrain resume exited {code} after SIGTERM, expected {EXIT_PREEMPTED}:\n{resume.output()}"
        )
    row["worker_start_s"] = row["resume_first_step_s"] - row["ray_start_s"] - row["download_s"]
    print(f"  round {k + 1}: resume: first step at {row['resume_first_step_s']:.2f}s", flush=True)
    shutil.rmtree(job_dir, ignore_errors=True)
    return row


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def print_table(rows: list[dict], s: dict) -> None:
    print()
    print(
        f"{'round':>5} {'fresh 1st step':>15} {'resume 1st step':>16} {'ray.init':>9} {'ckpt load':>10} "
        f"{'worker start':>13} {'fresh: job/ray line':>20} {'resume: resuming/ray line':>26}"
    )
    for r in rows:
        print(
            f"{r['round']:>5} {r['fresh_first_step_s']:>15.2f} {r['resume_first_step_s']:>16.2f} "
            f"{r['ray_start_s']:>9.2f} {r['download_s']:>10.2f} {r['worker_start_s']:>13.2f} "
            f"{fmt(r['fresh_job_line_s']) + ' / ' + fmt(r['fresh_ray_line_s']):>20} "
            f"{fmt(r['resume_line_s']) + ' / ' + fmt(r['resume_ray_line_s']):>26}"
        )
    print()
    print(
        f"resume to first step  {s['resume_first_step_s']:7.2f} s  (launch -> first new step record in "
        "metrics.jsonl)"
    )
    print(f"  Ray start           {s['ray_start_s']:7.2f} s  (connect_ray / ray.init, timed in-process)")
    print(
        f"  download + load     {s['download_s']:7.2f} s  (checkpointer.load of the same "
        f"{s['checkpoint_MB']:.0f} MB "
        f"checkpoint, in-process; read + sha256 {s['read_verify_s']:.2f} s)"
    )
    print(f"  worker start, rest  {s['worker_start_s']:7.2f} s  (resume - Ray start - download)")
    print(f"fresh run to first step {s['fresh_first_step_s']:5.2f} s  (launch -> first step record)")
    print(
        f"target: resume <= fresh + download + 5 = {s['target_s']:.2f} s: "
        f"{'met' if s['meets_target'] else 'MISSED'} "
        f"(resume - fresh = {s['resume_minus_fresh_s']:+.2f} s)"
    )
    print()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    waited = wait_for_quiet(args)
    env = dict(os.environ)
    env.update({"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "PYTHONUNBUFFERED": "1"})
    env.pop("RAY_ADDRESS", None)
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.1"
    print(
        f"resume: {args.arch} at {args.resolution}px, {args.workers} workers x batch {args.batch}, "
        f"SIGTERM after {args.preempt_after} steps, {args.rounds} round(s)",
        flush=True,
    )
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="stagetrain-resume-bench-") as tmp:
        rows = [one_round(args, k, tmp, env) for k in range(args.rounds)]

    def med(key):
        return statistics.median(r[key] for r in rows)

    s = {
        key: round(med(key), 3)
        for key in (
            "resume_first_step_s",
            "fresh_first_step_s",
            "download_s",
            "ray_start_s",
            "worker_start_s",
            "read_verify_s",
            "checkpoint_MB",
            "preempt_exit_s",
        )
    }
    s["target_s"] = round(s["fresh_first_step_s"] + s["download_s"] + 5.0, 3)
    s["meets_target"] = s["resume_first_step_s"] <= s["target_s"]
    s["resume_minus_fresh_s"] = round(s["resume_first_step_s"] - s["fresh_first_step_s"], 3)
    print_table(rows, s)
    result = {
        **s,
        "rounds": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
        "arch": args.arch,
        "workers": args.workers,
        "batch_per_worker": args.batch,
        "resolution": args.resolution,
        "waited_for_quiet_s": round(waited, 1),
        "quick": args.quick,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
