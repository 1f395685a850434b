"""The seam below the coordinator: what runs a stage's workers.

``JobRunner`` (``service.runner``) decides what to run and reads what comes back; a ``StageExecutor``
runs it. ``RayExecutor`` is the real one: one Ray Train ``TorchTrainer.fit()`` per run, reports
forwarded through a Ray queue. Tests drive the runner with an in-process executor that scripts
reports, failures and lost nodes (``tests/fake_executor.py``), so cancel, scale, retries, capacity
waits and re-layouts are tested in seconds without Ray.

A run streams items, each a dict: ``{"report": Report.model_dump()}`` from rank 0, or
``{"worker_errors": {rank: (summary, traceback)}}`` when the worker group failed.
"""

from __future__ import annotations

import os
import queue as stdqueue
import threading
import traceback
from dataclasses import dataclass
from typing import Protocol

from checkpoints.storage import Storage, forwarded_env
from service.console import error_line
from service.layout import RAY_DIR
from service.plan import Plan
from service.spec import JobSpec
from service.submit import SUBMISSION_ENV

DEFAULT_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}  # else every report blocks ~2 s


@dataclass(frozen=True)
class StageRun:
    """Run plan rows ``row``..``last`` of ``plan`` (one worker layout) from checkpoint ``restore``, the
    newest verified one (at ``start_step``): each stage ends with its boundary checkpoint and a ``StageEnd``
    report, then the same workers go on with the next row."""

    spec: JobSpec
    plan: Plan
    row: int
    start_step: int
    attempt: int
    job_id: str
    storage: str  # the storage root URL (the job lives in <storage>/<job_id>)
    git_revision: str | None = None
    last: int | None = None  # None: ``row`` alone
    restore: str | None = None  # the checkpoint to start from: the newest verified (None: afresh)

    @property
    def name(self) -> str:
        """Unique per stage attempt: Ray Train restores a run of the same name (see NOTES)."""
        return f"{self.job_id}-stage-{self.plan.stages[self.row].number}-attempt-{self.attempt}"


@dataclass(frozen=True)
class RunFailure:
    """Why a run's workers failed: ``cause`` in one line, ``actor_died`` when a worker's process or
    node went away (rather than the training code raising), ``details`` the full traceback."""

    cause: str
    actor_died: bool
    details: str


class Running(Protocol):
    def get(self, timeout: float) -> dict | None:
        """The next item from the workers, or None after ``timeout`` seconds without one."""

    def finished(self) -> bool:
        """The run has ended and every item has been taken."""

    def failure(self) -> RunFailure | None:
        """After the run ended: why it failed, or None."""

    def close(self) -> None:
        """Release the run's resources. A run still going is abandoned (the coordinator gave up on it:
        the cluster lost its capacity); whatever it raises later is not its failure."""


class StageExecutor(Protocol):
    def connect(self) -> None: ...

    def cluster_resources(self) -> dict[str, float]: ...

    def alive_nodes(self) -> set[str]: ...

    def start(self, run: StageRun) -> Running: ...


class RayExecutor:
    """Ray Train: one ``TorchTrainer`` per run, failures handed back to the coordinator."""

    def __init__(self, address: str | None, storage: Storage):
        self.address, self.storage = address, storage

    def connect(self) -> None:
        connect_ray(self.address)

    def cluster_resources(self) -> dict[str, float]:
        import ray

        return ray.cluster_resources()

    def alive_nodes(self) -> set[str]:
        import ray

        return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}

    def start(self, run: StageRun) -> Running:
        import ray
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from workers.entry import train_loop_per_worker

        stage, res = run.plan.stages[run.row], run.spec.resources
        # The report queue lives on the coordinator's node: a lost worker node must not take it along.
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        q = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        per_worker = {"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if res.use_gpu else {})}
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "spec": run.spec.model_dump(mode="json"),
                "plan": run.plan.model_dump(mode="json"),
                "stage": run.row,
                "last_stage": run.row if run.last is None else run.last,
                "job_id": run.job_id,
                "storage": run.storage,
                "restore": run.restore,
                "provenance": {"git_revision": run.git_revision},
            },
            scaling_config=ScalingConfig(
                num_workers=stage.workers, use_gpu=res.use_gpu, resources_per_worker=per_worker
            ),
            run_config=RunConfig(
                name=run.name,
                # Every failure comes back to the coordinator, which tells lost nodes from crashes of the
                # training code (only those count against failure.max_failures): see after_outcome.
                failure_config=FailureConfig(max_failures=0, max_preemption_failures=0),
                callbacks=[_make_callback(q)],
                **_ray_storage(self.storage, run.job_id),
            ),
        )
        return _RayRun(trainer, q, f"fit-stage-{stage.number}")


