"""``stagetrain submit --max-restarts N``: a keeper that resubmits a coordinator that died without a
final status (OOM-killed, its Ray job stopped by the system), up to N times, each as a new Ray submission
``<job>-attempt-<k>``. The keeper is itself a small Ray job (``<job>-keeper-<k>``, no CPU) on the head;
it watches the job record, the lease and the coordinator's Ray job, and ends when the job does. A
restarted head takes the keeper with it: there, the rerun of the same entrypoint (KubeRay's RayJob
retry, or ``stagetrain resume``) continues the job."""

from __future__ import annotations

import time

from service.coordination import read_lease
from service.decisions import keeper_action
from service.submit import ray_job_state, submit, submit_attempt

KEEPER_POLL_S = 5.0


def keeper_id(job_id: str, attempt: int) -> str:
    return f"{job_id}-keeper-{attempt}"


def submit_keeper(jobs, record, server: str, max_restarts: int) -> str:
    """Submit the keeper of ``record``'s job beside its coordinator (``submit_attempt`` recorded it)."""
    return submit(
        record.job_id,
        jobs.root.url,
        server,
        len(record.ray_submissions),
        record.job_spec().preemption.grace_seconds,
        command=["keep", record.job_id, "--storage", jobs.root.url, "--address", server]
        + ["--max-restarts", str(max_restarts)],
        sid=keeper_id(record.job_id, len(record.ray_submissions)),
    )


def keep(jobs, address: str, max_restarts: int, say=print, poll_s: float = KEEPER_POLL_S) -> int:
    restarts = 0
    while True:
        record = jobs.load()
        lease = read_lease(jobs.storage)
        alive = lease is not None and lease.alive()
        state = ray_job_state(address, record.ray_submissions[-1]) if record.ray_submissions else None
        action = keeper_action(record.status, alive, state, restarts, max_restarts)
        if action == "done":
            say(f"job {record.job_id} {record.status}: the keeper ends")
            return 0
        if action == "give_up":
            record.fail(
                f"the coordinator died without a final status {restarts + 1} times (submit --max-restarts "
                f"{max_restarts}); see `stagetrain logs {record.job_id}`, then `stagetrain resume`"
            )
            jobs.save(record)
            say(record.error)
            return 1
        if action == "resubmit":
            restarts += 1
            why = (
                f"keeper: Ray job {record.ray_submissions[-1]} ended {state} without a final status "
                f"(restart {restarts} of {max_restarts})"
            )
            sid = submit_attempt(jobs, record, address, why)
            say(f"{why}: resubmitted as {sid}")
        time.sleep(poll_s)
