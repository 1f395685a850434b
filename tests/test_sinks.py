"""The MLflow and W&B metric sinks on real components: a real ``mlflow server`` on 127.0.0.1 (SQLite
backend) read back with ``MlflowClient``, and W&B in offline mode read back from its own run file. Each
test runs a first coordinator's records, then a second coordinator continuing the job from step 3."""

from __future__ import annotations

import json
import math
import os
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from checkpoints.storage import Storage
from service.jobs import EvalRecord, JobStore, StageEnd, StepRecord
from service.spec import SpecError, validate_spec
from tests.conftest import BASE_SPEC, make_spec, merge
from tests.helpers import wait_for_http
from tests.s3_server import _free_port

NO_PHONING_HOME = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


class MLflowServer:
    """``mlflow server`` from this interpreter's environment: one worker, a SQLite backend and an artifact
    folder under ``root``, no telemetry, no job runner. It starts a uvicorn child, so it gets its own
    process group and ``stop()`` ends the group."""

    def __init__(self, root: str, port: int):
        self.port = port
        self.uri = f"http://127.0.0.1:{port}"
        self.root = root
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile()

    def start(self, timeout: float = 90.0) -> None:
        assert self.proc is None, "already running"
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "mlflow", "server"),
                *("--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"),
                *("--backend-store-uri", f"sqlite:///{self.root}/mlflow.db"),
                *("--default-artifact-root", f"{self.root}/artifacts"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **NO_PHONING_HOME, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            start_new_session=True,
        )
        what = f"mlflow server on port {self.port} did not answer /health"
        wait_for_http(self, f"{self.uri}/health", what, timeout, interval=0.1, tail=3000)

    def stop(self) -> None:
        """Terminate the server and its children. Safe to call when stopped."""
        if self.proc is None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # the group it leads (start_new_session)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A running server, with ``MLFLOW_TRACKING_URI`` pointing at it for the module's tests."""
    server = MLflowServer(str(tmp_path_factory.mktemp("mlflow")), _free_port())
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**NO_PHONING_HOME, "MLFLOW_TRACKING_URI": server.uri}.items():
            mp.setenv(key, value)
        mp.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        server.start()
        try:
            yield server
        finally:
            server.stop()
            server._log.close()


def record(k: int, stage: int, loss: float) -> StepRecord:
    return StepRecord(
        step=k,
        stage=stage,
        epoch=0,
        samples_seen=8 * (k + 1),
        loss=loss,
        lr=0.1 * stage + 0.01 * k,
        momentum=0.9,
        resolution=8 * (stage + 1),
        global_batch=8 * stage,
        workers=1,
        grad_accum=1,
        images_per_s=10.0,
        time=1e9 + k,
    )


def two_coordinators(sink, jobs, spec, between=lambda first: None) -> None:
    """The first writes stage 1 (steps 0-4, loss 1, an evaluation after step 2 reported after step 4)
    and its end, and stops without closing (then ``between(first)``); the second continues from the
    checkpoint at step 3: steps 3-4 again (loss 2), the same stage end, then stage 2 (steps 5-6, loss 3)
    and its end."""
    first = sink(jobs, spec, start_step=0)
    evaluation = EvalRecord(
        step=3, stage=1, samples_seen=24, resolution=16, val_loss=1.1, val_acc=0.4, time=2e9
    )
    first.write(
        [record(k, 1, 1.0) for k in range(5)]
        + [evaluation, StageEnd(stage=1, step=5, val_acc=0.5, val_loss=1.0)]
    )
    between(first)
    second = sink(jobs, spec, start_step=3)
    second.write([record(k, 1, 2.0) for k in (3, 4)] + [StageEnd(stage=1, step=5, val_acc=0.6, val_loss=0.9)])
    second.write([record(k, 2, 3.0) for k in (5, 6)] + [StageEnd(stage=2, step=7, val_acc=0.7, val_loss=0.8)])
    second.close()


