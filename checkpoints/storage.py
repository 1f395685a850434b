"""One storage module over fsspec: a local folder, ``s3://`` (s3fs), ``memory://``, or any other fsspec URL.

Paths stay ``str`` (``pathlib`` mangles ``s3://``). Credentials and endpoints come from the standard
environment (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL[_S3]``, profiles, instance roles); only the
non-secret ``checkpoint.storage_options`` are passed explicitly, so nothing secret is ever written
into a job record, manifest or log.
"""

from __future__ import annotations

import copy
import fcntl
import functools
import hashlib
import logging
import os
import threading
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


class WriteConflict(RuntimeError):
    """A conditional write (``Storage.write_versioned``) found the object changed since it was read."""


# Exception class names (not imported: botocore, aiohttp and cloud SDKs load only when a URL needs them)
_NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError")
_UNREACHABLE = ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionError")
_DENIED = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied")


def access_problem(exc: BaseException, url: str) -> str | None:
    """What keeps storage ``url`` from being used, in one line, when ``exc`` (or an exception it chains)
    says so: no credentials, an endpoint that cannot be reached, access denied. None otherwise."""
    s3 = url.startswith(("s3://", "s3a://"))
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        names = {k.__name__ for k in type(e).__mro__}
        if names & set(_NO_CREDENTIALS):
            hint = (
                "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE; AWS_ENDPOINT_URL for an "
                "S3-compatible server"
                if s3
                else "configure this filesystem's credentials"
            )
            return f"no credentials found ({hint})"
        if names & set(_UNREACHABLE) or isinstance(e, ConnectionRefusedError | TimeoutError):
            endpoint = (getattr(e, "kwargs", None) or {}).get("endpoint_url")
            where = f" {endpoint}" if endpoint else ""
            hint = " (AWS_ENDPOINT_URL)" if s3 and endpoint else ""
            return f"the endpoint{where}{hint} cannot be reached: {type(e).__name__}"
        if isinstance(e, PermissionError) or names & set(_DENIED):
            return f"access denied ({type(e).__name__}: {e}); check the credentials"
        e = e.__cause__ or e.__context__
    return None


def _missing_package(url: str, exc: ImportError) -> StorageError:
    """fsspec's ImportError for a protocol whose package is absent, as one line naming the package."""
    protocol = url.split("://", 1)[0]
    from fsspec.registry import known_implementations

    impl = known_implementations.get(protocol, {})
    package = impl.get("class", "").split(".", 1)[0]
    if not package:
        return StorageError(f"cannot open storage {url}: {exc}")
    return StorageError(
        f"cannot open storage {url}: the package `{package}` is not installed (pip install {package})"
    )


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


@functools.cache
def _s3_session(profile: str | None = None):
    """The aiobotocore session of this process's S3 clients (one per profile), without botocore's
    ``Expect: 100-continue`` on uploads: aiohttp starts a request's read timeout only once its body is
    sent, and sends the body only after the ``100 Continue``, so a PUT to an endpoint that stopped
    answering waited forever instead of failing after ``read_timeout`` and being retried."""
    from aiobotocore.session import AioSession
    from botocore.handlers import add_expect_header

    class Session(AioSession):
        def __reduce__(self):  # a filesystem pickled for Ray (RunConfig) takes its session along
            return _s3_session, (profile,)

    session = Session(profile=profile)
    session.unregister("before-call.s3", add_expect_header)
    return session


SEGMENTS = ".parts"  # on object stores, <name>.parts/ holds what was appended to <name>
MERGE_SEGMENTS = 64  # segments merged into one part object


class _Appender:
    """One writer's appends to one object-store path (the job's lease makes the coordinator its only
    writer). Each append is a new object ``<path>.parts/<seq>-<writer>.seg``; every ``MERGE_SEGMENTS``
    of them are merged into one ``<first>-<last>-<writer>.part`` (written first, then the segments are
    deleted), so a read is a listing and a few objects. Every byte is sent twice at most."""

    def __init__(self, fs, path: str):
        self.fs, self.folder = fs, path + SEGMENTS
        self.writer = uuid.uuid4().hex[:8]
        try:
            names = [n.rsplit("/", 1)[-1] for n in fs.ls(self.folder, detail=False, refresh=True)]
        except FileNotFoundError:
            names = []
        self.seq = max((_span(n)[1] for n in names if _span(n)), default=-1) + 1
        self.pending: list[tuple[int, bytes]] = []  # segments not merged yet

    def append(self, data: bytes) -> None:
        self.fs.pipe_file(f"{self.folder}/{self.seq:010d}-{self.writer}.seg", data)
        self.pending.append((self.seq, data))
        self.seq += 1
        if len(self.pending) >= MERGE_SEGMENTS:
            first, last = self.pending[0][0], self.pending[-1][0]
            merged = b"".join(d for _, d in self.pending)
            self.fs.pipe_file(f"{self.folder}/{first:010d}-{last:010d}-{self.writer}.part", merged)
            self.fs.rm([f"{self.folder}/{q:010d}-{self.writer}.seg" for q, _ in self.pending])
            self.pending = []


