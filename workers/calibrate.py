"""``stagetrain plan JOB.yaml --calibrate``: what each stage costs, measured on this machine before a
cluster-day is spent.

Every plan row runs a few warm-up and then timed optimizer steps through the workers' own code: a
``StageRunner`` builds the model, optimizer, precision (autocast, loss scaling), ``torch.compile`` and
EMA of the job, and ``StageRunner.train_data`` feeds it the stage's real input pipeline (the job's data
source, decoded, augmented and moved to the device as in training). The step itself is
``StageRunner.optimizer_step``, as in training, without reports, checkpoints and evaluations. The
fixed-resolution baseline of ``compare --baseline`` (``service.compare.baseline_spec``) is measured the
same way, or takes the measurement of a stage whose steps are the same work.

One process is one worker: it measures a worker's img/s at the stage's per-worker batch and projects the
stage on its planned workers linearly (``SCALING``). On CPU the process gets the threads a Ray worker of
the job gets (``resources.cpus_per_worker``; Ray sets ``OMP_NUM_THREADS`` to the worker's whole CPUs).

Nothing is written where the user keeps anything: the runner's storage is a temporary folder, removed
after, and no checkpoint is restored or saved.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator

import torch
from pydantic import BaseModel, ConfigDict

from service.compare import baseline_spec
from service.console import error_line
from service.plan import Plan, StagePlan, build_plan
from service.spec import JobSpec
from workers.train import StageRunner, training_loss

SCALING = (
    "linear: a stage's img/s on N workers = one worker's measured img/s x N (gradient all-reduce, stage "
    "start-ups, evaluations and checkpoints not counted)"
)
SCRATCH_JOB = "calibrate"  # the runner's job id, under a temporary folder


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class StageSpeed(_Frozen):
    """One plan row: what was measured on one worker, and what it projects on the planned workers."""

    stage: str  # the row's label: "2", or "2.1" for a segment
    resolution: int
    batch_size: int  # per-worker micro-batch
    grad_accum: int
    workers: int
    global_batch: int
    steps: int  # the stage's optimizer steps (each worker takes every one)
    warmup_steps: int  # optimizer steps run before the clock started
    timed_steps: int  # optimizer steps timed
    measured_s: float  # wall time of the timed steps
    images_per_s_per_worker: float
    images_per_s: float  # projected on ``workers`` (SCALING)
    seconds: float  # projected wall time of the stage
    worker_seconds: float  # seconds x workers: the compute the stage holds
    measured_as: str | None = None  # the baseline: the job's stage whose measurement it shares


class Projection(_Frozen):
    plan_hash: str
    stages: list[StageSpeed]
    seconds: float
    worker_seconds: float


class Calibration(Projection):
    """``plan --calibrate --json``: the job's projection, the baseline's, and their ratios."""

    job: str
    device: str
    warmup_steps: int  # as asked; each stage's own counts are clamped to its steps
    timed_steps: int
    scaling: str = SCALING
    baseline: Projection
    time_ratio: float  # job seconds / baseline seconds
    compute_ratio: float  # job worker-seconds / baseline worker-seconds


def calibrate(
    spec: JobSpec,
    plan: Plan,
    warmup_steps: int = 3,
    timed_steps: int = 10,
    say: Callable[[str], None] = lambda text: None,
) -> Calibration:
    """Measure every row of ``plan`` (the plan of ``spec`` on its data) and the baseline, and project
    them. ``say``: progress, one line per measured row."""
    if timed_steps < 1 or warmup_steps < 0:
        raise ValueError(
            f"calibration needs timed steps >= 1 and warm-up steps >= 0, got {timed_steps}, {warmup_steps}"
        )
    device, name = calibration_device(spec)
    say(f"calibrating on {name}")
    with _threads(spec, device):
        speeds = _measure_plan(spec, plan, device, warmup_steps, timed_steps, say)
        base_spec = baseline_spec(spec)
        base_plan = build_plan(base_spec, plan.dataset_size)
        shared = {
            key: speed
            for s, speed in zip(plan.stages, speeds, strict=True)
            if (key := _work(spec, s)) is not None
        }
        (base_row,) = base_plan.stages
        if (same := shared.get(_work(base_spec, base_row))) is not None:
            say(
                f"baseline: a step is stage {same.stage}'s ({base_row.resolution}px, batch "
                f"{base_row.batch_size} x accum {base_row.grad_accum}): measured once, for both"
            )
            base_speeds = [
                project(base_row, same.warmup_steps, same.timed_steps, same.measured_s, same.stage)
            ]
        else:
            base_speeds = _measure_plan(
                base_spec, base_plan, device, warmup_steps, timed_steps, say, "baseline"
            )
    job, base = _projection(plan, speeds), _projection(base_plan, base_speeds)
    return Calibration(
        **job.model_dump(),
        job=spec.name,
        device=name,
        warmup_steps=warmup_steps,
        timed_steps=timed_steps,
        baseline=base,
        time_ratio=job.seconds / base.seconds,
        compute_ratio=job.worker_seconds / base.worker_seconds,
    )


def project(
    st: StagePlan, warm: int, timed: int, measured_s: float, measured_as: str | None = None
) -> StageSpeed:
    """A row's projection from ``timed`` optimizer steps of one worker in ``measured_s`` seconds."""
    per_worker = timed * st.grad_accum * st.batch_size / measured_s
    seconds = st.steps * st.grad_accum * st.batch_size / per_worker  # = samples / (per_worker x workers)
    return StageSpeed(
        stage=st.label,
        resolution=st.resolution,
        batch_size=st.batch_size,
        grad_accum=st.grad_accum,
        workers=st.workers,
        global_batch=st.global_batch,
        steps=st.steps,
        warmup_steps=warm,
        timed_steps=timed,
        measured_s=measured_s,
        images_per_s_per_worker=per_worker,
        images_per_s=per_worker * st.workers,
        seconds=seconds,
        worker_seconds=seconds * st.workers,
        measured_as=measured_as,
    )


