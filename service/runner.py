"""Runs a job on Ray: one ``TorchTrainer`` per stage, acting on the decisions of ``service.decisions``.

The driver (this process) owns the job record and metrics file. Workers report every few steps;
a ``UserCallback`` on the Ray Train controller forwards the reports to the driver through a Ray
queue, where they become progress bars, ``metrics.jsonl`` lines and job-record updates.

Stage handover, worker restarts and ``stagetrain resume`` all go through the same door: workers
load the newest committed checkpoint in ``<storage>/<job-id>/checkpoints`` (see ``checkpoints``).
Ray Train's own checkpointing is not used, so there is exactly one "latest checkpoint".
"""

from __future__ import annotations

import os
import queue as stdqueue
import signal
import threading
import time
from dataclasses import dataclass, field

import ray
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from checkpoints.storage import Storage, forwarded_env
from checkpoints.store import git_revision
from service.decisions import (
    Completed,
    Fail,
    Finish,
    Preempted,
    RunStage,
    fits_cluster,
    next_action,
    stage_completed,
    stage_outcome,
)
from service.jobs import JobRecord, JobStore, Report, StageEnd, now
from service.layout import RAY_DIR, STOP_FILE
from service.plan import Plan, StagePlan
from service.spec import JobSpec

EXIT_OK, EXIT_FAILED, EXIT_PREEMPTED = 0, 1, 75  # 75 = EX_TEMPFAIL: resume it later
DEFAULT_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}  # else every report blocks ~2 s


@dataclass
class RunOptions:
    job_id: str
    storage: str
    address: str | None = None
    console: Console = field(default_factory=lambda: Console(stderr=True))


def connect_ray(address: str | None) -> None:
    env = {**DEFAULT_ENV, **{k: os.environ[k] for k in DEFAULT_ENV if k in os.environ}, **forwarded_env()}
    if ray.is_initialized():
        return
    for k, v in env.items():  # a local cluster's controller inherits these
        os.environ.setdefault(k, v)
    if address:
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        ray.init(address=address, runtime_env={
            "env_vars": env, "py_modules": [os.path.join(here, m) for m in ("service", "workers", "checkpoints")]})
    else:
        # address="local": always a fresh cluster; plain ray.init() would join one left by `ray start`.
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, runtime_env={"env_vars": env},
                 log_to_driver=os.environ.get("STAGETRAIN_RAY_LOGS") == "1")


def _ray_storage(store: Storage, job_id: str) -> dict:
    """``RunConfig`` storage for Ray's own run files, inside the job folder on the same filesystem."""
    if store.local:
        return {"storage_path": os.path.abspath(store.path(job_id, RAY_DIR))}
    import pyarrow.fs

    return {"storage_path": store.path(job_id, RAY_DIR),
            "storage_filesystem": pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(store.fs))}


def _make_callback(q):
    from ray.train import UserCallback

    class Forward(UserCallback):
        """Runs on the Ray Train controller: forwards reports and worker errors to the driver."""

        def after_report(self, run_context, metrics, checkpoint):
            q.put({"report": metrics[0]})

        def after_exception(self, run_context, worker_exceptions):
            q.put({"worker_errors": {r: f"{type(e).__name__}: {_first_line(e)}" for r, e in worker_exceptions.items()}})

    return Forward()