def _span(name: str) -> tuple[int, int, str] | None:
    """(first, last, writer) of a segment or part name; None for anything else."""
    stem, _, kind = name.rpartition(".")
    bits = stem.split("-")
    try:
        if kind == "seg" and len(bits) == 2:
            return int(bits[0]), int(bits[0]), bits[1]
        if kind == "part" and len(bits) == 3:
            return int(bits[0]), int(bits[1]), bits[2]
    except ValueError:
        pass
    return None


def _in_order(names: list[str]) -> list[str]:
    """Segment and part names in append order, without segments a part of their writer holds (a reader
    may list between a merge and the deletion of what it merged)."""
    spans = {n: s for n in names if (s := _span(n))}
    parts = [s for n, s in spans.items() if n.endswith(".part")]
    keep = [
        n
        for n, (first, last, writer) in spans.items()
        if n.endswith(".part") or not any(w == writer and a <= first <= b for a, b, w in parts)
    ]
    return sorted(keep, key=lambda n: spans[n][:2])


class Storage:
    """A root URL and its filesystem: ``Storage("s3://bucket/runs").child("job").read_text("job.json")``."""

    def __init__(self, url: str, options: dict | None = None):
        self.url = url.rstrip("/") or url
        # A deep copy: botocore rewrites a ``config_kwargs.retries`` dict in place, and the caller's
        # dict is usually the spec's ``checkpoint.storage_options`` (hashed into every manifest).
        options = copy.deepcopy(dict(options or {}))
        extra = {}
        if url.startswith(("s3://", "s3a://")):
            options = _s3_options(options)
            if "session" not in options:
                extra["session"] = _s3_session(options.get("profile"))
        self.options = options
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **options, **extra)
        except ImportError as e:
            raise _missing_package(self.url, e) from None
        self.root = self.root.rstrip("/")
        self.local = "file" in (
            self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        )
        self._appenders: dict[str, _Appender] = {}  # object stores: this process's appends, by path

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    def child(self, *parts: str) -> Storage:
        sub = Storage.__new__(Storage)
        sub.url = "/".join([self.url, *parts])
        sub.options, sub.fs, sub.local = self.options, self.fs, self.local
        sub._appenders = self._appenders  # one writer state per path in this process
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
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # on disk before it has the name: a crash leaves old or new
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    def write_text(self, text: str, *parts: str) -> None:
        self.write_bytes(text.encode(), *parts)

    @property
    def s3(self) -> bool:
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        return bool({"s3", "s3a"} & set(protocols))

    @property
    def atomic_versioned(self) -> bool:
        """``write_versioned`` is an atomic compare-and-swap here (a file lock; S3's conditional PUT)."""
        return self.local or self.s3

    def read_versioned(self, *parts: str) -> tuple[bytes, str] | None:
        """An object and its version token (S3: its ETag; elsewhere a hash of its bytes), or None if it
        does not exist. The token is what ``write_versioned`` compares against."""
        path = self.path(*parts)
        try:
            tag = self.fs.info(path).get("ETag") if self.s3 else None
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        return data, tag or hashlib.sha256(data).hexdigest()

    def write_versioned(self, data: bytes, *parts: str, expect: str | None) -> str:
        """Compare-and-swap: write ``data`` only if the object is still at version ``expect`` (None: only
        if it does not exist), else raise ``WriteConflict``. Returns the new version token.

        Local folders: under an exclusive ``flock`` on ``<name>.lock`` beside the object (atomic on one
        host and on file systems with working locks). S3: a conditional PUT (``If-None-Match: *`` /
        ``If-Match: <ETag>``), atomic on AWS S3 and servers that implement it. Other stores have no
        conditional write: the version is compared just before the write, so two writers within one
        request's time can both succeed (callers read back what they wrote)."""
        path = self.path(*parts)
        if self.local:
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            with open(f"{path}.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                current = self.read_versioned(*parts)
                if (current[1] if current else None) != expect:
                    raise WriteConflict(f"{self.url}/{'/'.join(parts)} changed since it was read")
                self.write_bytes(data, *parts)
            return hashlib.sha256(data).hexdigest()
        if self.s3:
            condition = {"mode": "create"} if expect is None else {"IfMatch": expect}
            try:
                out = self.fs.pipe_file(path, data, **condition)
            except (FileExistsError, OSError) as e:
                if isinstance(e, FileExistsError) or "pre-condition" in str(e).lower():
                    raise WriteConflict(f"{self.url}/{'/'.join(parts)} changed since it was read") from e
                raise
            tag = (out or {}).get("ETag") if isinstance(out, dict) else None
            return tag or self.read_versioned(*parts)[1]
        current = self.read_versioned(*parts)
        if (current[1] if current else None) != expect:
            raise WriteConflict(f"{self.url}/{'/'.join(parts)} changed since it was read")
        self.fs.pipe_file(path, data)
        return hashlib.sha256(data).hexdigest()

    def append_text(self, text: str, *parts: str) -> None:
        """Append to a text object. Local files: ``open(..., "a")``, after a newline if a crash left the
        last line torn. Object stores have no append: each append is a new segment object beside it
        (``_Appender``), so it costs its own bytes, never a rewrite of what is there."""
        path = self.path(*parts)
        if self.local:
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            with open(path, "ab+") as f:
                if f.seek(0, os.SEEK_END):
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        text = "\n" + text  # the torn line stays alone (readers skip it)
                f.write(text.encode())
            return
        appender = self._appenders.get(path)
        if appender is None:
            appender = self._appenders[path] = _Appender(self.fs, path)
        appender.append(text.encode())

    def read_appended(self, *parts: str) -> str:
        """What ``append_text`` wrote to ``parts`` (local: the file; object stores: the object, if an
        older version wrote one, then the segments in order). FileNotFoundError if there is nothing."""
        path = self.path(*parts)
        if self.local:
            return self.read_text(*parts)
        pieces = [self.fs.cat_file(path)] if self.fs.exists(path) else []
        names = _in_order(self.listdir(*parts[:-1], parts[-1] + SEGMENTS))
        if names:
            folder = path + SEGMENTS
            got = self.fs.cat([f"{folder}/{n}" for n in names])  # concurrently
            pieces += [got[f"{folder}/{n}"] for n in names]
        elif not pieces:
            raise FileNotFoundError(path)
        return b"".join(pieces).decode()

    def appended_exists(self, *parts: str) -> bool:
        return self.exists(*parts) or (
            not self.local and bool(self.listdir(*parts[:-1], parts[-1] + SEGMENTS))
        )

    def list_appended(self, *parts: str) -> list[str]:
        """Names of the appended objects under ``parts`` (their segment folders by the object's name)."""
        names = {n.removesuffix(SEGMENTS) for n in self.listdir(*parts)}
        return sorted(names)

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

    def bounded(self, timeout_s: float) -> Storage:
        """This storage through a client that sends each request once and gives up on it after
        ``timeout_s`` (to connect, and to read the answer), for callers with a deadline of their own
        that retry themselves (a lease renewal, a pre-flight check). S3 only: elsewhere, this storage."""
        if not self.s3:
            return self
        options = copy.deepcopy(self.options)
        config = options.setdefault("config_kwargs", {})
        config["retries"] = {"max_attempts": 1, "mode": "standard"}
        config["connect_timeout"] = config["read_timeout"] = timeout_s
        sub = Storage(self.url, options)  # a client of its own: fsspec caches instances by options
        sub.fs.retries = 1  # s3fs's own retry loop, on top of botocore's
        return sub

    def check(self, timeout_s: float = 5.0) -> None:
        """Fail at once, in one line, if remote storage cannot be used at all (no credentials, endpoint
        unreachable, access denied): one listing of the root through a client that does not retry and
        waits at most ``timeout_s`` for each answer. Anything else is left to the operation that meets it."""
        if self.local:
            return
        try:
            bounded = self.bounded(timeout_s)
            bounded.fs.ls(bounded.root, detail=False)
        except FileNotFoundError:
            pass  # an empty prefix: fine
        except Exception as e:  # noqa: BLE001 - classified below, else left alone
            problem = access_problem(e, self.url)
            if problem is not None:
                raise StorageError(f"cannot use storage {self.url}: {problem}") from None

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


def within(seconds: float, fn: Callable[[], T], what: str) -> T:
    """``fn()``, or ``TimeoutError`` if it has not returned after ``seconds``: for callers with a deadline
    that retry themselves. A client's timeouts bound each request, not a call (s3fs retries on top of
    them; an fsspec store may have no timeout at all). ``fn`` runs in a daemon thread, left to finish
    or fail on its own when given up on: it must not touch its caller's state."""
    done: list = []

    def run() -> None:
        try:
            done.append((True, fn()))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            done.append((False, e))

    thread = threading.Thread(target=run, name=what, daemon=True)
    thread.start()
    thread.join(seconds)
    if not done:
        raise TimeoutError(f"{what}: no answer within {seconds:.1f}s")
    ok, value = done[0]
    if not ok:
        raise value
    return value


def forwarded_env() -> dict[str, str]:
    """What a job's other processes (Ray workers, a submitted coordinator) get through ``runtime_env``:
    the non-secret storage settings and stagetrain's own ``STAGETRAIN_*`` settings (lease timeout, the
    tests' fault-injection delays...), so that a job behaves the same on a local Ray and on a cluster.
    Not the submission id: each submission sets its own."""
    return {
        k: v
        for k, v in os.environ.items()
        if k in FORWARDED_ENV or (k.startswith("STAGETRAIN_") and k != "STAGETRAIN_SUBMISSION_ID")
    }
