"""Figures of a finished (or running) job, from its metric records: the loss spike at each stage
boundary, wall-clock, throughput, and time to reach an accuracy. Pure Python on ``metrics.jsonl``
records (dicts, as ``JobStore.read_metrics`` returns them), so ``status`` and ``compare`` share them.

The boundary spike of stage k (k >= 2) is

    mean(smoothed loss over the first 5% of stage k's steps)
  - mean(smoothed loss over the last 5% of stage k-1's steps),

where the smoothed loss is a trailing moving average of the per-step training loss over
``SMOOTH_STEPS`` steps that never reaches back across a stage boundary (a raw per-batch loss is too
noisy to compare). Positive: the loss jumped when the stage began.
"""

from __future__ import annotations

import math
from datetime import datetime

SMOOTH_STEPS = 10
EDGE = 0.05  # the share of a stage's steps averaged on each side of a boundary


def smoothed_losses(steps: list[dict], window: int = SMOOTH_STEPS) -> dict[int, list[float]]:
    """Per stage (1-based), the trailing moving average of its steps' losses, in step order."""
    out: dict[int, list[float]] = {}
    raw: dict[int, list[float]] = {}
    for r in sorted(steps, key=lambda r: r["step"]):
        losses = raw.setdefault(r["stage"], [])
        losses.append(r["loss"])
        recent = losses[-window:]
        out.setdefault(r["stage"], []).append(sum(recent) / len(recent))
    return out


def boundary_spikes(
    records: list[dict], stage_steps: dict[int, int] | None = None, window: int = SMOOTH_STEPS
) -> dict[int, float]:
    """{stage k: its boundary spike} for every stage k >= 2 whose first 5% and whose predecessor's last
    5% of steps are in ``records`` (a stage still running has no figure until its 5% is in).
    ``stage_steps``: steps per stage (1-based) from the plan; default: from the records' stage ends."""
    steps = [r for r in records if r.get("kind", "step") == "step"]
    smooth = smoothed_losses(steps, window)
    counts = stage_steps or _stage_steps(records)
    out = {}
    for stage in sorted(smooth):
        prev = smooth.get(stage - 1)
        if prev is None or stage - 1 not in counts or stage not in counts:
            continue
        head = max(1, math.ceil(EDGE * counts[stage]))
        tail = max(1, math.ceil(EDGE * counts[stage - 1]))
        if len(smooth[stage]) < head or len(prev) < counts[stage - 1]:
            continue
        out[stage] = _mean(smooth[stage][:head]) - _mean(prev[-tail:])
    return out


def plan_stage_steps(plan) -> dict[int, int]:
    """Steps per stage (1-based) of a plan (a stage resumed on another layout has several rows)."""
    out: dict[int, int] = {}
    for row in plan.stages:
        out[row.number] = out.get(row.number, 0) + row.steps
    return out


def _stage_steps(records: list[dict]) -> dict[int, int]:
    """Steps per stage: from the stage's end record when it finished, else what has been reported."""
    steps = [r for r in records if r.get("kind", "step") == "step"]
    counts: dict[int, int] = {}
    for r in steps:
        counts[r["stage"]] = counts.get(r["stage"], 0) + 1
    first = {}
    for r in steps:
        first[r["stage"]] = min(first.get(r["stage"], r["step"]), r["step"])
    for r in records:
        if r.get("kind") == "stage_end" and r["stage"] in first and not r.get("preempted"):
            counts[r["stage"]] = r["step"] - first[r["stage"]]
    return counts


def evaluations(records: list[dict]) -> list[dict]:
    """Every validation result in training order: mid-stage evaluations and stage ends."""
    return [r for r in records if r.get("kind") in ("eval", "stage_end") and r.get("val_acc") is not None]


def wall_clock(records: list[dict], started: str | None) -> float | None:
    """Seconds from the job's first stage start (``StageRecord.started``) to its last evaluation."""
    evals = [r for r in evaluations(records) if r.get("time") is not None]
    if not evals or not started:
        return None
    return evals[-1]["time"] - datetime.fromisoformat(started).timestamp()


def time_to_accuracy(records: list[dict], started: str | None, target: float) -> float | None:
    """Seconds from the job's start until an evaluation first reached ``target`` top-1 (None: never)."""
    if not started:
        return None
    t0 = datetime.fromisoformat(started).timestamp()
    for r in evaluations(records):
        if r.get("time") is not None and r["val_acc"] >= target:
            return r["time"] - t0
    return None


def images_per_s(records: list[dict]) -> float | None:
    """Training throughput: the mean of the reported windows' images/s (start-up and evaluation not
    counted)."""
    rates = [r["images_per_s"] for r in records if r.get("kind", "step") == "step" and r.get("images_per_s")]
    return _mean(rates) if rates else None


def final_accuracy(records: list[dict]) -> float | None:
    evals = evaluations(records)
    return evals[-1]["val_acc"] if evals else None


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    m = _mean(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
