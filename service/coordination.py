"""One coordinator per job, one writer per file.

- **Lease** (``<job>/lease.json``): the running coordinator's claim on the job: owner, host, pid, Ray
  submission, heartbeat renewed every ``LEASE_TIMEOUT_S / 6`` seconds. ``run``/``resume``/``submit`` take
  it before they write anything; a job whose lease is fresh is refused naming the holder. A lease older
  than ``LEASE_TIMEOUT_S``, or held by a process of this host that is gone, is taken over (logged).
  Every write of the lease is a compare-and-swap (``Storage.write_versioned``: a file lock locally, a
  conditional PUT on S3, elsewhere compared, written and read back), so two coordinators cannot both
  hold it. A renewal gives up after one renewal interval (the next one tries again). A coordinator
  that finds its lease taken, or cannot renew it for ``LEASE_TIMEOUT_S`` less one interval, loses it:
  its writes to the job are fenced (each is made inside ``LeaseKeeper.fenced``, which raises
  ``LeaseLost``; a write under way when the loss is found lands first, none after) and it exits with
  ``EXIT_LEASE_LOST``.
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
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import datetime, timezone

from pydantic import BaseModel, ConfigDict

from checkpoints.storage import Storage, WriteConflict, within
from service.layout import CANCEL_FILE, LEASE_FILE, LOGS_DIR, REQUESTS_DIR

LEASE_TIMEOUT_S = float(os.environ.get("STAGETRAIN_LEASE_TIMEOUT_S", "60"))


def _now() -> datetime:
    return datetime.now(timezone.utc)


class LeaseHeld(ValueError):
    """Another coordinator holds a fresh lease on the job (a user error: exit 2)."""


class LeaseLost(RuntimeError):
    """This coordinator no longer holds the job's lease: it stops and writes nothing more to the job."""