def _projection(plan: Plan, speeds: list[StageSpeed]) -> Projection:
    return Projection(
        plan_hash=plan.plan_hash(),
        stages=speeds,
        seconds=sum(s.seconds for s in speeds),
        worker_seconds=sum(s.worker_seconds for s in speeds),
    )


def step_counts(steps: int, warmup: int, timed: int) -> tuple[int, int]:
    """(warm-up, timed) steps within a stage of ``steps``: the timed ones first give way to the warm-up
    (the first steps pay for the loader's start, allocation and compilation), but at least one is timed."""
    timed = max(1, min(timed, steps - warmup))
    return min(warmup, steps - timed), timed


def _work(spec: JobSpec, st: StagePlan) -> tuple | None:
    """What one worker's step of row ``st`` costs depends on; None when its first steps differ from the
    rest (``regularization_ramp_steps``: another row's measurement cannot stand for it)."""
    if spec.stages[st.index].regularization_ramp_steps:
        return None
    reg = spec.stage_regularization(st.index).model_dump_json()
    return (st.resolution, st.batch_size, st.grad_accum, st.compile, reg)


def calibration_device(spec: JobSpec) -> tuple[torch.device, str]:
    """The device a worker of ``spec`` trains on, here, and how to name it."""
    if spec.resources.use_gpu:
        if not torch.cuda.is_available():
            raise ValueError(
                "resources.use_gpu: this machine has no CUDA device to calibrate on: run `stagetrain plan "
                "--calibrate` on a machine with the workers' GPU (resources.use_gpu: false measures the CPU)"
            )
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        return device, f"{torch.cuda.get_device_name(device)} (cuda:0)"
    threads, cores = _cpu_threads(spec), os.cpu_count() or 1
    why = f"resources.cpus_per_worker {spec.resources.cpus_per_worker:g}" + (
        f", capped at this machine's {cores} cores"
        if threads == cores and _worker_threads(spec) > cores
        else ""
    )
    return torch.device("cpu"), f"{_cpu_name()}, {threads} thread{'s' * (threads > 1)} ({why})"


def _worker_threads(spec: JobSpec) -> int:
    """The intra-op threads of a Ray worker of ``spec``: Ray sets OMP_NUM_THREADS to its whole CPUs."""
    return max(math.floor(spec.resources.cpus_per_worker), 1)


def _cpu_threads(spec: JobSpec) -> int:
    return min(_worker_threads(spec), os.cpu_count() or 1)


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return "cpu " + line.split(":", 1)[1].strip()
    return "cpu"


