"""Checkpoints on fsspec storage, with a commit protocol.

Layout: ``<storage>/<job-id>/checkpoints/<tag>/{model.pt, train_state.pt, manifest.json}``.
Tags sort by step: ``step-000000117`` (periodic) and ``step-000000117-stage-1-end`` (stage boundary).

Commit protocol: the payload files are written first, ``manifest.json`` (sizes and sha256 of every
file) LAST. A folder without a manifest, or whose files do not match it, is not a checkpoint:
listing, ``latest`` and resume skip it, and pruning deletes it once a newer checkpoint is committed.
A new checkpoint is always committed before any old one is deleted.

Both payload files load with plain ``torch.load(f, weights_only=True)``:
``model.pt`` is the unwrapped model's state dict; ``train_state.pt`` holds optimizer, scheduler,
grad scaler, RNG, data position and progress, each a ``state_dict()``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, Protocol

import torch
from pydantic import BaseModel, ConfigDict

from checkpoints.storage import Storage, retry

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"
CHECKPOINTS_DIR = "checkpoints"
COMMIT_DELAY_S = float(os.environ.get("STAGETRAIN_TEST_COMMIT_DELAY_S", "0"))


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state_dict: dict) -> Any: ...


class FileEntry(BaseModel):
    size: int
    sha256: str


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = 1
    job_id: str
    tag: str
    stage: int  # 1-based
    epoch: int
    step: int  # optimizer steps completed = the next step to run
    samples_seen: int
    boundary: bool  # written at the end of ``stage``
    world_size: int
    plan_hash: str
    stage_hash: str
    spec_hash: str
    created: str
    versions: dict[str, str]
    git_revision: str | None = None
    files: dict[str, FileEntry]


class CheckpointInfo(BaseModel):
    tag: str
    manifest: Manifest | None
    verified: bool | None  # None: sizes checked only
    problem: str | None = None


def tag_for(step: int, stage: int, boundary: bool) -> str:
    return f"step-{step:09d}" + (f"-stage-{stage}-end" if boundary else "")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def to_cpu(obj: Any) -> Any:
    """A detached CPU copy of every tensor in a nested state dict (a copy even for CPU tensors:
    training keeps mutating the originals while the upload runs)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, Mapping):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def serialize(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def deserialize(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


class CheckpointStore:
    """Checkpoints of one job: ``Storage`` rooted at ``<storage>/<job-id>``."""

    def __init__(self, job_storage: Storage):
        self.storage = job_storage

    def tags(self) -> list[str]:
        return self.storage.listdir(CHECKPOINTS_DIR)

    def read_manifest(self, tag: str) -> Manifest | None:
        if not self.storage.exists(CHECKPOINTS_DIR, tag, MANIFEST):
            return None
        return Manifest.model_validate_json(self.storage.read_bytes(CHECKPOINTS_DIR, tag, MANIFEST))

    def inspect(self, tag: str, verify: bool = False) -> tuple[CheckpointInfo, dict[str, bytes] | None]:
        """Check one checkpoint: manifest present, files present with the right size, and (``verify``)
        the right sha256. Returns the payload bytes when verified, so a loader reads them once."""
        try:
            manifest = self.read_manifest(tag)
        except Exception as e:  # noqa: BLE001 - a garbled manifest means "not a checkpoint"
            return CheckpointInfo(tag=tag, manifest=None, verified=False, problem=f"unreadable manifest: {e}"), None
        if manifest is None:
            return CheckpointInfo(tag=tag, manifest=None, verified=False, problem="no manifest (uncommitted)"), None
        payload = {}
        for name, entry in manifest.files.items():
            if not self.storage.exists(CHECKPOINTS_DIR, tag, name):
                return CheckpointInfo(tag=tag, manifest=manifest, verified=False, problem=f"missing {name}"), None
            if not verify:
                size = self.storage.size(CHECKPOINTS_DIR, tag, name)
                if size != entry.size:
                    return CheckpointInfo(tag=tag, manifest=manifest, verified=False,
                                          problem=f"{name}: {size} bytes, manifest says {entry.size}"), None
                continue
            data = self.storage.read_bytes(CHECKPOINTS_DIR, tag, name)
            if len(data) != entry.size or _sha256(data) != entry.sha256:
                return CheckpointInfo(tag=tag, manifest=manifest, verified=False,
                                      problem=f"{name}: checksum mismatch"), None
            payload[name] = data
        return CheckpointInfo(tag=tag, manifest=manifest, verified=True if verify else None), (payload if verify else None)

    def list(self, verify: bool = False) -> list[CheckpointInfo]:
        return [self.inspect(tag, verify)[0] for tag in self.tags()]

    def latest(self, verify: bool = True) -> tuple[Manifest, dict[str, bytes] | None] | None:
        """The newest committed checkpoint that checks out -- the one source of truth for resume.
        Newer folders that fail the check (uncommitted, corrupt) are skipped with a warning."""
        for tag in reversed(self.tags()):
            info, payload = self.inspect(tag, verify)
            if info.problem is None:
                return info.manifest, payload
            log.warning("skipping checkpoint %s: %s", tag, info.problem)
        return None

    def load(self, tag: str) -> tuple[Manifest, dict[str, Any]]:
        """Verify and deserialize a checkpoint: ``{"model": ..., "optimizer": ..., ...}``."""
        info, payload = self.inspect(tag, verify=True)
        if info.problem is not None:
            raise ValueError(f"checkpoint {tag} is not usable: {info.problem}")
        return info.manifest, decode(payload)

    def commit(self, tag: str, files: dict[str, bytes], **meta: Any) -> Manifest:
        """Write ``files``, then the manifest (last). Each write is retried with backoff."""
        for name, data in files.items():
            retry(lambda n=name, d=data: self.storage.write_bytes(d, CHECKPOINTS_DIR, tag, n), f"upload {tag}/{name}")
        if COMMIT_DELAY_S:  # fault-injection seam for tests: widen the window before the manifest lands
            time.sleep(COMMIT_DELAY_S)
        manifest = Manifest(
            tag=tag, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            files={n: FileEntry(size=len(d), sha256=_sha256(d)) for n, d in files.items()}, **meta,
        )
        retry(lambda: self.storage.write_text(manifest.model_dump_json(indent=2), CHECKPOINTS_DIR, tag, MANIFEST),
              f"commit {tag}")
        return manifest

    def prune(self, keep_last: int, keep_stage_checkpoints: bool) -> list[str]:
        """Delete old periodic checkpoints beyond ``keep_last`` and uncommitted folders older than the
        newest committed checkpoint. Call only after committing a new one."""
        infos = self.list(verify=False)
        committed = [i for i in infos if i.problem is None]
        if not committed:
            return []
        newest = max(i.manifest.step for i in committed)
        retained = [i for i in committed if not (i.manifest.boundary and keep_stage_checkpoints)]
        doomed = [i.tag for i in sorted(retained, key=lambda i: i.manifest.step)[:-keep_last]]
        doomed += [i.tag for i in infos if i.problem is not None and _step_of(i.tag) < newest]
        for tag in doomed:
            self.storage.remove(CHECKPOINTS_DIR, tag)
        return doomed


def _step_of(tag: str) -> int:
    try:
        return int(tag.split("-")[1])
    except (IndexError, ValueError):
        return -1


def encode(state: dict[str, Any]) -> dict[str, bytes]:
    """Split a flat checkpoint dict into its payload files."""
    return {MODEL_FILE: serialize(state["model"]),
            STATE_FILE: serialize({k: v for k, v in state.items() if k != "model"})}


def decode(payload: dict[str, bytes]) -> dict[str, Any]:
    return {"model": deserialize(payload[MODEL_FILE]), **deserialize(payload[STATE_FILE])}


class AsyncCheckpointer:
    """Saves from rank 0 without stalling training: ``save`` copies the state to CPU memory (the only
    blocking part), then a background thread serialises, uploads and commits it. The next ``save``
    waits for the previous upload. A failed periodic upload is logged and counted, never fatal;
    ``save(..., block=True)`` (stage boundaries) raises if the commit fails after retries."""

    def __init__(self, store: CheckpointStore, keep_last: int, keep_stage_checkpoints: bool):
        self.store, self.keep_last, self.keep_stage = store, keep_last, keep_stage_checkpoints
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.failures: list[str] = []
        self.last_committed: Manifest | None = None
        self.stall_s = 0.0

    def save(self, state: dict[str, Any], tag: str, block: bool = False, **meta: Any) -> None:
        self.wait()
        t0 = time.perf_counter()
        # (Not under torch.set_num_threads(1): it makes copies steadier on overloaded cores, but
        # switching the intra-op pool back costs the training loop ~1 s per save, measured.)
        cpu_state = to_cpu(state)
        self.stall_s = time.perf_counter() - t0
        self._error = None
        self._thread = threading.Thread(target=self._upload, args=(cpu_state, tag, meta), daemon=True,
                                        name=f"checkpoint-{tag}")
        self._thread.start()
        if block:
            self.wait()
            if self._error is not None:
                raise RuntimeError(f"checkpoint {tag} could not be committed: {self._error}") from self._error

    def _upload(self, cpu_state: dict, tag: str, meta: dict) -> None:
        try:
            self.last_committed = self.store.commit(tag, encode(cpu_state), **meta)
        except BaseException as e:  # noqa: BLE001 - reported to the caller / job record, never lost
            self._error = e
            self.failures.append(f"{tag}: {type(e).__name__}: {e}")
            log.error("checkpoint %s failed: %s", tag, e)
            return
        try:
            self.store.prune(self.keep_last, self.keep_stage)
        except Exception as e:  # noqa: BLE001 - pruning is best-effort side work
            log.warning("pruning old checkpoints failed: %s", e)

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def package_versions() -> dict[str, str]:
    """Versions from the installed metadata: nothing is imported (ray takes seconds, and may be absent)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "ray"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def git_revision() -> str | None:
    import subprocess
    from pathlib import Path

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None

