"""Runs a job, acting on the decisions of ``service.decisions``, through a ``StageExecutor``
(``service.executor``: Ray Train in production, an in-process fake in tests).

The coordinator (this process, on the user's machine or as a Ray job on the head) holds the job's lease
(``service.coordination``) and is the only writer of its record and metrics. Each run is a stage group:
consecutive stages on one worker layout, one ``TorchTrainer.fit``; its workers report every few steps,
end each stage with a committed boundary checkpoint and a ``StageEnd``, and go on with the next stage in
place. Reports become progress (a bar on a terminal, plain lines elsewhere), ``metrics.jsonl`` lines,
job-record updates and the job log in storage.

Worker restarts and ``stagetrain resume`` go through one door: workers load the newest committed
checkpoint in ``<storage>/<job-id>/checkpoints`` (see ``checkpoints``). Ray Train's own checkpointing
is not used, so there is exactly one "latest checkpoint".

Between runs the coordinator applies what users asked for meanwhile: ``stagetrain scale`` requests (new
worker counts for stages not started; a pending request ends a group at the next boundary) and
``stagetrain cancel``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from checkpoints.store import git_revision
from service.analysis import boundary_spikes, plan_stage_steps
from service.console import make_console, styled
from service.coordination import JobLog, LeaseKeeper, LeaseLost, cancel_requested, consume, pending_scales
from service.decisions import (
    Cancelled,
    Completed,
    Fail,
    Finish,
    GiveUp,
    Outcome,
    Preempted,
    Relayout,
    RunStage,
    WaitForCapacity,
    after_outcome,
    check_resume,
    fits_cluster,
    next_action,
    resize_remaining,
    resize_stage,
    stage_completed,
    stage_outcome,
)
from service.executor import RayExecutor, Running, StageExecutor, StageRun
from service.jobs import (
    EXIT_CANCELLED,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_PREEMPTED,
    JobRecord,
    JobStatus,
    JobStore,
    Report,
    StageEnd,
    now,
)
from service.layout import CANCEL_FILE, STOP_FILE
from service.plan import Plan, StagePlan
from service.report import plan_table
from service.sinks import open_sinks
from service.spec import JobSpec
from service.submit import SUBMISSION_ENV

PROGRESS_EVERY_S = 5.0  # plain progress lines when stderr is not a terminal
REQUEST_POLL_S = 1.0  # how often a running stage looks for a cancel request
CAPACITY_POLL_S = 5.0  # how often a job waiting for capacity looks at the cluster again
# After a worker's actor died: how long Ray may take to mark its node dead (a test on one node, where no
# node can be lost, shortens it).
NODE_LOST_WAIT_S = float(os.environ.get("STAGETRAIN_NODE_LOST_WAIT_S", "10"))


@dataclass
class RunOptions:
    job_id: str
    storage: str
    address: str | None = None
    console: Console = field(default_factory=lambda: make_console(stderr=True))


class JobRunner:
    def __init__(
        self,
        spec: JobSpec,
        plan: Plan,
        record: JobRecord,
        jobs: JobStore,
        options: RunOptions,
        lease: LeaseKeeper,
        executor: StageExecutor | None = None,
    ):
        self.spec, self.plan, self.record, self.jobs, self.opt = spec, plan, record, jobs, options
        self.lease = lease
        self.executor = executor or RayExecutor(options.address, jobs.root)
        self.stop = threading.Event()
        self.stop_reason: str | None = None  # "cancel" or "SIGTERM"
        self._grace_timer: threading.Timer | None = None
        self._git_revision = git_revision()  # recorded in every manifest
        self.record.start_attempt(os.environ.get(SUBMISSION_ENV))
        self.sinks: list = []  # metrics.sinks, opened with Ray
        # when the job lost capacity (monotonic), while it has not run a stage since
        self.lost_at: float | None = None
        # Once another coordinator holds the job, every write to it raises LeaseLost (the run ends).
        self.jobs.fence = lease.fenced
        lease.on_lost = self._lease_lost
        self.log = JobLog(jobs.storage, self.record.coordinator_attempts, fence=lease.fenced)
        self._settled: dict[int, Outcome] = {}  # rows of the current run that ended at their boundary
        self._stage_clock = time.perf_counter()  # when the running stage started

    def say(self, text: str, style: str | None = None) -> None:
        """To the console and the job log in storage. ``text`` is never read as markup: it carries
        worker errors (gloo's name source files in brackets), paths and job ids."""
        self.opt.console.print(styled((text, style or "")), markup=False, highlight=False)
        self.log.line(text)

    def event(self, text: str) -> None:
        self.record.event(text)
        self.log.line(text)

    def _sink_failed(self, name: str, error: str) -> None:
        """(A sink's thread.) Said once; the record shows it from the next save (``_note_sinks``)."""
        self.say(
            f"metrics sink {name} failed: {error}; it is off for the rest of this attempt (training goes on; "
            "metrics.jsonl has every record)",
            "yellow",
        )

    def _note_sinks(self) -> bool:
        """The sinks' states into the record; True if they changed since the last call."""
        states = [s.state() for s in self.sinks]
        if states == self.record.sinks:
            return False
        self.record.sinks = states
        return True

    def _close_sinks(self, close_s: float | None = None) -> None:
        """Close every sink (each waits a bounded time, none raises), then save their final states."""
        for sink in self.sinks:
            sink.close() if close_s is None else sink.close(close_s)
        if self._note_sinks():
            try:
                self.jobs.save(self.record)
            except Exception as e:  # noqa: BLE001 - lease lost, storage gone: the job's status is saved
                self.opt.console.print(f"sinks' states not saved: {e}", markup=False, highlight=False)

    def _lease_lost(self, reason: str) -> None:
        """(The lease's renewal thread.) Another coordinator runs the job now: stop at once, write
        nothing (no stop request either: the control files are the new coordinator's). The run ends
        with ``LeaseLost`` at its next write or poll; exiting takes this driver's workers along."""
        self.stop_reason = "lease lost"
        self.stop.set()
        self.opt.console.print(styled((reason, "bold red")), markup=False, highlight=False)

    # -------------------------------------------------------------------------------- main loop

    def run(self) -> int:
        previous = None
        try:
            sid = os.environ.get(SUBMISSION_ENV)
            where = f"Ray job {sid}" if sid else f"host {self.lease.lease.host}"
            if (previous_holder := self.lease.took_over) is not None:
                why = "whose process has ended" if previous_holder.fresh() else "that stopped renewing it"
                self.event(f"took over the lease of a coordinator {why}: {previous_holder.describe()}")
            self.event(f"coordinator attempt {self.record.coordinator_attempts} on {where}")
            # a stop request is one coordinator's; a cancel request left while none ran is honoured
            # (`run` and `resume` by a user, and `submit`, clear one from before they continue a job)
            self.jobs.storage.remove(STOP_FILE)
            self.jobs.save(self.record)
            self.executor.connect()
            self.sinks = open_sinks(self.jobs, self.spec, self.record.current_step, self._sink_failed)
            self._note_sinks()
            if (
                threading.current_thread() is threading.main_thread()
            ):  # after ray.init, which installs its own
                previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            code = self._loop()
            self._write_plot()
            self.say(
                f"job {self.record.job_id} {self.record.status}"
                + (f": {self.record.error}" if self.record.error else "")
            )
            return code
        finally:
            if self._grace_timer is not None:
                self._grace_timer.cancel()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            try:
                self._close_sinks()
            finally:
                self.log.close()
                self.lease.release()

    def _write_plot(self) -> None:
        """``metrics.png``, written while the lease is held: once ``stagetrain wait`` sees the job ended
        (final record, lease released), none of its files changes any more. Best-effort: a plot that
        fails is logged, never decides the job's status."""
        import io

        from service.layout import PLOT_FILE
        from service.report import plot_metrics

        try:
            metrics = self.jobs.read_metrics()
            if metrics:
                buf = io.BytesIO()
                plot_metrics(metrics, buf, record=self.record)
                self.jobs.storage.write_bytes(buf.getvalue(), PLOT_FILE)
        except Exception as e:  # noqa: BLE001 - side work
            self.log.line(f"could not write {PLOT_FILE}: {type(e).__name__}: {e}")

    def _loop(self) -> int:
        while True:
            # the newest verified checkpoint (hashed once, here): where the job is, what workers restore
            manifest = self.jobs.checkpoints.newest_verified()
            for row, st in enumerate(self.plan.stages):  # e.g. the driver died right after a boundary commit
                srec = self.record.stages[st.index]
                if srec.status != "completed" and stage_completed(self.plan, row, manifest):
                    srec.status, srec.finished = "completed", srec.finished or now()
            step = manifest.step if manifest else 0
            if cancel_requested(self.jobs.storage) and step < self.plan.total_steps:
                return self._settle(
                    min(self.record.current_stage, len(self.record.stages)) - 1,
                    Cancelled("cancelled between stages"),
                    step,
                )
            if self.stop.is_set():  # SIGTERM while waiting for capacity
                if self._grace_timer is not None:
                    self._grace_timer.cancel()
                return self._settle(
                    self.record.current_stage - 1, Preempted(f"{self.stop_reason} requested"), step
                )
            self._apply_scale_requests(step)
            waiting = None if self.lost_at is None else time.monotonic() - self.lost_at
            action = next_action(
                self.record, self.plan, manifest, self.spec, self.executor.cluster_resources(), waiting
            )
            if isinstance(action, Finish):
                self.record.finish(self.plan.total_steps)
                self.jobs.save(self.record)
                return EXIT_OK
            if isinstance(action, Fail):
                return self._fail(action.reason)
            if isinstance(action, GiveUp):
                return self._settle(self.plan.stage_at(step).index, action.outcome, step)
            if isinstance(action, WaitForCapacity):
                self._wait_for_capacity(action, step)
                continue
            if isinstance(action, Relayout):
                self._relayout(action, step)
                continue
            assert isinstance(action, RunStage)
            self.lost_at = None
            row, outcome, step = self._run_stage(action, manifest.tag if manifest else None)
            if isinstance(outcome, Completed):
                continue
            srec = self.record.stages[self.plan.stages[row].index]
            retry = after_outcome(outcome, self.spec.failure, srec.restarts)
            if retry is None:
                return self._settle(srec.stage - 1, outcome, step)
            if retry.infra:
                srec.infra_failures += 1
                self.lost_at = time.monotonic()
            else:
                srec.restarts += 1
            self.say(f"stage {srec.stage}: {retry.reason}; running it again from step {step}", "yellow")
            self.record.event(f"stage {srec.stage} runs again from step {step}: {retry.reason}")
            self.jobs.save(self.record)
            if isinstance(outcome, Preempted) and outcome.nodes:
                self._await_gone(outcome.nodes)

    def _wait_for_capacity(self, action: WaitForCapacity, step: int) -> None:
        """Status ``waiting_for_capacity`` (in ``status`` and the log) until the next decision, a few
        seconds on; cancel requests and SIGTERM are seen meanwhile."""
        if self.record.status != JobStatus.WAITING_FOR_CAPACITY:
            self.record.move(JobStatus.WAITING_FOR_CAPACITY)
            self.record.waiting_for = action.need
            self.event(
                f"waiting up to {action.left_s:.0f}s for capacity at step {step} "
                f"(failure.capacity_wait_s): {action.need}"
            )
            self.say(f"waiting up to {action.left_s:.0f}s for capacity: {action.need}", "yellow")
            self.jobs.save(self.record)
        deadline = time.monotonic() + min(CAPACITY_POLL_S, action.left_s)
        while time.monotonic() < deadline and not cancel_requested(self.jobs.storage):
            if self.stop.wait(REQUEST_POLL_S):  # SIGTERM: the loop settles the job
                return

    def _relayout(self, action: Relayout, step: int) -> None:
        """Continue stage ``action.stage`` on fewer workers (``stages[].min_workers``), from ``step``."""
        spec = resize_stage(self.spec, action.stage, action.workers)
        plan, added = self.record.relayout(
            spec,
            step,
            f"elastic: {action.reason}",
            [f"stages[{action.stage}] on {action.workers} worker(s) from step {step}"],
            workers=action.workers,
            from_stage=action.stage + 1,
        )
        st = spec.stages[action.stage]
        how = (
            f"global batch {st.global_batch} kept: {st.workers} x {st.batch_size} x accum {st.grad_accum}"
            if not added
            else f"global batch now {st.global_batch}: LR x{plan.stage_at(step).lr_scale:.4g} from step "
            f"{step}"
        )
        self.spec, self.plan = spec, plan
        self.say(f"stage {action.stage + 1} continues on {action.workers} worker(s): {how}", "yellow")
        self.log.line(f"new plan {plan.plan_hash()} after: {action.reason}")
        self.jobs.save(self.record)

    def _await_gone(self, nodes: tuple[str, ...]) -> None:
        """After a termination notice and its checkpoint: give the noticed nodes up to
        ``preemption.notice_window_s`` to go, so the next attempt is not placed on them."""
        deadline = time.monotonic() + self.spec.preemption.notice_window_s
        self.say(f"waiting for noticed node(s) {', '.join(n[:8] for n in nodes)} to go", "yellow")
        while time.monotonic() < deadline:
            if not set(nodes) & self.executor.alive_nodes() or self.stop.wait(1.0):
                return
        self.log.line("the noticed node(s) are still there; continuing")

    def _apply_scale_requests(self, step: int) -> None:
        """``stagetrain scale`` requests, at a stage boundary: the same re-layout as ``resume --workers``."""
        for name, req in pending_scales(self.jobs.storage):
            try:
                spec = resize_remaining(self.spec, req.from_stage - 1, req.workers)
                first = self.plan.stage_at(min(step, self.plan.total_steps - 1))  # where the job is
                started = step > first.step_start
                if req.from_stage < first.number or (req.from_stage == first.number and started):
                    raise ValueError(f"stage {req.from_stage} has started (step {step})")
                changes = check_resume(self.record, self.plan, spec, step)
                plan = self.record.plan(spec, self.record.history)
                res = spec.resources
                for row, st in enumerate(plan.stages):
                    if st.number >= req.from_stage and (
                        problem := fits_cluster(
                            plan,
                            row,
                            res.use_gpu,
                            res.cpus_per_worker,
                            res.gpus_per_worker,
                            self.executor.cluster_resources(),
                        )
                    ):
                        raise ValueError(problem)
                plan, _ = self.record.relayout(
                    spec,
                    step,
                    f"scale request {name}",
                    changes,
                    workers=req.workers,
                    from_stage=req.from_stage,
                )
                self.spec, self.plan = spec, plan
                self.say(f"scale request {name}: stages {req.from_stage}+ now run on {req.workers} worker(s)")
                self.opt.console.print(plan_table(plan))
                self.log.line(
                    f"new plan {plan.plan_hash()}: "
                    + "; ".join(
                        f"stage {s.label}: {s.workers} x {s.batch_size} x {s.grad_accum} = {s.global_batch}, "
                        f"LR x{s.lr_scale:.4g}"
                        for s in plan.stages
                    )
                )
            except ValueError as e:
                self.say(f"scale request {name} ignored: {e}", "yellow")
                self.record.event(f"scale request {name} ignored: {e}")
            consume(self.jobs.storage, name)
            self.jobs.save(self.record)

    def _run_stage(self, action: RunStage, restore: str | None) -> tuple[int, Outcome, int]:
        """One run of plan rows ``action.stage``..``action.last`` (a stage group) on the executor. Each
        stage that ends inside the group is settled as it ends (``_stage_started``/``_stage_done``).
        Returns the row the run ended in, that row's outcome, and the step of the newest committed
        checkpoint after it."""
        self._settled = {}
        self._stage_started(action.stage, action.start_step, action.attempt)
        nodes_before = self.executor.alive_nodes()
        run = self.executor.start(
            StageRun(
                self.spec,
                self.plan,
                action.stage,
                action.start_step,
                action.attempt,
                self.record.job_id,
                self.opt.storage,
                self._git_revision,
                last=action.last,
                restore=restore,
            )
        )
        try:
            row, end, lost = self._follow(run, action.stage, action.start_step)
        finally:
            run.close()
        stage = self.plan.stages[row]
        failure = run.failure()
        node_lost = False
        if failure:
            self.log.line(failure.details)
            # a worker actor died: was its node lost (infrastructure), or the process (the code, OOM)?
            node_lost = failure.actor_died and self._node_lost(nodes_before, wait_s=NODE_LOST_WAIT_S)
            lost = lost or self._capacity_lost(stage)
        latest = self.jobs.checkpoints.latest(verify=False)
        manifest = latest[0] if latest else None
        if row in self._settled and not failure and not lost:  # the group ended at this stage's boundary
            return row, self._settled[row], manifest.step
        outcome = stage_outcome(
            self.plan,
            row,
            end,
            failure.cause if failure else None,
            lost,
            self.stop_reason,
            manifest,
            node_lost=node_lost,
        )
        if row not in self._settled:
            self._stage_done(row, end, outcome, manifest)
        return row, outcome, manifest.step if manifest else action.start_step

    def _stage_started(self, row: int, step: int, attempt: int) -> None:
        stage = self.plan.stages[row]
        srec = self.record.stages[stage.index]
        srec.status, srec.attempts, srec.workers = "running", attempt, stage.workers
        srec.started = srec.started or now()
        self.record.cluster = {
            k: float(v) for k, v in self.executor.cluster_resources().items() if k in ("CPU", "GPU")
        }
        self.record.move(JobStatus.RUNNING)
        self.record.current_stage = stage.number
        self.record.waiting_for = None
        self.record.current_step = step
        self.say(
            f"stage {stage.label}: {stage.resolution}px, {stage.workers} worker(s) x {stage.batch_size} x "
            f"accum {stage.grad_accum} = global batch {stage.global_batch}, steps {step}.."
            f"{stage.step_end - 1} (attempt {attempt})"
        )
        if step > stage.step_start:
            self.event(f"stage {stage.label} continues from step {step} (attempt {attempt})")
        self.jobs.save(self.record)
        self._stage_clock = time.perf_counter()

    def _stage_done(self, row: int, end: StageEnd | None, outcome: Outcome, manifest) -> None:
        stage = self.plan.stages[row]
        self.record.stages[stage.index].seconds += time.perf_counter() - self._stage_clock
        if end is not None:
            self.record.checkpoint_failures.extend(end.checkpoint_failures)
        self._note_spikes()
        if isinstance(outcome, Completed):
            self.record.settle(stage.index, outcome, manifest.step)
            self.jobs.save(self.record)
            self.say(
                f"stage {stage.label} completed: val top-1 {outcome.val_acc:.2%}"
                + (f", top-5 {outcome.val_top5:.2%}" if outcome.val_top5 is not None else "")
                + f", checkpoint {outcome.checkpoint}"
                if outcome.val_acc is not None
                else f"stage {stage.label} completed: {outcome.checkpoint}"
            )

    def _stage_ended(self, row: int, end: StageEnd) -> None:
        """Stage ``row`` ended with its boundary checkpoint while the run goes on (or ends here): settle
        it now, whatever comes after it in the run. Judged by the checkpoint the stage end names, not the
        newest one: the workers may already have committed a periodic checkpoint of the next stage."""
        info = self.jobs.checkpoints.inspect(end.checkpoint)[0] if end.checkpoint else None
        manifest = info.manifest if info is not None and info.problem is None else None
        outcome = stage_outcome(self.plan, row, end, None, None, None, manifest)
        if isinstance(outcome, Completed):
            self._stage_done(row, end, outcome, manifest)
            self._settled[row] = outcome

    def _note_spikes(self) -> None:
        """Each stage's boundary loss spike, into the record (``status`` and the summary table show it)."""
        for stage, spike in boundary_spikes(self.jobs.read_metrics(), plan_stage_steps(self.plan)).items():
            if stage <= len(self.record.stages):
                self.record.stages[stage - 1].spike = spike

    def _settle(self, stage: int, outcome, step: int) -> int:
        self.record.settle(stage, outcome, step)
        self.jobs.save(self.record)
        self.log.line(f"{self.record.status} at step {step}: {outcome.reason}")
        if isinstance(outcome, Preempted):
            if outcome.lost_capacity:
                self.say(
                    f"the cluster lost capacity: {outcome.lost_capacity}. Resume when it is back, or now "
                    f"with fewer workers: stagetrain resume {self.record.job_id} --workers N",
                    "yellow",
                )
            self.say(
                f"preempted at step {step}; continue with: stagetrain resume {self.record.job_id} "
                f"--storage {self.opt.storage}",
                "yellow",
            )
            return EXIT_PREEMPTED
        if isinstance(outcome, Cancelled):
            self.jobs.storage.remove(CANCEL_FILE)  # taken
            self.say(
                f"cancelled at step {step}; continue with: stagetrain resume {self.record.job_id} "
                f"--storage {self.opt.storage}",
                "yellow",
            )
            return EXIT_CANCELLED
        self.say(f"job failed: {outcome.reason}", "bold red")
        return EXIT_FAILED

    def _follow(self, run: Running, row: int, start_step: int) -> tuple[int, StageEnd | None, str | None]:
        """Drain reports while the run goes on: progress, metrics file, job record, log; a stage that
        ends while the run goes on is settled and the next one started (a stage group). Returns the row
        the run is in at its end, that stage's last report (if it came) and, if the cluster lost the
        capacity for the stage meanwhile, what it lacks."""
        end, rates = None, []
        tty = self.opt.console.is_terminal
        columns = [
            TextColumn("stage {task.fields[n]} {task.fields[res]}px", markup=False),
            BarColumn(),
            TextColumn("{task.completed:,.0f}/{task.total:,.0f} samples", markup=False),
            TextColumn("{task.fields[info]}", markup=False),
            TimeElapsedColumn(),
        ]
        bar = Progress(*columns, console=self.opt.console, transient=False, disable=not tty)
        last_line, last_poll, failed = 0.0, time.monotonic(), False

        def new_task(stage: StagePlan, step: int):
            done = self.plan.samples_before(step) - stage.sample_start
            return bar.add_task(
                "", total=stage.samples, n=stage.label, res=stage.resolution, info="", completed=done
            )

        stage = self.plan.stages[row]
        with bar:
            task = new_task(stage, start_step)
            while True:
                if time.monotonic() - last_poll > REQUEST_POLL_S:
                    last_poll = time.monotonic()
                    self.lease.check()
                    if not self.stop.is_set() and cancel_requested(self.jobs.storage):
                        self._request_stop("cancel")
                item = run.get(timeout=0.5)
                if item is None:
                    if run.finished():
                        break
                    if failed and (lost := self._capacity_lost(stage)):
                        return row, end, lost
                    continue
                if "worker_errors" in item:
                    failed = True
                    for rank, (_, text) in item["worker_errors"].items():
                        self.log.line(f"worker {rank} failed:\n{text}")
                    first = {r: summary for r, (summary, _) in item["worker_errors"].items()}
                    self.event(f"stage {stage.label}: worker group failed ({first})")
                    self.jobs.save(self.record)
                    continue
                report = Report.model_validate(item["report"])
                if report.started_row is not None:  # the group goes on with its next stage
                    row, end, rates = report.started_row, None, []
                    stage = self.plan.stages[row]
                    self._stage_started(row, stage.step_start, self.record.stages[stage.index].attempts + 1)
                    bar.update(task, visible=False)
                    task = new_task(stage, stage.step_start)
                    continue
                self.jobs.append_metrics([*report.records, *report.evals])
                for sink in self.sinks:  # never blocks (service.sinks.Background)
                    sink.write(
                        [*report.records, *report.evals, *([report.stage_end] if report.stage_end else [])]
                    )
                if self._note_sinks():  # a sink failed or dropped records: status shows it
                    self.jobs.save(self.record)
                if report.records:
                    last = report.records[-1]
                    rates.append(last.images_per_s)
                    self.record.current_step, self.record.images_per_s = last.step + 1, last.images_per_s
                    done = last.samples_seen - stage.sample_start
                    info = f"{last.images_per_s:,.0f} img/s  loss {last.loss:.3f}  lr {last.lr:.3g}"
                    bar.update(task, completed=done, info=info)
                    if time.monotonic() - last_line >= PROGRESS_EVERY_S:
                        last_line = time.monotonic()
                        line = (
                            f"stage {stage.label} {stage.resolution}px: step "
                            f"{last.step + 1}/{self.plan.total_steps}, "
                            f"{done:,}/{stage.samples:,} samples ({done / stage.samples:.0%})  {info}"
                        )
                        self.log.line(line)
                        if not tty:
                            self.opt.console.print(line, markup=False, highlight=False)
                if report.stage_end is not None:
                    end = report.stage_end
                    self.jobs.append_metrics([end])
                    if rates:
                        self.record.stages[stage.index].images_per_s = sum(rates) / len(rates)
                    if not end.preempted and end.step == stage.step_end:
                        self._stage_ended(row, end)
        return row, end, None

    def _node_lost(self, before: set[str], wait_s: float) -> bool:
        """Did a node alive at the stage's start die? Ray marks a dead node within seconds: look that
        long."""
        deadline = time.monotonic() + wait_s
        while True:
            if before - self.executor.alive_nodes():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)

    def _capacity_lost(self, stage, wait_s: float = 0.0) -> str | None:
        """After a worker-group failure: can the cluster still hold the stage? If a node went away for
        good, Ray Train would wait for resources that never come (or give up): stop as preempted.
        ``wait_s``: keep looking that long, as Ray notices a dead node within seconds."""
        res = self.spec.resources
        deadline = time.monotonic() + wait_s
        while True:
            lost = fits_cluster(
                self.plan,
                self.plan.row(stage),
                res.use_gpu,
                res.cpus_per_worker,
                res.gpus_per_worker,
                self.executor.cluster_resources(),
            )
            if lost or time.monotonic() >= deadline:
                return lost
            time.sleep(1.0)

    def _request_stop(self, reason: str) -> None:
        """Ask the workers (through storage, reachable from every node) to stop after the current step and
        commit a checkpoint; the stage then ends preempted or cancelled."""
        if self.stop.is_set() or self.lease.lost:
            return
        self.stop_reason = reason
        self.stop.set()
        self.say(
            f"{reason}: stopping after the current step, committing a checkpoint "
            f"(grace {self.spec.preemption.grace_seconds:g}s)",
            "yellow",
        )
        self.jobs.storage.write_text(f'{{"reason": "{reason}"}}', STOP_FILE)
        self._grace_timer = threading.Timer(self.spec.preemption.grace_seconds, self._grace_expired)
        self._grace_timer.start()

    def _on_sigterm(self, signum, frame) -> None:
        """Preemption notice (or ``ray job stop``, which ``stagetrain cancel`` may send)."""
        self._request_stop("cancel" if cancel_requested(self.jobs.storage) else "SIGTERM")

    def _grace_expired(self) -> None:
        reason = "the grace period ran out before the workers stopped"
        outcome = Cancelled(reason) if self.stop_reason == "cancel" else Preempted(f"SIGTERM: {reason}")
        self.record.settle(self.record.current_stage - 1, outcome, self.record.current_step)
        try:
            self.jobs.save(self.record)
        except LeaseLost:
            pass  # another coordinator's job now
        self._close_sinks(close_s=2.0)
        self.log.close()
        self.lease.release()
        os._exit(EXIT_CANCELLED if isinstance(outcome, Cancelled) else EXIT_PREEMPTED)

    def _fail(self, reason: str) -> int:
        self.record.fail(reason)
        self.jobs.save(self.record)
        self.say(f"job failed: {reason}", "bold red")
        return EXIT_FAILED
