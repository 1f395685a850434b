"""The job record (``<storage>/<job-id>/job.json``), the job's storage (record, ``metrics.jsonl``,
checkpoints), and the one place a stage's outcome becomes a job status (``JobRecord.settle``). The metric
records workers report are ``service.records``.

The record is what ``stagetrain status`` reads (no cluster needed) and what ``resume`` starts from.
It never holds credentials: storage settings come from the environment.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime, timezone
from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from checkpoints.storage import Storage
from checkpoints.store import CheckpointStore
from service.decisions import Cancelled, Completed, Failed, Outcome, Preempted
from service.layout import CHECKPOINTS, JOB_FILE, METRICS_FILE
from service.plan import Plan, StageLayout, build_plan
from service.records import EvalRecord, Report, StageEnd, StepRecord  # noqa: F401 - part of this API
from service.spec import JobSpec

RECORD_VERSION = 1


class JobStatus(str, Enum):
    """A job's status, as ``job.json`` spells it. It changes in one place, ``JobRecord.move``."""

    PENDING = "pending"  # created or submitted; no coordinator has started training yet
    RUNNING = "running"
    WAITING_FOR_CAPACITY = "waiting_for_capacity"  # a coordinator waits for the cluster (waiting_for)
    PREEMPTED = "preempted"
    CANCELLED = "cancelled"
    FAILED = "failed"
    SUCCEEDED = "succeeded"

    def __str__(self) -> str:  # in messages and f-strings: the value, as in job.json
        return self.value

    @property
    def terminal(self) -> bool:
        """No coordinator runs the job: it ended, or stopped until a resume."""
        return self in TERMINAL


JOB_STATUSES: tuple[str, ...] = tuple(s.value for s in JobStatus)
TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.PREEMPTED, JobStatus.CANCELLED})
StageStatus = Literal["pending", "running", "completed", "preempted", "cancelled", "failed"]
EXIT_OK, EXIT_FAILED, EXIT_PREEMPTED, EXIT_CANCELLED = 0, 1, 75, 130  # 75 = EX_TEMPFAIL: resume it later
log = logging.getLogger(__name__)
EXIT_LEASE_LOST = 3  # another coordinator took the job over; this one stopped without writing more
EXIT_CODES = {
    "succeeded": EXIT_OK,
    "failed": EXIT_FAILED,
    "preempted": EXIT_PREEMPTED,
    "cancelled": EXIT_CANCELLED,
}


def exit_code(status: str) -> int:
    """``run``'s exit code for a job that ended with ``status``."""
    return EXIT_CODES.get(status, EXIT_FAILED)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_job_id(name: str) -> str:
    """Readable and unique: ``<name>-<UTC time>-<4 hex>``."""
    import secrets

    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{name}-{stamp}-{secrets.token_hex(2)}"


class StageRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    stage: int  # 1-based
    status: StageStatus = "pending"
    workers: int
    attempts: int = 0  # TorchTrainer.fit() calls (runs, resumes)
    restarts: int = 0  # runs again after a crash of the training code (counted against max_failures)
    infra_failures: int = 0  # runs again after lost nodes or a termination notice (not counted)
    started: str | None = None
    finished: str | None = None
    seconds: float = 0.0
    images_per_s: float | None = None
    val_loss: float | None = None
    val_acc: float | None = None
    spike: float | None = None  # training-loss jump at this stage's start (service.analysis.boundary_spikes)
    checkpoint: str | None = None


class LayoutChange(BaseModel):
    """A worker-count change of stages not yet started (``stagetrain scale``, ``resume --workers``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    at: str
    source: str
    step: int  # applied when the job was at this step
    from_stage: int  # 1-based
    workers: int


class SinkState(BaseModel):
    """A metrics sink of the last coordinator attempt: ``failed`` its first error (it was disabled then),
    ``dropped`` the records it did not write (failed, or too slow for its queue)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    name: str
    failed: str | None = None
    dropped: int = 0


class JobRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    version: int = RECORD_VERSION
    job_id: str
    name: str
    status: JobStatus = JobStatus.PENDING
    spec: dict
    # measured once at submission; a resume re-uses it (workers check the data still has it)
    dataset_size: int
    plan_hash: str
    stage_hashes: list[str]
    total_steps: int
    current_stage: int = 1
    current_step: int = 0
    created: str = Field(default_factory=now)
    updated: str = Field(default_factory=now)
    error: str | None = None
    waiting_for: str | None = None  # status waiting_for_capacity: what the cluster lacks
    stages: list[StageRecord]
    history: list[StageLayout] = []  # worker layouts that resumes replaced mid-stage (see build_plan)
    layout_changes: list[LayoutChange] = []
    coordinator_attempts: int = 0  # coordinators started on this job (runs, resumes, Ray submissions)
    ray_address: str | None = None  # the Ray job server the job was last submitted to
    ray_submissions: list[str] = []  # Ray job submission ids, one per submitted attempt
    keeper: str | None = None  # the Ray job of `submit --max-restarts`'s keeper, if any
    images_per_s: float | None = None  # the last reported throughput
    checkpoint_failures: list[str] = []
    sinks: list[SinkState] = []  # metrics.sinks of the last coordinator attempt
    cluster: dict[str, float] | None = None  # the Ray cluster's resources when a stage last started
    events: list[str] = []  # resumes, re-plans, preemptions: one line each, timestamped

    @model_validator(mode="before")
    @classmethod
    def _measure_legacy(cls, data):
        """Records written before the size was recorded: measure it once (the next save keeps it)."""
        if isinstance(data, dict) and "dataset_size" not in data and "spec" in data:
            from service.sources import dataset_size

            data = {**data, "dataset_size": dataset_size(JobSpec.model_validate(data["spec"]).data)}
        return data

    def next_attempt(self) -> int:
        """The number of the next coordinator attempt: one numbering for the coordinator, its Ray
        submission (``<job>-attempt-<k>``) and its log (``logs/attempt-<k>.log``)."""
        submitted = [int(s.rsplit("-", 1)[1]) for s in self.ray_submissions if s.rsplit("-", 1)[1].isdigit()]
        return max([self.coordinator_attempts, *submitted]) + 1

    def start_attempt(self, submission_id: str | None) -> int:
        """A coordinator starts: attempt ``k`` of the Ray submission ``<job>-attempt-<k>`` it runs as,
        else the next number."""
        k = self.coordinator_attempts + 1
        if submission_id and submission_id.startswith(f"{self.job_id}-attempt-"):
            tail = submission_id.rsplit("-", 1)[1]
            k = max(k, int(tail)) if tail.isdigit() else k
        self.coordinator_attempts = k
        return k

    @classmethod
    def create(cls, job_id: str, spec: JobSpec, plan: Plan) -> JobRecord:
        return cls(
            job_id=job_id,
            name=spec.name,
            spec=spec.model_dump(mode="json"),
            dataset_size=plan.dataset_size,
            plan_hash=plan.plan_hash(),
            stage_hashes=[plan.stage_hash(i) for i in range(len(plan.stages))],
            total_steps=plan.total_steps,
            stages=[StageRecord(stage=i + 1, workers=st.workers) for i, st in enumerate(spec.stages)],
        )

    def event(self, text: str) -> None:
        self.events.append(f"{now()} {text}")

    def job_spec(self) -> JobSpec:
        return JobSpec.model_validate(self.spec)

    def plan(self, spec: JobSpec | None = None, history: list[StageLayout] | None = None) -> Plan:
        return build_plan(
            spec or self.job_spec(), self.dataset_size, tuple(self.history if history is None else history)
        )

    def settle(self, stage: int, outcome: Outcome, step: int) -> None:
        """The one place where a stage's outcome becomes stage and job status (``stage``: 0-based)."""
        srec = self.stages[stage]
        self.current_step, self.waiting_for = step, None
        if isinstance(outcome, Completed):
            srec.status, srec.finished, srec.checkpoint = "completed", now(), outcome.checkpoint
            srec.val_loss, srec.val_acc = outcome.val_loss, outcome.val_acc
            return
        status = {Preempted: JobStatus.PREEMPTED, Cancelled: JobStatus.CANCELLED, Failed: JobStatus.FAILED}
        self.move(status[type(outcome)])
        if srec.status != "completed":  # cancelled between stages: the stage before stays completed
            srec.status = self.status.value
        self.error = outcome.reason if isinstance(outcome, Failed) else None
        if isinstance(outcome, Preempted) and outcome.lost_capacity:
            self.error = (
                f"the cluster lost capacity: {outcome.lost_capacity}. Resume when it is back, or now with "
                f"fewer workers: stagetrain resume {self.job_id} --workers N"
            )
        self.event(f"{self.status} at step {step}: {outcome.reason}")

    def replan(
        self,
        spec: JobSpec,
        plan: Plan,
        changes: list[str],
        source: str,
        workers: int | None = None,
        from_stage: int | None = None,
        step: int = 0,
        history: list[StageLayout] | None = None,
    ) -> None:
        """Adopt an edited spec (resume --spec/--workers, a scale request): stages keep what they ran."""
        fresh = JobRecord.create(self.job_id, spec, plan)
        kept = {s.stage: s for s in self.stages}
        self.spec, self.plan_hash, self.stage_hashes = fresh.spec, fresh.plan_hash, fresh.stage_hashes
        self.total_steps = fresh.total_steps
        if history is not None:
            self.history = history
        self.stages = [
            kept[s.stage].model_copy(update={"workers": s.workers}) if s.stage in kept else s
            for s in fresh.stages
        ]
        if workers is not None and from_stage is not None:
            self.layout_changes.append(
                LayoutChange(at=now(), source=source, step=step, from_stage=from_stage, workers=workers)
            )
        self.event(f"re-planned ({source}): " + ("; ".join(changes) or "worker layout changed"))

    def relayout(
        self,
        spec: JobSpec,
        step: int,
        source: str,
        changes: list[str],
        workers: int | None = None,
        from_stage: int | None = None,
    ) -> tuple[Plan, list[StageLayout]]:
        """The one re-layout of a job (``resume --workers``/``--spec``, a scale request, an elastic
        continuation): adopt ``spec`` from ``step``. A stage interrupted at ``step`` whose global batch
        changes keeps the layout of the steps it ran (``decisions.layout_history``), so the new plan
        splits it there. Returns the new plan and the history entries added."""
        from service.decisions import layout_history

        added = layout_history(self.plan(), spec, step)
        history = self.history + added
        plan = self.plan(spec, history)
        notes = [f"stages[{h.stage}] ran steps before {h.until_step} with {h.workers} workers" for h in added]
        self.replan(spec, plan, changes + notes, source, workers, from_stage, step, history)
        return plan, added

    def move(self, status: JobStatus | str) -> None:
        """The one place a job's status changes. Any status may follow any other (a stopped job is
        resumed, taken over, or settled by ``cancel``), except that a succeeded job stays succeeded:
        ``run``, ``resume`` and ``submit`` of one say so and change nothing."""
        status = JobStatus(status)
        if self.status is JobStatus.SUCCEEDED and status is not JobStatus.SUCCEEDED:
            raise ValueError(f"job {self.job_id} has succeeded: its status cannot become {status}")
        self.status = status

    def finish(self, total_steps: int) -> None:
        self.move(JobStatus.SUCCEEDED)
        self.current_step, self.error, self.waiting_for = total_steps, None, None
        self.event("succeeded")

    def fail(self, reason: str) -> None:
        self.move(JobStatus.FAILED)
        self.error = reason
        self.event(f"failed: {reason}")


