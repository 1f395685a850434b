"""A real Ray head (``ray start --head``) with token authentication ON, for job-submission tests.

Provides the session fixture ``ray_head`` (load with ``pytest_plugins = ["tests.ray_head"]`` or
``pytest -p tests.ray_head``). It yields a :class:`RayHead` with:

- ``address``: the job server URL ``http://127.0.0.1:PORT`` (dashboard bound to loopback);
- ``gcs_address``: ``127.0.0.1:PORT`` for ``ray.init(address=...)``;
- ``token`` / ``token_path`` / ``auth_headers``: the cluster token, the 0600 file holding it and
  ``{"Authorization": "Bearer <token>"}`` for an in-process ``JobSubmissionClient(address, headers=...)``;
- ``env``: what a client subprocess needs (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN``); merge it over
  ``subprocess_env()``, which also drops ambient ``RAY_ADDRESS`` / ``RAY_API_SERVER_ADDRESS`` / auth
  variables (those override even an explicit ``JobSubmissionClient`` address). ``RAY_ADDRESS`` is not set:
  pass ``address`` / ``gcs_address`` explicitly. Jobs on the head inherit the head's token settings;
- ``temp_dir``: the head's ``--temp-dir`` (short, under /tmp: Unix socket paths are limited to 107 bytes);
- ``stop()`` (idempotent; kills this head's processes only, never other Ray instances) and ``restart()``
  (same ports and token; job history is lost).

Facts about Ray 2.60 this relies on (read in Ray's source, checked on this machine):

- ``ray start --head`` turns token auth on only when ``RAY_AUTH_MODE=token``, or when the mode is unset and a
  token exists; with neither it starts with auth DISABLED (a warning). ``ray.init()`` starting a local
  cluster is the path that turns it on by default (and writes ``~/.ray/auth_token``). The head here sets
  ``RAY_AUTH_MODE=token`` and its own token, so ``~/.ray`` is neither read nor written.
- Token lookup order (C++ ``AuthenticationTokenLoader``): ``RAY_AUTH_TOKEN``, then the file at
  ``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``. Clients send a header only when their own
  ``RAY_AUTH_MODE`` is ``token`` (or when given ``headers={"Authorization": ...}``); without it the job
  server answers 401 and the client raises ``ray.exceptions.AuthenticationError``
  ("Authentication required: Unauthorized: Missing authentication token ..."); a wrong token gives 403.
- In a process that already imported Ray, the mode and a found token are cached: after changing the
  variables call ``ray._raylet.Config.initialize("")`` and
  ``ray._raylet.AuthenticationTokenLoader.instance().reset_cache()`` (what Ray's own test helpers do).
- ``--node-ip-address=127.0.0.1`` alone is rewritten to the machine's routable IP
  (``services.resolve_ip_for_localhost``) and GCS/raylet listen on all addresses. With
  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` Ray takes 127.0.0.1 as the node IP and every listener of the
  head was on 127.0.0.1 (``ss -ltn``); clients calling ``ray.init(address=gcs_address)`` need it too.
- Job entrypoints run ``python`` from the head's PATH: the head's PATH starts with this venv's bin.
- ``ray stop`` kills every Ray process on the machine by name. This head's processes are found by a marker
  variable in their environment (inherited by raylet, workers, agents and job entrypoints, which run in
  their own sessions), and stopped raylet first, GCS last, like ``ray stop``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

import pytest

MARKER_VAR = "STAGETRAIN_RAY_HEAD_ID"
# Distinctive prefix: a test can grep logs and storage for it to prove the token leaks nowhere.
TOKEN_PREFIX = "stagetrain-ray-test-token-"
AMBIENT_VARS = (
    "RAY_ADDRESS",
    "RAY_API_SERVER_ADDRESS",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
)


def _free_port() -> int:
    """A free loopback port from the ephemeral range (32768+), clear of Ray's worker ports 10002-19999."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` ('Z' zombie), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2 :][:1].decode()


