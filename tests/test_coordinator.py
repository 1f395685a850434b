"""The coordinator (``service.runner.JobRunner``) driven through an in-process executor
(``tests/fake_executor.py``): retries, cancel, scale requests, lost nodes and capacity waits, in
seconds and without Ray. Storage is real (a local folder); what Ray alone shows is in the *_ray tests."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

import service.runner as runner_module
from checkpoints.storage import Storage
from service.coordination import LEASE_TIMEOUT_S, LeaseKeeper, request_cancel, request_scale
from service.jobs import EXIT_CANCELLED, EXIT_OK, EXIT_PREEMPTED, JobRecord, JobStore
from service.plan import build_plan
from service.runner import JobRunner, RunOptions
from service.spec import validate_spec
from tests.conftest import merge
from tests.fake_executor import FakeExecutor, Fault
from tests.jobs import TINY

# 3 stages of 12 steps on 2 workers (global batch 32 of 384 samples); reports every 2, checkpoints every 4
SPEC = merge(
    TINY,
    {
        "name": "coord",
        "stages": [
            {"resolution": 16, "epochs": 1, "batch_size": 16, "workers": 2},
            {"resolution": 20, "epochs": 1, "batch_size": 16, "workers": 2},
            {"resolution": 24, "epochs": 1, "batch_size": 16, "workers": 2},
        ],
        "metrics": {"every_n_steps": 2},
        "checkpoint": {"every_n_steps": 4},
    },
)
# gloo's error text names its source file in brackets; with it, rich-markup-like text of every kind
NASTY = (
    "Connection closed by peer [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] "
    "[/x] [bold]b[/bold] [link=http://e]l"
)


@pytest.fixture(autouse=True)
def quick_waits(monkeypatch):
    """The runner's polls, at test speed (the values are configuration, not behaviour)."""
    monkeypatch.setattr(runner_module, "CAPACITY_POLL_S", 0.2)
    monkeypatch.setattr(runner_module, "REQUEST_POLL_S", 0.05)
    monkeypatch.setattr(runner_module, "NODE_LOST_WAIT_S", 0.2)


class Job:
    """A job record in a tmp storage folder and a coordinator for it on a fake executor."""

    def __init__(self, tmp_path, overrides: dict | None = None, job_id: str = "j"):
        self.url, self.job_id = str(tmp_path), job_id
        self.spec = validate_spec(merge(SPEC, overrides or {}))
        self.jobs = JobStore(Storage(self.url), job_id)
        self.jobs.save(JobRecord.create(job_id, self.spec, build_plan(self.spec, 384)))
        self.executor = FakeExecutor(self.url, job_id)
        self.out = io.StringIO()

    def run(self, lease_timeout_s: float = LEASE_TIMEOUT_S) -> int:
        record = self.jobs.load()
        spec = record.job_spec()
        self.lease = lease = LeaseKeeper(self.jobs.storage, self.job_id, timeout_s=lease_timeout_s).acquire()
        console = Console(file=self.out, width=200)  # markup on: JobRunner must not depend on it being off
        options = RunOptions(job_id=self.job_id, storage=self.url, console=console)
        return JobRunner(spec, record.plan(spec), record, self.jobs, options, lease, self.executor).run()

    @property
    def record(self) -> JobRecord:
        return self.jobs.load()

    def steps(self) -> list[int]:
        return [m["step"] for m in self.jobs.read_metrics() if m["kind"] == "step"]


def test_stages_on_one_layout_run_in_one_group_each_settled_at_its_boundary(tmp_path):
    job = Job(tmp_path)
    assert job.run() == EXIT_OK
    record = job.record
    assert [(r.row, r.start_step, r.last) for r in job.executor.runs] == [(0, 0, 2)]
    assert [(s.status, s.attempts, s.val_acc) for s in record.stages] == [("completed", 1, 0.5)] * 3
    assert all(s.seconds > 0 and s.started and s.finished for s in record.stages)
    ends = [m for m in job.jobs.read_metrics() if m["kind"] == "stage_end"]
    assert [(e["stage"], e["step"]) for e in ends] == [(1, 12), (2, 24), (3, 36)]
    assert job.steps() == list(range(36))
    boundaries = [i.tag for i in job.jobs.checkpoints.list() if i.manifest.boundary]
    assert boundaries == [f"step-{12 * k:09d}-stage-{k}-end" for k in (1, 2, 3)]
    out = job.out.getvalue()
    assert out.index("stage 1 completed") < out.index("stage 2: 20px") < out.index("stage 2 completed")


