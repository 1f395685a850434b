"""Stage-boundary cost with stage groups (one ``TorchTrainer.fit`` for consecutive stages on one worker
layout) against one ``fit`` per stage, side by side in one run.

    .venv/bin/python bench/stage_groups.py           # ~2 min on 2 cores
    .venv/bin/python bench/stage_groups.py --rounds 2

The same 3-stage job (synthetic data, the quickstart's small ResNet, 2 CPU workers, 16/20/24 px,
``metrics.every_n_steps: 1`` so every step's report time is recorded, local folder storage) runs through
the real coordinator (``service.runner.JobRunner`` on ``RayExecutor``, one local Ray session for all
runs) twice per round, in alternating order:

- ``grouped``: as stagetrain runs it: the workers go from stage k to stage k+1 in place;
- ``per_stage``: the same, with every run limited to one stage (``StageRun.last = None``: one ``fit``
  per stage, as before stage groups).

From each run's ``metrics.jsonl``: the boundary gap = the report time of stage k+1's first step minus
that of stage k's last step, minus the median step time (what the boundary costs beyond a step: the
stage-end evaluation, the boundary checkpoint, and for ``per_stage`` a new worker group). Target:
grouped gap <= 3 s. Also each run's wall clock. The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # runnable as `python bench/stage_groups.py` from a checkout
    sys.path.insert(0, REPO)

os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

SPEC = {
    "version": 1,
    "name": "groups",
    "model": {
        "builder": "workers.models:small_resnet",
        "kwargs": {"widths": [16, 32, 64], "blocks": [1, 1, 1]},
        "num_classes": 10,
        "in_channels": 3,
    },
    "data": {"kind": "synthetic", "size": 768, "val_size": 128, "num_classes": 10, "loader_workers": 0},
    "optimizer": {"name": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 5e-5},
    "schedule": {"strategy": "global_onecycle", "max_lr": 0.1},
    "stages": [
        {"resolution": 16, "epochs": 1, "batch_size": 32, "workers": 2},
        {"resolution": 20, "epochs": 1, "batch_size": 32, "workers": 2},
        {"resolution": 24, "epochs": 1, "batch_size": 32, "workers": 2},
    ],
    "metrics": {"every_n_steps": 1},
    "checkpoint": {"every_n_steps": 0},
}


def run_job(root: str, job_id: str, grouped: bool) -> tuple[float, list[float]]:
    """Wall seconds of the job and its boundary gaps (s beyond a median step)."""
    from rich.console import Console

    from checkpoints.storage import Storage
    from service.coordination import LeaseKeeper
    from service.executor import RayExecutor
    from service.jobs import JobRecord, JobStore
    from service.plan import build_plan
    from service.runner import JobRunner, RunOptions
    from service.spec import validate_spec

    class PerStage(RayExecutor):
        def start(self, run):
            import dataclasses

            return super().start(dataclasses.replace(run, last=None))

    spec = validate_spec(SPEC)
    plan = build_plan(spec, SPEC["data"]["size"])
    jobs = JobStore(Storage(root), job_id)
    record = JobRecord.create(job_id, spec, plan)
    jobs.save(record)
    lease = LeaseKeeper(jobs.storage, job_id).acquire()
    options = RunOptions(job_id=job_id, storage=root, console=Console(file=io.StringIO()))
    executor = (RayExecutor if grouped else PerStage)(None, jobs.root)
    started = time.perf_counter()
    code = JobRunner(spec, plan, record, jobs, options, lease, executor).run()
    wall = time.perf_counter() - started
    assert code == 0, f"{job_id} exited {code}"
    steps = {m["step"]: m["time"] for m in jobs.read_metrics() if m["kind"] == "step"}
    per_step = statistics.median(steps[k + 1] - steps[k] for k in range(len(steps) - 1))
    gaps = [steps[s.step_start] - steps[s.step_start - 1] - per_step for s in plan.stages[1:]]
    return wall, gaps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    from service.executor import connect_ray

    connect_ray(None)
    results: dict[str, dict[str, list[float]]] = {
        m: {"wall_s": [], "gap_s": []} for m in ("grouped", "per_stage")
    }
    with tempfile.TemporaryDirectory() as root:
        for r in range(args.rounds):
            order = ("grouped", "per_stage") if r % 2 == 0 else ("per_stage", "grouped")
            for mode in order:
                wall, gaps = run_job(root, f"{mode}-{r}", grouped=mode == "grouped")
                results[mode]["wall_s"].append(wall)
                results[mode]["gap_s"].extend(gaps)
                print(
                    f"round {r + 1} {mode:9s}: wall {wall:6.1f} s, boundary gaps "
                    + ", ".join(f"{g:.2f} s" for g in gaps)
                )
    figures = {
        f"{mode}_{key}": round(statistics.median(values), 2)
        for mode, d in results.items()
        for key, values in d.items()
    }
    figures["gap_ratio_per_stage_to_grouped"] = round(
        figures["per_stage_gap_s"] / max(figures["grouped_gap_s"], 1e-3), 1
    )
    figures["wall_ratio_grouped_to_per_stage"] = round(
        figures["grouped_wall_s"] / figures["per_stage_wall_s"], 3
    )
    figures["target_grouped_gap_s"] = 3.0
    print(
        f"boundary beyond a step: grouped {figures['grouped_gap_s']:.2f} s, "
        f"per stage {figures['per_stage_gap_s']:.2f} s"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
