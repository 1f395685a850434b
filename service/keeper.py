"""``stagetrain submit --max-restarts N``: a keeper that resubmits a coordinator that died without a
final status (OOM-killed, its Ray job stopped by the system), up to N times, each as a new Ray submission
``<job>-attempt-<k>``. The keeper is itself a small Ray job (``<job>-keeper-<k>``, no CPU) on the head;
it watches the job record, the lease and the coordinator's Ray job, and ends when the job does. A
restarted head takes the keeper with it: there, the rerun of the same entrypoint (KubeRay's RayJob
retry, or ``stagetrain resume``) continues the job."""

from __future__ import annotations

import os
import time

from service.console import first_line
from service.coordination import LeaseHeld, cancel_requested, holding, read_lease
from service.decisions import Cancelled, keeper_action
from service.jobs import TERMINAL, JobStatus
from service.submit import ray_job_state, submit, submit_attempt

# how often the keeper looks (a STAGETRAIN_* setting: forwarded to the keeper's Ray job like the lease's)
KEEPER_POLL_S = float(os.environ.get("STAGETRAIN_KEEPER_POLL_S", "5"))


def keeper_id(job_id: str, attempt: int) -> str:
    return f"{job_id}-keeper-{attempt}"


def submit_keeper(jobs, record, server: str, max_restarts: int, attempt: int) -> str:
    """Submit the keeper of ``record``'s job beside its coordinator attempt ``attempt``
    (``submit_attempt`` recorded it)."""
    return submit(
        record.job_id,
        jobs.root.url,
        server,
        attempt,
        record.job_spec().preemption.grace_seconds,
        command=["keep", record.job_id, "--storage", jobs.root.url, "--address", server]
        + ["--max-restarts", str(max_restarts)],
        sid=keeper_id(record.job_id, attempt),
    )


def keep(jobs, address: str, max_restarts: int, say=print, poll_s: float = KEEPER_POLL_S) -> int:
    restarts = 0
    while True:
        try:
            record = jobs.load()
            lease = read_lease(jobs.storage)
            alive = lease is not None and lease.alive()
            state = ray_job_state(address, record.ray_submissions[-1]) if record.ray_submissions else None
            action = keeper_action(
                record.status, alive, state, restarts, max_restarts, cancel_requested(jobs.storage)
            )
            if action == "done":
                say(f"job {record.job_id} {record.status}: the keeper ends")
                return 0
            if action in ("give_up", "cancel"):
                record = _settle(jobs, action, restarts, max_restarts)
                say(f"job {record.job_id} {record.status}" + (f": {record.error}" if record.error else ""))
                return 0 if record.status == JobStatus.CANCELLED else 1
            if action == "resubmit":
                restarts += 1
                why = (
                    f"keeper: Ray job {record.ray_submissions[-1]} ended {state} without a final status "
                    f"(restart {restarts} of {max_restarts})"
                )
                sid = submit_attempt(jobs, record, address, why, by_keeper=True)
                say(
                    f"{why}: resubmitted as {sid}"
                    if sid
                    else f"{why}: the job ended meanwhile; not resubmitted"
                )
        except LeaseHeld:
            pass  # a coordinator holds the job now: watch it
        except Exception as e:  # noqa: BLE001 - storage or job server hiccup: the next poll tries again
            say(f"keeper: {type(e).__name__}: {first_line(e)}; trying again in {poll_s:g}s")
        time.sleep(poll_s)


def _settle(jobs, action: str, restarts: int, max_restarts: int):
    """End the job ``cancelled`` or ``failed`` under its lease (``LeaseHeld`` if a coordinator took it
    meanwhile), never over a final status written meanwhile. Returns the record."""
    with holding(jobs):
        record = jobs.load()
        if record.status in TERMINAL:
            return record
        if action == "cancel":
            outcome = Cancelled("cancelled while its coordinator was down")
            record.settle(max(record.current_stage - 1, 0), outcome, record.current_step)
        else:
            record.fail(
                f"the coordinator died without a final status {restarts + 1} times (submit --max-restarts "
                f"{max_restarts}); see `stagetrain logs {record.job_id}`, then `stagetrain resume`"
            )
        jobs.save(record)
        return record
