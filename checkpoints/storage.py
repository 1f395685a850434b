"""One storage module over fsspec: a local folder, ``s3://`` (s3fs), ``memory://``, or any other fsspec URL.

Paths stay ``str`` (``pathlib`` mangles ``s3://``). Credentials and endpoints come from the standard
environment (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL[_S3]``, profiles, instance roles); only the
non-secret ``checkpoint.storage_options`` are passed explicitly, so nothing secret is ever written
into a job record, manifest or log.
"""

from __future__ import annotations

import copy
import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

import fsspec

log = logging.getLogger(__name__)
T = TypeVar("T")

# Settings a Ray worker on another node needs to reach the same storage; secrets are deliberately
# absent (nodes get credentials from their own environment: instance role, IRSA, a mounted profile).
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE")


class StorageError(RuntimeError):
    pass


def _s3_options(options: dict) -> dict:
    """s3fs reads credentials itself, but not AWS_ENDPOINT_URL[_S3] in every version; add it, and
    let botocore retry transient errors with backoff (``standard`` mode, 5 attempts)."""
    opts = dict(options)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and "endpoint_url" not in opts and "endpoint_url" not in opts.get("client_kwargs", {}):
        opts["endpoint_url"] = endpoint
    config = dict(opts.pop("config_kwargs", {}))
    config.setdefault("retries", {"max_attempts": 5, "mode": "standard"})
    opts["config_kwargs"] = config
    return opts


class Storage:
    """A root URL and its filesystem: ``Storage("s3://bucket/runs").child("job").read_text("job.json")``."""

    def __init__(self, url: str, options: dict | None = None):
        self.url = url.rstrip("/") or url
        # A deep copy: botocore rewrites a ``config_kwargs.retries`` dict in place, and the caller's
        # dict is usually the spec's ``checkpoint.storage_options`` (hashed into every manifest).
        options = copy.deepcopy(dict(options or {}))
        if url.startswith(("s3://", "s3a://")):
            options = _s3_options(options)
        self.options = options
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **options)
        self.root = self.root.rstrip("/")
        self.local = "file" in (
            self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        )

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    def child(self, *parts: str) -> Storage:
        sub = Storage.__new__(Storage)
        sub.url = "/".join([self.url, *parts])
        sub.options, sub.fs, sub.local = self.options, self.fs, self.local
        sub.root = "/".join([self.root, *parts])
        return sub

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def read_bytes(self, *parts: str) -> bytes:
        return self.fs.cat_file(self.path(*parts))

    def read_text(self, *parts: str) -> str:
        return self.read_bytes(*parts).decode()

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Write a whole object. Local files are written to a temporary name and renamed, so a
        reader never sees half a file; an object store PUT is atomic already."""
        path = self.path(*parts)
        if self.local:
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    def write_text(self, text: str, *parts: str) -> None:
        self.write_bytes(text.encode(), *parts)

    def append_text(self, text: str, *parts: str) -> None:
        path = self.path(*parts)
        if self.local:
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            with open(path, "a") as f:
                f.write(text)
        else:  # object stores have no append: read-modify-write (metrics files are small)
            old = self.fs.cat_file(path) if self.fs.exists(path) else b""
            self.fs.pipe_file(path, old + text.encode())

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def listdir(self, *parts: str) -> list[str]:
        """Names (not paths) directly under ``parts``; empty if it does not exist."""
        path = self.path(*parts)
        try:
            entries = (
                self.fs.ls(path, detail=False, refresh=True)
                if not self.local
                else self.fs.ls(path, detail=False)
            )
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != path)

    def size(self, *parts: str) -> int:
        return self.fs.size(self.path(*parts))

    def remove(self, *parts: str) -> None:
        path = self.path(*parts)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def probe(self) -> None:
        """Prove the storage is writable before any compute is spent (as Ray Train does)."""
        name = f".probe-{uuid.uuid4().hex[:8]}"
        try:
            self.write_text("ok", name)
            assert self.read_text(name) == "ok"
            self.remove(name)
        except Exception as e:  # noqa: BLE001 - the message below is what the user needs
            raise StorageError(
                f"cannot write to storage {self.url}: {type(e).__name__}: {e}. Check the URL, that the "
                "bucket "
                "exists, and the credentials in the environment (AWS_ACCESS_KEY_ID / AWS_PROFILE / "
                "AWS_ENDPOINT_URL for S3-compatible servers)."
            ) from e


def retry(fn: Callable[[], T], what: str, attempts: int = 3, base_delay: float = 1.0) -> T:
    """Call ``fn``, retrying any exception with exponential backoff; the last failure propagates."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - storage clients raise many types for transient faults
            if attempt == attempts:
                raise
            delay = base_delay * 2 ** (attempt - 1)
            log.warning(
                "%s failed (%s: %s); retry %d/%d in %.1fs",
                what,
                type(e).__name__,
                e,
                attempt,
                attempts - 1,
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def forwarded_env() -> dict[str, str]:
    """Non-secret storage settings to hand to Ray workers through ``runtime_env``."""
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