def test_mlflow_sink_continues_one_run_per_job(mlflow_server, tmp_path):
    """One run for the job, found again by its tag; the steps the second coordinator re-runs are logged
    once (first values kept); the stage metric shows the boundary; the spec is the run's parameters."""
    from mlflow import MlflowClient

    from service.sinks import MLflowSink

    jobs = JobStore(Storage(str(tmp_path / "runs")), "mlf")
    spec = make_spec(metrics={"sinks": ["mlflow"]})
    two_coordinators(MLflowSink, jobs, spec)

    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name(spec.name)  # no MLFLOW_EXPERIMENT_NAME: the job name
    (run,) = client.search_runs([experiment.experiment_id])
    assert (run.info.run_name, run.info.status) == ("mlf", "FINISHED")
    assert run.data.tags["stagetrain.job_id"] == "mlf"

    def history(key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))

    assert history("train/loss") == [(0, 1.0), (1, 1.0), (2, 1.0), (3, 1.0), (4, 1.0), (5, 3.0), (6, 3.0)]
    assert history("train/lr") == [
        (k, pytest.approx(0.1 * s + 0.01 * k)) for k, s in enumerate([1] * 5 + [2] * 2)
    ]
    assert history("train/resolution") == [(k, 16.0) for k in range(5)] + [(5, 24.0), (6, 24.0)]
    assert history("train/global_batch") == [(k, 8.0) for k in range(5)] + [(5, 16.0), (6, 16.0)]
    assert history("train/stage") == [(k, 1.0) for k in range(5)] + [(5, 2.0), (6, 2.0)]
    assert history("val/top1") == [(3, pytest.approx(0.4)), (5, pytest.approx(0.5)), (7, pytest.approx(0.7))]
    assert history("val/loss") == [(3, pytest.approx(1.1)), (5, pytest.approx(1.0)), (7, pytest.approx(0.8))]
    assert {m.timestamp for m in client.get_metric_history(run.info.run_id, "train/momentum")} == {
        int((1e9 + k) * 1000) for k in range(7)
    }
    params = run.data.params
    assert params["model.arch"] == spec.model.arch
    assert params["stages.0.resolution"] == str(spec.stages[0].resolution)
    assert params["metrics.sinks.0"] == "mlflow"
    assert json.loads(params["seed"]) == spec.seed


def wandb_records(path: str):
    """The records of a W&B run file (``run-<id>.wandb``): a LevelDB-style log (32 KiB blocks of
    chunks, each with a 7-byte header: CRC32C, length, type) after a 7-byte W&B header, each record one
    ``wandb_internal_pb2.Record``. The installed wandb has no reader of its own for it."""
    from wandb.proto import wandb_internal_pb2

    block, full, last = 32768, 1, 4
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", f"{path} is no W&B run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room left for a chunk header: zero padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (full, last):
            out = wandb_internal_pb2.Record()
            out.ParseFromString(pending)
            pending = b""
            yield out


def test_wandb_sink_offline(monkeypatch, tmp_path):
    """Offline: nothing leaves the machine; the run files land in ``<job>/wandb/``, one per coordinator,
    both with the job id as run id, the spec as config and the steps each one logged."""
    from service.sinks import WandbSink

    monkeypatch.setenv("WANDB_MODE", "offline")
    for key in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_API_KEY", "WANDB_ENTITY", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    for key in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(key, str(tmp_path / "wandb-home" / key.lower()))
    jobs = JobStore(Storage(str(tmp_path / "runs")), "wb")
    spec = make_spec(metrics={"sinks": ["wandb"]})

    def first_ends(first) -> None:
        """A W&B run ends with its process: here, in one process, by closing it. W&B names an offline
        run's folder by its start second, so the second run starts in a later second."""
        first.close()
        time.sleep(max(0.0, math.floor(first.run.start_time) + 1 - time.time()))

    two_coordinators(WandbSink, jobs, spec, between=first_ends)

    folder = tmp_path / "runs" / "wb" / "wandb"  # under the job folder: local storage, no WANDB_DIR
    names = sorted(n for n in os.listdir(folder) if n.startswith("offline-run-"))
    assert len(names) == 2 and all(n.endswith("-wb") for n in names), names
    runs = [read_wandb_run(str(folder / name / "run-wb.wandb")) for name in names]
    for run, config, _ in runs:
        assert (run.run_id, run.project) == ("wb", spec.name)
        assert config == spec.model_dump(mode="json")
    first, second = (rows for _, _, rows in runs)
    assert list(first) == [0, 1, 2, 3, 4, 5]
    assert [first[k]["train/loss"] for k in range(5)] == [1.0] * 5
    assert first[4]["train/lr"] == pytest.approx(0.14) and first[4]["train/resolution"] == 16
    assert (first[3]["train/loss"], first[3]["val/top1"]) == (1.0, 0.4)  # logged in step order
    assert first[5] == {"val/top1": 0.5, "val/loss": 1.0}
    # offline, W&B cannot know which steps the run has: `wandb sync` drops 3-5 as already logged
    assert list(second) == [3, 4, 5, 6, 7]
    assert [second[k]["train/loss"] for k in (3, 4, 5, 6)] == [2.0, 2.0, 3.0, 3.0]
    assert [second[k]["train/stage"] for k in (3, 4, 5, 6)] == [1, 1, 2, 2]
    assert [second[k]["train/global_batch"] for k in (3, 4, 5, 6)] == [8, 8, 16, 16]
    assert second[5]["val/top1"] == 0.6  # stage 1's end, at the step stage 2 starts with
    assert second[7] == {"val/top1": 0.7, "val/loss": 0.8}


