"""LR and momentum as pure functions of (plan, optimizer step).

Three strategies:

- ``global_onecycle``: one OneCycle curve over the whole job. With ``progress: steps`` its position
  is the global optimizer step; with ``progress: samples`` it is samples seen, measured in units of
  stage 1's global batch, so a stage with a smaller global batch takes more steps for the same share
  of the curve, and a later stage's batch or worker count never moves an earlier step's LR. With a
  constant global batch both settings equal ``torch.optim.lr_scheduler.OneCycleLR`` exactly.
- ``per_stage_onecycle``: a fresh OneCycle per stage (re-heats at every boundary; for comparison).
- ``per_stage_cosine``: ``CosineAnnealingLR(T_max=stage steps, eta_min=min_lr)`` per stage.

The curve is multiplied by the stage's batch-size factor (``lr_scaling``), optionally ramped over
the first ``ramp_steps`` steps of a stage from the previous stage's factor, and optionally warmed up
over the first ``schedule.stage_warmup_steps`` of every later stage. Momentum is never scaled.

Pure Python: the CLI and the coordinator draw and check the curve without torch.
``workers.schedules.PlanScheduler`` applies it to an optimizer.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.plan import Plan
    from service.spec import JobSpec, Regularization


def onecycle(
    x: float,
    total: float,
    max_lr: float,
    pct_start: float,
    div_factor: float,
    final_div_factor: float,
    anneal: str,
    base_momentum: float,
    max_momentum: float,
) -> tuple[float, float]:
    """``OneCycleLR`` (two phases) at position ``x`` of a ``total``-step cycle: the same arithmetic as
    torch's, extended to fractional positions and clamped at the end of the cycle."""
    initial = max_lr / div_factor
    min_lr = initial / final_div_factor
    end1 = float(pct_start * total) - 1
    end2 = total - 1
    if x <= end1:
        pct, lrs, moms = x / end1, (initial, max_lr), (max_momentum, base_momentum)
    else:
        pct, lrs, moms = min((x - end1) / (end2 - end1), 1.0), (max_lr, min_lr), (base_momentum, max_momentum)
    f = _cos if anneal == "cos" else _linear
    return f(*lrs, pct), f(*moms, pct)


def _cos(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def _linear(start: float, end: float, pct: float) -> float:
    return (end - start) * pct + start


def onecycle_length(plan: Plan) -> float:
    """Length of the global curve in its own units (steps, or samples / stage 1's global batch)."""
    if plan.schedule.progress == "steps":
        return plan.total_steps
    return plan.total_samples / plan.stages[0].global_batch


def curve(plan: Plan, step: int) -> tuple[float, float]:
    """(lr, momentum) of the strategy at global ``step``, before the batch-size factor."""
    if not 0 <= step < plan.total_steps:
        raise ValueError(
            f"optimizer step {step} is past the end of the plan: it has {plan.total_steps} steps "
            f"(0..{plan.total_steps - 1})"
        )
    sch, stage = plan.schedule, plan.stage_at(step)
    # Per-stage curves run over the stage's sample stream in units of its first global batch: the local
    # step, unless a resume changed the stage's worker layout part-way (then the curve still fits the stage).
    local = stage.stream_position(step) / stage.stream_batch
    stage_steps = stage.stream_samples / stage.stream_batch
    if sch.strategy == "per_stage_cosine":
        lr = sch.min_lr + (stage.max_lr - sch.min_lr) * (1 + math.cos(math.pi * local / stage_steps)) / 2
        return lr, plan.momentum
    if sch.strategy == "per_stage_onecycle":
        x, total, max_lr, pct_start = local, stage_steps, stage.max_lr, stage.pct_start
    else:
        total, max_lr, pct_start = onecycle_length(plan), sch.max_lr, sch.pct_start
        x = step if sch.progress == "steps" else plan.samples_before(step) / plan.stages[0].global_batch
    lr, momentum = onecycle(
        x,
        total,
        max_lr,
        pct_start,
        sch.div_factor,
        sch.final_div_factor,
        sch.anneal,
        sch.base_momentum,
        sch.max_momentum,
    )
    return lr, (momentum if sch.cycle_momentum else plan.momentum)


def lr_factor(plan: Plan, step: int) -> float:
    """The batch-size factor at ``step``; ramps linearly from the previous stage's over ``ramp_steps``
    (at stage boundaries; a mid-stage layout change applies its factor from its first step)."""
    stage = plan.stage_at(step)
    ramp = plan.lr_scaling.ramp_steps
    local = step - stage.step_start
    if stage.index == 0 or stage.segment > 0 or ramp == 0 or local >= ramp:
        return stage.lr_scale
    prev = plan.stages[plan.row(stage) - 1].lr_scale
    return prev + (stage.lr_scale - prev) * local / ramp


def stage_warmup(plan: Plan, step: int) -> float:
    """``schedule.stage_warmup_steps`` N: 1/N, 2/N, ... 1 over the first N steps of stages 2, 3, ..."""
    n = plan.schedule.stage_warmup_steps
    stage = plan.stage_at(step)
    if n == 0 or stage.index == 0 or stage.segment > 0:
        return 1.0
    return min(1.0, (step - stage.step_start + 1) / n)


def lr_momentum(plan: Plan, step: int) -> tuple[float, float]:
    """What the optimizer uses for optimizer step ``step``: (lr, momentum or Adam beta1)."""
    lr, momentum = curve(plan, step)
    return lr * lr_factor(plan, step) * stage_warmup(plan, step), momentum


def stage_first_step(plan: Plan, step: int) -> int:
    """The first optimizer step of ``step``'s stage (its first segment's, when a mid-stage layout change
    split the stage into plan rows)."""
    stage = plan.stage_at(step)
    return plan.stages[plan.row(stage) - stage.segment].step_start


def stage_local(plan: Plan, step: int) -> int:
    """Optimizer steps from the first step of ``step``'s stage to ``step``."""
    return step - stage_first_step(plan, step)


def resolution(plan: Plan, step: int) -> int:
    """The image resolution of optimizer step ``step``: the stage's, or on the way to it over the
    stage's first ``resolution_ramp_steps`` steps (from the previous stage's resolution)."""
    stage = plan.stage_at(step)
    n, local = stage.resolution_ramp_steps, stage_local(plan, step)
    if n == 0 or local >= n:
        return stage.resolution
    return round(stage.ramp_from + (stage.resolution - stage.ramp_from) * (local + 1) / (n + 1))


def regularization(spec: JobSpec, plan: Plan, step: int) -> Regularization:
    """The regularization of optimizer step ``step``: its stage's (``JobSpec.stage_regularization``),
    or on the way to it over the stage's first ``regularization_ramp_steps`` steps, from the previous
    stage's (``Regularization.toward``), as ``resolution`` ramps."""
    stage = plan.stage_at(step)
    target = spec.stage_regularization(stage.index)
    n, local = spec.stages[stage.index].regularization_ramp_steps, stage_local(plan, step)
    if n == 0 or local >= n:
        return target
    return spec.stage_regularization(stage.index - 1).toward(target, (local + 1) / (n + 1))