@contextlib.contextmanager
def _threads(spec: JobSpec, device: torch.device):
    """On CPU, a worker's threads for the measurement; the process's own again after."""
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(_cpu_threads(spec))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _measure_plan(
    spec: JobSpec,
    plan: Plan,
    device: torch.device,
    warmup: int,
    timed: int,
    say: Callable[[str], None],
    what: str = "stage",
) -> list[StageSpeed]:
    """Every row of ``plan``, in order, on one runner: it goes from row to row as a worker of a stage
    group does (``next_stage``), so the model carries over and only the row's own start-up is warmed."""
    speeds = []
    with tempfile.TemporaryDirectory(prefix="stagetrain-calibrate-") as scratch:
        # no storage options: they are the job's storage's (an S3 endpoint), not the scratch folder's
        scratch_spec = spec.model_copy(
            update={
                "checkpoint": spec.checkpoint.model_copy(update={"storage": scratch, "storage_options": {}})
            }
        )
        runner = None
        for row, st in enumerate(plan.stages):
            if runner is None:
                runner = StageRunner(
                    scratch_spec, plan, row, SCRATCH_JOB, scratch, device=device, restore=None
                )
            else:  # at the row's start, as a restore of the previous row's boundary checkpoint would be
                runner.progress.load_state_dict({"step": st.step_start})
                runner.scheduler.load_state_dict({"step": st.step_start})
                runner.next_stage()
            warm, timed_n = step_counts(st.steps, warmup, timed)
            name = f"{what} {st.label}" if what == "stage" else what
            say(
                f"{name}: {st.resolution}px, batch {st.batch_size} x accum {st.grad_accum}: {warm} warm-up + "
                f"{timed_n} timed steps"
            )
            speeds.append(project(st, warm, timed_n, _time_steps(runner, warm, timed_n, name)))
        del runner
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return speeds


def _time_steps(runner: StageRunner, warm: int, timed: int, name: str) -> float:
    """Seconds of ``timed`` optimizer steps of ``runner``'s row after ``warm`` untimed ones."""
    st, spec = runner.stage, runner.spec
    what = f"the training data of {name} ({spec.data.kind})"
    # The stage's first steps' data. A rank alone in its world reads a whole global batch a step (its
    # ``workers`` x grad_accum micro-batches): more than the steps measured here need, read lazily.
    _, batches, _ = _readable(lambda: runner.train_data(0, warm + timed), what)
    loss_fn = functools.partial(training_loss, smoothing=spec.stage_regularization(st.index).label_smoothing)

    stream = _read_errors(iter(batches), what)
    runner.model.train()
    try:
        for k in range(warm):
            _step(runner, stream, st.step_start + k, loss_fn, name)
        _sync(runner.device)
        started = time.perf_counter()
        for k in range(warm, warm + timed):
            loss = _step(runner, stream, st.step_start + k, loss_fn, name)
        loss.item()  # the last step's work is done
        _sync(runner.device)
        return time.perf_counter() - started
    finally:
        if hasattr(batches, "close"):
            batches.close()  # ends the loader's iterator (and its worker processes) now


def _step(runner: StageRunner, batches: Iterator, step: int, loss_fn, name: str) -> torch.Tensor:
    """One optimizer step as ``StageRunner.run`` takes it, without its reports, checkpoints and
    evaluations."""
    try:
        return runner.optimizer_step(batches, loss_fn, step)
    except torch.OutOfMemoryError:
        st = runner.stage
        raise ValueError(
            f"{name} does not fit on {runner.device}: out of memory at {st.resolution}px with a per-worker "
            f"batch of {st.batch_size}; lower its batch_size and raise grad_accum (the global batch stays)"
        ) from None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DataUnreadable(ValueError):
    """The job's data cannot be read: invalid input (exit 2), in one line."""


def _readable(make, what: str):
    try:
        return make()
    except Exception as e:  # noqa: BLE001 - the user's data (files, bucket, factory): say what and where
        raise DataUnreadable(f"data: cannot read {what}: {error_line(e)}") from e


def _read_errors(batches: Iterator, what: str) -> Iterator:
    """``batches``, with an error reading them as ``DataUnreadable`` (the model's own errors pass as they are:
    this wraps only the reads)."""
    while True:
        try:
            item = next(batches)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 - as in _readable
            raise DataUnreadable(f"data: cannot read {what}: {error_line(e)}") from e
        yield item
