"""`stagetrain submit` and the keeper of `submit --max-restarts` against a tiny stand-in for Ray's job
server on 127.0.0.1: it speaks the part of the job REST API that ``JobSubmissionClient`` and the keeper
use (version, packages, jobs) and can answer ``POST /api/jobs/`` with Ray's own HTTP 500 "No available
agent" for a while, as a head started seconds ago does. Storage is a real local folder."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from checkpoints.storage import Storage
from service.jobs import JobRecord
from service.layout import JOB_FILE
from tests.conftest import merge
from tests.helpers import cli_env, stagetrain
from tests.jobs import TINY, write_job

NOT_READY = "No available agent to submit job, please try again later."


class JobServer(ThreadingHTTPServer):
    """Answers ``not_ready`` submissions with 500, then accepts; records what it was sent."""

    def __init__(self, not_ready: int):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.not_ready, self.posts, self.packages, self.accepted = not_ready, 0, set(), []
        self.job_state = "RUNNING"  # what GET /api/jobs/<id> says of every job
        self.job_message = ""
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _Handler(BaseHTTPRequestHandler):
    server: JobServer

    def log_message(self, *args) -> None:
        pass

    def _answer(self, code: int, body) -> None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json" if not isinstance(body, str) else "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_GET(self) -> None:
        import ray

        if self.path == "/api/version":
            return self._answer(200, {"version": "4", "ray_version": ray.__version__, "ray_commit": "x"})
        if self.path.startswith("/api/jobs/"):
            return self._answer(200, {"status": self.server.job_state, "message": self.server.job_message})
        if self.path.startswith("/api/packages/"):
            return self._answer(200 if self.path in self.server.packages else 404, {})
        self._answer(404, "not found")

    def do_PUT(self) -> None:
        self._body()
        self.server.packages.add(self.path)
        self._answer(200, {})

    def do_POST(self) -> None:
        body = json.loads(self._body())
        self.server.posts += 1
        if self.server.posts <= self.server.not_ready:
            return self._answer(500, NOT_READY)
        self.server.accepted.append(body)
        self._answer(200, {"submission_id": body["submission_id"], "job_id": None})


@pytest.fixture
def job_file(tmp_path):
    return write_job(tmp_path, merge(TINY, {"name": "sub"}))


def test_submit_waits_for_a_job_agent_that_is_not_ready_yet(tmp_path, job_file):
    server = JobServer(not_ready=3)
    storage = str(tmp_path / "runs")
    proc = stagetrain("submit", job_file, "--job-id", "s", "--storage", storage, "--address", server.url)
    server.shutdown()
    assert proc.returncode == 0, proc.stderr
    assert server.posts == 4 and [b["submission_id"] for b in server.accepted] == ["s-attempt-1"]
    record = JobRecord.model_validate_json(Storage(storage).read_bytes("s", JOB_FILE))
    assert record.status == "pending" and record.ray_submissions == ["s-attempt-1"]


def test_the_submitted_coordinator_gets_stagetrains_settings_and_its_own_submission_id(tmp_path, job_file):
    """``STAGETRAIN_*`` settings of the submitting shell reach the Ray job (and through it the workers),
    as on a local Ray; a submission id in that shell (a keeper resubmitting from inside a Ray job) does
    not replace the new one. Secrets are not forwarded."""
    server = JobServer(not_ready=0)
    env = cli_env(
        STAGETRAIN_TEST_COMMIT_DELAY_S="1.5",
        STAGETRAIN_SUBMISSION_ID="old-attempt-1",
        AWS_SECRET_ACCESS_KEY="do-not-forward",
    )
    proc = stagetrain(
        "submit",
        job_file,
        "--job-id",
        "f",
        "--storage",
        str(tmp_path / "runs"),
        "--address",
        server.url,
        env=env,
    )
    server.shutdown()
    assert proc.returncode == 0, proc.stderr
    (body,) = server.accepted
    sent = body["runtime_env"]["env_vars"]
    assert (
        sent["STAGETRAIN_TEST_COMMIT_DELAY_S"] == "1.5" and sent["STAGETRAIN_SUBMISSION_ID"] == "f-attempt-1"
    )
    assert "AWS_SECRET_ACCESS_KEY" not in sent


def test_submit_to_a_job_agent_that_never_gets_ready_is_one_line(tmp_path, job_file):
    server = JobServer(not_ready=10**6)
    storage = str(tmp_path / "runs")
    env = cli_env(STAGETRAIN_SUBMIT_RETRY_S="3")
    args = ("submit", job_file, "--job-id", "s", "--storage", storage, "--address", server.url)
    proc = stagetrain(*args, env=env)
    server.shutdown()
    assert proc.returncode == 2 and server.posts >= 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: --address {server.url}: the Ray job server is not ready to take jobs after 3s (Request "
        f"failed with status code 500: {NOT_READY.rstrip('.')}); try again in a minute"
    )
    assert not Storage(storage).exists("s")  # not submitted: nothing left behind


def _orphaned(tmp_path, server: JobServer):
    """Job "k", submitted once, whose coordinator died without a final status: status running, no lease,
    its Ray job FAILED."""
    from tests.test_coordinator import Job

    job = Job(tmp_path)
    record = job.record
    record.status, record.ray_address, record.ray_submissions = "running", server.url, ["j-attempt-1"]
    job.jobs.save(record)
    server.job_state = "FAILED"
    return job


def test_a_cancel_while_the_coordinator_is_down_ends_the_job_cancelled_not_restarted(tmp_path):
    from service.coordination import request_cancel
    from service.keeper import keep

    server = JobServer(not_ready=0)
    job = _orphaned(tmp_path, server)
    request_cancel(job.jobs.storage, now=False)  # as `stagetrain cancel` leaves it, first thing
    said = []
    assert keep(job.jobs, server.url, max_restarts=3, say=said.append, poll_s=0.05) == 0
    server.shutdown()
    assert server.posts == 0, said  # no coordinator was submitted
    assert job.record.status == "cancelled" and said[-1] == "job j cancelled"


def test_the_keeper_never_resubmits_over_a_final_status_written_meanwhile(tmp_path):
    """The keeper decided on a record that said running; by the time it holds the lease the job was
    cancelled: nothing is submitted, nothing overwritten."""
    from service.decisions import Cancelled
    from service.submit import submit_attempt

    server = JobServer(not_ready=0)
    job = _orphaned(tmp_path, server)
    stale = job.record
    ended = job.record
    ended.settle(0, Cancelled("cancelled while stopped"), 0)
    job.jobs.save(ended)
    assert submit_attempt(job.jobs, stale, server.url, "keeper: restart 1 of 3", by_keeper=True) is None
    server.shutdown()
    assert server.posts == 0 and job.record.status == "cancelled"


def test_the_keeper_rides_out_a_storage_error_then_resubmits(tmp_path):
    """The job record cannot be read for a while (a half-written object, a storage outage): the keeper
    says so each poll and goes on; once it can, it resubmits the dead coordinator."""
    from service.keeper import keep

    server = JobServer(not_ready=0)
    job = _orphaned(tmp_path, server)
    good = job.jobs.storage.read_bytes(JOB_FILE)
    job.jobs.storage.write_bytes(b'{"job_id": ', JOB_FILE)
    said = []

    def say(line: str) -> None:
        said.append(line)
        if len(said) == 3:  # two failed polls: storage is back
            job.jobs.storage.write_bytes(good, JOB_FILE)
        if "resubmitted as" in line:  # the new coordinator ran the job to its end
            record = job.record
            record.status = "succeeded"
            job.jobs.save(record)

    assert keep(job.jobs, server.url, max_restarts=1, say=say, poll_s=0.05) == 0
    server.shutdown()
    assert said[0].startswith("keeper: ValidationError: ") and said[0].endswith("; trying again in 0.05s")
    assert [b["submission_id"] for b in server.accepted] == ["j-attempt-2"], said
    assert said[-1] == "job j succeeded: the keeper ends"


ENTRYPOINT_FAILED = (
    "Job entrypoint command failed with exit code 1, last available logs (truncated to 20,000 chars):\n"
    'Traceback (most recent call last):\n  File "<frozen runpy>", line 198, in _run_module_as_main\n'
    "ModuleNotFoundError: No module named 'pydantic'\n"
)


@pytest.mark.parametrize("command", ["status", "wait", "logs"])
def test_a_ray_job_that_failed_before_its_coordinator_started_ends_the_job_failed(tmp_path, command):
    """The cluster's Python could not even import stagetrain: the job was `pending` for ever. The first
    look (`status`, `wait`, `logs --follow`) records it failed with the Ray job's own last line."""
    from tests.test_coordinator import Job

    server = JobServer(not_ready=0)
    job = Job(tmp_path)
    record = job.record
    record.ray_address, record.ray_submissions = server.url, ["j-attempt-1"]
    job.jobs.save(record)
    server.job_state, server.job_message = "FAILED", ENTRYPOINT_FAILED
    args = {"status": ["status", "j"], "wait": ["wait", "j"], "logs": ["logs", "j", "--follow"]}[command]
    proc = stagetrain(*args, "--storage", str(tmp_path), timeout=120)
    server.shutdown()
    why = (
        "Ray job j-attempt-1 FAILED before its coordinator started: Job entrypoint command failed with exit "
        "code 1: ModuleNotFoundError: No module named 'pydantic'; see `ray job logs j-attempt-1 --address "
        f"{server.url}`"
    )
    assert job.record.status == "failed" and job.record.error == why
    assert proc.returncode == (0 if command == "status" else 1), proc.stderr
    assert why in (proc.stdout + proc.stderr).replace("\n", "")


def test_one_numbering_for_coordinator_attempts_ray_jobs_and_logs(tmp_path, monkeypatch):
    """A job run here once (attempt 1, stopped after), then submitted: its Ray job is attempt 2, and the
    coordinator running as that Ray job calls itself attempt 2 and logs to attempt-2.log."""
    from service.submit import SUBMISSION_ENV, submit_attempt
    from tests.test_coordinator import Job

    server = JobServer(not_ready=0)
    job = Job(tmp_path)
    assert job.run() == 0
    stopped = job.record
    stopped.status = "preempted"  # (a succeeded job is never submitted again)
    job.jobs.save(stopped)
    assert submit_attempt(job.jobs, stopped, server.url) == "j-attempt-2"
    server.shutdown()
    monkeypatch.setenv(SUBMISSION_ENV, "j-attempt-2")
    record = job.record
    record.status = "running"
    job.jobs.save(record)
    job.run()
    assert job.record.coordinator_attempts == 2
    log = job.jobs.storage.read_text("logs", "attempt-2.log")
    assert "coordinator attempt 2 on Ray job j-attempt-2" in log
