"""Stop requests reaching a running stage: a stop file in job storage (written by the coordinator on
SIGTERM, seen by workers on any node), SIGTERM delivered to the worker process itself, and the cloud's
termination notice for the worker's node (``preemption.notice``), polled by a thread in each worker.
Also the hold seam (``control/hold.json``): workers that wait at a given step until a stop arrives, so
a test or a demo acts on a job at a known step instead of racing it."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request

from pydantic import BaseModel

from checkpoints.storage import Storage
from service.layout import HELD_DIR, HOLD_FILE, STOP_FILE

log = logging.getLogger(__name__)
_sigterm = threading.Event()


def _install_sigterm_deferral(grace_seconds: float) -> None:
    """Ray's worker SIGTERM handler exits at once, losing the step in flight. It looks up
    ``raise_sys_exit_with_custom_error_message`` when the signal arrives; route that through a flag
    the training loop checks every step, and exit only if the loop has not left within the grace
    period. (The training function runs in a thread, so it cannot install a handler itself.)"""
    try:
        import ray._private.worker as ray_worker
    except ImportError:
        return
    original = getattr(ray_worker, "raise_sys_exit_with_custom_error_message", None)
    if original is None or getattr(original, "_stagetrain", False):
        return

    def deferred(message: str, exit_code: int = 1):
        if "SIGTERM" not in message:
            return original(message, exit_code=exit_code)
        log.warning(
            "SIGTERM: finishing the current step and committing a checkpoint (grace %.0fs)", grace_seconds
        )
        _sigterm.set()
        threading.Timer(grace_seconds, lambda: os._exit(exit_code)).start()

    deferred._stagetrain = True
    ray_worker.raise_sys_exit_with_custom_error_message = deferred


# The metadata endpoints, overridable the way the clouds' own SDKs allow (tests point them at a fake
# server on 127.0.0.1). Nothing is contacted unless preemption.notice names the cloud.
AWS_ENDPOINT_ENV, AWS_DEFAULT_ENDPOINT = "AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://169.254.169.254"
GCP_HOST_ENV, GCP_DEFAULT_HOST = "GCE_METADATA_HOST", "metadata.google.internal"
AWS_NOTICE_PATHS = ("spot/instance-action", "events/recommendations/rebalance")


class NoticeSource:
    """One poll of a termination notice: ``check()`` returns what the notice says, or None.
    ``kind``: ``aws`` (IMDSv2: a session token, then the spot interruption notice and the rebalance
    recommendation, 404 while there is none), ``gcp`` (``instance/preempted`` says TRUE), or a URL
    (HTTP 200 with a non-empty body is a notice)."""

    def __init__(self, kind: str, timeout: float = 2.0):
        self.kind, self.timeout, self._token = kind, timeout, None

    def _get(self, url: str, headers: dict, method: str = "GET") -> tuple[int, str]:
        req = urllib.request.Request(url, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, resp.read().decode(errors="replace").strip()
        except urllib.error.HTTPError as e:
            return e.code, ""

    def check(self) -> str | None:
        if self.kind == "aws":
            base = os.environ.get(AWS_ENDPOINT_ENV, AWS_DEFAULT_ENDPOINT).rstrip("/") + "/latest"
            for path in AWS_NOTICE_PATHS:
                for _ in range(2):  # once more with a fresh token if it expired
                    if self._token is None:
                        code, token = self._get(
                            f"{base}/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "21600"}, "PUT"
                        )
                        if code != 200:
                            raise OSError(f"IMDSv2 token request answered HTTP {code}")
                        self._token = token
                    code, body = self._get(
                        f"{base}/meta-data/{path}", {"X-aws-ec2-metadata-token": self._token}
                    )
                    if code != 401:
                        break
                    self._token = None
                if code == 200 and body:
                    return f"aws {path}: {body[:200]}"
            return None
        if self.kind == "gcp":
            host = os.environ.get(GCP_HOST_ENV, GCP_DEFAULT_HOST)
            code, body = self._get(
                f"http://{host}/computeMetadata/v1/instance/preempted", {"Metadata-Flavor": "Google"}
            )
            return "gcp instance/preempted: TRUE" if code == 200 and body.upper() == "TRUE" else None
        code, body = self._get(self.kind, {})
        return f"{self.kind}: {body[:200]}" if code == 200 and body else None


def notice_source(notice) -> NoticeSource | None:
    """``preemption.notice`` (``"none"``, ``"aws"``, ``"gcp"`` or ``{url: ...}``) as a source, or None."""
    if notice in (None, "none"):
        return None
    return NoticeSource(notice if isinstance(notice, str) else notice.url)


class StopSignal:
    """Callable: has a stop been requested? A daemon thread polls the stop file every ``poll_s``
    seconds, off the training thread: one poll is a HEAD and a LIST request on S3. With a notice source,
    another thread polls it every ``notice_poll_s``; ``notice`` then says what the notice said, with the
    Ray node it came from (the coordinator waits for that node to go before it continues)."""

    def __init__(
        self,
        storage: Storage | None,
        grace_seconds: float,
        poll_s: float | None = None,
        notice: NoticeSource | None = None,
        notice_poll_s: float = 5.0,
    ):
        # A local stat is free; an object-store poll is a request or two: once a second is plenty.
        self.storage = storage
        self.poll_s = poll_s or (0.2 if storage is not None and storage.local else 1.0)
        self._stopped = threading.Event()
        self.notice: dict | None = None  # {"node": Ray node id, "text": what the notice said}
        _install_sigterm_deferral(grace_seconds)
        if storage is not None:
            threading.Thread(target=self._poll, daemon=True, name="stagetrain-stop-poll").start()
        if notice is not None:
            threading.Thread(
                target=self._watch, args=(notice, notice_poll_s), daemon=True, name="stagetrain-notice"
            ).start()

    def _watch(self, source: NoticeSource, every: float) -> None:
        warned = False
        while True:
            try:
                text = source.check()
            except Exception as e:  # noqa: BLE001 - an unreachable endpoint must not stop training
                if not warned:
                    log.warning("could not poll the termination notice (%s): %s", source.kind, e)
                    warned = True
                text = None
            if text:
                log.warning("termination notice: %s; stopping after this step with a checkpoint", text)
                self.notice = {"node": _node_id(), "text": text}
                self._stopped.set()
                return
            time.sleep(every)

    def _poll(self) -> None:
        while True:
            try:
                if self.storage.exists(STOP_FILE):
                    self._stopped.set()
                    return
            except Exception as e:  # noqa: BLE001 - a storage hiccup must not stop training
                log.warning("could not poll the stop file: %s", e)
            time.sleep(self.poll_s)

    def __call__(self) -> bool:
        return self._stopped.is_set() or _sigterm.is_set()


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


class StopAfter:
    """A ``stop_requested`` that says yes once ``n`` optimizer steps have run; pass its ``on_step`` to
    the ``StageRunner`` too. For benchmarks and tests that stop a stage part-way, in-process."""

    def __init__(self, n: int):
        self.n, self.seen = n, 0

    def on_step(self, step: int) -> None:
        self.seen += 1

    def __call__(self) -> bool:
        return self.seen >= self.n


class HoldRequest(BaseModel):
    """``control/hold.json``: hold every rank before each of ``steps`` (once per step: a step whose
    rank-0 marker exists is not held again, so a retried or resumed stage runs through it) until a stop
    is requested, or ``timeout_s`` passes (then training goes on)."""

    steps: list[int]
    timeout_s: float = 600.0


def held_marker(step: int, rank: int) -> str:
    """``control/held/step-<N>-rank-<r>.json``: written by each rank as it holds (pid, node, host)."""
    return f"{HELD_DIR}/step-{step:09d}-rank-{rank}.json"


def pending_holds(storage: Storage | None) -> HoldRequest | None:
    """The hold request with the steps not yet held, or None (no request: one ``exists`` per stage)."""
    if storage is None or not storage.exists(HOLD_FILE):
        return None
    req = HoldRequest.model_validate_json(storage.read_text(HOLD_FILE))
    req.steps = [s for s in req.steps if not storage.exists(held_marker(s, 0))]
    return req if req.steps else None


def write_held_marker(storage: Storage, step: int, rank: int) -> None:
    import socket

    info = {"step": step, "rank": rank, "pid": os.getpid(), "host": socket.gethostname(), "node": _node_id()}
    storage.write_text(json.dumps(info), held_marker(step, rank))