class JobRunner:
    def __init__(self, spec: JobSpec, plan: Plan, record: JobRecord, jobs: JobStore, options: RunOptions):
        self.spec, self.plan, self.record, self.jobs, self.opt = spec, plan, record, jobs, options
        self.stop = threading.Event()
        self._grace_timer: threading.Timer | None = None
        self._git_revision = git_revision()  # recorded in every manifest

    # -------------------------------------------------------------------------------- main loop

    def run(self) -> int:
        connect_ray(self.opt.address)
        self.jobs.storage.remove(STOP_FILE)
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) if threading.current_thread() is threading.main_thread() else None
        try:
            return self._loop()
        finally:
            if self._grace_timer is not None:
                self._grace_timer.cancel()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def _loop(self) -> int:
        while True:
            latest = self.jobs.checkpoints.latest(verify=False)
            manifest = latest[0] if latest else None
            for row, st in enumerate(self.plan.stages):  # e.g. the driver died right after a boundary commit
                srec = self.record.stages[st.index]
                if srec.status != "completed" and stage_completed(self.plan, row, manifest):
                    srec.status, srec.finished = "completed", srec.finished or now()
            action = next_action(self.record, self.plan, manifest, self.spec.resources, ray.cluster_resources())
            if isinstance(action, Finish):
                self.record.finish(self.plan.total_steps)
                self.jobs.save(self.record)
                return EXIT_OK
            if isinstance(action, Fail):
                return self._fail(action.reason)
            assert isinstance(action, RunStage)
            outcome = self._run_stage(action)
            if outcome is not None:
                return outcome

    def _run_stage(self, action: RunStage) -> int | None:
        """One ``TorchTrainer.fit()`` of plan row ``action.stage``; None when the stage completed."""
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from workers.train import train_loop_per_worker

        stage, spec = self.plan.stages[action.stage], self.spec
        res = spec.resources
        srec = self.record.stages[stage.index]
        srec.status, srec.attempts, srec.workers = "running", action.attempt, stage.workers
        srec.started = srec.started or now()
        self.record.status, self.record.current_stage = "running", stage.index + 1
        self.record.current_step = action.start_step
        if action.start_step > stage.step_start:
            self.record.event(f"stage {stage.label} continues from step {action.start_step} "
                              f"(attempt {action.attempt})")
        self.jobs.save(self.record)

        # The report queue lives on the driver's node: a lost worker node must not take it along.
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        q = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        per_worker = {"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if res.use_gpu else {})}
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "spec": spec.model_dump(mode="json"), "plan": self.plan.model_dump(mode="json"),
                "stage": action.stage, "job_id": self.record.job_id, "storage": self.opt.storage,
                "provenance": {"git_revision": self._git_revision},
            },
            scaling_config=ScalingConfig(num_workers=stage.workers, use_gpu=res.use_gpu,
                                         resources_per_worker=per_worker),
            run_config=RunConfig(
                name=f"{self.record.job_id}-stage-{stage.index + 1}-attempt-{action.attempt}",
                failure_config=FailureConfig(max_failures=spec.failure.max_failures),
                callbacks=[_make_callback(q)], **_ray_storage(self.jobs.root, self.record.job_id)),
        )
        error: list[BaseException] = []
        started = time.perf_counter()

        def fit():
            try:
                trainer.fit()
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                error.append(e)

        thread = threading.Thread(target=fit, name=f"fit-stage-{stage.index + 1}", daemon=True)
        thread.start()
        end, lost = self._follow(thread, q, stage, action.start_step)
        if thread.is_alive():  # gave up on the stage: the driver's exit takes the Ray Train controller with it
            error.clear()
        ray.kill(q.actor)
        srec.seconds += time.perf_counter() - started
        if error and not lost:
            lost = self._capacity_lost(stage, wait_s=10)  # a node went away: not the job's fault

        latest = self.jobs.checkpoints.latest(verify=False)
        manifest = latest[0] if latest else None
        outcome = stage_outcome(self.plan, action.stage, end, _root_cause(error[0]) if error else None, lost,
                                self.stop.is_set(), manifest)
        self.record.settle(stage.index, outcome, manifest.step if manifest else self.record.current_step)
        if end is not None:
            self.record.checkpoint_failures.extend(end.checkpoint_failures)
        self.jobs.save(self.record)
        if isinstance(outcome, Completed):
            return None
        if isinstance(outcome, Preempted):
            if outcome.lost_capacity:
                self.opt.console.print(f"[yellow]the cluster lost capacity:[/] {outcome.lost_capacity}. Resume when "
                                       f"it is back, or now with fewer workers: stagetrain resume "
                                       f"{self.record.job_id} --workers N", highlight=False)
            self.opt.console.print(f"[yellow]preempted[/] at step {self.record.current_step}; "
                                   f"continue with: stagetrain resume {self.record.job_id} "
                                   f"--storage {self.opt.storage}", highlight=False)
            return EXIT_PREEMPTED
        self.opt.console.print(f"[bold red]job failed:[/] {outcome.reason}", highlight=False)
        return EXIT_FAILED

    def _follow(self, thread: threading.Thread, q, stage: StagePlan, start_step: int) -> tuple[StageEnd | None,
                                                                                                str | None]:
        """Drain reports while ``fit`` runs: progress bar, metrics file, job record. Returns the stage's
        last report and, if the cluster lost the capacity for the stage meanwhile, what it lacks."""
        srec = self.record.stages[stage.index]
        end, rates = None, []
        columns = [TextColumn("stage {task.fields[n]} {task.fields[res]}px"), BarColumn(),
                   TextColumn("{task.completed:,.0f}/{task.total:,.0f} samples"), TextColumn("{task.fields[info]}"),
                   TimeElapsedColumn()]
        with Progress(*columns, console=self.opt.console, transient=False) as bar:
            task = bar.add_task("", total=stage.samples, n=stage.label, res=stage.resolution, info="",
                                completed=self.plan.samples_before(start_step) - stage.sample_start)
            failed = False  # the worker group failed: from then on, watch the cluster's capacity
            while True:
                try:
                    item = q.get(timeout=0.5)
                except stdqueue.Empty:
                    if not thread.is_alive() and q.empty():
                        break
                    if failed and (lost := self._capacity_lost(stage)):
                        return end, lost
                    continue
                if "worker_errors" in item:
                    srec.restarts += 1
                    failed = True
                    self.record.event(f"stage {stage.label}: worker group failed ({item['worker_errors']}); "
                                      f"Ray Train restarts it from the latest checkpoint")
                    self.jobs.save(self.record)
                    continue
                report = Report.model_validate(item["report"])
                self.jobs.append_metrics(report.records)
                if report.records:
                    last = report.records[-1]
                    rates.append(last.images_per_s)
                    self.record.current_step = last.step + 1
                    bar.update(task, completed=last.samples_seen - stage.sample_start,
                               info=f"{last.images_per_s:,.0f} img/s  loss {last.loss:.3f}  lr {last.lr:.3g}")
                if report.stage_end is not None:
                    end = report.stage_end
                    self.jobs.append_metrics([end])
            thread.join()
        if rates:
            srec.images_per_s = sum(rates) / len(rates)
        return end, None

    def _capacity_lost(self, stage, wait_s: float = 0.0) -> str | None:
        """After a worker-group failure: can the cluster still hold the stage? If a node went away for
        good, Ray Train would wait for resources that never come (or give up): stop as preempted.
        ``wait_s``: keep looking that long, as Ray notices a dead node within seconds."""
        res = self.spec.resources
        deadline = time.monotonic() + wait_s
        while True:
            lost = fits_cluster(self.plan, self.plan.row(stage), res.use_gpu, res.cpus_per_worker,
                                res.gpus_per_worker, ray.cluster_resources())
            if lost or time.monotonic() >= deadline:
                return lost
            time.sleep(1.0)

    def _on_sigterm(self, signum, frame) -> None:
        """Preemption notice: ask the workers (through storage, reachable from every node) to stop after
        the current step and commit a checkpoint; the main loop then marks the job preempted."""
        if self.stop.is_set():
            return
        self.stop.set()
        self.opt.console.print(f"[yellow]SIGTERM[/]: stopping after the current step, committing a checkpoint "
                               f"(grace {self.spec.preemption.grace_seconds:g}s)")
        self.jobs.storage.write_text('{"reason": "SIGTERM"}', STOP_FILE)
        self._grace_timer = threading.Timer(self.spec.preemption.grace_seconds, self._grace_expired)
        self._grace_timer.start()

    def _grace_expired(self) -> None:
        outcome = Preempted("SIGTERM: the grace period ran out before the workers stopped")
        self.record.settle(self.record.current_stage - 1, outcome, self.record.current_step)
        self.jobs.save(self.record)
        os._exit(EXIT_PREEMPTED)

    def _fail(self, reason: str) -> int:
        self.record.fail(reason)
        self.jobs.save(self.record)
        self.opt.console.print(f"[bold red]job failed:[/] {reason}", highlight=False)
        return EXIT_FAILED


def _first_line(text: str, limit: int = 300) -> str:
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _root_cause(e: BaseException) -> str:
    failures = getattr(e, "worker_failures", None)
    if failures:
        rank, err = next(iter(failures.items()))
        return f"worker {rank}: {type(err).__name__}: {_first_line(err)}"
    return f"{type(e).__name__}: {_first_line(e)}"
