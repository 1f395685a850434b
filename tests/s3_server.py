"""A real S3 HTTP server for tests: moto's server mode, in its own process.

Fixtures (registered through ``pytest_plugins`` in ``tests/conftest.py``):

- ``s3_server`` (session): the running server, with ``endpoint``, ``env`` (fake credentials, endpoint,
  region) and ``stop()`` / ``start()``, which restart it on the same port. moto keeps objects in
  memory, so a restart comes back EMPTY: buckets and objects are gone.
- ``s3_url`` (function): a fresh bucket; yields ``s3://<bucket>/runs`` with ``env`` applied to
  ``os.environ``, which is where ``checkpoints.storage`` finds the endpoint and credentials.
- ``storage_url`` (function, parametrized ``local`` / ``s3``): a local folder or ``s3_url``. Both set
  the fake credentials in the environment, so a test can check they leak nowhere.

``FlakyProxy`` sits in front of the server and can cut and refuse connections for a while, as an
endpoint restart does, without moto losing its objects.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import pytest

from tests.helpers import wait_for_http

# Distinctive fake values: a test greps storage and output for them to prove no secret leaks.
ACCESS_KEY_ID = "stagetrain-test-key-id"
SECRET_ACCESS_KEY = "stagetrain-test-secret-do-not-log"
CREDENTIALS_ENV = {
    "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
    "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """``moto_server`` from this interpreter's environment, on a fixed loopback port."""

    def __init__(self, port: int):
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self.env = {**CREDENTIALS_ENV, "AWS_ENDPOINT_URL": self.endpoint}
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile()

    def start(self, timeout: float = 20.0) -> None:
        assert self.proc is None, "already running"
        exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
        self.proc = subprocess.Popen(
            [exe, "-H", "127.0.0.1", "-p", str(self.port)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        what = f"moto_server on port {self.port} did not answer"
        wait_for_http(self, self.endpoint, what, timeout, interval=0.05, tail=2000)  # ListBuckets

    def stop(self) -> None:
        """Terminate the server (its objects are lost). Safe to call when stopped."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class FlakyProxy:
    """A TCP proxy in front of the S3 server that can be 'restarted': all connections are cut and new
    ones refused for a while, as when an S3 endpoint restarts (its data survives, unlike moto's); or
    'muted': requests still reach the server (and take effect) but its answers are lost, as on a
    congested or partitioned network."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.listener: socket.socket | None = None
        self.restarts = 0
        self.muted = False

    def start(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.conns += [client, upstream]
            for a, b, drop in ((client, upstream, False), (upstream, client, self.muted)):
                threading.Thread(target=self._pipe, args=(a, b, drop), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, drop: bool) -> None:
        try:
            while data := src.recv(65536):
                if not drop:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def restart(self, down_s: float) -> None:
        self.close()
        self.restarts += 1
        time.sleep(down_s)
        self.start()

    def mute(self, down_s: float) -> None:
        """For ``down_s`` seconds, new connections get no answer (what they send still reaches the
        server); existing ones are cut first. A connection opened meanwhile stays mute."""
        self.muted = True
        self._cut()
        time.sleep(down_s)
        self.muted = False

    def close(self) -> None:
        """Cut every connection and refuse new ones."""
        self.listener.close()
        self._cut()

    def _cut(self) -> None:
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass
        self.conns = []


@pytest.fixture(scope="session")
def s3_server():
    server = S3Server(_free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
        server._log.close()


def make_bucket(server: S3Server, bucket: str) -> None:
    """Create ``bucket`` with s3fs. No ``region_name``: with ``us-east-1`` moto answers
    InvalidLocationConstraint."""
    import s3fs

    fs = s3fs.S3FileSystem(
        key=ACCESS_KEY_ID, secret=SECRET_ACCESS_KEY, endpoint_url=server.endpoint, skip_instance_cache=True
    )
    fs.mkdir(bucket)


@pytest.fixture
def s3_url(s3_server, monkeypatch):
    if not s3_server.running:  # a previous test stopped it and failed before restarting it
        s3_server.proc = None
        s3_server.start()
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    bucket = f"stagetrain-{uuid.uuid4().hex[:12]}"
    make_bucket(s3_server, bucket)
    yield f"s3://{bucket}/runs"
    if s3_server.running:  # free moto's memory; a restarted server has no bucket to delete
        import s3fs

        fs = s3fs.S3FileSystem(
            key=ACCESS_KEY_ID,
            secret=SECRET_ACCESS_KEY,
            endpoint_url=s3_server.endpoint,
            skip_instance_cache=True,
        )
        try:
            fs.rm(bucket, recursive=True)
        except FileNotFoundError:
            pass


@pytest.fixture(params=["local", "s3"])
def storage_url(request, tmp_path, monkeypatch):
    if request.param == "s3":
        return request.getfixturevalue("s3_url")
    for key, value in CREDENTIALS_ENV.items():
        monkeypatch.setenv(key, value)
    return str(tmp_path / "runs")
