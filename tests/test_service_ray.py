"""The job service against a real Ray head (``ray start --head`` on 127.0.0.1, token auth ON; see
``tests/ray_head.py``): submit and walk away, scale a running job, cancel and resume, one coordinator per
job (lease), and the read-only commands after the head is gone. Tiny jobs, run one after another."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from service.curve import lr_momentum
from service.jobs import JobRecord, JobStatus
from tests.conftest import merge
from tests.helpers import assert_same, stagetrain, wait_until
from tests.jobs import (
    DETERMINISTIC,
    TINY,
    final_state,
    held,
    hold_at,
    read_metrics,
    read_record,
    steps_reported,
    write_job,
)

pytestmark = pytest.mark.ray

THREE = merge(
    TINY,
    {
        "name": "svc",
        "stages": [
            {"resolution": 16, "epochs": 1, "batch_size": 16, "workers": 2},  # 12 steps of 32
            {"resolution": 20, "epochs": 1, "batch_size": 16, "workers": 2},  # 12 steps
            {"resolution": 24, "epochs": 1, "batch_size": 16, "workers": 2},
        ],  # 12 steps
        "metrics": {"every_n_steps": 2},
        "checkpoint": {"every_n_steps": 4},
    },
)


@pytest.fixture(scope="module")
def svc(ray_head, tmp_path_factory):
    """The head, a storage folder and the environment a user's shell has (token auth, short lease, a
    keeper that looks every second)."""
    storage = tmp_path_factory.mktemp("svc") / "runs"
    env = ray_head.subprocess_env(
        STAGETRAIN_LEASE_TIMEOUT_S="10",
        STAGETRAIN_KEEPER_POLL_S="1",
        RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.1",
        PYTHONUNBUFFERED="1",
    )
    return ray_head, str(storage), env


def st(svc, *args, **kw):
    _, storage, env = svc
    return stagetrain(*args, "--storage", storage, env=env, **kw)


def test_a_submitted_job_scaled_taken_over_cancelled_and_resumed(svc, straight, tmp_path):
    """A submitted job's life on the head, walked away from: scale a stage before it starts; one
    coordinator per job (a second is refused while the first runs); the coordinator SIGKILLed (its lease
    goes stale) and the keeper of `submit --max-restarts 1` resubmitting it as attempt 2; `cancel` in
    stage 2 (a checkpoint at the step reached); `resume` as attempt 3, to the end. Up to the stage-2
    boundary it is the uninterrupted run, bit for bit; stage 3 runs on the scaled layout at its LR."""
    head, storage, env = svc
    job = write_job(tmp_path, merge(DETERMINISTIC, {"name": "svc"}))
    job_dir = f"{storage}/svc1"
    hold_at(job_dir, 6, 28)  # where its coordinator is killed, where the job is cancelled
    out = st(svc, "submit", job, "--job-id", "svc1", "--address", head.address, "--max-restarts", "1")
    assert out.returncode == 0, out.stderr
    assert "svc1" in out.stdout and "stagetrain logs svc1" in out.stdout
    assert head.token not in out.stdout + out.stderr
    # scale stage 3 before it starts: a request file the coordinator applies at a stage boundary
    scaled = st(svc, "scale", "svc1", "--workers", "1", "--from-stage", "3")
    assert scaled.returncode == 0, scaled.stderr
    lease_path = f"{job_dir}/lease.json"
    wait_until(lambda: os.path.exists(lease_path), "the coordinator's lease", timeout=120)
    # a second coordinator of the running job is refused, naming the holder
    second = st(svc, "run", "--job-id", "svc1")
    assert second.returncode == 2 and "is running: coordinator" in second.stderr, second.stderr
    again = st(svc, "submit", job, "--job-id", "svc1", "--address", head.address)
    assert again.returncode == 2 and "is running" in again.stderr
    held(job_dir, 6, ranks=2)
    # the workers reported steps 0-5 before holding; the kill comes once the coordinator logged them (a
    # coordinator SIGKILLed before writing a report loses those lines: the checkpoint covers the steps)
    wait_until(lambda: steps_reported(Path(job_dir)) >= 6, "steps 0-5 in metrics.jsonl")
    pid = json.loads(open(lease_path).read())["pid"]
    os.kill(pid, signal.SIGKILL)  # the coordinator dies without a word (OOM kill): nobody types anything

    held(job_dir, 28, ranks=2, timeout=400)  # attempt 2, the keeper's, in stage 2
    cancelled = st(svc, "cancel", "svc1", timeout=120)
    assert cancelled.returncode == 0, cancelled.stderr
    record = JobRecord.model_validate(read_record(job_dir))
    assert record.status == "cancelled", record.events
    from checkpoints.storage import Storage
    from checkpoints.store import CheckpointStore

    latest = CheckpointStore(Storage(storage).child("svc1", "checkpoints")).latest(verify=True)[0]
    assert latest.step == record.current_step == 28 and not latest.boundary
    assert st(svc, "wait", "svc1").returncode == 130
    keeper = head.client().get_job_logs("svc1-keeper-1")
    wait_until(  # the keeper ends with the job it kept
        lambda: head.client().get_job_status("svc1-keeper-1").value == "SUCCEEDED", "the keeper to end"
    )

    resumed = st(svc, "resume", "svc1", "--address", head.address)
    assert resumed.returncode == 0, resumed.stderr
    waited = st(svc, "wait", "svc1", timeout=400)
    assert waited.returncode == 0, (waited.stdout, waited.stderr, st(svc, "logs", "svc1").stdout, keeper)
    record = JobRecord.model_validate(read_record(job_dir))
    assert record.status == "succeeded"
    assert record.ray_submissions == ["svc1-attempt-1", "svc1-attempt-2", "svc1-attempt-3"]
    assert any("took over" in e for e in record.events), record.events
    assert any("keeper: Ray job svc1-attempt-1 ended FAILED" in e for e in record.events), record.events
    assert (Path(job_dir) / "metrics.png").exists()  # written before the lease was released: `wait` saw it
    assert [s.workers for s in record.stages] == [2, 2, 1]
    assert [c.workers for c in record.layout_changes] == [1] and record.layout_changes[0].from_stage == 3
    plan = record.plan()
    assert plan.stages[2].workers == 1 and plan.stages[2].lr_scale == 0.5  # global batch 16 vs 32
    steps = [m for m in read_metrics(job_dir) if m["kind"] == "step"]
    assert sorted(m["step"] for m in steps) == list(range(plan.total_steps))
    for m in steps:
        assert m["workers"] == plan.stage_at(m["step"]).workers
        assert m["lr"] == pytest.approx(lr_momentum(plan, m["step"])[0], rel=1e-12)
    # a cancel stops as a SIGTERM does (test_resume_ray.py::test_sigterm_preempts_*): to the stage-2
    # boundary, where the layout changes, the resumed job is the uninterrupted one, bit for bit
    model_a, state_a = final_state(straight[0], stage=2)
    model_b, state_b = final_state(Path(job_dir), stage=2)
    assert_same(state_a["rng"], state_b["rng"], "rng")
    # the momentum buffers (the LR in the param groups is already the next step's: stage 3's, scaled)
    assert_same(state_a["optimizer"]["state"], state_b["optimizer"]["state"], "optimizer")
    assert_same(model_a, model_b, "model")
    ref = {m["step"]: m for m in read_metrics(straight[0]) if m["kind"] == "step"}
    for m in steps:
        if m["step"] < 36:
            for key in ("lr", "momentum", "loss", "samples_seen"):
                assert m[key] == ref[m["step"]][key], (m["step"], key)
    # the Ray job ends a moment after the coordinator released its lease (summary, plot)
    wait_until(
        lambda: head.client().get_job_status("svc1-attempt-3").value == "SUCCEEDED", "the Ray job to end"
    )

    status = st(svc, "status", "svc1")
    assert status.returncode == 0 and "succeeded" in status.stdout
    assert "Ray job svc1-attempt-3: SUCCEEDED" in status.stdout
    listed = st(svc, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = [r for r in json.loads(listed.stdout) if r["job_id"] == "svc1"]
    assert row["status"] == "succeeded" and row["stage"] == "3/3" and row["step"] == plan.total_steps
    assert row["val_acc"] is not None
    logs = st(svc, "logs", "svc1", "--attempt", "2")
    assert logs.returncode == 0 and "stage 2" in logs.stdout and "took over" in logs.stdout
    assert "cancelled" in logs.stdout and head.token not in logs.stdout
    last = st(svc, "logs", "svc1", "--attempt", "3")
    assert last.returncode == 0 and "stage 3" in last.stdout and "succeeded" in last.stdout
    first = st(svc, "logs", "svc1", "--attempt", "1")
    assert first.returncode == 0 and "coordinator attempt 1" in first.stdout


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["status", "nope"], "no job 'nope'"),
        (["cancel", "nope"], "no job 'nope'"),
        (["scale", "nope", "--workers", "1"], "no job 'nope'"),
        (["wait", "nope"], "no job 'nope'"),
        (["logs", "nope"], "no job 'nope'"),
        (["logs", "../x"], "letters, digits"),
        (["cancel", "../x"], "letters, digits"),
        (["scale", "svc1", "--workers", "0"], "--workers"),
        (["scale", "svc1", "--workers", "1"], "svc1 has finished (succeeded)"),
    ],
)
def test_bad_input_exits_2_and_changes_nothing(svc, args, expect):
    _, storage, _ = svc

    def snapshot() -> dict[str, float]:  # every file by its full path (two jobs share basenames)
        return {
            os.path.join(dp, f): os.path.getmtime(os.path.join(dp, f))
            for dp, _, fs in os.walk(storage)
            for f in fs
        }

    before = snapshot()
    out = st(svc, *args)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert expect in out.stderr and "Traceback" not in out.stderr
    assert snapshot() == before


def test_scale_refuses_a_started_or_missing_stage(svc, tmp_path):
    _, storage, _ = svc
    from checkpoints.storage import Storage
    from service.jobs import JobStore
    from service.plan import build_plan
    from service.spec import validate_spec

    spec = validate_spec(THREE)
    record = JobRecord.create("svc-stopped", spec, build_plan(spec, 384))
    record.status, record.current_stage = JobStatus.PREEMPTED, 2
    record.stages[0].status, record.stages[1].status = "completed", "preempted"
    JobStore(Storage(storage), "svc-stopped").save(record)
    started = st(svc, "scale", "svc-stopped", "--workers", "1", "--from-stage", "2")
    assert started.returncode == 2 and "stage 2 has started" in started.stderr
    missing = st(svc, "scale", "svc-stopped", "--workers", "1", "--from-stage", "4")
    assert missing.returncode == 2 and "has 3 stages" in missing.stderr
    ok = st(svc, "scale", "svc-stopped", "--workers", "1")  # default: from the next stage (3)
    assert ok.returncode == 0 and "stage 3" in ok.stdout


def test_submit_refuses_unreachable_or_unsuitable_targets(svc, tmp_path):
    _, storage, env = svc
    job = write_job(tmp_path, THREE)
    refused = stagetrain(
        "submit", job, "--job-id", "x1", "--storage", storage, "--address", "http://127.0.0.1:9", env=env
    )
    assert refused.returncode == 2 and "cannot reach the Ray job server" in refused.stderr, refused.stderr
    remote = stagetrain(
        "submit",
        job,
        "--job-id",
        "x2",
        "--storage",
        storage,
        "--address",
        "http://ray-head.example:8265",
        env=env,
    )
    assert remote.returncode == 2 and "is a local folder, which the cluster" in remote.stderr
    assert not os.path.exists(f"{storage}/x1") and not os.path.exists(f"{storage}/x2")


def test_without_the_token_submit_and_status_say_it_is_authentication(svc, tmp_path):
    head, storage, env = svc
    no_token = {
        k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    }
    job = write_job(tmp_path, THREE)
    refused = stagetrain(
        "submit", job, "--job-id", "x3", "--address", head.address, "--storage", storage, env=no_token
    )
    assert refused.returncode == 2, refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert "the Ray job server requires authentication" in line and "RAY_AUTH_MODE=token" in line, line
    assert "RAY_AUTH_TOKEN_PATH" in line and "cannot reach" not in line
    assert not os.path.exists(f"{storage}/x3")  # nothing written
    # a job submitted to that head (its record, as `submit` leaves it): status names the cause too
    from checkpoints.storage import Storage
    from service.jobs import JobStore
    from service.plan import build_plan
    from service.spec import validate_spec

    spec = validate_spec(THREE)
    record = JobRecord.create("x4", spec, build_plan(spec, 384))
    record.ray_address, record.ray_submissions = head.address, ["x4-attempt-1"]
    JobStore(Storage(storage), "x4").save(record)
    status = stagetrain("status", "x4", "--storage", storage, env=no_token)
    assert status.returncode == 0, status.stderr
    assert "Ray job x4-attempt-1: the Ray job server requires authentication" in status.stdout
    assert "unreachable" not in status.stdout


def test_read_only_commands_work_after_the_head_is_gone(svc):
    head, storage, env = svc
    head.stop()
    try:
        for args in (["status", "svc1"], ["list"], ["logs", "svc1"], ["checkpoints", "svc1"]):
            out = st(svc, *args)
            assert out.returncode == 0, (args, out.stderr)
        assert "svc1" in st(svc, "list").stdout
    finally:
        head.start()  # the head is the session's: the tests after this one use it too
