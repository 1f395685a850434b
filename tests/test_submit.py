"""`stagetrain submit` against a Ray job server that is up but not ready: a tiny stand-in on 127.0.0.1
that speaks the part of Ray's job REST API that ``JobSubmissionClient`` uses (version, packages, jobs)
and answers ``POST /api/jobs/`` with Ray's own HTTP 500 "No available agent" for a while, as a head
started seconds ago does."""

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
    assert not Storage(storage).exists("s", JOB_FILE)  # not submitted: no job left behind
