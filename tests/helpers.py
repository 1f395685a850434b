"""Small helpers every test module shares: one ``stagetrain`` subprocess, one "same tensors" check, one
wait loop that fails with what it waited for."""

from __future__ import annotations

import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# A coordinator a test kills on this machine frees its lease at once (its pid is gone). The timeout
# (60 s by default) is also how long a coordinator may go without renewing before it fences itself:
# 10 s keeps one whose renewal thread is starved on a loaded 2-core machine from stopping its job.
LEASE_TIMEOUT_S = 10.0


def cli_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update(
        {
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
            "PYTHONUNBUFFERED": "1",
            "STAGETRAIN_LEASE_TIMEOUT_S": str(LEASE_TIMEOUT_S),
            **extra,
        }
    )
    return env


def stagetrain(
    *args: str, env: dict | None = None, timeout: float = 600, check: bool = False, input: str | None = None
) -> subprocess.CompletedProcess:
    """``stagetrain ARGS`` as a user runs it (a fresh process), from the repo root."""
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        env=env or cli_env(),
        input=input,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"stagetrain {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def assert_same(a, b, where: str = "state") -> None:
    """Nested state dicts are equal: tensors bit for bit (and dtype), everything else by ``==``."""
    import torch

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def wait_for_http(server, url: str, what: str, timeout: float, interval: float, tail: int) -> None:
    """Until ``url`` answers: ``server`` has ``proc`` (the process just started), ``_log`` (a binary file
    holding its output) and ``stop()``. If the process exits or ``timeout`` passes first, stop it and fail
    with ``what`` and the last ``tail`` characters of its output."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if server.proc.poll() is not None or time.monotonic() > deadline:
            server._log.seek(0)
            output = server._log.read().decode(errors="replace")[-tail:]
            server.stop()
            raise RuntimeError(f"{what} within {timeout:.0f}s:\n{output}")
        time.sleep(interval)


def wait_until(condition, what: str, timeout: float = 60.0, interval: float = 0.05):
    """Poll ``condition`` until it is truthy (returned); fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout:g}s waiting for {what}"
        time.sleep(interval)
    return result
