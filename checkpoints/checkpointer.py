"""Saving and loading training state as checkpoints (``checkpoints.store`` has the commit protocol).

Both payload files load with plain ``torch.load(f, weights_only=True)``: ``model.pt`` is the unwrapped
model's state dict; ``train_state.pt`` holds the other ``state_dict()``s of the worker's flat state
(optimizer, scheduler, RNG, data position), under the same names.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import torch

from checkpoints.store import MODEL_FILE, STATE_FILE, CheckpointStore, Manifest

log = logging.getLogger(__name__)


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


def encode(state: dict[str, Any]) -> dict[str, bytes]:
    """Split a flat checkpoint dict into its payload files."""
    return {
        MODEL_FILE: serialize(state["model"]),
        STATE_FILE: serialize({k: v for k, v in state.items() if k != "model"}),
    }


def decode(payload: dict[str, bytes]) -> dict[str, Any]:
    return {"model": deserialize(payload[MODEL_FILE]), **deserialize(payload[STATE_FILE])}


def load(store: CheckpointStore, tag: str, verify: bool = True) -> tuple[Manifest, dict[str, Any]]:
    """Deserialize a checkpoint: ``{"model": ..., "optimizer": ..., ...}``, its bytes checked against
    the manifest (``verify``: hashed too; without it only sizes, for a tag already verified)."""
    info, payload = store.inspect(tag, verify=True) if verify else store.inspect(tag, verify=False)
    if not verify and info.problem is None:
        payload = {n: store.storage.read_bytes(tag, n) for n in info.manifest.files}
        sizes = {n: len(d) for n, d in payload.items()}
        wrong = [n for n, e in info.manifest.files.items() if sizes[n] != e.size]
        if wrong:
            raise ValueError(f"checkpoint {tag} is not usable: {', '.join(wrong)} changed size")
    if info.problem is not None:
        raise ValueError(f"checkpoint {tag} is not usable: {info.problem}")
    return info.manifest, decode(payload)


class AsyncCheckpointer:
    """Saves from rank 0 without stalling training: ``save`` copies the state to CPU memory (the only
    blocking part), then a background thread serialises, uploads and commits it. The next ``save``
    waits for the previous upload. A failed periodic upload is logged and counted, never fatal;
    ``save(..., block=True)`` (stage boundaries) raises if the commit fails after retries."""

    def __init__(
        self,
        store: CheckpointStore,
        keep_last: int,
        keep_stage_checkpoints: bool,
        keep_best: tuple[str, str] | None = None,
    ):
        self.store, self.keep_last, self.keep_stage = store, keep_last, keep_stage_checkpoints
        self.keep_best = keep_best  # (metric, mode): the best evaluated checkpoint is never pruned
        self.protect: frozenset[str] = frozenset()  # never pruned: the verified tag the run restored
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.failures: list[str] = []
        self.last_committed: Manifest | None = None
        self.stall_s = 0.0
        # (start, end) of each save's blocking copy and (start, end, thread CPU s) of each upload,
        # perf_counter seconds: what bench/checkpoint.py lays over the training steps.
        self.saves: list[tuple[float, float]] = []
        self.uploads: list[tuple[float, float, float]] = []

    def save(self, state: dict[str, Any], tag: str, block: bool = False, **meta: Any) -> None:
        self.wait()
        t0 = time.perf_counter()
        # (Not under torch.set_num_threads(1): it makes copies steadier on overloaded cores, but
        # switching the intra-op pool back costs the training loop ~1 s per save, measured.)
        cpu_state = to_cpu(state)
        t1 = time.perf_counter()
        self.stall_s = t1 - t0
        self.saves.append((t0, t1))
        self._error = None
        self._thread = threading.Thread(
            target=self._upload, args=(cpu_state, tag, meta), daemon=True, name=f"checkpoint-{tag}"
        )
        self._thread.start()
        if block:
            self.wait()
            if self._error is not None:
                raise RuntimeError(f"checkpoint {tag} could not be committed: {self._error}") from self._error

    def _upload(self, cpu_state: dict, tag: str, meta: dict) -> None:
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            self.last_committed = self.store.commit(tag, encode(cpu_state), **meta)
        except BaseException as e:  # noqa: BLE001 - reported to the caller / job record, never lost
            self._error = e
            self.failures.append(f"{tag}: {type(e).__name__}: {e}")
            log.error("checkpoint %s failed: %s", tag, e)
            return
        try:
            self.store.prune(self.keep_last, self.keep_stage, self.protect, self.keep_best)
        except Exception as e:  # noqa: BLE001 - pruning is best-effort side work
            log.warning("pruning old checkpoints failed: %s", e)
        finally:
            self.uploads.append((t0, time.perf_counter(), time.thread_time() - c0))

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