def read_wandb_run(path: str) -> tuple:
    """``(run record, config, {step: {key: value}})`` of a finished run file, without W&B's own
    ``_step``/``_runtime``/``_timestamp`` keys."""

    def key(item) -> str:  # W&B splits keys with a "/" into nested_key
        return item.key or "/".join(item.nested_key)

    records = list(wandb_records(path))
    kinds = [r.WhichOneof("record_type") for r in records]
    assert "run" in kinds and kinds[-1] == "exit", f"{path} is incomplete after close(): {kinds}"
    run = next(r.run for r in records if r.HasField("run"))
    config = {key(i): json.loads(i.value_json) for i in run.config.update if key(i) != "_wandb"}
    rows = {}
    for r in records:
        if r.HasField("history"):
            items = {key(i): json.loads(i.value_json) for i in r.history.item}
            rows[r.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    return run, config, rows


@pytest.mark.parametrize("sink, package", [("MLflowSink", "mlflow"), ("WandbSink", "wandb")])
def test_missing_sink_package_is_named(monkeypatch, sink, package):
    import builtins

    import service.sinks

    real = builtins.__import__

    def missing(name, *args, **kwargs):
        if name == package or name.startswith(package + "."):
            raise ImportError(f"No module named {package!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", missing)
    with pytest.raises(
        ValueError, match=f"metrics.sinks: {package} needs the {package} package .*pip install"
    ):
        getattr(service.sinks, sink)(None, make_spec(), 0)


def test_sinks_plot_top5_and_the_ema_only_when_evaluated():
    from service.sinks import scalars

    plain = EvalRecord(step=3, stage=1, samples_seen=96, resolution=16, val_loss=1.0, val_acc=0.4, time=0.0)
    assert scalars(plain) == {"val/top1": 0.4, "val/loss": 1.0}
    both = StageEnd(stage=1, step=6, val_loss=1.0, val_acc=0.4, val_top5=0.9, ema_val_loss=0.8)
    both.ema_val_acc, both.ema_val_top5 = 0.5, 0.95
    assert scalars(both) == {
        "val/top1": 0.4,
        "val/loss": 1.0,
        "val/top5": 0.9,
        "ema/val_top1": 0.5,
        "ema/val_loss": 0.8,
        "ema/val_top5": 0.95,
    }


def test_unknown_sink_is_refused_naming_the_field():
    with pytest.raises(SpecError) as e:
        validate_spec(merge(BASE_SPEC, {"metrics": {"sinks": ["tensorboard", "mlflw"]}}))
    line = "metrics.sinks[1]: expected one of 'tensorboard', 'mlflow', 'wandb', got 'mlflw'"
    assert f"{line}; did you mean 'mlflow'?" in e.value.problems, e.value.problems


# ------------------------------------------------------------------------ sinks off the training path


class ScriptedSink:
    """A sink that does what a test tells it: block in ``write`` until ``release`` is set, raise at its
    ``raise_at``-th write, raise in ``close``. It counts what it was given."""

    release = threading.Event()
    raise_at: int | None = None
    close_raises = False
    written: list = []

    def __init__(self, jobs, spec, start_step: int):
        ScriptedSink.written = []

    def write(self, records: list) -> None:
        ScriptedSink.release.wait()
        if ScriptedSink.raise_at is not None and len(ScriptedSink.written) + 1 >= ScriptedSink.raise_at:
            raise ConnectionError("sink server gone [/x] [bold]")
        ScriptedSink.written.append(records)

    def close(self) -> None:
        if ScriptedSink.close_raises:
            raise OSError("disk full")


@pytest.fixture
def scripted(monkeypatch):
    """``metrics.sinks: [tensorboard]`` runs ``ScriptedSink`` (set up per test), closing waits 0.5 s."""
    import service.sinks

    monkeypatch.setitem(service.sinks.SINKS, "tensorboard", ScriptedSink)
    monkeypatch.setattr(service.sinks, "SINK_CLOSE_S", 0.5)
    ScriptedSink.release, ScriptedSink.raise_at, ScriptedSink.close_raises = threading.Event(), None, False
    yield ScriptedSink
    ScriptedSink.release.set()


def _sink_job(tmp_path):
    from tests.test_coordinator import Job

    return Job(tmp_path, {"metrics": {"sinks": ["tensorboard"]}})


def test_a_sink_that_hangs_never_holds_training_up(tmp_path, scripted, monkeypatch):
    """The sink blocks in its first write for the whole job: the job still runs to its end (with the
    sink on the report loop it would never get past its first report), the sink's queue (2 reports)
    overflows and counts what it dropped, and closing gives the sink up after its wait."""
    import service.sinks

    monkeypatch.setattr(service.sinks, "SINK_QUEUE", 2)
    job = _sink_job(tmp_path)
    watchdog = threading.Timer(120, scripted.release.set)  # a sink on the loop would hang the test: fail
    watchdog.start()
    try:
        assert job.run() == 0, job.out.getvalue()
    finally:
        watchdog.cancel()
    assert not scripted.release.is_set() and scripted.written == []  # it wrote nothing at all
    record = job.record
    assert record.status == "succeeded" and len(job.steps()) == 36
    (state,) = record.sinks
    assert state.failed == "TimeoutError: still writing after 0.5s; the rest is dropped"
    assert state.dropped == 36 + 3  # 36 steps and 3 stage ends: none written
    assert not job.jobs.storage.exists("lease.json")  # released
    lines = "\n".join(__import__("service.report", fromlist=["x"]).status_lines(record, None, None, None))
    assert "metrics sinks: tensorboard failed (TimeoutError: still writing after 0.5s" in lines
    assert f"{state.dropped:,} record(s) dropped" in lines


def test_a_sink_that_fails_is_said_once_and_the_job_succeeds(tmp_path, scripted):
    scripted.release.set()
    scripted.raise_at = 3
    job = _sink_job(tmp_path)
    assert job.run() == 0, job.out.getvalue()
    record = job.record
    assert record.status == "succeeded" and len(job.steps()) == 36
    assert len(scripted.written) == 2  # then disabled: nothing more reaches it
    (state,) = record.sinks
    assert state.failed == "ConnectionError: sink server gone [/x] [bold]"
    assert state.dropped == 36 + 3 - sum(len(w) for w in scripted.written)
    out = job.out.getvalue().replace("\n", "")
    assert out.count("metrics sink tensorboard failed: ConnectionError: sink server gone [/x] [bold]") == 1
    log = job.jobs.storage.read_text("logs", "attempt-1.log")
    assert log.count("metrics sink tensorboard failed") == 1 and "job j succeeded" in log


def test_a_sink_whose_close_raises_still_releases_the_log_and_the_lease(tmp_path, scripted):
    scripted.release.set()
    scripted.close_raises = True
    job = _sink_job(tmp_path)
    assert job.run() == 0, job.out.getvalue()
    record = job.record
    assert record.status == "succeeded"
    assert [(s.failed, s.dropped) for s in record.sinks] == [("OSError: disk full", 0)]
    assert sum(len(w) for w in scripted.written) == 36 + 3
    assert not job.jobs.storage.exists("lease.json")
    assert "job j succeeded" in job.jobs.storage.read_text("logs", "attempt-1.log")


def test_mlflow_server_gone_mid_run_disables_the_sink_and_training_goes_on(tmp_path, monkeypatch):
    """A real MLflow server, killed at step 10 of the coordinator's job (in-process executor): the
    sink's next write fails after MLflow's own (shortened) retries, off the report loop; the job
    succeeds with every step in metrics.jsonl; the record says the sink failed and what it dropped."""
    from tests.test_coordinator import Job

    server = MLflowServer(str(tmp_path / "mlflow"), _free_port())
    for key, value in {**NO_PHONING_HOME, "MLFLOW_TRACKING_URI": server.uri}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    server.start()
    try:
        job = Job(tmp_path / "runs", {"metrics": {"sinks": ["mlflow"]}})
        job.executor.on_step = lambda step: step == 10 and server.stop()
        assert job.run() == 0, job.out.getvalue()
    finally:
        server.stop()
    record = job.record
    assert record.status == "succeeded" and len(job.steps()) == 36
    (state,) = record.sinks
    assert state.name == "mlflow" and state.failed and state.dropped > 0, state
    assert job.out.getvalue().count("metrics sink mlflow failed") == 1
