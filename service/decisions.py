"""The coordinator's decisions, as values, computed in one place and tested without Ray.

Given the job record, the plan and the latest committed checkpoint, ``next_action`` says what to do
next (run a stage, continue it on fewer workers, wait for capacity, give up); ``stage_outcome`` what a
finished ``fit()`` amounts to; ``after_outcome`` whether the coordinator runs a stage again by itself;
``check_resume`` whether a (possibly edited) spec may continue a job; ``fits_cluster`` whether a stage
can be placed at all. ``service.runner`` executes the decisions on Ray; ``JobRecord.settle`` turns
outcomes into statuses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from checkpoints.store import Manifest
from service.plan import Plan, StageLayout
from service.spec import FailureSpec, JobSpec

if TYPE_CHECKING:
    from service.jobs import JobRecord, StageEnd


@dataclass(frozen=True)
class RunStage:
    """Run plan rows ``stage``..``last`` (a stage group: one worker layout) from ``start_step``."""

    stage: int  # row in plan.stages (a stage, or a segment of one after a mid-stage resize)
    start_step: int  # where the stage's workers will pick up (from the latest checkpoint)
    attempt: int  # 1-based; makes the Ray run name unique
    last: int | None = None  # the group's last row (None: ``stage`` alone)


@dataclass(frozen=True)
class Finish:
    pass


@dataclass(frozen=True)
class Fail:
    reason: str


@dataclass(frozen=True)
class Relayout:
    """Continue stage ``stage`` (0-based) on ``workers`` now, as the cluster cannot hold its planned
    count: the stage's global batch is kept by gradient accumulation when it divides (see
    ``resize_stage``). Later stages keep their planned worker counts."""

    stage: int
    workers: int
    reason: str  # what the cluster lacks for the planned count


@dataclass(frozen=True)
class WaitForCapacity:
    need: str  # what the cluster lacks
    left_s: float  # of failure.capacity_wait_s


@dataclass(frozen=True)
class GiveUp:
    outcome: Outcome


Action = RunStage | Finish | Fail | Relayout | WaitForCapacity | GiveUp


@dataclass(frozen=True)
class Completed:
    checkpoint: str  # the committed boundary checkpoint
    val_loss: float | None = None
    val_acc: float | None = None
    val_top5: float | None = None  # when model.num_classes > 5


@dataclass(frozen=True)
class Preempted:
    reason: str
    lost_capacity: str | None = None  # what the cluster lacks now, when a node went away
    # "stop": the coordinator was asked to stop (SIGTERM); "node": worker nodes went away; "notice": a
    # worker saw its node's termination notice and the stage stopped with a checkpoint. The last two are
    # infrastructure: the coordinator recovers from them by itself, without using up max_failures.
    cause: str = "stop"
    nodes: tuple[str, ...] = ()  # the Ray node ids that got a notice


@dataclass(frozen=True)
class Cancelled:
    reason: str


@dataclass(frozen=True)
class Failed:
    reason: str


Outcome = Completed | Preempted | Cancelled | Failed


def stage_outcome(
    plan: Plan,
    row: int,
    end: StageEnd | None,
    error: str | None,
    lost_capacity: str | None,
    stop_requested: str | None,
    latest: Manifest | None,
    node_lost: bool = False,
) -> Outcome:
    """What one ``fit()`` of plan row ``row`` amounts to. ``end``: the stage's last report (None if
    it never came); ``error``: the root cause if ``fit()`` raised; ``lost_capacity``: after a worker-group
    failure, what the cluster lacks for the stage now (None if it still fits); ``stop_requested``: why the
    coordinator asked the workers to stop (``"cancel"``, ``"SIGTERM"``) or None; ``latest``: the newest
    committed checkpoint after the stage; ``node_lost``: a node that was alive when the stage started
    died with its workers (then the error is the infrastructure's, not the training code's)."""
    label = plan.stages[row].label
    at = f"checkpoint {latest.tag}" if latest else "no checkpoint"
    if lost_capacity:  # checked only after the worker group failed
        return Preempted(f"the cluster lost capacity ({at})", lost_capacity=lost_capacity, cause="node")
    if error is not None and node_lost:
        return Preempted(f"a worker node went away ({error}; {at})", cause="node")
    if error is not None:
        return Failed(f"stage {label} failed: {error}")
    if stop_requested == "cancel":
        return Cancelled(f"cancel requested ({at})")
    if stop_requested:
        return Preempted(f"{stop_requested} requested ({at})")
    if end is not None and end.preempted and end.notices:
        return Preempted(
            f"termination notice: {'; '.join(end.notices)} ({at})",
            cause="notice",
            nodes=tuple(end.notice_nodes),
        )
    if end is not None and end.preempted:
        return Preempted(f"stop requested ({at})")
    if not stage_completed(plan, row, latest):
        return Failed(f"stage {label} ended without committing its boundary checkpoint")
    return Completed(
        checkpoint=latest.tag,
        val_loss=end.val_loss if end else None,
        val_acc=end.val_acc if end else None,
        val_top5=end.val_top5 if end else None,
    )


def next_action(
    record: JobRecord,
    plan: Plan,
    latest: Manifest | None,
    spec: JobSpec,
    cluster: dict[str, float],
    waiting_s: float | None = None,
) -> Action:
    """Run the stage the latest committed checkpoint leads to, or finish. When the cluster cannot hold
    the stage's workers: continue on fewer if the stage's ``min_workers`` allows; else, if the job lost
    capacity (``waiting_s``: seconds since, None if it did not), wait up to ``failure.capacity_wait_s``
    and then give up as preempted; else fail at once (the cluster is simply too small)."""
    step = latest.step if latest is not None else 0
    if step >= plan.total_steps:
        return Finish()
    stage = plan.stage_at(step)
    row = plan.row(stage)
    res = spec.resources
    problem = fits_cluster(plan, row, res.use_gpu, res.cpus_per_worker, res.gpus_per_worker, cluster)
    if not problem:
        attempt = record.stages[stage.index].attempts + 1
        return RunStage(stage=row, start_step=step, attempt=attempt, last=group_end(plan, row))
    fewest = spec.stages[stage.index].fewest_workers(spec.failure)
    for workers in range(stage.workers - 1, fewest - 1, -1):
        if not _shortfall(
            stage.index, workers, res.use_gpu, res.cpus_per_worker, res.gpus_per_worker, cluster
        ):
            return Relayout(stage=stage.index, workers=workers, reason=problem)
    if waiting_s is None:
        return Fail(problem)
    wait = spec.failure.capacity_wait_s
    if waiting_s < wait:
        return WaitForCapacity(need=problem, left_s=wait - waiting_s)
    at = f"checkpoint {latest.tag}" if latest else "no checkpoint"
    waited = f"waited {wait:g}s for capacity" if wait else "failure.capacity_wait_s is 0"
    return GiveUp(
        Preempted(f"the cluster lost capacity; {waited} ({at})", lost_capacity=problem, cause="node")
    )


# Spec fields naming user code: a worker error that starts with one (``model.builder: cannot import ...``)
# is the job's configuration, not a crash worth retrying.
CONFIG_FIELDS = ("model.builder", "data.factory", "regularization.dropout", "regularization.drop_path")
# A worker error about the data itself (``workers.data``: an image that cannot be decoded with
# ``data.on_bad_image: error``, a prepared folder whose files changed since ``stagetrain prepare``): the
# same files on every attempt.
DATA_ERRORS = ("data: image ",)


@dataclass(frozen=True)
class Retry:
    reason: str
    infra: bool  # lost nodes or a notice: not counted against failure.max_failures


def after_outcome(outcome: Outcome, failure: FailureSpec, restarts: int) -> Retry | None:
    """Does the coordinator run the stage again by itself (from the newest committed checkpoint, as a new
    attempt)? Infrastructure losses always (``next_action`` then decides where and when); a crash of the
    training code while the stage's ``restarts`` are under ``failure.max_failures``. None: the outcome
    settles the job (completed, cancelled, asked to stop, out of retries)."""
    if isinstance(outcome, Preempted) and outcome.cause in ("node", "notice"):
        return Retry(outcome.reason, infra=True)
    if isinstance(outcome, Failed) and any(f"{field}:" in outcome.reason for field in CONFIG_FIELDS):
        return None  # the job's own import paths do not resolve: the same on every attempt
    if isinstance(outcome, Failed) and any(error in outcome.reason for error in DATA_ERRORS):
        return None  # a bad image or a changed prepared folder: the same files on every attempt
    if isinstance(outcome, Failed) and (failure.max_failures == -1 or restarts < failure.max_failures):
        limit = "unlimited" if failure.max_failures == -1 else failure.max_failures
        return Retry(f"{outcome.reason}; retry {restarts + 1} of {limit}", infra=False)
    return None


def group_end(plan: Plan, row: int) -> int:
    """The last plan row that runs with ``row`` in one worker group: the rows after it with the same
    worker count (resources are job-wide). The workers move to the next stage's resolution, batch, data
    and LR in place; only a change of layout needs new workers. A scale request pending at a boundary
    ends the group there too (the workers look), so the coordinator can apply it."""
    last = row
    while last + 1 < len(plan.stages) and plan.stages[last + 1].workers == plan.stages[row].workers:
        last += 1
    return last


def stage_completed(plan: Plan, row: int, latest: Manifest | None) -> bool:
    """A stage is complete only once its boundary checkpoint is committed."""
    stage = plan.stages[row]
    return stage.last_segment and latest is not None and latest.boundary and latest.step >= stage.step_end


class IncompatibleResume(ValueError):
    pass


def check_resume(record: JobRecord, old_plan: Plan, new_spec: JobSpec, step: int) -> list[str]:
    """May ``new_spec`` continue a job whose latest checkpoint is at ``step``? Model, optimizer, data and
    schedule must be unchanged, and so must every stage that already ran (fully or partly) -- except how
    it lays out its global batch over workers. Returns the changes to stages not yet started (to be
    recorded); raises ``IncompatibleResume`` explaining what differs otherwise."""
    old_spec = record.job_spec()
    problems = []
    for field in ("model", "optimizer", "seed", "data"):
        if getattr(old_spec, field) != getattr(new_spec, field):
            problems.append(f"{field}: was {getattr(old_spec, field)!r}, now {getattr(new_spec, field)!r}")
    if old_spec.schedule != new_spec.schedule or old_spec.lr_scaling != new_spec.lr_scaling:
        problems.append(
            "schedule / lr_scaling changed: the LR already applied would disagree with the new curve"
        )
    if (old_spec.train.ema is None) != (new_spec.train.ema is None) and step > 0:
        problems.append(
            f"train.ema: was {'on' if old_spec.train.ema else 'off'}, now "
            f"{'on' if new_spec.train.ema else 'off'}: the checkpoints hold the average only when it was on"
        )
    started = {s.index for s in old_plan.stages if s.step_start < step}  # ran at least one step
    changes = []
    for i in range(max(len(old_spec.stages), len(new_spec.stages))):
        old = old_spec.stages[i] if i < len(old_spec.stages) else None
        new = new_spec.stages[i] if i < len(new_spec.stages) else None
        if old == new:
            continue
        if i in started:
            if new is None or _what(old) != _what(new):
                problems.append(
                    f"stages[{i}] already ran (checkpoint at step {step}) and cannot change: "
                    + ("removed" if new is None else _diff(old, new))
                )
        else:
            changes.append(
                f"stages[{i}]: " + ("added" if old is None else "removed" if new is None else _diff(old, new))
            )
    if problems:
        raise IncompatibleResume("cannot resume job {}: {}".format(record.job_id, "; ".join(problems)))
    return changes


def spec_differences(old: JobSpec, new: JobSpec, layout: bool = True) -> list[str]:
    """What differs between two specs, one short line per top-level field or stage. ``layout=False``
    ignores how stages lay out their global batch over workers (what ``scale``/``resume --workers``
    change in a job's recorded spec)."""
    out = []
    a, b = old.model_dump(mode="json"), new.model_dump(mode="json")
    for key in a.keys() | b.keys():
        if key == "stages" or a.get(key) == b.get(key):
            continue
        out.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    for i in range(max(len(old.stages), len(new.stages))):
        x = old.stages[i] if i < len(old.stages) else None
        y = new.stages[i] if i < len(new.stages) else None
        if x is not None and y is not None and not layout and _what(x) == _what(y):
            continue
        if x != y:
            out.append(f"stages[{i}]: " + ("added" if x is None else "removed" if y is None else _diff(x, y)))
    return sorted(out)


def _what(stage) -> dict:
    """A stage without its worker layout: what it computes."""
    return stage.model_dump(exclude={"workers", "batch_size", "grad_accum", "compile", "min_workers"})


def _diff(old, new) -> str:
    fields = (
        "resolution",
        "epochs",
        "data_fraction",
        "batch_size",
        "workers",
        "grad_accum",
        "max_lr",
        "pct_start",
    )
    return (
        ", ".join(
            f"{f} {getattr(old, f)} -> {getattr(new, f)}"
            for f in fields
            if getattr(old, f) != getattr(new, f)
        )
        or "changed"
    )


def layout_history(old_plan: Plan, new_spec: JobSpec, step: int) -> list[StageLayout]:
    """If a resume changes the global batch of the stage it interrupts, the steps it already ran keep
    their layout: record it, so the new plan splits the stage there (see ``build_plan``)."""
    if step >= old_plan.total_steps:
        return []
    current = old_plan.stage_at(step)
    new = new_spec.stages[current.index]
    if step == current.step_start or new.global_batch == current.global_batch:
        return []
    return [
        StageLayout(
            stage=current.index,
            until_step=step,
            workers=current.workers,
            batch_size=current.batch_size,
            grad_accum=current.grad_accum,
        )
    ]


def fits_cluster(
    plan: Plan,
    row: int,
    use_gpu: bool,
    cpus_per_worker: float,
    gpus_per_worker: float,
    cluster: dict[str, float],
) -> str | None:
    """None if the cluster can hold the stage's workers, else a message saying what is missing."""
    s = plan.stages[row]
    return _shortfall(s.index, s.workers, use_gpu, cpus_per_worker, gpus_per_worker, cluster)


def _shortfall(
    stage: int, workers: int, use_gpu: bool, cpus_per_worker: float, gpus_per_worker: float, cluster: dict
) -> str | None:
    need_cpu = workers * cpus_per_worker
    have_cpu = cluster.get("CPU", 0)
    if need_cpu > have_cpu:
        return (
            f"stage {stage + 1} needs {workers} workers x {cpus_per_worker:g} CPUs = {need_cpu:g} CPUs, "
            "but the "
            f"Ray cluster has {have_cpu:g}; lower stages[{stage}].workers or resources.cpus_per_worker, "
            "or add nodes"
        )
    if use_gpu and workers * gpus_per_worker > cluster.get("GPU", 0):
        return (
            f"stage {stage + 1} needs {workers * gpus_per_worker:g} GPUs, but the Ray cluster has "
            f"{cluster.get('GPU', 0):g}; lower stages[{stage}].workers or add GPU nodes"
        )
    return None


def resize_remaining(spec: JobSpec, first_stage: int, workers: int) -> JobSpec:
    """The spec with ``workers`` for stages ``first_stage`` onwards. With ``keep_global_batch`` each
    stage keeps its global batch by re-splitting it into per-worker micro-batches (no larger than
    before, so memory per worker does not grow) and gradient accumulation; otherwise batch_size and
    grad_accum stay and the global batch (and so the LR, by ``lr_scaling.rule``) changes."""
    stages = []
    for i, st in enumerate(spec.stages):
        if i < first_stage or st.workers == workers:
            stages.append(st)
            continue
        if not spec.keep_global_batch:
            stages.append(st.model_copy(update={"workers": workers}))
            continue
        if st.global_batch % workers:
            raise ValueError(
                f"--workers {workers}: stages[{i}] global batch {st.global_batch} does not split evenly "
                f"over {workers} workers; pick another worker count or set keep_global_batch: false to "
                "rescale the LR"
            )
        stages.append(_split(st, workers))
    return spec.model_copy(update={"stages": stages})


def resize_stage(spec: JobSpec, stage: int, workers: int) -> JobSpec:
    """The spec with stage ``stage`` (0-based) on ``workers`` (elastic continuation): its global batch is
    kept through gradient accumulation when it divides over ``workers`` (the optimisation is unchanged),
    else the micro-batch stays and the global batch, so the LR by ``lr_scaling.rule``, changes."""
    st = spec.stages[stage]
    new = (
        _split(st, workers) if st.global_batch % workers == 0 else st.model_copy(update={"workers": workers})
    )
    return spec.model_copy(update={"stages": [new if i == stage else s for i, s in enumerate(spec.stages)]})


def _split(st, workers: int):
    """``st`` on ``workers`` with the same global batch: per-worker micro-batches no larger than before
    (memory per worker does not grow) and gradient accumulation."""
    per_worker = st.global_batch // workers
    accum = next(
        a for a in range(1, per_worker + 1) if per_worker % a == 0 and per_worker // a <= st.batch_size
    )
    return st.model_copy(update={"workers": workers, "batch_size": per_worker // accum, "grad_accum": accum})


def keeper_action(
    status: str,
    coordinator_alive: bool,
    ray_state: str | None,
    restarts: int,
    max_restarts: int,
    cancel_requested: bool = False,
) -> str:
    """What ``submit --max-restarts``'s keeper does now: ``"done"`` (the job has a final status and no
    coordinator runs it), ``"watch"``, ``"resubmit"`` (the coordinator's Ray job ended but the job has no
    final status and no coordinator holds its lease: it died, e.g. OOM-killed or stopped by the system),
    ``"cancel"`` (that, with a cancel request nobody took: the job ends cancelled, not restarted), or
    ``"give_up"`` (it died more than ``max_restarts`` times)."""
    from service.jobs import TERMINAL

    if status in TERMINAL and not coordinator_alive:
        return "done"
    if coordinator_alive or ray_state not in ("SUCCEEDED", "FAILED", "STOPPED"):
        return "watch"
    if cancel_requested:
        return "cancel"
    return "resubmit" if restarts < max_restarts else "give_up"
