"""Checkpoints on real storage: every test runs on a local folder and on a real S3 HTTP server (moto in
its own process, ``tests/s3_server.py``). Nothing in s3fs/botocore is mocked; failures are real (a
killed uploader, a stopped server, a flipped byte, a deleted file)."""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import checkpoints.store as checkpoint_store
from checkpoints.checkpointer import AsyncCheckpointer, encode, load
from checkpoints.storage import Storage, retry, within
from checkpoints.store import MANIFEST, MODEL_FILE, STATE_FILE, CheckpointStore, tag_for
from service.jobs import JobRecord, JobStore
from service.plan import build_plan
from tests.conftest import make_spec
from tests.helpers import stagetrain, wait_until
from tests.s3_server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, FlakyProxy, make_bucket

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = "job"


# ------------------------------------------------------------------------------------------ helpers


def job_store(url: str, job_id: str = JOB, options: dict | None = None) -> CheckpointStore:
    return CheckpointStore(Storage(url, options).child(job_id, "checkpoints"))


def meta(step: int, stage: int = 1, boundary: bool = False) -> dict:
    return dict(
        job_id=JOB,
        stage=stage,
        epoch=0,
        step=step,
        samples_seen=64 * step,
        boundary=boundary,
        world_size=1,
        plan_hash="plan",
        stage_hash=f"stage-{stage}",
        spec_hash="spec",
        versions={"torch": torch.__version__},
        git_revision=None,
    )


def small_state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {
        "model": {"w": torch.randn(64, 32, generator=g), "b": torch.zeros(32)},
        "optimizer": {
            "state": {0: {"momentum_buffer": torch.randn(64, 32, generator=g)}},
            "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": [0]}],
        },
        "scheduler": {"step": step},
        "data": {"step": step, "samples_seen": 64 * step},
    }


def commit(store: CheckpointStore, step: int, stage: int = 1, boundary: bool = False) -> str:
    tag = tag_for(step, stage, boundary)
    store.commit(tag, encode(small_state(step)), **meta(step, stage, boundary))
    return tag


def write_payload_only(store: CheckpointStore, step: int, stage: int = 1) -> str:
    """What an upload that died before its manifest leaves behind."""
    tag = tag_for(step, stage, False)
    for name, data in encode(small_state(step)).items():
        store.storage.write_bytes(data, tag, name)
    return tag