def test_a_crash_is_retried_and_its_message_printed_verbatim(tmp_path):
    """The retry path prints the worker's error as it is: a gloo message once crashed it (MarkupError)."""
    job = Job(tmp_path, {"failure": {"max_failures": 1}})
    job.executor.faults = [Fault(step=18, message=NASTY)]
    assert job.run() == EXIT_OK, job.out.getvalue()
    record = job.record
    assert record.status == "succeeded"
    assert (record.stages[1].attempts, record.stages[1].restarts, record.stages[1].infra_failures) == (
        2,
        1,
        0,
    )
    assert NASTY in job.out.getvalue().replace("\n", "")  # printed, brackets and all
    assert any(NASTY in e and "retry 1 of 1" in e for e in record.events), record.events
    log = job.jobs.storage.read_text("logs", "attempt-1.log")
    assert NASTY in log
    # one run for the three stages (one layout), then the retry from the newest checkpoint (step 16)
    assert [(r.row, r.start_step, r.last) for r in job.executor.runs] == [(0, 0, 2), (1, 16, 2)]
    assert sorted(set(job.steps())) == list(range(36))


def test_a_crash_past_max_failures_fails_the_job_naming_the_error(tmp_path):
    job = Job(tmp_path, {"failure": {"max_failures": 1}})
    job.executor.faults = [Fault(step=5, message=NASTY), Fault(step=6, message=NASTY)]
    assert job.run() == 1
    record = job.record
    assert record.status == "failed" and NASTY in record.error
    assert (record.stages[0].attempts, record.stages[0].restarts) == (2, 1)
    assert f"job failed: stage 1 failed: worker 1: RuntimeError: {NASTY}" in job.out.getvalue().replace(
        "\n", ""
    )


def test_a_dead_worker_is_restarted_from_the_newest_checkpoint_each_time(tmp_path):
    """A worker's process killed twice (its node stays): two restarts of the stage, each from the newest
    checkpoint, not infrastructure failures (the Ray test kills one real worker once)."""
    job = Job(tmp_path, {"failure": {"max_failures": 3}})
    job.executor.faults = [
        Fault(step=6, message="worker died", actor_died=True),
        Fault(step=10, message="worker died", actor_died=True),
    ]
    assert job.run() == EXIT_OK, job.out.getvalue()
    record = job.record
    assert record.status == "succeeded"
    stage = record.stages[0]
    assert (stage.attempts, stage.restarts, stage.infra_failures) == (3, 2, 0)
    assert [(r.row, r.start_step) for r in job.executor.runs] == [(0, 0), (0, 4), (0, 8)]
    assert sorted(set(job.steps())) == list(range(36))


def test_cancel_mid_stage_stops_at_the_next_report_with_a_checkpoint(tmp_path):
    job = Job(tmp_path)
    job.executor.step_s = 0.02
    job.executor.on_step = lambda step: step == 15 and request_cancel(job.jobs.storage, now=False)
    assert job.run() == EXIT_CANCELLED
    record = job.record
    assert record.status == "cancelled" and record.stages[1].status == "cancelled"
    latest = job.jobs.checkpoints.latest()[0]
    assert latest.step == record.current_step and 16 <= latest.step < 24 and not latest.boundary
    assert job.steps() == list(range(latest.step))


def test_a_cancel_left_while_no_coordinator_ran_ends_the_job_before_it_runs(tmp_path):
    """`stagetrain cancel` of a job whose coordinator was down (or not started yet) leaves its request:
    the next coordinator (a keeper's restart, a submitted attempt) ends the job cancelled at once."""
    job = Job(tmp_path)
    request_cancel(job.jobs.storage, now=False)
    assert job.run() == EXIT_CANCELLED
    assert job.executor.runs == [] and job.record.status == "cancelled"
    assert not job.jobs.storage.exists("control", "cancel.json")  # taken


def test_a_corrupt_newest_checkpoint_is_skipped_and_the_workers_get_the_verified_one(tmp_path):
    """The newest checkpoint's bytes rotted (same size, so only a hash tells): the coordinator hashes
    once, continues from the newest one that verifies and hands the workers that tag."""
    job = Job(tmp_path)
    job.executor.step_s = 0.02
    job.executor.on_step = lambda step: step == 15 and request_cancel(job.jobs.storage, now=False)
    assert job.run() == EXIT_CANCELLED
    *_, good, newest = [i.tag for i in job.jobs.checkpoints.list() if i.problem is None]
    name = next(iter(job.jobs.checkpoints.read_manifest(newest).files))
    path = job.jobs.checkpoints.storage.path(newest, name)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    job.executor.on_step = lambda step: None
    assert job.run() == EXIT_OK
    again = job.executor.runs[1]
    assert again.restore == good and again.start_step == job.jobs.checkpoints.read_manifest(good).step
    assert job.executor.runs[0].restore is None  # the first run started afresh


def test_a_scale_request_applies_at_the_next_stage_boundary(tmp_path):
    job = Job(tmp_path)
    job.executor.on_step = lambda step: step == 3 and request_scale(job.jobs.storage, 1, 2)
    assert job.run() == EXIT_OK
    record = job.record
    assert [s.workers for s in record.stages] == [2, 1, 1]
    # the request ended the first run (rows 0-2 on 2 workers) at stage 1's boundary
    assert [(r.row, r.last, r.plan.stages[r.row].workers) for r in job.executor.runs] == [
        (0, 2, 2),
        (1, 2, 1),
    ]
    assert record.layout_changes[0].from_stage == 2
    plan = record.plan()
    assert plan.stages[1].lr_scale == 0.5  # global batch 16 vs the reference 32 (linear rule)


