"""What workers report, one typed model each: a step, a mid-stage evaluation, a stage's end, and the
report that carries them (passed to ``ray.train.report`` as ``model_dump()``). The coordinator keeps
them in ``metrics.jsonl``. Both sides import this module; it imports nothing of the coordinator.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class StepRecord(BaseModel):
    """One optimizer step, as a worker reports it and ``metrics.jsonl`` keeps it."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["step"] = "step"
    step: int
    stage: int  # 1-based
    epoch: int  # 0-based within the stage
    samples_seen: int  # after this step
    loss: float
    lr: float
    momentum: float
    resolution: int
    global_batch: int
    workers: int
    grad_accum: int
    images_per_s: float
    time: float | None = None  # unix time when the step's report window closed (rank 0's clock)
    skipped_images: int | None = None  # data.on_bad_image: skip: images left out of this step, all ranks
    sample_ids: list[list[int]] | None = None  # audit mode: the sample ids each rank read, per rank


class EvalRecord(BaseModel):
    """A validation pass inside a stage (``metrics.eval_every_n_steps``)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["eval"] = "eval"
    step: int  # optimizer steps done before the evaluation (like ``StageEnd.step``)
    stage: int  # 1-based
    samples_seen: int
    resolution: int
    val_loss: float
    val_acc: float
    time: float
    val_top5: float | None = None  # when model.num_classes > 5
    ema_val_loss: float | None = None  # the weights' average (train.ema), evaluated beside them
    ema_val_acc: float | None = None
    ema_val_top5: float | None = None


class StageEnd(BaseModel):
    """A stage's last report, from rank 0: how it ended."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["stage_end"] = "stage_end"
    stage: int  # 1-based
    step: int  # the next step to run
    preempted: bool = False  # a stop request was honoured: a checkpoint is committed at ``step``
    restored_from: str | None = None
    val_loss: float | None = None
    val_acc: float | None = None
    val_top5: float | None = None  # when model.num_classes > 5
    ema_val_loss: float | None = None  # the weights' average (train.ema), evaluated beside them
    ema_val_acc: float | None = None
    ema_val_top5: float | None = None
    param_digests: list[str] | None = None
    checkpoint: str | None = None
    checkpoint_failures: list[str] = []
    stall_s: float | None = None
    time: float | None = None  # unix time after the stage-end evaluation
    notices: list[str] = []  # termination notices the workers saw (preemption.notice), one line each
    notice_nodes: list[str] = []  # the Ray node ids they came from


class Report(BaseModel):
    """What a worker passes to ``ray.train.report`` (as ``model_dump()``): rank 0 sends the records."""

    records: list[StepRecord] = []
    evals: list[EvalRecord] = []
    stage_end: StageEnd | None = None
    started_row: int | None = None  # a stage group went on with this plan row (after a stage_end)
