"""Preemption-safe resume on a real local Ray cluster: interrupted-and-resumed runs must end bit-identical
to an uninterrupted one (deterministic mode, CPU)."""

from __future__ import annotations

import json
import os
import signal

import pytest

from checkpoints.store import MANIFEST
from service.layout import CHECKPOINTS
from tests.conftest import merge
from tests.helpers import assert_same, wait_until
from tests.jobs import (
    DETERMINISTIC,
    TINY,
    TOTAL,
    final_state,
    held,
    hold_at,
    launch,
    read_metrics,
    read_record,
    stagetrain,
    write_job,
)

pytestmark = pytest.mark.ray


def _kill(proc, workers: list[dict]) -> None:
    """SIGKILL the coordinator (a driver on the session's head); its lease is free at once (its process
    is gone). Ray then ends the dead driver's job: its Train controller and the workers it owns. Wait
    until those workers (``held``'s markers) are gone, so the next coordinator finds the head free."""
    from tests.ray_head import _alive

    assert proc.poll() is None, f"coordinator exited {proc.returncode}:\n{proc.stdout.read()}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_until(
        lambda: not any(_alive(w["pid"]) for w in workers),
        "the dead coordinator's workers to end",
        timeout=60,
    )


def _committed(job_dir, suffix: str) -> bool:
    folder = job_dir / CHECKPOINTS
    return folder.exists() and any(
        t.endswith(suffix) and (folder / t / MANIFEST).exists() for t in os.listdir(folder)
    )


def _upload_in_flight(job_dir, after_step: int) -> bool:
    folder = job_dir / CHECKPOINTS
    if not folder.exists():
        return False
    return any(
        int(t.split("-")[1]) > after_step
        and not (folder / t / MANIFEST).exists()
        and (folder / t).is_dir()
        and os.listdir(folder / t)
        for t in os.listdir(folder)
    )


def test_sigkill_mid_epoch_and_mid_upload_then_resume_is_bit_identical(tmp_path, straight, on_head):
    straight_dir, _ = straight
    job = write_job(tmp_path, DETERMINISTIC)
    storage = tmp_path / "runs"
    job_dir = storage / "killed"
    resumed_from = []

    # The workers hold at each kill point (once each) until the kill: no race with the job.
    hold_at(job_dir, 8, 25)
    # (a) mid-epoch: past the step-5 checkpoint, inside stage 1's first epoch
    proc = launch("run", job, "--job-id", "killed", "--storage", str(storage), on=on_head)
    _kill(proc, held(job_dir, 8, ranks=2, proc=proc))
    assert read_record(job_dir)["status"] == "running"  # the driver died: nobody marked it
    # (b) past the stage-1 boundary commit, during the next upload: the step-25 payload written, its
    # manifest held back 60 s (that step's only)
    proc = launch(
        "resume", "killed", "--storage", str(storage), on=on_head, STAGETRAIN_TEST_COMMIT_DELAY_S="60@25"
    )
    workers = held(job_dir, 25, ranks=2, proc=proc)
    wait_until(lambda: _upload_in_flight(job_dir, after_step=24), "the step-25 upload to start")
    assert _committed(job_dir, "stage-1-end")
    _kill(proc, workers)
    orphans = [
        t for t in os.listdir(job_dir / CHECKPOINTS) if not (job_dir / CHECKPOINTS / t / MANIFEST).exists()
    ]
    assert orphans, "the kill should have left an uncommitted checkpoint folder"
    listing = stagetrain("checkpoints", "killed", "--storage", str(storage))
    assert "no manifest" in listing.stdout

    proc = stagetrain("resume", "killed", "--storage", str(storage), env=on_head)  # nobody kills this one
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = read_record(job_dir)
    assert record["status"] == "succeeded"
    assert sum("resumed from" in e for e in record["events"]) == 2, record["events"]
    for event in record["events"]:
        if "resumed from" in event:
            resumed_from.append(int(event.rsplit("(step ", 1)[1].rstrip(")")))
    # (a) resumes from a mid-epoch checkpoint: a periodic one, or the one a worker commits when Ray
    # SIGTERMs it after the coordinator's death (workers defer that signal to finish their step)
    assert 5 <= resumed_from[0] < 24 and resumed_from[0] % 12 != 0
    assert resumed_from[1] == 24  # the boundary: (b)'s step-25 checkpoint never committed
    # the orphan was ignored by resume and cleaned up once newer checkpoints were committed
    assert not any(o in os.listdir(job_dir / CHECKPOINTS) for o in orphans)
    assert_equivalent(job_dir, straight_dir, resumed_from)


def test_sigterm_preempts_with_a_checkpoint_at_the_step_reached(tmp_path, on_head):
    """SIGTERM to the coordinator (``ray job stop``, a pod deleted) while the workers hold at step 28, mid
    stage 2: the workers finish their step and commit a checkpoint at exactly the step reached; exit 75.
    The bit-identical resume of such a stop (a cancel at the same step 28) is
    test_service_ray.py::test_a_submitted_job_scaled_taken_over_*; a resume on fewer workers mid-stage is
    test_cluster_ray.py's (and its re-plan and LR, test_decisions.py::test_mid_stage_resize_*)."""
    job = write_job(tmp_path, DETERMINISTIC)
    storage = tmp_path / "runs"
    job_dir = storage / "preempted"
    hold_at(job_dir, 28)
    proc = launch("run", job, "--job-id", "preempted", "--storage", str(storage), on=on_head)
    held(job_dir, 28, ranks=2, proc=proc)
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 75, out
    record = read_record(job_dir)
    assert record["status"] == "preempted"
    assert record["stages"][1]["status"] == "preempted"
    stopped_at = record["current_step"]
    assert stopped_at == 28
    assert _committed(job_dir, f"step-{stopped_at:09d}")
    status = stagetrain("status", "preempted", "--storage", str(storage))
    assert "preempted" in status.stdout and f"step {stopped_at}" in status.stdout


