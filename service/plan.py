"""The plan: a job spec expanded into stages with their batch, step and sample ranges.

Pure and deterministic. Everything derived from it (LR, momentum, resolution, data order) is a
function of (plan, step), so none of it is checkpointed.

Drop-last semantics: a stage trains on ``subset = floor(data_fraction * N)`` samples. Each epoch
takes ``steps_per_epoch = subset // global_batch`` full optimizer steps and drops the remainder
(a different remainder each epoch, since every epoch is a fresh permutation). A fractional
``epochs`` value runs ``floor(epochs * steps_per_epoch)`` steps; the last, partial epoch takes the
first steps of its permutation.

A stage's data is one *sample stream*: its epochs' permutations, each cut to ``epoch_samples =
steps_per_epoch * global_batch``, end to end. Step k of the stage consumes stream positions
``[stream_offset + k * global_batch, ... + global_batch)``; ``workers.data.StageSampler`` maps them to
sample ids and ranks.

Three names for "which stage", never mixed: a plan **row** is a position in ``Plan.stages`` (a stage
resumed on another worker count has several rows, its segments); a stage **index** is 0-based
(``StagePlan.index``, ``JobSpec.stages[index]``, ``JobRecord.stages[index]``); a stage **number** is
1-based, what users see and what records, tags and run names carry (``StagePlan.number``).
"""

from __future__ import annotations

import bisect
import hashlib
import math

from pydantic import BaseModel, ConfigDict

from service.curve import onecycle_length
from service.spec import JobSpec, LRScalingSpec, ScheduleSpec, SpecError

PLAN_VERSION = 1
EXECUTION_FIELDS = {"workers", "batch_size", "grad_accum", "compile"}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class StagePlan(_Frozen):
    index: int  # 0-based; users see ``number``
    segment: int = 0  # > 0: the stage continued with another worker layout after a resume
    last_segment: bool = True
    resolution: int
    epochs: float
    data_fraction: float
    subset_size: int
    workers: int
    batch_size: int  # per-worker micro-batch
    grad_accum: int
    global_batch: int
    steps_per_epoch: int
    epoch_samples: int  # samples each epoch contributes to the stage's sample stream (drop-last applied)
    stream_offset: int  # stream samples consumed before this segment's first step (> 0 for later segments)
    stream_samples: int  # the stage's whole stream: steps x global batch of its first layout
    stream_batch: int  # global batch of the stage's first layout (the per-stage curves' step unit)
    steps: int
    step_start: int  # global optimizer-step range [step_start, step_end)
    step_end: int
    sample_start: int  # samples seen before the stage / after it
    sample_end: int
    lr_scale: float  # batch-size rule factor, multiplies the LR curve
    max_lr: float  # curve peak (stage override or schedule.max_lr), before lr_scale
    pct_start: float
    compile: bool
    ramp_from: int = 0  # the previous stage's resolution (0 for the first stage)
    resolution_ramp_steps: int = 0  # steps over which the resolution grows from ramp_from

    @property
    def samples(self) -> int:
        return self.sample_end - self.sample_start

    @property
    def number(self) -> int:
        """The 1-based stage number users see (records, checkpoint tags, run names)."""
        return self.index + 1

    @property
    def label(self) -> str:
        """``2``, or ``2.1``/``2.2`` for the segments of a stage resumed on another worker count."""
        single = self.segment == 0 and self.last_segment
        return f"{self.number}" if single else f"{self.number}.{self.segment + 1}"

    def stream_position(self, step: int) -> int:
        return self.stream_offset + (step - self.step_start) * self.global_batch

    def epoch_of(self, step: int) -> int:
        return self.position(step)[0]

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch within that epoch) of global optimizer ``step`` in this stage's sample stream."""
        pos = self.stream_position(step)
        return pos // self.epoch_samples, (pos % self.epoch_samples) // self.global_batch