class JobStore:
    """Everything of one job on storage: record, metrics, checkpoints."""

    def __init__(self, storage: Storage, job_id: str):
        self.job_id = job_id
        self.root = storage
        self.storage = storage.child(job_id)
        self.checkpoints = CheckpointStore(self.storage.child(CHECKPOINTS))
        # Held around every write of the record and metrics: the coordinator's lease
        # (``LeaseKeeper.fenced``), so a coordinator that lost the job writes nothing more to it.
        self.fence: Callable[[], AbstractContextManager] | None = None

    def exists(self) -> bool:
        return self.storage.exists(JOB_FILE)

    @staticmethod
    def all(root: Storage) -> list[JobRecord]:
        """Every job under a storage root (a folder holding a job.json), oldest first."""
        out = []
        for name in root.listdir():
            if root.exists(name, JOB_FILE):
                try:
                    out.append(JobRecord.model_validate_json(root.read_bytes(name, JOB_FILE)))
                except ValueError:
                    continue  # not ours, or from an incompatible version
        return sorted(out, key=lambda r: r.created)

    def load(self) -> JobRecord:
        if not self.exists():
            known = [n for n in self.root.listdir() if self.root.exists(n, JOB_FILE)]
            raise FileNotFoundError(
                f"no job {self.job_id!r} in {self.root.url}"
                + (f"; jobs there: {', '.join(known[-5:])}" if known else "; there are no jobs there")
            )
        return JobRecord.model_validate_json(self.storage.read_bytes(JOB_FILE))

    def _fenced(self) -> AbstractContextManager:
        return self.fence() if self.fence is not None else nullcontext()

    def save(self, record: JobRecord) -> None:
        with self._fenced():
            record.updated = now()
            self.storage.write_text(record.model_dump_json(indent=2), JOB_FILE)

    def append_metrics(self, records: list[StepRecord | EvalRecord | StageEnd]) -> None:
        if records:
            lines = "".join(r.model_dump_json(exclude_none=True) + "\n" for r in records)
            with self._fenced():
                self.storage.append_text(lines, METRICS_FILE)

    def read_metrics(self) -> list[dict]:
        """Metric records in step order. Steps re-run after a resume appear twice in the file; the
        later record wins (it is the one the final model descends from)."""
        if not self.storage.appended_exists(METRICS_FILE):
            return []
        by_key: dict[tuple, dict] = {}
        for n, line in enumerate(self.storage.read_appended(METRICS_FILE).splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError:  # a line torn by a crash mid-append: the steps re-run after it
                log.warning("%s/%s line %d is not a whole record; skipped", self.storage.url, METRICS_FILE, n)
                continue
            by_key[(r.get("kind", "step"), r.get("step"), r.get("stage"))] = r
        return sorted(by_key.values(), key=_metric_order)


def _metric_order(r: dict) -> tuple[int, int]:
    """Training order: step k, then the evaluation and stage end after k + 1 steps (their ``step``)."""
    kind = r.get("kind", "step")
    done = r.get("step", 0) + 1 if kind == "step" else r.get("step", 0)
    return done, {"step": 0, "eval": 1}.get(kind, 2)