def flip_byte(store: CheckpointStore, tag: str, name: str) -> None:
    data = bytearray(store.storage.read_bytes(tag, name))
    data[len(data) // 2] ^= 0xFF
    store.storage.write_bytes(bytes(data), tag, name)


def all_objects(url: str) -> dict[str, bytes]:
    """Every object under the storage root (for S3: the whole bucket)."""
    storage = Storage(url)
    root = storage.root.split("/")[0] if url.startswith("s3://") else storage.root
    return {p: storage.fs.cat_file(p) for p in storage.fs.find(root)}


def assert_no_secrets(blobs: dict[str, bytes]) -> None:
    assert blobs
    for name, data in blobs.items():
        for secret in (ACCESS_KEY_ID, SECRET_ACCESS_KEY):
            assert secret.encode() not in data, f"{secret!r} leaked into {name}"


class CheckedStore(CheckpointStore):
    """A store that checks, each time the checkpointer prunes, that the checkpoint it just saved is
    already committed and verifies: nothing is deleted before its replacement exists."""

    def __init__(self, storage: Storage):
        super().__init__(storage)
        self.checkpointer: AsyncCheckpointer | None = None
        self.prunes: list[str] = []

    def prune(
        self, keep_last: int, keep_stage_checkpoints: bool, protect=frozenset(), keep_best=None
    ) -> list[str]:
        new = self.checkpointer.last_committed.tag
        info, _ = self.inspect(new, verify=True)
        assert info.problem is None, f"pruning before {new} is committed: {info.problem}"
        self.prunes.append(new)
        return super().prune(keep_last, keep_stage_checkpoints, protect, keep_best)


def checked(
    url: str, job_id: str = JOB, keep_last: int = 2, keep_stage: bool = True, options: dict | None = None
) -> tuple[CheckedStore, AsyncCheckpointer]:
    store = CheckedStore(Storage(url, options).child(job_id, "checkpoints"))
    store.checkpointer = AsyncCheckpointer(store, keep_last, keep_stage)
    return store, store.checkpointer


# ------------------------------------------------------------------------------ commit protocol


def test_folder_without_manifest_is_not_a_checkpoint(storage_url):
    store = job_store(storage_url)
    assert store.latest() is None
    orphan_only = write_payload_only(store, 3)
    assert store.latest() is None
    good = commit(store, 5)
    orphan = write_payload_only(store, 10)
    assert store.tags() == [orphan_only, good, orphan]
    info, payload = store.inspect(orphan, verify=True)
    assert info.problem == "no manifest (uncommitted)" and payload is None
    for verify in (False, True):
        assert store.latest(verify=verify)[0].tag == good
        assert [i.problem is None for i in store.list(verify=verify)] == [False, True, False]
    with pytest.raises(ValueError, match="no manifest"):
        load(store, orphan)


# Run as a separate process and SIGKILLed mid-upload: ~72 MB, so the upload takes long enough to hit.
UPLOADER = r"""
import json, sys, torch
from checkpoints.checkpointer import encode
from checkpoints.storage import Storage
from checkpoints.store import CheckpointStore
url, job_id, tag, meta = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
store = CheckpointStore(Storage(url).child(job_id, "checkpoints"))
files = encode({"model": {"w": torch.rand(12_000_000)}, "optimizer": {"m": torch.rand(6_000_000)}})
print("uploading", flush=True)
store.commit(tag, files, **meta)
print("committed", flush=True)
"""


def test_upload_killed_midway_leaves_no_manifest(storage_url):
    store, ckpt = checked(storage_url)
    ckpt.save(small_state(5), tag_for(5, 1, False), block=True, **meta(5))
    killed = tag_for(10, 1, False)
    proc = subprocess.Popen(
        [sys.executable, "-c", UPLOADER, storage_url, JOB, killed, json.dumps(meta(10))],
        cwd=REPO,
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "uploading", proc.stderr.read()
        # The first bytes of the checkpoint are on storage (a temporary file locally, model.pt on S3).
        local = not storage_url.startswith("s3://")
        wait_until(
            lambda: store.storage.listdir(killed) or proc.poll() is not None,
            "the upload to start",
            interval=0 if local else 0.01,
        )
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "the uploader finished before it could be killed"

    store.storage.fs.invalidate_cache()  # look at storage, not at what this process listed while polling
    assert killed in store.tags()
    assert store.inspect(killed)[0].problem == "no manifest (uncommitted)"
    assert not store.storage.exists(killed, MANIFEST)
    assert store.latest(verify=True)[0].tag == tag_for(5, 1, False)

    # The next committed checkpoint prunes the dead upload's folder (it is older).
    ckpt.save(small_state(15), tag_for(15, 1, False), block=True, **meta(15))
    assert store.tags() == [tag_for(5, 1, False), tag_for(15, 1, False)]


def test_corrupt_payload_is_detected_and_skipped(storage_url):
    store = job_store(storage_url)
    good, bad = commit(store, 5), commit(store, 10)
    flip_byte(store, bad, MODEL_FILE)

    info, payload = store.inspect(bad, verify=True)
    assert info.problem == f"{MODEL_FILE}: checksum mismatch" and info.verified is False and payload is None
    # Without verify only sizes are checked: a same-size corruption passes (that is what --verify is for).
    assert store.inspect(bad, verify=False)[0].problem is None
    assert [(i.tag, i.problem) for i in store.list(verify=True)] == [
        (good, None),
        (bad, f"{MODEL_FILE}: checksum mismatch"),
    ]
    manifest, payload = store.latest(verify=True)
    assert manifest.tag == good and set(payload) == {MODEL_FILE, STATE_FILE}
    with pytest.raises(ValueError, match="checksum mismatch"):
        load(store, bad)

    # A garbled manifest is "not a checkpoint" too, not a crash.
    store.storage.write_text("{not json", good, MANIFEST)
    assert store.inspect(good)[0].problem.startswith("unreadable manifest")
    assert store.latest(verify=True) is None


def test_manifest_pointing_at_missing_file_is_skipped(storage_url):
    store = job_store(storage_url)
    good, broken = commit(store, 5), commit(store, 10)
    store.storage.remove(broken, STATE_FILE)
    for verify in (False, True):
        assert store.inspect(broken, verify=verify)[0].problem == f"missing {STATE_FILE}"
        assert store.latest(verify=verify)[0].tag == good
    with pytest.raises(ValueError, match=f"missing {STATE_FILE}"):
        load(store, broken)


def test_prune_keeps_last_periodic_and_stage_boundaries(storage_url):
    store, ckpt = checked(storage_url, keep_last=2, keep_stage=True)

    def save(step: int, stage: int, boundary: bool = False) -> str:
        tag = tag_for(step, stage, boundary)
        ckpt.save(small_state(step), tag, block=boundary, **meta(step, stage, boundary))
        return tag

    t5 = save(5, 1)
    ckpt.wait()
    died = write_payload_only(store, 7)  # an upload that died: older than the next commit
    in_flight = write_payload_only(store, 90, 3)  # newer than anything committed: maybe still uploading
    t10 = save(10, 1)
    ckpt.wait()
    assert store.tags() == [t5, t10, in_flight]  # the dead one went, only after t10 was committed
    b16 = save(16, 1, boundary=True)
    t20, t25, t30 = save(20, 2), save(25, 2), save(30, 2)
    b32 = save(32, 2, boundary=True)
    assert store.tags() == [b16, t25, t30, b32, in_flight]
    assert store.prunes == [t5, t10, b16, t20, t25, t30, b32] and died not in store.tags()
    assert ckpt.failures == []

    # Without keep_stage_checkpoints, stage boundaries count against keep_last like the rest.
    store2, ckpt2 = checked(storage_url, job_id="job-2", keep_last=2, keep_stage=False)
    for step, stage, boundary in [(5, 1, False), (16, 1, True), (20, 2, False), (32, 2, True)]:
        ckpt2.save(
            small_state(step), tag_for(step, stage, boundary), block=True, **meta(step, stage, boundary)
        )
    assert store2.tags() == [tag_for(20, 2, False), tag_for(32, 2, True)]


def test_keep_best_is_kept_apart_and_never_pruned(tmp_path):
    """checkpoint.keep_best: the checkpoint whose manifest records the best metric survives keep_last=1
    (earliest on a tie), and a fresh store (a resumed run) finds it again from the manifests."""
    store, ckpt = checked(str(tmp_path), keep_last=1, keep_stage=False)
    ckpt.keep_best = ("val_acc", "max")

    def save(step: int, acc: float | None, boundary: bool = False) -> str:
        tag = tag_for(step, 1, boundary)
        metrics = None if acc is None else {"val_acc": acc, "val_loss": 1 - acc}
        ckpt.save(small_state(step), tag, block=True, metrics=metrics, **meta(step, 1, boundary))
        return tag

    t5, t10 = save(5, 0.3), save(10, 0.5)
    assert store.tags() == [t10]  # the best is also the newest: one checkpoint does for both
    t15 = save(15, None)  # a periodic checkpoint without an evaluation
    assert store.tags() == [t10, t15]
    t20 = save(20, 0.5)  # a tie: the earlier one stays the best
    assert store.tags() == [t10, t20] and t5 not in store.tags() and t15 not in store.tags()
    b25 = save(25, 0.4, boundary=True)
    assert store.tags() == [t10, b25]
    assert ckpt.failures == []
    again = job_store(str(tmp_path))  # what a resumed run or `export --best` sees
    assert again.best("val_acc", "max").tag == t10
    assert again.best("val_loss", "min").tag == t10 and again.best("val_acc", "min").tag == b25
    assert again.best("val_top5", "max") is None
    assert again.read_manifest(t10).metrics == {"val_acc": 0.5, "val_loss": 0.5}


# --------------------------------------------------------------------------------- failed upload


FAST_FAIL = {"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 10}}


@contextlib.contextmanager
def outage(storage_url: str, request, store: CheckpointStore, ckpt: AsyncCheckpointer, tag: str, state: dict):
    """Start saving ``state`` as ``tag`` (periodic) while storage goes away for real. S3: the server is
    stopped once the first file is up, mid-upload, and restarted (empty) on exit. Local: a plain file
    stands where the checkpoints folder was."""
    if storage_url.startswith("s3://"):
        server = request.getfixturevalue("s3_server")
        ckpt.save(state, tag, **meta(10))
        wait_until(lambda: store.storage.listdir(tag), "the first file of the upload", interval=0.01)
        server.stop()
        try:
            yield
        finally:
            server.start()
            make_bucket(server, storage_url.split("/")[2])
    else:
        folder = store.storage.path()
        os.rename(folder, folder + ".aside")
        store.storage.write_text("in the way")
        try:
            ckpt.save(state, tag, **meta(10))
            yield
        finally:
            ckpt.wait()
            os.remove(folder)
            os.rename(folder + ".aside", folder)


def test_failed_upload_never_commits(storage_url, request, monkeypatch, caplog):
    monkeypatch.setattr(checkpoint_store, "retry", functools.partial(retry, attempts=2, base_delay=0.05))
    s3 = storage_url.startswith("s3://")
    store, ckpt = checked(storage_url, options=FAST_FAIL if s3 else None)
    first = tag_for(5, 1, False)
    ckpt.save(small_state(5), first, block=True, **meta(5))
    failed, boundary = tag_for(10, 1, False), tag_for(12, 1, True)
    big = {"model": {"w": torch.rand(12_000_000)}, "optimizer": {"m": torch.rand(12_000_000)}}

    t0 = time.monotonic()
    with outage(storage_url, request, store, ckpt, failed, big):
        ckpt.wait()  # a periodic save: the failure is recorded, not raised
        assert len(ckpt.failures) == 1 and ckpt.failures[0].startswith(f"{failed}: ")
        assert ckpt.last_committed.tag == first
        with pytest.raises(RuntimeError, match=f"checkpoint {boundary} could not be committed"):
            ckpt.save(small_state(12), boundary, block=True, **meta(12, 1, True))
        assert len(ckpt.failures) == 2 and ckpt.failures[1].startswith(f"{boundary}: ")
    assert time.monotonic() - t0 < 60
    assert store.prunes == [first]  # nothing is pruned after a failed commit
    if not s3:  # (a restarted moto server is empty: nothing to look at)
        assert store.tags() == [first]
        assert store.latest(verify=True)[0].tag == first

    # Storage is back: the next save commits. Nothing secret went into the failure messages (they
    # end up in the job record) or the log.
    ckpt.save(small_state(15), tag_for(15, 1, False), block=True, **meta(15))
    assert store.latest(verify=True)[0].tag == tag_for(15, 1, False)
    assert store.tags() == ([first] if not s3 else []) + [tag_for(15, 1, False)]
    assert_no_secrets({"failures": "\n".join(ckpt.failures).encode(), "log": caplog.text.encode()})


def test_storage_options_are_not_mutated(storage_url):
    """botocore rewrites a ``retries`` dict in place; the spec's storage_options (hashed into every
    manifest as spec_hash) must not change because a Storage was built from them."""
    options = {"config_kwargs": {"retries": {"max_attempts": 3}}} if storage_url.startswith("s3://") else {}
    spec = make_spec(checkpoint={"storage": storage_url, "storage_options": options})
    before, spec_hash = copy.deepcopy(spec.checkpoint.storage_options), spec.spec_hash()
    Storage(storage_url, spec.checkpoint.storage_options).probe()
    assert spec.checkpoint.storage_options == before and spec.spec_hash() == spec_hash


@pytest.mark.s3
def test_an_s3_upload_to_an_endpoint_that_stops_answering_fails_after_the_read_timeout(
    s3_url, s3_server, monkeypatch
):
    """An endpoint that takes connections and never answers: each upload fails after ``read_timeout``
    (1 s here, one attempt) and the caller's retry can act. With botocore's ``Expect: 100-continue`` an
    upload waited forever (aiohttp starts the read timeout only once the body is sent, after the
    100): ``within`` gives up on it after 20 s and the test fails."""
    proxy = FlakyProxy(s3_server.port)
    proxy.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    store = Storage(s3_url, {"config_kwargs": {"read_timeout": 1, "retries": {"max_attempts": 1}}})
    store.write_bytes(b"x", "f")  # answered
    threading.Thread(target=proxy.mute, args=(60,), daemon=True).start()
    wait_until(lambda: proxy.muted, "the proxy to mute", timeout=5)
    try:
        for _ in range(2):  # the first may meet the connection the mute cut; the second is a new one
            with pytest.raises(Exception) as failed:
                within(20, lambda: store.write_bytes(b"y" * 100_000, "f"), "an upload")
            assert "no answer within" not in str(failed.value)
    finally:
        proxy.close()


# ------------------------------------------------------------------------------------------ CLI


def test_cli_lists_and_verifies_checkpoints_without_leaking_secrets(storage_url):
    spec = make_spec(checkpoint={"storage": storage_url})
    JobStore(Storage(storage_url), JOB).save(JobRecord.create(JOB, spec, build_plan(spec, 4096)))
    store = job_store(storage_url)
    good, bad = commit(store, 5), commit(store, 16, 1, boundary=True)
    flip_byte(store, bad, STATE_FILE)

    listed = stagetrain("checkpoints", JOB, "--storage", storage_url)
    assert listed.returncode == 0, listed.stderr
    assert good in listed.stdout and bad in listed.stdout and listed.stdout.count("sizes ok") == 2

    verified = stagetrain("checkpoints", JOB, "--storage", storage_url, "--verify")
    assert verified.returncode == 1, verified.stdout + verified.stderr
    rows = {line.split()[1]: line for line in verified.stdout.splitlines() if "step-" in line}
    assert set(rows) == {good, bad}
    assert "yes" in rows[good] and f"no: {STATE_FILE}: checksum mismatch" in rows[bad]

    assert_no_secrets(
        {
            **all_objects(storage_url),
            "cli": (listed.stdout + listed.stderr + verified.stdout + verified.stderr).encode(),
        }
    )