def _process_started(pid: int) -> float | None:
    """When process ``pid`` of this host started (Linux: clock ticks after boot, from ``/proc``; -1 where
    that is unknown), or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return float(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return None
    except (OSError, IndexError, ValueError):
        return -1.0
    try:  # no /proc (macOS): only whether it exists
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return -1.0


class Lease(BaseModel):
    model_config = ConfigDict(extra="forbid")
    owner: str
    host: str
    pid: int
    pid_started: float | None = None  # the process's start time: a reused pid is not the holder
    submission_id: str | None = None
    acquired: str
    heartbeat: str
    timeout_s: float

    def age_s(self) -> float:
        return (_now() - datetime.fromisoformat(self.heartbeat)).total_seconds()

    def fresh(self) -> bool:
        return self.age_s() < self.timeout_s

    def alive(self) -> bool:
        """A coordinator holds the job: the heartbeat is fresh and its holder not known to be gone."""
        return self.fresh() and not self.holder_gone()

    def holder_gone(self) -> bool:
        """The holder ran on this host and its process is gone (e.g. SIGKILLed): the lease is free at once.
        A holder on another host is judged by its heartbeat only."""
        if self.host != socket.gethostname():
            return False
        started = _process_started(self.pid)
        if started is None:
            return True
        known = self.pid_started is not None and self.pid_started >= 0 and started >= 0
        return known and started != self.pid_started

    def describe(self) -> str:
        via = f", Ray submission {self.submission_id}" if self.submission_id else ""
        return (
            f"coordinator {self.owner} on {self.host} (pid {self.pid}{via}), "
            f"heartbeat {self.age_s():.0f}s ago"
        )


def _parse(data: bytes) -> Lease | None:
    try:
        return Lease.model_validate_json(data)
    except ValueError:
        return None  # not a lease this version reads: nobody holds it


def read_lease(job: Storage) -> Lease | None:
    if not job.exists(LEASE_FILE):
        return None
    try:
        return _parse(job.read_bytes(LEASE_FILE))
    except FileNotFoundError:
        return None  # removed meanwhile: nobody holds it


def check_free(job: Storage, job_id: str, lease: Lease | None = None) -> Lease | None:
    """Raise ``LeaseHeld`` if a live coordinator holds the job; else the stale lease (or None)."""
    lease = lease if lease is not None else read_lease(job)
    if lease is not None and lease.alive():
        raise LeaseHeld(
            f"job {job_id} is running: {lease.describe()}. Follow it with `stagetrain logs {job_id} "
            f"--follow`, or stop it with `stagetrain cancel {job_id}`"
        )
    return lease


class _Taken(Exception):
    """A renewal found the lease held by another coordinator (``held``), or removed (None)."""

    def __init__(self, held: Lease | None):
        self.held = held


class LeaseKeeper:
    """Holds the lease while the coordinator runs: acquire, renew in a daemon thread, release.

    ``fenced()`` fences the holder's writes: ``check()`` raises ``LeaseLost`` once another coordinator
    took the lease, or when the last renewal is older than the timeout less one renewal interval (another
    coordinator may take a lease that old). ``on_lost(reason)`` is called once, from the thread that
    found the loss."""

    def __init__(
        self,
        job: Storage,
        job_id: str,
        submission_id: str | None = None,
        timeout_s: float = LEASE_TIMEOUT_S,
        on_lost: Callable[[str], None] | None = None,
    ):
        self.job, self.job_id, self.timeout_s, self.on_lost = job, job_id, timeout_s, on_lost
        self.lease = Lease(
            owner=uuid.uuid4().hex[:12],
            host=socket.gethostname(),
            pid=os.getpid(),
            pid_started=_process_started(os.getpid()),
            submission_id=submission_id,
            acquired=_now().isoformat(),
            heartbeat=_now().isoformat(),
            timeout_s=timeout_s,
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._version: str | None = None  # the lease object's version token after our last write
        self._renewed = 0.0  # monotonic time our last renewal started (its heartbeat is no older)
        # Renewals give up on a request after one interval, so that a storage outage shorter than the
        # timeout leaves time for more attempts (a client retrying with backoff can outlast the lease).
        self._renewals = job.bounded(self.interval_s)
        self.took_over: Lease | None = None
        self.lost: str | None = None
        # held by a fenced write (``fenced``) and while the lease is declared lost: once ``lost`` is set,
        # no write of this coordinator is still under way
        self._writing = threading.RLock()

    @property
    def interval_s(self) -> float:
        return self.timeout_s / 6

    def acquire(self) -> LeaseKeeper:
        current = self.job.read_versioned(LEASE_FILE)
        self.took_over = check_free(self.job, self.job_id, _parse(current[0]) if current else None)
        try:
            self._version, self._renewed = self._write(expect=current[1] if current else None)
        except WriteConflict:
            held = read_lease(self.job)
            raise LeaseHeld(
                f"job {self.job_id}: another coordinator took the lease at the same moment"
                + (f": {held.describe()}" if held else "")
            ) from None
        self._thread = threading.Thread(target=self._renew, name="stagetrain-lease", daemon=True)
        self._thread.start()
        return self

    def _write(self, expect: str | None, store: Storage | None = None) -> tuple[str, float]:
        """Write the lease with a fresh heartbeat over version ``expect``: (its new version, when this
        write started: the heartbeat is no older)."""
        store = store or self.job
        started = time.monotonic()
        lease = self.lease.model_copy(update={"heartbeat": _now().isoformat()})
        version = store.write_versioned(lease.model_dump_json(indent=2).encode(), LEASE_FILE, expect=expect)
        if not store.atomic_versioned:  # the last writer wins: look
            held = read_lease(store)
            if held is None or held.owner != lease.owner:
                raise WriteConflict(f"{self.job.url}/{LEASE_FILE} was written by another coordinator")
        return version, started

    def _attempt(self, expect: str | None) -> tuple[str, float | None]:
        """One renewal over version ``expect``: (new version, when it started) once written. If the lease
        changed meanwhile and is still ours, one of our writes took effect but its answer was lost (a
        request given up on): (its version, None). Anyone else's lease, or none: ``_Taken``."""
        try:
            return self._write(expect, self._renewals)
        except WriteConflict:
            current = self._renewals.read_versioned(LEASE_FILE)
        held = _parse(current[0]) if current else None
        if held is None or held.owner != self.lease.owner:
            raise _Taken(held)
        return current[1], None

    def renew(self) -> bool:
        """One renewal; False once the lease is lost. A storage error, or no answer within one renewal
        interval, is retried at the next renewal, until the lease is too old to be ours."""
        if self.lost:
            return False
        expect = self._version
        try:
            self._version, started = within(
                self.interval_s, lambda: self._attempt(expect), "renewing the job's lease"
            )
        except _Taken as taken:
            self._lose(
                f"another coordinator took the job's lease: {taken.held.describe()}"
                if taken.held is not None
                else "the job's lease was removed by another coordinator"
            )
            return False
        except Exception as e:  # noqa: BLE001 - a storage hiccup: the next renewal tries again
            late = time.monotonic() - self._renewed
            if late >= self.timeout_s - self.interval_s:
                self._lose(f"could not renew the job's lease for {late:.0f}s: {type(e).__name__}: {e}")
                return False
            return True
        if started is not None:  # else renewed from the adopted version next time
            self._renewed = started
        return True

    def _lose(self, reason: str) -> None:
        with self._writing:  # a write under way lands first: none lands after
            if self.lost is not None:
                return
            self.lost = f"lost the lease of job {self.job_id}: {reason}"
        if self.on_lost is not None:
            self.on_lost(self.lost)

    def check(self) -> None:
        """Raise ``LeaseLost`` unless this coordinator still holds the lease."""
        if self.lost is None and time.monotonic() - self._renewed >= self.timeout_s - self.interval_s:
            self._lose(f"its last renewal is {time.monotonic() - self._renewed:.0f}s old")
        if self.lost is not None:
            raise LeaseLost(self.lost)

    @contextmanager
    def fenced(self) -> Iterator[None]:
        """Around every write to the job: ``LeaseLost`` unless this coordinator still holds the lease, and
        the lease is not declared lost until the write is done (a renewal that finds it taken waits), so
        nothing this coordinator writes lands after ``lost`` is set."""
        with self._writing:
            self.check()
            yield

    def _renew(self) -> None:
        while not self._stop.wait(self.interval_s):
            if not self.renew():
                return

    def release(self, restore: Lease | None = None) -> None:
        """Give the lease up (``restore``: put that lease back instead, as ``holding`` found it)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        if self.lost is not None or self._version is None:
            return  # another coordinator's lease now: never touch it
        current = self.job.read_versioned(LEASE_FILE)
        held = _parse(current[0]) if current else None
        if held is None or held.owner != self.lease.owner:
            return
        if restore is not None:
            data = restore.model_dump_json(indent=2).encode()
            self.job.write_versioned(data, LEASE_FILE, expect=current[1])
        else:
            self.job.remove(LEASE_FILE)


@contextmanager
def holding(jobs) -> Iterator[LeaseKeeper]:
    """The lease of ``jobs`` (a ``JobStore``) for a few writes, fenced by it: what ``submit`` writes before
    its coordinator starts, ``cancel`` of a job nobody runs. ``LeaseHeld`` if a coordinator holds it.
    The lease is left as it was found: the stale lease of a coordinator that died is put back, so the
    next coordinator takes it over (and says so in its log)."""
    keeper = LeaseKeeper(jobs.storage, jobs.job_id).acquire()
    jobs.fence = keeper.fenced
    try:
        yield keeper
    finally:
        jobs.fence = None
        keeper.release(restore=keeper.took_over)


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

    def __init__(
        self,
        job: Storage,
        attempt: int,
        flush_s: float = 2.0,
        fence: Callable[[], AbstractContextManager] | None = None,
    ):
        self.job, self.name, self.flush_s, self.fence = job, log_name(attempt), flush_s, fence
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
            try:
                with self.fence() if self.fence is not None else nullcontext():
                    self.job.append_text(text, LOGS_DIR, self.name)
            except LeaseLost:
                return  # the job is another coordinator's now

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
