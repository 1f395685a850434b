"""An in-process ``StageExecutor`` (``service.executor``) for testing the coordinator without Ray.

``FakeExecutor`` "trains" a run (a stage group: the rows ``row``..``last``, going on at each boundary
unless a stop or a scale request is pending, as the workers do) by walking its steps in a thread: it
reports every ``metrics.every_n_steps``, commits real checkpoints (small payloads, the real
``CheckpointStore`` on the test's storage) every ``checkpoint.every_n_steps`` and at each stage's end,
and honours the coordinator's stop file after a report, as the workers do. Scripted ``Fault``s make a
run fail at a step (the training code raising, or a worker's process or node dying), ``on_step`` lets
a test act at a step (cancel, scale), and ``nodes`` (name: CPUs) are the cluster the runner sees,
which faults may shrink.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from checkpoints.store import CheckpointStore, tag_for
from service.curve import lr_momentum, resolution
from service.executor import RunFailure, StageRun
from service.layout import CHECKPOINTS, REQUESTS_DIR, STOP_FILE
from service.records import Report, StageEnd, StepRecord


@dataclass
class Fault:
    """At ``step`` (before it runs) the run fails with ``message``. ``actor_died``: a worker's process
    died (else the training code raised); ``lose_node``: its node goes too (taking its CPUs from the
    cluster); ``back_after_s``: the node returns that many seconds later (None: never)."""

    step: int
    message: str
    actor_died: bool = False
    lose_node: str | None = None
    back_after_s: float | None = None


@dataclass
class FakeExecutor:
    storage: str  # the storage root URL
    job_id: str
    nodes: dict[str, float] = field(default_factory=lambda: {"head": 1.0, "worker": 1.0})  # node: CPUs
    faults: list[Fault] = field(default_factory=list)
    on_step: Callable[[int], None] = lambda step: None
    step_s: float = 0.0  # pause per step, for tests that act while a stage runs
    runs: list[StageRun] = field(default_factory=list)

    def connect(self) -> None:
        pass

    def cluster_resources(self) -> dict[str, float]:
        return {"CPU": sum(self.nodes.values())}

    def alive_nodes(self) -> set[str]:
        return set(self.nodes)

    def start(self, run: StageRun) -> FakeRun:
        self.runs.append(run)
        return FakeRun(self, run)

    def lose(self, node: str, back_after_s: float | None) -> None:
        cpus = self.nodes.pop(node)
        if back_after_s is not None:
            threading.Timer(back_after_s, lambda: self.nodes.__setitem__(node, cpus)).start()


class FakeRun:
    def __init__(self, executor: FakeExecutor, run: StageRun):
        from checkpoints.storage import Storage

        self.ex, self.run = executor, run
        self.job = Storage(executor.storage).child(run.job_id)
        self.store = CheckpointStore(self.job.child(CHECKPOINTS))
        self.items: queue.Queue = queue.Queue()
        self._failure: RunFailure | None = None
        self.thread = threading.Thread(target=self._train, daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ the Running protocol
    def get(self, timeout: float) -> dict | None:
        try:
            return self.items.get(timeout=min(timeout, 0.05))
        except queue.Empty:
            return None

    def finished(self) -> bool:
        return not self.thread.is_alive() and self.items.empty()

    def failure(self) -> RunFailure | None:
        return self._failure

    def close(self) -> None:
        self.thread.join(timeout=10)

    # ------------------------------------------------------------------ "training"
    def _commit(self, row: int, step: int, boundary: bool) -> str:
        plan, stage = self.run.plan, self.run.plan.stages[row]
        tag = tag_for(step, stage.index + 1, boundary)
        self.store.commit(
            tag,
            {"model.pt": f"weights at step {step}".encode()},
            job_id=self.run.job_id,
            stage=stage.index + 1,
            epoch=stage.epoch_of(min(step, stage.step_end - 1)),
            step=step,
            samples_seen=plan.samples_before(step),
            boundary=boundary,
            world_size=stage.workers,
            plan_hash=plan.plan_hash(),
            stage_hash=plan.stage_hash(row),
            spec_hash=self.run.spec.spec_hash(),
            versions={},
        )
        return tag

    def _record(self, row: int, step: int) -> StepRecord:
        plan, stage = self.run.plan, self.run.plan.stages[row]
        lr, momentum = lr_momentum(plan, step)
        return StepRecord(
            step=step,
            stage=stage.index + 1,
            epoch=stage.epoch_of(step),
            samples_seen=plan.samples_before(step + 1),
            loss=1.0 / (1 + step),
            lr=lr,
            momentum=momentum,
            resolution=resolution(plan, step),
            global_batch=stage.global_batch,
            workers=stage.workers,
            grad_accum=stage.grad_accum,
            images_per_s=1000.0,
            time=time.time(),
        )

    def _fail(self, fault: Fault) -> None:
        self.ex.faults.remove(fault)
        if fault.lose_node:
            self.ex.lose(fault.lose_node, fault.back_after_s)
        summary = fault.message.splitlines()[0]
        self.items.put({"worker_errors": {1: (summary, f"Traceback (fake)\n{fault.message}")}})
        name = "RayActorError" if fault.actor_died else "RuntimeError"
        self._failure = RunFailure(f"worker 1: {name}: {summary}", fault.actor_died, fault.message)

    def _train(self) -> None:
        """The rows of the run's stage group, as ``workers.train.train_loop_per_worker`` walks them."""
        row, step = self.run.row, self.run.start_step
        last = self.run.row if self.run.last is None else self.run.last
        while self._stage(row, step):
            scale_pending = any(n.startswith("scale-") for n in self.job.listdir(REQUESTS_DIR))
            if row == last or self.job.exists(STOP_FILE) or scale_pending:
                return
            row += 1
            step = self.run.plan.stages[row].step_start
            self.items.put({"report": Report(started_row=row).model_dump()})

    def _stage(self, row: int, start: int) -> bool:
        """One stage from ``start``: True if it ended with its boundary checkpoint."""
        spec, stage = self.run.spec, self.run.plan.stages[row]
        every_report, every_ckpt = spec.metrics.every_n_steps, spec.checkpoint.every_n_steps
        pending: list[StepRecord] = []
        for step in range(start, stage.step_end):
            fault = next((f for f in self.ex.faults if f.step == step), None)
            if fault is not None:
                self._fail(fault)
                return False
            self.ex.on_step(step)
            time.sleep(self.ex.step_s)
            pending.append(self._record(row, step))
            if step + 1 == stage.step_end:
                break
            if every_ckpt and (step + 1) % every_ckpt == 0:
                self._commit(row, step + 1, boundary=False)
            if len(pending) >= every_report:
                self.items.put({"report": Report(records=pending).model_dump()})
                pending = []
                if self.job.exists(STOP_FILE):
                    tag = self._commit(row, step + 1, boundary=False)
                    end = StageEnd(stage=stage.index + 1, step=step + 1, preempted=True, checkpoint=tag)
                    self.items.put({"report": Report(stage_end=end).model_dump()})
                    return False
        tag = self._commit(row, stage.step_end, boundary=stage.last_segment)
        end = StageEnd(stage=stage.index + 1, step=stage.step_end, val_loss=0.5, val_acc=0.5, checkpoint=tag)
        self.items.put({"report": Report(records=pending, stage_end=end).model_dump()})
        return True