class _RayRun:
    def __init__(self, trainer, q, name: str):
        self.q, self.error = q, None
        self.controller = None  # the run's Ray Train controller actor, once its first item came
        self.thread = threading.Thread(target=self._fit, args=(trainer,), name=name, daemon=True)
        self.thread.start()

    def _fit(self, trainer) -> None:
        try:
            trainer.fit()
        except BaseException as e:  # noqa: BLE001 - handed to the coordinator's thread
            self.error = e

    def get(self, timeout: float) -> dict | None:
        try:
            item = self.q.get(timeout=timeout)
        except stdqueue.Empty:
            return None
        if "controller" in item:
            self.controller = item["controller"]
            return None
        return item

    def finished(self) -> bool:
        return not self.thread.is_alive() and self.q.empty()

    def failure(self) -> RunFailure | None:
        e = self.error
        if e is None:
            return None
        return RunFailure(_root_cause(e), _actor_died(e), "".join(traceback.format_exception(e)))

    def close(self, abort_s: float = 30.0) -> None:
        """A run still going is given up: its controller aborts its workers and ends (else a retry of
        the same stage would train beside it); whatever it raises then is not its failure."""
        import ray

        if self.thread.is_alive():
            if self.controller is not None:
                try:
                    ray.get(self.controller.abort.remote(), timeout=abort_s)
                except Exception:  # noqa: BLE001 - it ends by exiting: RayActorError is the normal answer
                    pass
                self.thread.join(abort_s)
            if self.thread.is_alive() and self.controller is not None:
                ray.kill(self.controller)
            self.error = None
        ray.kill(self.q.actor)


def connect_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    env = {**DEFAULT_ENV, **{k: os.environ[k] for k in DEFAULT_ENV if k in os.environ}, **forwarded_env()}
    for k, v in env.items():  # a local cluster's controller inherits these
        os.environ.setdefault(k, v)
    log_to_driver = os.environ.get("STAGETRAIN_RAY_LOGS") == "1"  # worker lines would flood the job log
    if os.environ.get(SUBMISSION_ENV):  # a submitted coordinator: the Ray job's runtime env already applies
        ray.init(log_to_driver=log_to_driver)
    elif address:
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        ray.init(
            address=address,
            log_to_driver=log_to_driver,
            runtime_env={
                "env_vars": env,
                "py_modules": [os.path.join(here, m) for m in ("service", "workers", "checkpoints")],
            },
        )
    else:
        # address="local": always a fresh cluster; plain ray.init() would join one left by `ray start`.
        ray.init(
            address="local",
            num_cpus=os.cpu_count(),
            include_dashboard=False,
            runtime_env={"env_vars": env},
            log_to_driver=log_to_driver,
        )


def _ray_storage(store: Storage, job_id: str) -> dict:
    """``RunConfig`` storage for Ray's own run files, inside the job folder on the same filesystem."""
    if store.local:
        return {"storage_path": os.path.abspath(store.path(job_id, RAY_DIR))}
    import pyarrow.fs

    return {
        "storage_path": store.path(job_id, RAY_DIR),
        "storage_filesystem": pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(store.fs)),
    }


def _make_callback(q):
    from ray.train import UserCallback

    class Forward(UserCallback):
        """Runs on the Ray Train controller: forwards reports and worker errors to the coordinator, and
        (once) the controller's own handle, so that a run the coordinator gives up can be aborted."""

        told = False

        def _tell(self) -> None:
            if not self.told:
                import ray

                self.told = True
                q.put({"controller": ray.get_runtime_context().current_actor})

        def after_report(self, run_context, metrics, checkpoint):
            self._tell()
            q.put({"report": metrics[0]})

        def after_exception(self, run_context, worker_exceptions):
            self._tell()
            q.put(
                {
                    "worker_errors": {
                        r: (error_line(e), "".join(traceback.format_exception(e)))
                        for r, e in worker_exceptions.items()
                    }
                }
            )

    return Forward()


def _actor_died(e: BaseException) -> bool:
    """Did a worker's actor die (its process or its node gone), rather than raise from the training
    code? Ray Train reports that as ``RayActorError`` (or a failed health check wrapping one)."""
    from ray.exceptions import RayActorError

    failures = getattr(e, "worker_failures", None) or {0: e}
    return any(
        isinstance(err, RayActorError)
        or isinstance(getattr(err, "health_check_failure", None), RayActorError)
        or "HealthCheck" in type(err).__name__
        for err in failures.values()
    )


def _root_cause(e: BaseException) -> str:
    failures = getattr(e, "worker_failures", None)
    if failures:
        rank, err = next(iter(failures.items()))
        return f"worker {rank}: {error_line(err)}"
    return error_line(e)
