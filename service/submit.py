"""The coordinator as a Ray job: ``stagetrain submit`` and ``resume --address http://...`` hand the job to
the Ray Jobs API and return; the cluster runs ``stagetrain run --job-id ID --storage URL``, which reads the
spec from storage (nothing on the user's disk is needed there).

- ``submission_id`` is ``<job-id>-attempt-<k>``: Ray never reuses one, so each (re)submission is a new
  attempt, counted in the job record.
- The entrypoint needs no worker slot (``entrypoint_num_cpus=0``); the code travels as ``py_modules``
  (or is the cluster image's installed package).
- ``RAY_JOB_STOP_WAIT_TIME_S`` is set above ``preemption.grace_seconds``: Ray's default (3 s) would
  SIGKILL the coordinator before the workers commit their checkpoint.
- Ray's token authentication (on by default in 2.60) is the client's own: ``RAY_AUTH_MODE=token`` with
  ``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH``, read by Ray; stagetrain never prints or stores the token.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import time
from urllib.parse import urlparse

from checkpoints.storage import forwarded_env
from service.console import first_line
from service.layout import CANCEL_FILE

SUBMISSION_ENV = "STAGETRAIN_SUBMISSION_ID"
# What a job server with token authentication needs from a client (Ray's own variables)
AUTH_HINT = (
    "the Ray job server requires authentication: export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<the "
    "cluster's token> (or RAY_AUTH_TOKEN_PATH=<a file holding it>)"
)  # set in a submitted coordinator's environment
STOP_MARGIN_S = 30


# How long `submit` retries a job server that answers 5xx (a head whose job agent is starting)
SUBMIT_RETRY_S = float(os.environ.get("STAGETRAIN_SUBMIT_RETRY_S", "60"))


class SubmitError(ValueError):
    """The job cannot be submitted (a user error: exit 2, nothing changed)."""


def submission_id(job_id: str, attempt: int) -> str:
    return f"{job_id}-attempt-{attempt}"


def job_server(address: str | None) -> str:
    """The Ray job server URL (``http://HEAD:8265``), or a clear error for anything else."""
    if not address:
        raise SubmitError(
            "--address: the Ray job server URL is required, e.g. --address http://HEAD:8265 "
            "(or set RAY_ADDRESS)"
        )
    parsed = urlparse(address)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise SubmitError(
            f"--address: expected the Ray dashboard / job server URL http://HEAD:8265, got {address!r}"
        )
    return address.rstrip("/")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_reachable(storage_url: str, address: str) -> None:
    """Storage the cluster cannot reach is refused before anything is submitted."""
    if "://" not in storage_url or storage_url.startswith("file://"):
        host = urlparse(address).hostname or ""
        if not _loopback(host):
            raise SubmitError(
                f"--storage {storage_url} is a local folder, which the cluster at {address} cannot reach; "
                "use shared storage (s3://bucket/prefix, or a path every node mounts, as file:///mnt/...)"
            )


def code_modules() -> list[str]:
    """The package folders to ship as ``py_modules``, wherever they are: a checkout, site-packages, or
    (for the keeper, which submits from inside the cluster) each in its own unpacked Ray package."""
    import importlib.util

    return [
        os.path.dirname(importlib.util.find_spec(m).origin) for m in ("service", "workers", "checkpoints")
    ]


def submit(
    job_id: str,
    storage_url: str,
    address: str,
    attempt: int,
    grace_seconds: float,
    metadata: dict[str, str] | None = None,
    command: list[str] | None = None,
    sid: str | None = None,
) -> str:
    """Submit the coordinator of ``job_id`` as Ray job ``<job-id>-attempt-<attempt>`` (or ``command``,
    ``stagetrain`` arguments, as Ray job ``sid``); returns its id."""
    from ray.job_submission import JobSubmissionClient

    sid = sid or submission_id(job_id, attempt)
    try:
        client = JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001 - connection, auth and version errors all mean "cannot submit"
        first = str(e).splitlines()[0] if str(e) else ""
        if type(e).__name__ == "AuthenticationError" or "Unauthorized" in first or "Forbidden" in first:
            raise SubmitError(f"--address {address}: {AUTH_HINT} ({type(e).__name__}: {first})") from None
        raise SubmitError(
            f"--address {address}: cannot reach the Ray job server: {type(e).__name__}: {first}"
        ) from None
    entrypoint = " ".join(
        shlex.quote(a)
        for a in (
            "python",
            "-m",
            "service.cli",
            *(command or ["run", "--job-id", job_id, "--storage", storage_url]),
        )
    )
    env = {
        **forwarded_env(),
        SUBMISSION_ENV: sid,
        "RAY_JOB_STOP_WAIT_TIME_S": str(int(grace_seconds + STOP_MARGIN_S)),
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1"),
        "PYTHONUNBUFFERED": "1",
    }
    deadline, wait = time.monotonic() + SUBMIT_RETRY_S, 0.5
    while True:
        try:
            client.submit_job(
                entrypoint=entrypoint,
                submission_id=sid,
                entrypoint_num_cpus=0,
                runtime_env={"env_vars": env, "py_modules": code_modules()},
                metadata={"stagetrain_job": job_id, **(metadata or {})},
            )
            return sid
        except RuntimeError as e:
            # a head started seconds ago answers 500 "No available agent to submit job, please try
            # again later" until its job agent is up; 502/503 from a proxy in front of it likewise
            text = str(e).strip()
            if not re.match(r"Request failed with status code 5\d\d", text):
                raise
            if time.monotonic() + wait > deadline:
                raise SubmitError(
                    f"--address {address}: the Ray job server is not ready to take jobs after "
                    f"{SUBMIT_RETRY_S:g}s ({first_line(text, 160).rstrip('.')}); try again in a minute"
                ) from None
            time.sleep(wait)
            wait = min(wait * 2, 8.0)


def submit_attempt(
    jobs, record, server: str, why: str = "", keeper_restarts: int = 0, by_keeper: bool = False
) -> str | None:
    """Submit the job's next coordinator attempt (and with ``keeper_restarts``, a keeper: see
    ``service.keeper``). The record is written first, under the job's lease (``LeaseHeld`` if a
    coordinator holds it), which is released for the submitted coordinator to take: the job is
    ``pending`` until it does. A user's submission clears a cancel request left from before; the
    keeper's (``by_keeper``) resubmits only a job that is still unfinished and not being cancelled,
    else returns None. Returns the Ray submission id."""
    from service.coordination import cancel_requested, holding
    from service.jobs import TERMINAL, JobStatus
    from service.keeper import keeper_id, submit_keeper

    with holding(jobs):
        existed = jobs.exists()
        if by_keeper:
            record = jobs.load()  # as it is now, under the lease
            if record.status in TERMINAL or cancel_requested(jobs.storage):
                return None
        else:
            jobs.storage.remove(CANCEL_FILE)  # the user continues the job
        attempt = record.next_attempt()
        sid = submission_id(record.job_id, attempt)
        before = record.model_copy(deep=True)
        record.ray_address = server
        record.ray_submissions.append(sid)
        record.move(JobStatus.PENDING)
        record.error = None
        record.event(f"submitted to {server} as Ray job {sid}" + (f": {why}" if why else ""))
        if keeper_restarts:
            record.keeper = keeper_id(record.job_id, attempt)
            record.event(f"keeper {record.keeper}: resubmits the coordinator up to {keeper_restarts} time(s)")
        jobs.save(record)
    grace = record.job_spec().preemption.grace_seconds
    try:
        submit(record.job_id, jobs.root.url, server, attempt, grace, sid=sid)
    except BaseException as e:
        if existed:  # nothing was submitted: the record says so
            with holding(jobs):
                before.event(f"could not submit Ray job {sid}: {type(e).__name__}: {e}")
                jobs.save(before)
        else:  # a new job that was never submitted leaves nothing behind
            jobs.storage.remove()
        raise
    if keeper_restarts:
        submit_keeper(jobs, record, server, keeper_restarts, attempt)
    return sid


def stop(address: str, sid: str) -> bool:
    """Stop Ray job ``sid`` (SIGTERM to its entrypoint); ``SubmitError`` in one line when the job server
    cannot be reached or refuses."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address).stop_job(sid)
    except Exception as e:  # noqa: BLE001 - unreachable, token refused, unknown job: one line
        first = first_line(str(e), 200)
        hint = f" ({AUTH_HINT})" if "401" in first or "403" in first or "Unauthorized" in first else ""
        raise SubmitError(
            f"could not stop Ray job {sid} on {address}: {type(e).__name__}: {first}{hint}"
        ) from None


def ray_job_state(address: str, sid: str, timeout: float = 2.0) -> str | None:
    """The Ray job's state (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED) over the job server's REST API
    (no Ray import: ``status`` stays fast), or None if the server does not answer."""
    info = ray_job_info(address, sid, timeout)
    return info if isinstance(info, str) else (info or {}).get("status")


def ray_job_info(address: str, sid: str, timeout: float = 2.0) -> dict | str | None:
    """The job server's record of Ray job ``sid`` (``status``, ``message``, ...), ``AUTH_HINT`` if it
    wants a token, or None if it does not answer."""
    import json
    import urllib.error
    import urllib.request

    headers = {}
    token = _auth_token()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        req = urllib.request.Request(f"{address}/api/jobs/{sid}", headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as e:
        return AUTH_HINT if e.code in (401, 403) else None
    except Exception:  # noqa: BLE001 - unreachable, unknown: nothing to show
        return None


def keeper_running(record) -> bool:
    """The job has a keeper (``submit --max-restarts``) and its Ray job is pending or running."""
    return bool(record.keeper) and ray_job_state(record.ray_address, record.keeper) in ("PENDING", "RUNNING")


def settle_never_started(jobs, record):
    """A submitted job whose Ray job ended before its coordinator took the lease (its entrypoint failed:
    the cluster's Python lacks a package, the command is wrong, the job was stopped) will never run:
    record it ``failed`` with the Ray job's own message, once, under the job's lease. ``status``,
    ``wait`` and ``logs --follow`` call this; a keeper that is still running decides instead. Returns the
    record as it is now."""
    from service.coordination import LeaseHeld, holding, read_lease
    from service.jobs import JobStatus

    if record.status != JobStatus.PENDING or not record.ray_submissions or not record.ray_address:
        return record
    lease = read_lease(jobs.storage)
    if lease is not None and lease.alive():
        return record
    sid = record.ray_submissions[-1]
    info = ray_job_info(record.ray_address, sid)
    if not isinstance(info, dict) or info.get("status") not in ("FAILED", "STOPPED"):
        return record
    if keeper_running(record):
        return record
    why = first_line(_last_lines(info.get("message") or ""), 300)
    try:
        with holding(jobs):
            record = jobs.load()
            if record.status == JobStatus.PENDING and record.ray_submissions[-1:] == [sid]:
                record.fail(
                    f"Ray job {sid} {info['status']} before its coordinator started"
                    + (f": {why}" if why else "")
                    + f"; see `ray job logs {sid} --address {record.ray_address}`"
                )
                jobs.save(record)
    except LeaseHeld:
        return jobs.load()  # a coordinator started meanwhile
    return record


def _last_lines(message: str) -> str:
    """The line that says why, from Ray's "Job entrypoint command failed with exit code N, last available
    logs (truncated ...):" message: the last non-blank line of the logs (the exception), else the first."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    if len(lines) > 1 and "last available logs" in lines[0]:
        code = lines[0].split(",")[0]
        return f"{code}: {lines[-1]}"
    return lines[0] if lines else ""


def _auth_token() -> str | None:
    """The token Ray's clients would send (same lookup order as Ray's), when token auth is on."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return None
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    for path in (os.environ.get("RAY_AUTH_TOKEN_PATH"), os.path.expanduser("~/.ray/auth_token")):
        if path and os.path.exists(path):
            with open(path) as f:
                return f.read().strip()
    return None
