"""Stop requests reaching a running stage: a stop file in job storage (written by the coordinator on
SIGTERM, seen by workers on any node) and SIGTERM delivered to the worker process itself."""

from __future__ import annotations

import logging
import os
import threading
import time

from checkpoints.storage import Storage
from service.layout import STOP_FILE

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


class StopSignal:
    """Callable: has a stop been requested? A daemon thread polls the stop file every ``poll_s``
    seconds, off the training thread: one poll is a HEAD and a LIST request on S3."""

    def __init__(self, storage: Storage | None, grace_seconds: float, poll_s: float | None = None):
        # A local stat is free; an object-store poll is a request or two: once a second is plenty.
        self.storage = storage
        self.poll_s = poll_s or (0.2 if storage is not None and storage.local else 1.0)
        self._stopped = threading.Event()
        _install_sigterm_deferral(grace_seconds)
        if storage is not None:
            threading.Thread(target=self._poll, daemon=True, name="stagetrain-stop-poll").start()

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


class StopAfter:
    """A ``stop_requested`` that says yes once ``n`` optimizer steps have run; pass its ``on_step`` to
    the ``StageRunner`` too. For benchmarks and tests that stop a stage part-way, in-process."""

    def __init__(self, n: int):
        self.n, self.seen = n, 0

    def on_step(self, step: int) -> None:
        self.seen += 1

    def __call__(self) -> bool:
        return self.seen >= self.n
