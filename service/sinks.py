"""Metric sinks besides ``metrics.jsonl`` (``metrics.sinks``), written by the coordinator from the same
records: per step the loss, LR, momentum, resolution, global batch, workers and throughput; every
evaluation; the stage (a step function, so boundaries show); and the spec as the run's parameters.

Each sink's package is imported only when the job uses it, with a clear error when it is missing.
A coordinator that continues a job (after a restart or a ``resume``) continues the same run in each
sink; the steps it re-runs from the checkpoint are written once (see each sink for how).

Sinks are side work and never sit on the training path: each writes from its own thread
(``Background``), fed through a bounded queue that drops (and counts) records when the sink falls
behind. A sink that fails (server gone, disk full) is reported once, disabled for the rest of the
attempt, and shown in ``stagetrain status`` with what it dropped; ``metrics.jsonl`` has every record.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable

from service.console import first_line, redact_url
from service.jobs import SinkState
from service.layout import TENSORBOARD_DIR
from service.records import EvalRecord, StageEnd, StepRecord

log = logging.getLogger(__name__)

STEP_SCALARS = (
    "loss",
    "lr",
    "momentum",
    "resolution",
    "global_batch",
    "workers",
    "grad_accum",
    "images_per_s",
)


class TensorBoardSink:
    """TensorBoard event files in ``<storage>/<job-id>/tensorboard/`` (``tensorboard --logdir`` there).
    On an object store they are written to a local folder and uploaded at every stage end and at exit.
    A coordinator that continues a job purges the events past the step it continues from."""

    def __init__(self, jobs, spec, start_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ValueError(
                f"metrics.sinks: tensorboard needs the tensorboard package ({e}); pip install tensorboard"
            ) from None
        self.storage = jobs.storage
        self.local = self.storage.local
        self.dir = (
            self.storage.path(TENSORBOARD_DIR) if self.local else tempfile.mkdtemp(prefix="stagetrain-tb-")
        )
        if not self.local:  # continue the event files already uploaded
            for name in self.storage.listdir(TENSORBOARD_DIR):
                with open(os.path.join(self.dir, name), "wb") as f:
                    f.write(self.storage.read_bytes(TENSORBOARD_DIR, name))
        self.writer = SummaryWriter(self.dir, purge_step=start_step or None)
        if not start_step:
            self.writer.add_text(
                "spec", "```\n" + json.dumps(spec.model_dump(mode="json"), indent=2) + "\n```"
            )

    def write(self, records: list) -> None:
        for r in records:
            if isinstance(r, StepRecord):
                for key in STEP_SCALARS:
                    self.writer.add_scalar(f"train/{key}", getattr(r, key), r.step, walltime=r.time)
                self.writer.add_scalar("train/stage", r.stage, r.step, walltime=r.time)
            elif isinstance(r, EvalRecord | StageEnd) and r.val_acc is not None:
                for name, value in scalars(r).items():
                    self.writer.add_scalar(name, value, r.step, walltime=r.time)
        if any(isinstance(r, StageEnd) for r in records):
            self.flush()

    def flush(self) -> None:
        self.writer.flush()
        if not self.local:
            for name in os.listdir(self.dir):
                with open(os.path.join(self.dir, name), "rb") as f:
                    self.storage.write_bytes(f.read(), TENSORBOARD_DIR, name)

    def close(self) -> None:
        self.flush()
        self.writer.close()


def spec_params(spec) -> dict[str, str]:
    """The spec as flat run parameters: ``{"model.arch": "resnet18", "stages.0.resolution": "128"}``.
    Strings as they are, everything else as JSON (``null``, ``true``, ``[]``)."""
    out: dict[str, str] = {}

    def walk(value, key: str) -> None:
        if isinstance(value, dict | list) and value:
            for k, v in value.items() if isinstance(value, dict) else enumerate(value):
                walk(v, f"{key}.{k}" if key else str(k))
        else:
            out[key] = value if isinstance(value, str) else json.dumps(value)

    walk(spec.model_dump(mode="json"), "")
    return out


def scalars(r) -> dict[str, float]:
    """What the sinks plot of one record, as TensorBoard names them."""
    if isinstance(r, StepRecord):
        return {
            **{f"train/{key}": float(getattr(r, key)) for key in STEP_SCALARS},
            "train/stage": float(r.stage),
        }
    if isinstance(r, EvalRecord | StageEnd) and r.val_acc is not None:
        # top-5 when num_classes > 5, the weights' average (train.ema) when kept: only what was evaluated
        optional = {"val/top5": r.val_top5, "ema/val_top1": r.ema_val_acc, "ema/val_loss": r.ema_val_loss}
        optional["ema/val_top5"] = r.ema_val_top5
        values = {"val/top1": r.val_acc, "val/loss": r.val_loss}
        return values | {name: v for name, v in optional.items() if v is not None}
    return {}


def step_rows(records: list) -> dict[int, dict[str, float]]:
    """The scalars of ``records`` by optimizer step, in step order: an evaluation comes after the step
    records of its report but may belong to an earlier step."""
    rows: dict[int, dict[str, float]] = {}
    for r in records:
        if values := scalars(r):
            rows.setdefault(r.step, {}).update(values)
    return dict(sorted(rows.items()))


JOB_ID_TAG = "stagetrain.job_id"  # how a continuing coordinator finds the job's MLflow run
MLFLOW_PARAM_MAX = 6000  # characters of a parameter value (MLflow's limit)
MLFLOW_BATCH = {"metrics": 1000, "params": 100}  # entries per log_batch call (MLflow's limits)


class MLflowSink:
    """An MLflow run per job, on the tracking server of ``MLFLOW_TRACKING_URI`` (MLflow's default when
    unset), in the experiment ``MLFLOW_EXPERIMENT_NAME`` or else the job name (created if missing).
    The run is named after the job id and tagged ``stagetrain.job_id``; a coordinator that continues
    the job finds it by that tag and continues it. MLflow keeps every point logged and cannot delete
    one, so the continued run skips the steps it already has: each step appears once, with the value
    first logged (``metrics.jsonl`` keeps both). Parameters are the flat spec (``spec_params``); a
    continued run adds only the keys it lacks, since MLflow refuses to change a logged value.

    Each ``write`` is one ``log_batch`` call (per 1000 metrics). MLflow's client waits
    ``MLFLOW_HTTP_REQUEST_TIMEOUT`` per request and retries ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` times: 10 s
    and 2 here unless set (its
    defaults, 120 s and 7 with backoff, hold a failing write for minutes). An unreachable server fails
    the job at start, saying so; one that goes away later disables the sink (``Background``)."""

    def __init__(self, jobs, spec, start_step: int):
        try:
            from mlflow import MlflowClient
            from mlflow.entities import Metric, Param
            from mlflow.exceptions import MlflowException
        except ImportError as e:
            raise ValueError(
                f"metrics.sinks: mlflow needs the mlflow package ({e}); pip install mlflow"
            ) from None
        self.Metric, self.Error = Metric, MlflowException
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        self.client = MlflowClient()
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or spec.name
        try:
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(name)
            found = self.client.search_runs(
                [exp_id], filter_string=f"tags.`{JOB_ID_TAG}` = '{jobs.job_id}'", max_results=1
            )
            if found:
                run = found[0]
                self.client.update_run(run.info.run_id, status="RUNNING")
            else:
                run = self.client.create_run(exp_id, run_name=jobs.job_id, tags={JOB_ID_TAG: jobs.job_id})
            self.run_id = run.info.run_id
            params = [
                Param(k, v[:MLFLOW_PARAM_MAX])
                for k, v in spec_params(spec).items()
                if k not in run.data.params
            ]
            self._batches("params", params)
            # the last step of each kind the run has: a continuing coordinator re-runs some
            self.logged = {key: self._last_step(key) if found else -1 for key in ("train/loss", "val/top1")}
        except MlflowException as e:
            uri = redact_url(self.client.tracking_uri)
            raise ValueError(
                f"metrics.sinks: mlflow: tracking server {uri}, experiment {name!r}: "
                f"{str(e).replace(self.client.tracking_uri, uri)}; set MLFLOW_TRACKING_URI (and "
                "MLFLOW_EXPERIMENT_NAME) to one this coordinator can reach"
            ) from None
        log.info(
            "mlflow run %s in experiment %r on %s", self.run_id, name, redact_url(self.client.tracking_uri)
        )

    def _last_step(self, key: str) -> int:
        return max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=-1)

    def _batches(self, kind: str, entries: list) -> None:
        size = MLFLOW_BATCH[kind]
        for i in range(0, len(entries), size):
            self.client.log_batch(self.run_id, **{kind: entries[i : i + size]})

    def write(self, records: list) -> None:
        metrics = []
        for r in records:
            values = scalars(r)
            if values and r.step > self.logged["train/loss" if isinstance(r, StepRecord) else "val/top1"]:
                stamp = int((r.time if r.time is not None else time.time()) * 1000)
                metrics += [self.Metric(key, value, stamp, r.step) for key, value in values.items()]
        self._batches("metrics", metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED")


class WandbSink:
    """A W&B run per job, in the project ``WANDB_PROJECT`` or else the job name. Its id is the job id,
    so a coordinator that continues the job resumes the same run (``resume="allow"``). ``WANDB_MODE``
    (``online``, ``offline``, ``disabled``), ``WANDB_ENTITY`` and the API key come from the environment
    as usual; offline, nothing leaves the machine (``wandb sync`` the run folder later). The config is
    the spec. The run prints only warnings and leaves the coordinator's console alone.

    Its local folder is ``WANDB_DIR`` if set, else the job folder on local storage (the run lands in
    ``<job>/wandb/``), else a temporary folder: an offline run of a job on an object store needs
    ``WANDB_DIR`` to be kept.

    W&B steps only grow, and it drops (with a warning) a step at or below one it has. A continued
    online run skips the steps the server has already (the values first logged stay). A continued
    offline run cannot know them: it writes a second run file with the same id from its start step,
    and ``wandb sync`` drops the repeated steps. Either way a step W&B holds in part is not completed:
    when a coordinator stopped right after a stage end, the new stage's first step keeps only the
    stage-end evaluation logged at that step."""

    def __init__(self, jobs, spec, start_step: int):
        try:
            import wandb
        except ImportError as e:
            raise ValueError(
                f"metrics.sinks: wandb needs the wandb package ({e}); pip install wandb"
            ) from None
        folder = os.environ.get("WANDB_DIR") or (
            jobs.storage.path() if jobs.storage.local else tempfile.mkdtemp(prefix="stagetrain-wandb-")
        )
        os.makedirs(folder, exist_ok=True)
        self.wandb = wandb
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT") or spec.name,
                id=jobs.job_id,
                name=jobs.job_id,
                resume="allow",
                dir=folder,
                config=spec.model_dump(mode="json"),
                reinit="create_new",  # the run is this sink's, not wandb.run's
                # quiet; the folder is no git work tree (each checkpoint manifest records the revision)
                settings=wandb.Settings(silent=True, console="off", disable_git=True),
            )
        except wandb.Error as e:  # no API key, server unreachable, ...
            raise ValueError(
                f"metrics.sinks: wandb: {str(e).rstrip('.')}; "
                f"to keep the run on this machine, set WANDB_MODE=offline"
            ) from None
        self.next_step = self.run.step  # > 0 when W&B already has steps of this run
        log.info("wandb run %s in project %r (%s)", self.run.id, self.run.project, folder)

    def write(self, records: list) -> None:
        for step, row in step_rows(records).items():
            if step >= self.next_step:
                self.run.log(row, step=step)

    def close(self) -> None:
        """Finish the run and wait until W&B has written (and, online, sent) all of it: ``finish`` alone
        returns before the run file is complete, and the atexit hook that completes it does not always
        run in a coordinator. The coordinator has one W&B run, so shutting W&B down here is safe."""
        self.run.finish()
        self.wandb.teardown()


SINKS = {"tensorboard": TensorBoardSink, "mlflow": MLflowSink, "wandb": WandbSink}
SINK_QUEUE = 1000  # reports waiting for a slow sink; more are dropped and counted
SINK_CLOSE_S = 30.0  # how long closing waits for a sink to write what it has queued


class Background:
    """One sink off the coordinator's report loop. ``write`` never blocks: the records go through a
    bounded queue to the sink's own thread; a full queue drops them (counted). The first exception of
    the sink is passed to ``on_fail(name, error)`` once and disables it for the rest of the attempt
    (what comes later is dropped, counted). ``close`` waits at most ``close_s`` and never raises."""

    def __init__(self, name: str, sink, on_fail: Callable[[str, str], None], maxsize: int | None = None):
        self.name, self.sink, self.on_fail = name, sink, on_fail
        self._q: queue.Queue = queue.Queue(maxsize or SINK_QUEUE)
        self._lock = threading.Lock()
        self.dropped = 0  # records
        self._inflight = 0  # records of the write under way
        self.error: str | None = None
        self._thread = threading.Thread(target=self._drain, name=f"stagetrain-sink-{name}", daemon=True)
        self._thread.start()

    def _drop(self, n: int) -> None:
        with self._lock:
            self.dropped += n

    def write(self, records: list) -> None:
        if self.error is not None:
            return self._drop(len(records))
        try:
            self._q.put_nowait(records)
        except queue.Full:
            self._drop(len(records))

    def _fail(self, e: BaseException) -> None:
        self.error = _redacted(f"{type(e).__name__}: {first_line(e)}")
        try:
            self.on_fail(self.name, self.error)
        except Exception:  # noqa: BLE001 - reporting must not end the sink's thread
            log.exception("metrics sink %s failed: %s", self.name, self.error)

    def _drain(self) -> None:
        while (records := self._q.get()) is not None:
            if self.error is not None:
                self._drop(len(records))
                continue
            self._inflight = len(records)
            try:
                self.sink.write(records)
            except Exception as e:  # noqa: BLE001 - a sink never ends the job
                self._drop(len(records))
                self._fail(e)
            self._inflight = 0

    def close(self, close_s: float | None = None) -> None:
        close_s = SINK_CLOSE_S if close_s is None else close_s
        deadline = time.monotonic() + close_s
        try:
            self._q.put(None, timeout=close_s)
        except queue.Full:
            pass
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():  # still writing: give it up (a daemon thread), count what it had
            waiting = 0
            while True:
                try:
                    records = self._q.get_nowait()
                except queue.Empty:
                    break
                waiting += len(records or [])
            self._drop(self._inflight + waiting)
            if self.error is None:
                self._fail(TimeoutError(f"still writing after {close_s:g}s; the rest is dropped"))
            return
        if self.error is None:
            try:
                self.sink.close()
            except Exception as e:  # noqa: BLE001 - the job log and the lease are released regardless
                self._fail(e)

    def state(self) -> SinkState:
        return SinkState(name=self.name, failed=self.error, dropped=self.dropped)


def _redacted(text: str) -> str:
    """Credentials in URLs inside ``text`` (an exception's message) as ``***``."""
    import re

    return re.sub(r"(\w+://)[^/\s@]+@", r"\1***@", text)


def open_sinks(jobs, spec, start_step: int, on_fail: Callable[[str, str], None]) -> list[Background]:
    return [Background(name, SINKS[name](jobs, spec, start_step), on_fail) for name in spec.metrics.sinks]
