"""Goodput under a scripted preemption schedule, on a 2-node local Ray cluster (ray.cluster_utils.Cluster:
a 1-CPU head and a 1-CPU worker node, one of the job's two workers on each).

    .venv/bin/python bench/preemption.py             # ~15 min on 2 cores (4 runs, 2 preemptions each)
    .venv/bin/python bench/preemption.py --quick     # ~10 min: shorter job, one preemption per run

One job (synthetic 3x24x24 images, the small ResNet, 3 stages 16/20/24 px, 2 workers, periodic
checkpoints every 10 steps, ``metrics.every_n_steps: 1``), launched through the CLI four times. A
preemption is due every ``--every`` seconds after the first step, and happens at the first moment
after that when steps are flowing and the current stage has run ``--into-stage`` steps:

1. ``uninterrupted``: the reference wall time, and a fresh start's time to its first step.
2. ``notice``: every ``--every`` seconds of training the worker node's fake metadata server (127.0.0.1)
   starts announcing a spot termination (``preemption.notice: aws``); once the coordinator has the
   checkpoint (its record shows the stage running again), the node is removed; ``--down`` seconds later an
   equal node is added.
3. ``sigkill``: the same schedule without a notice: the node is removed (its processes killed) at once.
4. ``restart_stage``: as ``sigkill``, but with checkpoints at stage boundaries only, so each preemption
   restarts the interrupted stage from its start (what a job without mid-stage state does).

Figures per mode: ``goodput`` (the uninterrupted wall time / this run's), ``steps_lost_per_preemption``
(step records written more than once: steps run again), ``recovery_s`` (capacity back, i.e. the added
node registered, to the first new step's report), ``preemptions``. Targets: with notice, 0 steps lost;
recovery <= a fresh start's time to first step + 5 s (``fresh_first_step_s``).

The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tests.fake_metadata import FakeMetadata  # noqa: E402
from workers.control import AWS_ENDPOINT_ENV  # noqa: E402


def job_spec(name: str, epochs: float, size: int, boundary_only: bool, notice: bool) -> dict:
    stage = {"epochs": epochs, "batch_size": 32, "workers": 2}
    return {
        "name": name,
        "seed": 0,
        "model": {"builder": "workers.models:small_resnet", "num_classes": 10, "in_channels": 3},
        "data": {"kind": "synthetic", "size": size, "val_size": 256, "num_classes": 10, "loader_workers": 0},
        "optimizer": {"name": "sgd", "momentum": 0.9, "weight_decay": 5e-5},
        "schedule": {"strategy": "global_onecycle", "max_lr": 0.2},
        "stages": [{**stage, "resolution": r} for r in (16, 20, 24)],
        "metrics": {"every_n_steps": 1},
        "checkpoint": {"every_n_steps": 0 if boundary_only else 10, "keep_last": 2},
        "failure": {"capacity_wait_s": 600},
        "preemption": {"notice": "aws" if notice else "none", "notice_poll_s": 0.5},
    }


def steps(job_dir: str) -> list[dict]:
    path = os.path.join(job_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written
            if r.get("kind") == "step":
                out.append(r)
    return out


def record(job_dir: str) -> dict:
    try:
        with open(os.path.join(job_dir, "job.json")) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def run_mode(mode: str, args, work: str) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    os.environ["RAY_AUTH_MODE"] = "disabled"
    quiet = FakeMetadata()
    servers = [FakeMetadata()]
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "env_vars": {AWS_ENDPOINT_ENV: quiet.url}}
    )
    node = cluster.add_node(num_cpus=1, env_vars={AWS_ENDPOINT_ENV: servers[-1].url})
    cluster.wait_for_nodes()
    storage = os.path.join(work, mode)
    job_dir = os.path.join(storage, mode)
    spec = job_spec(
        mode, args.epochs, args.size, boundary_only=mode == "restart_stage", notice=mode == "notice"
    )
    path = os.path.join(work, f"{mode}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(spec, f)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", AWS_ENDPOINT_ENV: quiet.url, "PYTHONPATH": REPO}
    cmd = [sys.executable, "-m", "service.cli", "run", path, "--job-id", mode, "--storage", storage]
    started = time.time()
    proc = subprocess.Popen(
        cmd + ["--address", cluster.address],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    preemptions, recoveries = 0, []
    try:
        while not steps(job_dir):
            time.sleep(0.05)
        first_step = steps(job_dir)[0]["time"] - started
        next_at = time.time() + args.every
        while proc.poll() is None:
            if mode == "uninterrupted" or preemptions >= args.preemptions or time.time() < next_at:
                time.sleep(0.2)
                continue
            ran = steps(job_dir)
            in_stage = {r["step"] for r in ran if r["stage"] == ran[-1]["stage"]}
            if time.time() - ran[-1]["time"] > 1.5 or len(in_stage) < args.into_stage:
                time.sleep(0.1)  # between stages, or just into one: wait until it is well under way
                continue
            if record(job_dir).get("current_step", 0) >= record(job_dir).get("total_steps", 1) - 10:
                break  # too close to the end to matter
            done = len(steps(job_dir))
            if mode == "notice":
                servers[-1].announced = "terminate"
                infra = sum(s["infra_failures"] for s in record(job_dir).get("stages", []))
                while sum(s["infra_failures"] for s in record(job_dir).get("stages", [])) == infra:
                    if proc.poll() is not None:
                        break
                    time.sleep(0.1)
            cluster.remove_node(node)
            preemptions += 1
            time.sleep(args.down)
            servers.append(FakeMetadata())
            node = cluster.add_node(num_cpus=1, env_vars={AWS_ENDPOINT_ENV: servers[-1].url})
            cluster.wait_for_nodes()
            back = time.time()
            while proc.poll() is None:
                new = [s for s in steps(job_dir)[done:] if s["time"] > back]
                if new:
                    recoveries.append(new[0]["time"] - back)
                    break
                time.sleep(0.1)
            next_at = time.time() + args.every
        out, _ = proc.communicate(timeout=1200)
        wall = time.time() - started
    finally:
        if proc.poll() is None:
            proc.kill()
        ray.shutdown()
        cluster.shutdown()
        for s in [quiet, *servers]:
            s.close()
    if proc.returncode != 0:
        raise SystemExit(f"{mode}: the job exited {proc.returncode}\n{out[-3000:]}")
    counts = Counter(s["step"] for s in steps(job_dir))
    rerun = sum(c - 1 for c in counts.values())
    return {
        "wall_s": round(wall, 1),
        "first_step_s": round(first_step, 1),
        "preemptions": preemptions,
        "steps": len(counts),
        "steps_lost_per_preemption": round(rerun / preemptions, 1) if preemptions else 0,
        "recovery_s": [round(r, 1) for r in recoveries],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--every", type=float, default=40.0, help="seconds of training between preemptions")
    parser.add_argument("--down", type=float, default=10.0, help="seconds before the node is replaced")
    parser.add_argument("--preemptions", type=int, default=2)
    parser.add_argument("--epochs", type=float, default=1.0, help="per stage")
    parser.add_argument("--size", type=int, default=6144, help="synthetic training images")
    parser.add_argument(
        "--into-stage", type=int, default=15, help="steps a stage has run before a preemption"
    )
    parser.add_argument("--modes", default="uninterrupted,notice,sigkill,restart_stage")
    args = parser.parse_args()
    if args.quick:
        args.size, args.preemptions, args.every = 3072, 1, 20.0
    work = tempfile.mkdtemp(prefix="stagetrain-preemption-")
    print(f"machine: {os.cpu_count()} CPUs; work folder {work}", flush=True)
    results = {}
    for mode in args.modes.split(","):
        results[mode] = run_mode(mode, args, work)
        print(f"{mode}: {results[mode]}", flush=True)
    base = results.get("uninterrupted")
    for r in results.values():
        if base:
            r["goodput"] = round(base["wall_s"] / r["wall_s"], 3)
    fresh = base["first_step_s"] if base else None
    print(f"{'mode':<15}{'goodput':>9}{'lost/preempt':>14}{'recovery s':>16}{'preemptions':>13}")
    for mode, r in results.items():
        rec = ",".join(f"{x:g}" for x in r["recovery_s"]) or "-"
        print(
            f"{mode:<15}{r.get('goodput', 1):>9.3f}{r['steps_lost_per_preemption']:>14g}{rec:>16}"
            f"{r['preemptions']:>13}"
        )
    if fresh is not None:
        print(f"fresh start's time to first step: {fresh:.1f}s; recovery target <= {fresh + 5:.1f}s")
    print(json.dumps({"fresh_first_step_s": fresh, "modes": results}))


if __name__ == "__main__":
    main()
