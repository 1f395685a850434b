"""Checkpoints on fsspec storage, with a commit protocol. No torch here: listing, verifying and choosing
"the latest" is bookkeeping that the CLI and the coordinator do without it (``checkpoints.checkpointer``
serialises tensors and saves in the background).

Layout: ``<checkpoints folder>/<tag>/{model.pt, train_state.pt, manifest.json}``, the folder being
``<storage>/<job-id>/checkpoints`` (``service.layout``). Tags sort by step: ``step-000000117``
(periodic) and ``step-000000117-stage-1-end`` (stage boundary).

Commit protocol: the payload files are written first, ``manifest.json`` (sizes and sha256 of every
file) LAST. A folder without a manifest, or whose files do not match it, is not a checkpoint:
listing, ``latest`` and resume skip it, and pruning deletes it once a newer checkpoint is committed.
A new checkpoint is always committed before any old one is deleted.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict

from checkpoints.storage import Storage, retry

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"
# Fault-injection seam for tests: "SECONDS" holds every manifest back that long after its payload is
# written (a window to restart the storage or kill the process in); "SECONDS@STEP" only that step's.
_DELAY, _, _DELAY_STEP = os.environ.get("STAGETRAIN_TEST_COMMIT_DELAY_S", "0").partition("@")
COMMIT_DELAY_S, COMMIT_DELAY_STEP = float(_DELAY), int(_DELAY_STEP) if _DELAY_STEP else None


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
    # the evaluation at ``step`` (val_acc, val_loss, val_top5, ema_val_*), when one ran there: what
    # ``checkpoint.keep_best`` ranks checkpoints by, read back from storage after a resume
    metrics: dict[str, float] | None = None


class CheckpointInfo(BaseModel):
    tag: str
    manifest: Manifest | None
    verified: bool | None  # None: sizes checked only
    problem: str | None = None


def tag_for(step: int, stage: int, boundary: bool) -> str:
    return f"step-{step:09d}" + (f"-stage-{stage}-end" if boundary else "")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class CheckpointStore:
    """Checkpoints of one job: ``Storage`` rooted at its checkpoints folder."""

    def __init__(self, storage: Storage):
        self.storage = storage
        self._verified: dict[str, Manifest] = {}  # committed tags whose bytes hashed right here

    def tags(self) -> list[str]:
        return self.storage.listdir()

    def read_manifest(self, tag: str) -> Manifest | None:
        if not self.storage.exists(tag, MANIFEST):
            return None
        return Manifest.model_validate_json(self.storage.read_bytes(tag, MANIFEST))

    def inspect(self, tag: str, verify: bool = False) -> tuple[CheckpointInfo, dict[str, bytes] | None]:
        """Check one checkpoint: manifest present, files present with the right size, and (``verify``)
        the right sha256. Returns the payload bytes when verified, so a loader reads them once."""
        try:
            manifest = self.read_manifest(tag)
        except Exception as e:  # noqa: BLE001 - a garbled manifest means "not a checkpoint"
            return CheckpointInfo(
                tag=tag, manifest=None, verified=False, problem=f"unreadable manifest: {e}"
            ), None
        if manifest is None:
            return CheckpointInfo(
                tag=tag, manifest=None, verified=False, problem="no manifest (uncommitted)"
            ), None
        payload = {}
        for name, entry in manifest.files.items():
            if not self.storage.exists(tag, name):
                return CheckpointInfo(
                    tag=tag, manifest=manifest, verified=False, problem=f"missing {name}"
                ), None
            if not verify:
                size = self.storage.size(tag, name)
                if size != entry.size:
                    return CheckpointInfo(
                        tag=tag,
                        manifest=manifest,
                        verified=False,
                        problem=f"{name}: {size} bytes, manifest says {entry.size}",
                    ), None
                continue
            data = self.storage.read_bytes(tag, name)
            if len(data) != entry.size or sha256(data) != entry.sha256:
                return CheckpointInfo(
                    tag=tag, manifest=manifest, verified=False, problem=f"{name}: checksum mismatch"
                ), None
            payload[name] = data
        return CheckpointInfo(tag=tag, manifest=manifest, verified=True if verify else None), (
            payload if verify else None
        )

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

    def newest_verified(self) -> Manifest | None:
        """The manifest of ``latest(verify=True)``: what the coordinator hands the workers to restore.
        Each tag's bytes are hashed once per store, not at every look (a coordinator waiting for
        capacity looks every few seconds); a new, newer tag is hashed when it appears."""
        for tag in reversed(self.tags()):
            if tag in self._verified:
                return self._verified[tag]
            info, _ = self.inspect(tag, verify=True)
            if info.problem is None:
                self._verified[tag] = info.manifest
                return info.manifest
            log.warning("skipping checkpoint %s: %s", tag, info.problem)
        return None

    def commit(self, tag: str, files: dict[str, bytes], **meta: Any) -> Manifest:
        """Write ``files``, then the manifest (last). Each write is retried with backoff."""
        for name, data in files.items():
            retry(lambda n=name, d=data: self.storage.write_bytes(d, tag, n), f"upload {tag}/{name}")
        if COMMIT_DELAY_S and COMMIT_DELAY_STEP in (None, meta.get("step")):
            time.sleep(COMMIT_DELAY_S)
        manifest = Manifest(
            tag=tag,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            files={n: FileEntry(size=len(d), sha256=sha256(d)) for n, d in files.items()},
            **meta,
        )
        retry(
            lambda: self.storage.write_text(manifest.model_dump_json(indent=2), tag, MANIFEST),
            f"commit {tag}",
        )
        return manifest

    def best(
        self, metric: str, mode: str, infos: list[CheckpointInfo] | None = None
    ) -> CheckpointInfo | None:
        """The committed checkpoint whose manifest records the best ``metric`` (``mode``: max or min);
        the earliest one on a tie (a later one must do strictly better). ``checkpoint.keep_best``."""
        found = None
        for info in sorted(infos if infos is not None else self.list(), key=_step_key):
            value = (info.manifest.metrics or {}).get(metric) if info.problem is None else None
            if value is None:
                continue
            if found is None or (value > found[0] if mode == "max" else value < found[0]):
                found = (value, info)
        return found[1] if found else None

    def prune(
        self,
        keep_last: int,
        keep_stage_checkpoints: bool,
        protect: frozenset[str] = frozenset(),
        keep_best: tuple[str, str] | None = None,
    ) -> list[str]:
        """Delete old periodic checkpoints beyond ``keep_last`` and uncommitted folders older than the
        newest committed checkpoint, never a tag in ``protect`` (the verified checkpoint the run
        restored from: the newest known good one if a newer one proves corrupt), nor the best evaluated
        one by ``keep_best`` (metric, mode): kept beside the ``keep_last`` newest when it is older. Call
        only after committing a new one."""
        infos = self.list(verify=False)
        committed = [i for i in infos if i.problem is None]
        if not committed:
            return []
        newest = max(i.manifest.step for i in committed)
        best = self.best(*keep_best, infos=committed) if keep_best else None
        if best is not None:
            protect = protect | {best.tag}
        retained = [i for i in committed if not (i.manifest.boundary and keep_stage_checkpoints)]
        doomed = [i.tag for i in sorted(retained, key=lambda i: i.manifest.step)[:-keep_last]]
        doomed += [i.tag for i in infos if i.problem is not None and _step_of(i.tag) < newest]
        doomed = [tag for tag in doomed if tag not in protect]
        for tag in doomed:
            self.storage.remove(tag)
        return doomed


def _step_key(info: CheckpointInfo) -> tuple[int, str]:
    return (info.manifest.step if info.manifest else _step_of(info.tag), info.tag)


def _step_of(tag: str) -> int:
    try:
        return int(tag.split("-")[1])
    except (IndexError, ValueError):
        return -1


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
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
