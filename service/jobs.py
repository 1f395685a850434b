"""The job record (``<storage>/<job-id>/job.json``) and metrics (``<storage>/<job-id>/metrics.jsonl``).

The record is what ``stagetrain status`` reads (no cluster needed) and what ``resume`` starts from.
It never holds credentials: storage settings come from the environment.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from checkpoints.checkpointer import CheckpointStore
from checkpoints.storage import Storage
from service.plan import Plan, StageLayout, build_plan
from service.spec import JobSpec

JOB_FILE = "job.json"
METRICS_FILE = "metrics.jsonl"
RECORD_VERSION = 1

JobStatus = Literal["pending", "running", "preempted", "failed", "succeeded"]
StageStatus = Literal["pending", "running", "completed", "preempted", "failed"]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_job_id(name: str) -> str:
    """Readable and unique: ``<name>-<UTC time>-<4 hex>``."""
    import secrets

    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{name}-{stamp}-{secrets.token_hex(2)}"


def check_job_id(job_id: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", job_id):
        raise ValueError(f"--job-id: letters, digits, '.', '_' and '-' only (max 128), got {job_id!r}")
    return job_id


class StageRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stage: int  # 1-based
    status: StageStatus = "pending"
    workers: int
    attempts: int = 0  # TorchTrainer.fit() calls (runs, resumes)
    restarts: int = 0  # worker-group restarts inside those, by Ray's FailureConfig
    started: str | None = None
    finished: str | None = None
    seconds: float = 0.0
    images_per_s: float | None = None
    val_loss: float | None = None
    val_acc: float | None = None
    checkpoint: str | None = None


class JobRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = RECORD_VERSION
    job_id: str
    name: str
    status: JobStatus = "pending"
    spec: dict
    plan_hash: str
    stage_hashes: list[str]
    total_steps: int
    current_stage: int = 1
    current_step: int = 0
    created: str = Field(default_factory=now)
    updated: str = Field(default_factory=now)
    error: str | None = None
    stages: list[StageRecord]
    history: list[StageLayout] = []  # worker layouts that resumes replaced mid-stage (see build_plan)
    checkpoint_failures: list[str] = []
    events: list[str] = []  # resumes, re-plans, preemptions: one line each, timestamped

    @classmethod
    def create(cls, job_id: str, spec: JobSpec, plan: Plan) -> JobRecord:
        return cls(job_id=job_id, name=spec.name, spec=spec.model_dump(mode="json"), plan_hash=plan.plan_hash(),
                   stage_hashes=[plan.stage_hash(i) for i in range(len(plan.stages))], total_steps=plan.total_steps,
                   stages=[StageRecord(stage=i + 1, workers=st.workers) for i, st in enumerate(spec.stages)])

    def event(self, text: str) -> None:
        self.events.append(f"{now()} {text}")

    def job_spec(self) -> JobSpec:
        return JobSpec.model_validate(self.spec)

    def plan(self, spec: JobSpec | None = None, history: list[StageLayout] | None = None) -> Plan:
        return build_plan(spec or self.job_spec(), history=tuple(self.history if history is None else history))


class JobStore:
    """Everything of one job on storage: record, metrics, checkpoints."""

    def __init__(self, storage: Storage, job_id: str):
        self.job_id = job_id
        self.root = storage
        self.storage = storage.child(job_id)
        self.checkpoints = CheckpointStore(self.storage)

    def exists(self) -> bool:
        return self.storage.exists(JOB_FILE)

    def load(self) -> JobRecord:
        if not self.exists():
            known = [n for n in self.root.listdir() if self.root.exists(n, JOB_FILE)]
            raise FileNotFoundError(
                f"no job {self.job_id!r} in {self.root.url}"
                + (f"; jobs there: {', '.join(known[-5:])}" if known else "; pass --storage to look elsewhere"))
        return JobRecord.model_validate_json(self.storage.read_bytes(JOB_FILE))

    def save(self, record: JobRecord) -> None:
        record.updated = now()
        self.storage.write_text(record.model_dump_json(indent=2), JOB_FILE)

    def append_metrics(self, records: list[dict]) -> None:
        if records:
            self.storage.append_text("".join(json.dumps(r) + "\n" for r in records), METRICS_FILE)

    def read_metrics(self) -> list[dict]:
        """Metric records in step order. Steps re-run after a resume appear twice in the file; the
        later record wins (it is the one the final model descends from)."""
        if not self.storage.exists(METRICS_FILE):
            return []
        by_key: dict[tuple, dict] = {}
        for line in self.storage.read_text(METRICS_FILE).splitlines():
            if line.strip():
                r = json.loads(line)
                by_key[(r.get("kind", "step"), r.get("step"), r.get("stage"))] = r
        return sorted(by_key.values(), key=lambda r: (r.get("step", 0), r.get("kind", "step") != "step"))
