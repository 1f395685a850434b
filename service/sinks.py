"""Metric sinks besides ``metrics.jsonl`` (``metrics.sinks``), written by the coordinator from the same
records: per step the loss, LR, momentum, resolution, global batch, workers and throughput; every
evaluation; the stage (a step function, so boundaries show); and the spec as the run's parameters.

Each sink's package is imported only when the job uses it, with a clear error when it is missing.
"""

from __future__ import annotations

import json
import os
import tempfile

from service.jobs import EvalRecord, StageEnd, StepRecord
from service.layout import TENSORBOARD_DIR

STEP_SCALARS = (
    "loss",
    "lr",
    "momentum",
    "resolution",
    "global_batch",
    "workers",
    "grad_accum",
    "images_per_s",
)


class TensorBoardSink:
    """TensorBoard event files in ``<storage>/<job-id>/tensorboard/`` (``tensorboard --logdir`` there).
    On an object store they are written to a local folder and uploaded at every stage end and at exit.
    A coordinator that continues a job purges the events past the step it continues from."""

    def __init__(self, jobs, spec, start_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ValueError(
                f"metrics.sinks: tensorboard needs the tensorboard package ({e}); pip install tensorboard"
            ) from None
        self.storage = jobs.storage
        self.local = self.storage.local
        self.dir = (
            self.storage.path(TENSORBOARD_DIR) if self.local else tempfile.mkdtemp(prefix="stagetrain-tb-")
        )
        if not self.local:  # continue the event files already uploaded
            for name in self.storage.listdir(TENSORBOARD_DIR):
                with open(os.path.join(self.dir, name), "wb") as f:
                    f.write(self.storage.read_bytes(TENSORBOARD_DIR, name))
        self.writer = SummaryWriter(self.dir, purge_step=start_step or None)
        if not start_step:
            self.writer.add_text(
                "spec", "```\n" + json.dumps(spec.model_dump(mode="json"), indent=2) + "\n```"
            )

    def write(self, records: list) -> None:
        for r in records:
            if isinstance(r, StepRecord):
                for key in STEP_SCALARS:
                    self.writer.add_scalar(f"train/{key}", getattr(r, key), r.step, walltime=r.time)
                self.writer.add_scalar("train/stage", r.stage, r.step, walltime=r.time)
            elif isinstance(r, EvalRecord | StageEnd) and r.val_acc is not None:
                self.writer.add_scalar("val/top1", r.val_acc, r.step, walltime=r.time)
                self.writer.add_scalar("val/loss", r.val_loss, r.step, walltime=r.time)
        if any(isinstance(r, StageEnd) for r in records):
            self.flush()

    def flush(self) -> None:
        self.writer.flush()
        if not self.local:
            for name in os.listdir(self.dir):
                with open(os.path.join(self.dir, name), "rb") as f:
                    self.storage.write_bytes(f.read(), TENSORBOARD_DIR, name)

    def close(self) -> None:
        self.flush()
        self.writer.close()


SINKS = {"tensorboard": TensorBoardSink}


def open_sinks(jobs, spec, start_step: int) -> list:
    return [SINKS[name](jobs, spec, start_step) for name in spec.metrics.sinks]