def test_a_killed_worker_is_restarted_then_sigterm_to_the_workers_preempts_as_on_a_spot_node(
    tmp_path, on_head
):
    """Two things that happen to a real Ray worker process, in one run: SIGKILL (the OOM killer) ends
    one worker at step 10 and the stage restarts from the newest checkpoint; at step 22 both workers
    get SIGTERM (their spot node is going away): they finish the step, commit a checkpoint at exactly
    the step reached and the job stops as preempted (exit 75). Repeated restarts are the coordinator's,
    tested without Ray: test_coordinator.py::test_a_dead_worker_is_restarted_from_the_newest_*."""
    spec = merge(
        DETERMINISTIC,
        {
            "name": "worker-kill",
            "failure": {"max_failures": 3},
            "stages": [{"resolution": 16, "epochs": 2, "batch_size": 16, "workers": 2}],  # 24 steps
        },
    )
    job = write_job(tmp_path, spec)
    storage = tmp_path / "runs"
    job_dir = storage / "wk"
    hold_at(job_dir, 10, 22)
    # one node: a dead worker is never a lost node, so the coordinator need not wait 10 s to see
    proc = launch(
        "run", job, "--job-id", "wk", "--storage", str(storage), on=on_head, STAGETRAIN_NODE_LOST_WAIT_S="1"
    )
    workers = held(job_dir, 10, ranks=2, proc=proc)
    os.kill(workers[1]["pid"], signal.SIGKILL)  # one worker of this job's group
    for worker in held(job_dir, 22, ranks=2, proc=proc):  # the restarted group's workers
        os.kill(worker["pid"], signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out
    record = read_record(job_dir)
    assert record["status"] == "preempted" and record["stages"][0]["status"] == "preempted"
    assert record["stages"][0]["restarts"] == 1, record["events"]
    # the workers finished their step and committed a checkpoint at the step reached (not a periodic one)
    assert record["current_step"] == 22 and _committed(job_dir, "step-000000022")
    records = [json.loads(line) for line in (job_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["kind"] == "step"]  # as written: re-run steps twice
    # steps whose report had not reached the coordinator when the worker died are not logged (the
    # checkpoint covers them): every step up to the stop is logged from the restart on
    breaks = [i for i in range(1, len(steps)) if steps[i] != steps[i - 1] + 1]  # where the restart began
    assert len(breaks) <= 1 and steps[0] == 0, steps
    restart = breaks[0] if breaks else 0
    assert steps[restart:] == list(range(steps[restart], 22)) and steps[restart] <= 10, steps
    # the failure lost at most one checkpoint interval (5) plus the unreported tail (< 2 steps)
    assert len(steps) - len(set(steps)) <= 5 + 2, steps


def test_a_crash_of_the_training_code_fails_the_job_naming_the_error(tmp_path, on_head):
    """The training code raises in a real worker: the job fails with the worker's error, not counted as
    an infrastructure failure. Retries up to failure.max_failures (each from the newest checkpoint) are
    the coordinator's decision, tested without Ray: test_coordinator.py::test_a_crash_*."""
    spec = merge(
        TINY,
        {
            "name": "crash",
            "failure": {"max_failures": 0},
            "stages": [{"resolution": 16, "epochs": 1, "batch_size": 16, "workers": 1}],
        },
    )
    spec["model"] = {"builder": "tests.custom_parts:exploding_net", "num_classes": 10}  # replaced, not merged
    job = write_job(tmp_path, spec)
    proc = stagetrain("run", job, "--job-id", "cr", "--storage", str(tmp_path / "runs"), env=on_head)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    record = read_record(tmp_path / "runs" / "cr")
    assert record["status"] == "failed" and "RuntimeError: boom at training forward 3" in record["error"]
    stage = record["stages"][0]
    assert (stage["attempts"], stage["restarts"], stage["infra_failures"]) == (1, 0, 0)
    printed = (proc.stdout + proc.stderr).replace("\n", "")
    assert "stage 1 failed: worker 0: RuntimeError: boom at training forward 3" in printed, printed


def assert_equivalent(job_dir, straight_dir, resumed_from: list[int]) -> None:
    """A run interrupted and resumed at ``resumed_from`` ended bit-identical to the uninterrupted one:
    model, optimizer, scheduler, and every step logged from the first resume point on."""
    model_a, state_a = final_state(straight_dir)
    model_b, state_b = final_state(job_dir)
    assert_same(model_a, model_b, "model")
    assert_same(state_a["optimizer"], state_b["optimizer"], "optimizer")
    assert_same(state_a["scheduler"], state_b["scheduler"], "scheduler")
    ref = {m["step"]: m for m in read_metrics(straight_dir) if m.get("kind", "step") == "step"}
    got = {m["step"]: m for m in read_metrics(job_dir) if m.get("kind", "step") == "step"}
    assert sorted(ref) == list(range(TOTAL))
    # The driver writes the metrics: steps whose report had not reached it when it was killed are not
    # logged (the checkpoint covers them, so they are not re-run). From the last resume point on every
    # step is logged; every step logged after the first resume point matches the uninterrupted run.
    assert set(range(max(resumed_from), TOTAL)) <= set(got)
    for step in sorted(s for s in got if s >= min(resumed_from)):
        for key in ("lr", "momentum", "loss", "samples_seen"):
            assert got[step][key] == ref[step][key], (step, key)
