"""Helpers for tests that run real jobs: write a spec, run the CLI in a subprocess, read results."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from checkpoints.store import MODEL_FILE, STATE_FILE
from service.layout import CHECKPOINTS, METRICS_FILE
from tests.conftest import BASE_SPEC, merge
from tests.helpers import cli_env, stagetrain

TINY = merge(
    BASE_SPEC,
    {
        "name": "tiny",
        "data": {"kind": "synthetic", "size": 384, "val_size": 64, "num_classes": 10, "loader_workers": 0},
        "schedule": {"max_lr": 0.1},
        "lr_scaling": {"rule": "linear"},
        "stages": [
            {"resolution": 16, "epochs": 1, "batch_size": 16, "workers": 2},
            {"resolution": 24, "epochs": 1, "batch_size": 16, "workers": 1, "grad_accum": 2},
        ],
        "metrics": {"every_n_steps": 4},
        "checkpoint": {"every_n_steps": 5, "keep_last": 2},
    },
)
TINY["data"] = {"kind": "synthetic", "size": 384, "val_size": 64, "num_classes": 10, "loader_workers": 0}
# The small CIFAR-style ResNet of the quickstart (78k parameters): ~10x faster a step than ResNet-18 at
# these sizes, and 0.3 MB checkpoints. ResNet-18 and other torchvision models are trained in-process.
TINY["model"] = {
    "builder": "workers.models:small_resnet",
    "kwargs": {"widths": [16, 32, 64], "blocks": [1, 1, 1]},
    "num_classes": 10,
    "in_channels": 3,
}


# The smallest job StageRunner trains in-process (tests/test_runner.py, tests/test_regularization.py): a
# two-block ResNet of 4 and 8 channels on 64 synthetic images, deterministic.
TINY_IN_PROCESS = dict(
    deterministic=True,
    model={
        "arch": None,
        "builder": "workers.models:small_resnet",
        "kwargs": {"widths": [4, 8], "blocks": [1, 1]},
        "num_classes": 10,
        "in_channels": 3,
    },
    data={"kind": "synthetic", "size": 64, "val_size": 16, "num_classes": 10, "loader_workers": 0},
)


def write_job(tmp_path, spec: dict, name: str = "job.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def read_metrics(job_dir) -> list[dict]:
    from checkpoints.storage import Storage
    from service.jobs import JobStore

    job_dir = str(job_dir)
    root, job_id = job_dir.rsplit("/", 1)
    return JobStore(Storage(root), job_id).read_metrics()


def read_record(job_dir) -> dict:
    with open(os.path.join(str(job_dir), "job.json")) as f:
        return json.load(f)


DETERMINISTIC = merge(
    TINY,
    {
        "name": "resume",
        "deterministic": True,
        "stages": [
            {"resolution": 16, "epochs": 2, "batch_size": 16, "workers": 2},  # 24 steps of 32
            {"resolution": 20, "epochs": 1, "batch_size": 16, "workers": 2},  # 12 steps
            {"resolution": 24, "epochs": 1, "batch_size": 8, "workers": 2, "grad_accum": 2},  # 12 steps
        ],
        "metrics": {"every_n_steps": 2},
        "checkpoint": {"every_n_steps": 5, "keep_last": 2},
    },
)
TOTAL = 48


@pytest.fixture(scope="session")
def on_head(ray_head) -> dict:
    """The environment of a user whose ``RAY_ADDRESS`` is the session's Ray head (``tests/ray_head.py``):
    ``stagetrain run`` joins that cluster instead of starting a local Ray of its own, which on 2 cores
    costs ~20 s a run (starting and stopping its processes beside the first ``fit``). A coordinator
    SIGKILLed here is a dead driver: Ray ends its job's Train controller and workers (the kill tests wait
    for their pids to go). Workers on the head get the head's environment (with the test bucket's fake
    credentials) and what ``stagetrain`` forwards: ``STAGETRAIN_*`` settings and the storage endpoint."""
    env = cli_env(**ray_head.env, RAY_ADDRESS=ray_head.gcs_address)
    return {k: v for k, v in env.items() if k not in ("RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH")}


@pytest.fixture(scope="session")
def straight(tmp_path_factory, on_head):
    """The uninterrupted reference run."""
    tmp = tmp_path_factory.mktemp("straight")
    job = write_job(tmp, DETERMINISTIC)
    stagetrain("run", job, "--job-id", "straight", "--storage", str(tmp / "runs"), env=on_head, check=True)
    return tmp / "runs" / "straight", job


def final_state(job_dir, stage: int = 3):
    """Model and train state of the job's stage-``stage`` boundary checkpoint (the last stage's: the end)."""
    tags = sorted(os.listdir(job_dir / CHECKPOINTS))
    final = [t for t in tags if t.endswith(f"stage-{stage}-end")]
    assert final, tags
    folder = job_dir / CHECKPOINTS / final[0]
    return (
        torch.load(folder / MODEL_FILE, weights_only=True),
        torch.load(folder / STATE_FILE, weights_only=True),
    )


def launch(*args, on: dict | None = None, **env):
    """Start the coordinator in its own session, so the test can kill it with all its Ray processes (a
    local Ray; ``on``: the environment to start from instead, e.g. ``on_head``'s)."""
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**on, **env} if on else cli_env(**env),
        start_new_session=True,
    )


def steps_reported(job_dir) -> int:
    path = job_dir / METRICS_FILE
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line and json.loads(line)["kind"] == "step")


def hold_at(job_dir, *steps: int, timeout_s: float = 600) -> None:
    """The job's workers will hold before each of ``steps`` (once each) until a stop is requested
    (``control/hold.json``): a test then kills, cancels or notices at a known step, not in a race."""
    from checkpoints.storage import Storage
    from service.layout import HOLD_FILE
    from workers.control import HoldRequest

    root, job_id = str(job_dir).rsplit("/", 1)
    request = HoldRequest(steps=list(steps), timeout_s=timeout_s)
    Storage(root).child(job_id).write_text(request.model_dump_json(), HOLD_FILE)


def held(job_dir, step: int, ranks: int, proc=None, timeout: float = 300) -> list[dict]:
    """Wait until ``ranks`` workers hold at ``step``; their markers (pid, host, node), by rank. With
    ``proc`` (the coordinator), fail at once with its output if it exits first."""
    import time

    from checkpoints.storage import Storage
    from workers.control import held_marker

    root, job_id = str(job_dir).rsplit("/", 1)
    storage = Storage(root).child(job_id)
    names = [held_marker(step, r) for r in range(ranks)]
    deadline = time.monotonic() + timeout
    while not all(storage.exists(n) for n in names):
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(
                f"coordinator exited {proc.returncode} before holding at step {step}:\n{out}"
            )
        assert time.monotonic() < deadline, f"timed out after {timeout:g}s waiting for a hold at step {step}"
        time.sleep(0.05)
    return [json.loads(storage.read_text(n)) for n in names]
