"""One coordinator per job, one writer per file.

- **Lease** (``<job>/lease.json``): the running coordinator's claim on the job: owner, host, pid, Ray
  submission, heartbeat renewed every ``LEASE_TIMEOUT_S / 6`` seconds. ``run``/``resume``/``submit`` of a job
  whose lease is fresh are refused naming the holder; a lease older than ``LEASE_TIMEOUT_S`` is taken over
  (the previous coordinator died) and the takeover is logged. Only the lease holder writes ``job.json``
  and ``metrics.jsonl``. On object storage, which has no compare-and-swap, a takeover is confirmed by
  reading the lease back: two coordinators racing within one write are not excluded.
- **Requests** (``<job>/control/requests/*.json``): what ``stagetrain scale`` and ``cancel`` leave for the
  coordinator, which applies and removes them (``scale`` at the next stage boundary, or ``resume``).
- **Log** (``<job>/logs/attempt-<k>.log``): everything the coordinator says, flushed every few seconds,
  so ``stagetrain logs`` works after the Ray head and the cluster are gone.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone

from pydantic import BaseModel, ConfigDict

from checkpoints.storage import Storage
from service.layout import CANCEL_FILE, LEASE_FILE, LOGS_DIR, REQUESTS_DIR

LEASE_TIMEOUT_S = float(os.environ.get("STAGETRAIN_LEASE_TIMEOUT_S", "60"))


def _now() -> datetime:
    return datetime.now(timezone.utc)


class LeaseHeld(ValueError):
    """Another coordinator holds a fresh lease on the job (a user error: exit 2)."""


class Lease(BaseModel):
    model_config = ConfigDict(extra="forbid")
    owner: str
    host: str
    pid: int
    submission_id: str | None = None
    acquired: str
    heartbeat: str
    timeout_s: float

    def age_s(self) -> float:
        return (_now() - datetime.fromisoformat(self.heartbeat)).total_seconds()

    def fresh(self) -> bool:
        return self.age_s() < self.timeout_s

    def describe(self) -> str:
        via = f", Ray submission {self.submission_id}" if self.submission_id else ""
        return (
            f"coordinator {self.owner} on {self.host} (pid {self.pid}{via}), "
            f"heartbeat {self.age_s():.0f}s ago"
        )


def read_lease(job: Storage) -> Lease | None:
    if not job.exists(LEASE_FILE):
        return None
    try:
        return Lease.model_validate_json(job.read_bytes(LEASE_FILE))
    except (ValueError, FileNotFoundError):
        return None  # half-written or removed meanwhile: nobody holds it


def check_free(job: Storage, job_id: str) -> Lease | None:
    """Raise ``LeaseHeld`` if a live coordinator holds the job; else the stale lease (or None)."""
    lease = read_lease(job)
    if lease is not None and lease.fresh():
        raise LeaseHeld(
            f"job {job_id} is running: {lease.describe()}. Follow it with `stagetrain logs {job_id} "
            f"--follow`, or stop it with `stagetrain cancel {job_id}`"
        )
    return lease


class LeaseKeeper:
    """Holds the lease while the coordinator runs: acquire, renew in a daemon thread, release."""

    def __init__(
        self, job: Storage, job_id: str, submission_id: str | None = None, timeout_s: float = LEASE_TIMEOUT_S
    ):
        self.job, self.job_id, self.timeout_s = job, job_id, timeout_s
        self.lease = Lease(
            owner=uuid.uuid4().hex[:12],
            host=socket.gethostname(),
            pid=os.getpid(),
            submission_id=submission_id,
            acquired=_now().isoformat(),
            heartbeat=_now().isoformat(),
            timeout_s=timeout_s,
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_over: Lease | None = None

    def acquire(self) -> LeaseKeeper:
        self.took_over = check_free(self.job, self.job_id)
        self._write()
        held = read_lease(self.job)
        if held is None or held.owner != self.lease.owner:
            raise LeaseHeld(
                f"job {self.job_id}: another coordinator took the lease at the same moment"
                + (f": {held.describe()}" if held else "")
            )
        self._thread = threading.Thread(target=self._renew, name="stagetrain-lease", daemon=True)
        self._thread.start()
        return self

    def _write(self) -> None:
        self.lease.heartbeat = _now().isoformat()
        self.job.write_text(self.lease.model_dump_json(indent=2), LEASE_FILE)

    def _renew(self) -> None:
        while not self._stop.wait(self.timeout_s / 6):
            try:
                self._write()
            except Exception:  # noqa: BLE001 - a storage hiccup; the next renewal tries again
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        held = read_lease(self.job)
        if held is not None and held.owner == self.lease.owner:
            self.job.remove(LEASE_FILE)


# ------------------------------------------------------------------------------------------ requests


class ScaleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    workers: int
    from_stage: int  # 1-based
    requested: str


def request_scale(job: Storage, workers: int, from_stage: int) -> str:
    name = f"scale-{_now().strftime('%Y%m%dT%H%M%S%f')}-{uuid.uuid4().hex[:4]}.json"
    job.write_text(
        ScaleRequest(workers=workers, from_stage=from_stage, requested=_now().isoformat()).model_dump_json(),
        REQUESTS_DIR,
        name,
    )
    return name


def pending_scales(job: Storage) -> list[tuple[str, ScaleRequest]]:
    """Scale requests not yet applied, oldest first."""
    return [
        (n, ScaleRequest.model_validate_json(job.read_bytes(REQUESTS_DIR, n)))
        for n in job.listdir(REQUESTS_DIR)
        if n.startswith("scale-") and n.endswith(".json")
    ]


def consume(job: Storage, name: str) -> None:
    job.remove(REQUESTS_DIR, name)


def request_cancel(job: Storage, now: bool) -> None:
    job.write_text(json.dumps({"requested": _now().isoformat(), "now": now}), CANCEL_FILE)


def cancel_requested(job: Storage) -> bool:
    return job.exists(CANCEL_FILE)


# ------------------------------------------------------------------------------------------------ log


def log_name(attempt: int) -> str:
    return f"attempt-{attempt}.log"


class JobLog:
    """Timestamped lines into ``<job>/logs/attempt-<k>.log``, flushed every ``flush_s`` seconds by a daemon
    thread (and on ``close``). Appending to an object store rewrites the object: the log stays small (a
    progress line every few seconds)."""

    def __init__(self, job: Storage, attempt: int, flush_s: float = 2.0):
        self.job, self.name, self.flush_s = job, log_name(attempt), flush_s
        self._buf: list[str] = []
        self._lock = threading.RLock()  # re-entrant: the SIGTERM handler may log while the main thread does
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="stagetrain-log", daemon=True)
        self._thread.start()

    def line(self, text: str) -> None:
        stamp = _now().isoformat(timespec="seconds")
        with self._lock:
            self._buf.extend(f"{stamp} {ln}\n" for ln in str(text).splitlines() or [""])

    def flush(self) -> None:
        with self._lock:
            text, self._buf = "".join(self._buf), []
        if text:
            self.job.append_text(text, LOGS_DIR, self.name)

    def _loop(self) -> None:
        while not self._stop.wait(self.flush_s):
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - the next flush retries; the log is side work
                pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.flush()


def wait_for(condition, timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()