def _alive(pid: int) -> bool:
    return _proc_state(pid) not in (None, "Z")


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class RayHead:
    """One ``ray start --head`` on loopback ports, its own temp dir, token auth on."""

    def __init__(self, num_cpus: int = 2, extra_env: dict[str, str] | None = None):
        self.num_cpus = num_cpus
        self.head_id = uuid.uuid4().hex
        self.temp_dir = tempfile.mkdtemp(prefix="rh-", dir="/tmp")  # short: socket paths live under it
        self.token = TOKEN_PREFIX + secrets.token_hex(16)
        self.token_path = os.path.join(self.temp_dir, "auth_token")
        fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.token)
        self.gcs_port, self.dashboard_port = _free_port(), _free_port()
        self.client_server_port, self.agent_http_port = _free_port(), _free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.gcs_address = f"127.0.0.1:{self.gcs_port}"
        self.auth_headers = {"Authorization": f"Bearer {self.token}"}
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: node IP 127.0.0.1 (see above); a ray.init(address=gcs_address)
        # client needs it too, or it looks for a raylet on the routable IP and hangs.
        self.env = {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        }
        self.head_env = {
            **self.env,
            MARKER_VAR: self.head_id,
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
            **(extra_env or {}),
        }
        self.log_path = os.path.join(self.temp_dir, "ray-start.log")
        self.started_at: float | None = None
        self.ready_after_s: float | None = None  # `ray start` launched -> job server answered
        self.ray_start_s: float | None = None  # `ray start` launched -> it exited
        self._started = False

    # -- environment -------------------------------------------------------------------------------
    def subprocess_env(self, **extra: str) -> dict[str, str]:
        """``os.environ`` without ambient Ray address/auth variables, plus ``env`` and ``extra``."""
        base = {k: v for k, v in os.environ.items() if k not in AMBIENT_VARS}
        return {**base, **self.env, **extra}

    def client(self):
        """An in-process ``JobSubmissionClient`` for this head (token passed as a header)."""
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address, headers=dict(self.auth_headers))

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self, timeout: float = 90.0) -> None:
        assert not self._started, "already started"
        exe = os.path.join(os.path.dirname(sys.executable), "ray")
        cmd = [
            exe,
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--port={self.gcs_port}",
            f"--ray-client-server-port={self.client_server_port}",
            f"--dashboard-agent-listen-port={self.agent_http_port}",
            f"--num-cpus={self.num_cpus}",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
            "--log-style=record",
        ]
        env = {k: v for k, v in os.environ.items() if k not in AMBIENT_VARS}
        env.update(self.head_env)
        # Job entrypoints run `python` from PATH: make it this interpreter's (the venv's).
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        self._started = True
        self.started_at, self.ray_start_s = time.monotonic(), None
        with open(self.log_path, "ab") as log:
            proc = subprocess.Popen(
                cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.temp_dir,
            )
        try:
            self._wait_ready(proc, timeout)
        except BaseException:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            self.stop()
            raise
        self.ready_after_s = time.monotonic() - self.started_at

    def _wait_ready(self, proc: subprocess.Popen, timeout: float) -> None:
        """Until ``ray start`` exited 0 and an authenticated GET /api/jobs/ answers 200."""
        deadline = time.monotonic() + timeout
        waiting_for, last_error = "`ray start` to exit", ""
        while True:
            code = proc.poll()
            if code is not None and code != 0:
                raise RuntimeError(f"`ray start` exited {code}:\n{self._log_tail()}")
            if code == 0:
                if self.ray_start_s is None:
                    self.ray_start_s = time.monotonic() - self.started_at
                waiting_for = f"job server {self.address}/api/jobs/ to answer 200 with the token"
                request = urllib.request.Request(self.address + "/api/jobs/", headers=self.auth_headers)
                try:
                    with urllib.request.urlopen(request, timeout=2) as response:
                        json.load(response)
                        return
                except urllib.error.HTTPError as e:
                    last_error = f"HTTP {e.code}: {e.read()[:200]!r}"
                except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError) as e:
                    last_error = repr(e)
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"Ray head not ready within {timeout:.0f}s: waited for {waiting_for}; "
                    f"last error: {last_error or '-'}\n"
                    f"`ray start` output:\n{self._log_tail()}"
                )
            time.sleep(0.1)

    def _log_tail(self, chars: int = 3000) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-chars:]
        except OSError:
            return "(no log)"

    def pids(self) -> list[int]:
        """Live processes of this head: those whose environment carries this head's marker."""
        needle = f"{MARKER_VAR}={self.head_id}".encode()
        found = []
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) == os.getpid():
                continue
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    environ = f.read()
            except OSError:
                continue
            if needle in environ.split(b"\0") and _alive(int(name)):
                found.append(int(name))
        return found

    def rss_bytes(self) -> dict[int, tuple[str, int]]:
        """``{pid: (command line, RSS bytes)}`` for this head's processes."""
        out = {}
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/status") as f:
                    rss = next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), 0)
            except OSError:
                continue
            out[pid] = (_cmdline(pid), rss)
        return out

    @property
    def running(self) -> bool:
        return bool(self.pids())

    def stop(self, grace: float = 5.0) -> None:
        """Stop this head only: SIGTERM raylet, then the rest, then GCS; SIGKILL what outlives ``grace``.

        Idempotent. Leaves ``temp_dir`` (token, logs) in place until ``cleanup()``.
        """

        def signal_all(pids, sig):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass

        def wait_gone(pids, timeout):
            end = time.monotonic() + timeout
            while any(_alive(p) for p in pids) and time.monotonic() < end:
                time.sleep(0.05)

        pids = self.pids()
        if pids:
            names = {pid: _cmdline(pid) for pid in pids}
            raylets = [p for p in pids if "/raylet/raylet " in names[p] + " "]
            gcs = [p for p in pids if "/gcs/gcs_server " in names[p] + " "]
            others = [p for p in pids if p not in raylets and p not in gcs]
            end = time.monotonic() + grace
            for group in (raylets, others, gcs):
                signal_all(group, signal.SIGTERM)
                wait_gone(group, max(0.0, end - time.monotonic()) / 2)
            for _ in range(20):  # SIGKILL stragglers and anything they spawned meanwhile
                left = self.pids()
                if not left:
                    break
                signal_all(left, signal.SIGKILL)
                wait_gone(left, 2.0)
            else:
                raise RuntimeError(f"Ray head processes survived SIGKILL: {self.pids()}")
        self._started = False

    def restart(self, timeout: float = 90.0) -> None:
        """Stop and start again on the same ports with the same token (jobs and their logs are gone)."""
        self.stop()
        self.start(timeout=timeout)

    def cleanup(self) -> None:
        """Stop, then remove ``temp_dir``."""
        self.stop()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_head():
    from tests.s3_server import CREDENTIALS_ENV

    # The head's workers hold the test bucket's (fake) credentials, as a cluster's nodes hold an instance
    # role's: jobs on S3 (tests/test_s3_ray.py) run here; the coordinator forwards only the endpoint.
    head = RayHead(extra_env=CREDENTIALS_ENV)
    try:
        head.start()
        yield head
    finally:
        head.cleanup()