class Plan(_Frozen):
    version: int = PLAN_VERSION
    dataset_size: int
    seed: int
    schedule: ScheduleSpec
    lr_scaling: LRScalingSpec
    reference_batch: int
    momentum: float  # the optimizer's own momentum / beta1, used where momentum is not cycled
    stages: tuple[StagePlan, ...]

    @property
    def total_steps(self) -> int:
        return self.stages[-1].step_end

    @property
    def total_samples(self) -> int:
        return self.stages[-1].sample_end

    def row(self, stage: StagePlan) -> int:
        """Position of a stage (segment) in ``stages``: what the coordinator hands to workers."""
        return self.stages.index(stage)

    def stage_at(self, step: int) -> StagePlan:
        """The stage (segment) that optimizer step ``step`` (0-based, global) belongs to."""
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} is outside the plan's {self.total_steps} optimizer steps")
        starts = [s.step_start for s in self.stages]
        return self.stages[bisect.bisect_right(starts, step) - 1]

    def samples_before(self, step: int) -> int:
        """Samples consumed by all optimizer steps before ``step``."""
        if step == self.total_steps:
            return self.total_samples
        stage = self.stage_at(step)
        return stage.sample_start + (step - stage.step_start) * stage.global_batch

    def plan_hash(self) -> str:
        return _hash(self.model_dump_json())

    def stage_hash(self, row: int) -> str:
        """Hash of what stage ``index`` computes: its data, batch, steps and LR curve -- not how the global
        batch is laid out over workers (``workers`` x ``batch_size`` x ``grad_accum``), which a resume
        may change without changing the optimisation."""
        s = self.stages[row].model_dump_json(exclude=EXECUTION_FIELDS)
        return _hash(
            s
            + self.schedule.model_dump_json()
            + self.lr_scaling.model_dump_json()
            + f"{self.dataset_size}/{self.seed}"
        )


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def lr_scale(rule: str, global_batch: int, reference_batch: int) -> float:
    ratio = global_batch / reference_batch
    return {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[rule]


class StageLayout(_Frozen):
    """How stage ``stage`` (0-based) laid out its global batch for its steps before ``until_step``: recorded
    when a resume changes the worker count mid-stage, so the plan can replay the stage's history."""

    stage: int
    until_step: int
    workers: int
    batch_size: int
    grad_accum: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.workers * self.grad_accum


def build_plan(spec: JobSpec, dataset_size: int, history: tuple[StageLayout, ...] = ()) -> Plan:
    """Expand ``spec`` into a :class:`Plan` over a training split of ``dataset_size`` samples (measured
    once by the caller, ``service.sources.dataset_size``, and kept in the job record).

    ``history`` lists earlier worker layouts of stages that a resume changed mid-stage. Such a stage
    becomes several *segments* (plan rows sharing the stage index): each consumes the stage's sample
    stream with its own global batch (and LR factor), and together they cover the stream the stage's
    first layout planned, so the epochs, data and stage boundary stay where they were."""
    problems = []
    earlier = {
        i: sorted((h for h in history if h.stage == i), key=lambda h: h.until_step)
        for i in range(len(spec.stages))
    }
    first_layout = earlier[0][0] if earlier[0] else spec.stages[0]
    reference = spec.lr_scaling.reference_batch or first_layout.global_batch
    stages, step, sample = [], 0, 0
    for i, st in enumerate(spec.stages):
        subset = math.floor(st.data_fraction * dataset_size)
        layouts = [*earlier[i], st]
        gb0 = layouts[0].global_batch
        per_epoch = subset // gb0
        steps0 = math.floor(st.epochs * per_epoch)
        if per_epoch == 0:
            problems.append(
                f"stages[{i}].batch_size: global batch {gb0} (batch_size {layouts[0].batch_size} x workers "
                f"{layouts[0].workers} x grad_accum {layouts[0].grad_accum}) exceeds the stage's {subset} "
                "samples"
                f" (data_fraction {st.data_fraction} x {dataset_size})"
            )
            continue
        if steps0 == 0:
            problems.append(
                f"stages[{i}].epochs: {st.epochs} epochs of {per_epoch} steps is less than one optimizer step"
            )
            continue
        max_lr = st.max_lr or spec.schedule.max_lr
        pct = st.pct_start or spec.schedule.pct_start
        if spec.schedule.strategy == "per_stage_onecycle" and not pct * steps0 > 1:
            problems.append(
                f"stages[{i}].pct_start: per_stage_onecycle needs pct_start x steps > 1, got {pct} x {steps0}"
            )
        if spec.schedule.strategy == "per_stage_cosine" and spec.schedule.min_lr >= max_lr:
            problems.append(
                f"stages[{i}].max_lr: must exceed schedule.min_lr {spec.schedule.min_lr}, got {max_lr}"
            )
        for ramp in ("resolution_ramp_steps", "regularization_ramp_steps"):
            if (n := getattr(st, ramp)) >= steps0:
                problems.append(f"stages[{i}].{ramp}: must be fewer than the stage's {steps0} steps, got {n}")
        stream_samples, offset = steps0 * gb0, 0
        for j, layout in enumerate(layouts):
            gb = layout.global_batch
            last = j == len(layouts) - 1
            steps = (stream_samples - offset) // gb if last else layout.until_step - step
            if steps <= 0:
                problems.append(
                    f"stages[{i}].workers: with global batch {gb} from step {step} on, "
                    f"no full optimizer step of the stage's remaining {stream_samples - offset} samples is "
                    "left"
                )
                break
            stages.append(
                StagePlan(
                    index=i,
                    segment=j,
                    last_segment=last,
                    resolution=st.resolution,
                    epochs=st.epochs,
                    data_fraction=st.data_fraction,
                    subset_size=subset,
                    workers=layout.workers,
                    batch_size=layout.batch_size,
                    grad_accum=layout.grad_accum,
                    global_batch=gb,
                    steps_per_epoch=per_epoch * gb0 // gb,
                    epoch_samples=per_epoch * gb0,
                    stream_offset=offset,
                    stream_samples=stream_samples,
                    stream_batch=gb0,
                    steps=steps,
                    step_start=step,
                    step_end=step + steps,
                    sample_start=sample,
                    sample_end=sample + steps * gb,
                    lr_scale=lr_scale(spec.lr_scaling.rule, gb, reference),
                    max_lr=max_lr,
                    pct_start=pct,
                    compile=st.compile,
                    ramp_from=spec.stages[i - 1].resolution if i else 0,
                    resolution_ramp_steps=st.resolution_ramp_steps,
                )
            )
            step += steps
            sample += steps * gb
            offset += steps * gb
    if problems:
        raise SpecError(problems, source=spec.name)
    plan = Plan(
        dataset_size=dataset_size,
        seed=spec.seed,
        schedule=spec.schedule,
        lr_scaling=spec.lr_scaling,
        reference_batch=reference,
        momentum=spec.momentum,
        stages=tuple(stages),
    )
    if spec.schedule.strategy == "global_onecycle":
        if not spec.schedule.pct_start * onecycle_length(plan) > 1:
            raise SpecError(
                [
                    f"schedule.pct_start: global_onecycle needs pct_start x total steps > 1,"
                    f" got {spec.schedule.pct_start} x {onecycle_length(plan):g}"
                ],
                source=spec.name,
            )
    return plan