def test_a_lost_node_waits_for_capacity_then_continues_by_itself(tmp_path):
    job = Job(tmp_path, {"failure": {"capacity_wait_s": 30}})
    job.executor.faults = [
        Fault(step=14, message="node died", actor_died=True, lose_node="worker", back_after_s=1)
    ]
    assert job.run() == EXIT_OK
    record = job.record
    assert record.status == "succeeded"
    assert (record.stages[1].attempts, record.stages[1].restarts, record.stages[1].infra_failures) == (
        2,
        0,
        1,
    )
    assert any("waiting up to" in e for e in record.events)
    assert job.executor.runs[1].start_step == 12  # stage 2's second attempt, from its newest checkpoint


def test_a_node_lost_for_good_preempts_after_the_capacity_wait(tmp_path):
    job = Job(tmp_path, {"failure": {"capacity_wait_s": 1}})
    job.executor.faults = [Fault(step=26, message="node died", actor_died=True, lose_node="worker")]
    assert job.run() == EXIT_PREEMPTED
    record = job.record
    assert record.status == "preempted" and "--workers" in record.error
    assert "needs 2 workers" in record.error and record.current_step == 24
    assert "stagetrain resume j --workers N" in job.out.getvalue()


def test_min_workers_continues_at_once_on_fewer_workers(tmp_path):
    job = Job(tmp_path, {"failure": {"min_workers": 1}})
    job.executor.faults = [Fault(step=14, message="node died", actor_died=True, lose_node="worker")]
    assert job.run() == EXIT_OK
    record = job.record
    layouts = [(r.plan.stages[r.row].workers, r.plan.stages[r.row].grad_accum) for r in job.executor.runs]
    assert layouts == [(2, 1), (1, 2), (1, 2)]  # stages 2 and 3 kept their global batch by accumulation
    assert record.layout_changes[0].source.startswith("elastic")
    assert not any("waiting" in e for e in record.events)


def test_min_workers_returns_to_the_plan_at_the_next_stage_once_the_node_is_back(tmp_path):
    """Moved from the two-node Ray test: the node comes back during the elastic continuation, so stage 3
    runs on the planned 2 workers again; every step is logged once, each with its layout."""
    job = Job(tmp_path, {"failure": {"min_workers": 1}})
    job.executor.faults = [Fault(step=16, message="node died", actor_died=True, lose_node="worker")]
    job.executor.on_step = lambda step: step == 20 and job.executor.nodes.setdefault("worker", 1.0)
    assert job.run() == EXIT_OK
    record = job.record
    assert record.status == "succeeded"
    assert [s.workers for s in record.stages] == [2, 1, 2]
    assert (record.stages[1].infra_failures, record.stages[1].restarts) == (1, 0)
    (change,) = record.layout_changes
    assert (change.from_stage, change.workers) == (2, 1) and change.source.startswith("elastic")
    assert not any("waiting" in e for e in record.events)  # it did not wait
    steps = [m for m in job.jobs.read_metrics() if m["kind"] == "step"]
    assert [m["step"] for m in steps] == list(range(36))
    layouts = {(m["stage"], m["workers"], m["grad_accum"], m["global_batch"]) for m in steps}
    # stage 2 kept its global batch of 32: one worker, twice the accumulation; stage 3 back on 2 workers
    assert layouts == {(1, 2, 1, 32), (2, 2, 1, 32), (2, 1, 2, 32), (3, 2, 1, 32)}


def test_scale_beyond_the_cluster_is_accepted_with_a_warning_and_status_shows_it_pending(tmp_path):
    """The record keeps the cluster a stage last started on (2 CPUs here): `scale --workers 3` says at
    once that it will not fit unless the cluster grows; `status` lists the pending request."""
    from tests.helpers import stagetrain

    job = Job(tmp_path)
    job.executor.step_s = 0.02
    job.executor.on_step = lambda step: step == 5 and request_cancel(job.jobs.storage, now=False)
    assert job.run() == EXIT_CANCELLED
    assert job.record.cluster == {"CPU": 2.0}
    proc = stagetrain("scale", "j", "--workers", "3", "--from-stage", "2", "--storage", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "requested: stage 2..3 of job j on 3 worker(s)" in proc.stdout
    assert (
        "warning: when the job last started a stage, stage 2 needs 3 workers x 1 CPUs = 3 CPUs, but the "
        in (proc.stderr.replace("\n", " "))
    )
    fits = stagetrain("scale", "j", "--workers", "1", "--from-stage", "3", "--storage", str(tmp_path))
    assert fits.returncode == 0 and "warning" not in fits.stderr, fits.stderr
    status = stagetrain("status", "j", "--storage", str(tmp_path))
    assert "scale request 3 worker(s) from stage 2: pending" in status.stdout
    assert "scale request 1 worker(s) from stage 3: pending" in status.stdout
