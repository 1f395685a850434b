"""Why does the training loss jump at a stage boundary, and what stops it?

Reproduces the first boundary (16 -> 22 px) of a Fashion-MNIST recipe in one process (world size 1,
the same global batch as the 2-worker job, real data), trains stage 1 once, and then branches at the
boundary. Measured at the boundary, before any stage-2 update:

- the LR of the last stage-1 step and the first stage-2 step, and the LR-rescale factor between them;
- the momentum buffers carried across (their norm relative to the weights');
- the loss of the first stage-2 batches at 22 px and of the same images resized to 16 px (train
  mode: the resolution change alone, no update yet);
- validation loss/top-1 in eval mode at 22 px with stage 1's BatchNorm running statistics, and after
  re-estimating them on 22 px batches.

Then each mitigation runs the first ``--steps`` steps of stage 2 from the same checkpoint, and the spike
(service.analysis.boundary_spikes: smoothed loss over the first 5% of stage 2 minus the last 5% of
stage 1) is compared: as is, ``schedule.stage_warmup_steps``, momentum buffers reset at the boundary,
BatchNorm statistics re-estimated at the new resolution, and ``stages[].resolution_ramp_steps``.

    python bench/boundary.py                    # the old quickstart recipe (ResNet-18), ~8 min on 2 cores
    python bench/boundary.py --model small      # the new quickstart's small ResNet

Last line: one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time

import torch
import torch.nn.functional as F

from checkpoints.storage import Storage
from checkpoints.store import CheckpointStore
from service.analysis import boundary_spikes, plan_stage_steps
from service.curve import lr_momentum
from service.plan import build_plan
from service.spec import validate_spec
from workers.control import StopAfter
from workers.train import StageRunner

MODELS = {
    "resnet18": {"arch": "resnet18", "num_classes": 10, "in_channels": 1},
    "small": {
        "builder": "workers.models:small_resnet",
        "kwargs": {"widths": [16, 32, 64], "blocks": [1, 1, 1]},
        "num_classes": 10,
        "in_channels": 1,
    },
}


def recipe(model: str, warmup: int = 0, ramp: int = 0) -> dict:
    """The quickstart's first two stages (the recipe of the issue: ResNet-18, max_lr 0.08, global
    OneCycle peaking at 25% of the samples, i.e. right after the 16 -> 22 px boundary)."""
    return {
        "name": "boundary",
        "seed": 0,
        "model": MODELS[model],
        "data": {"kind": "fashion_mnist", "loader_workers": 0, "crop_scale": [1.0, 1.0]},
        "optimizer": {"name": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 5.0e-5},
        "schedule": {
            "strategy": "global_onecycle",
            "max_lr": 0.08,
            "pct_start": 0.25,
            "final_div_factor": 10000,
            "stage_warmup_steps": warmup,
        },
        "lr_scaling": {"rule": "linear", "reference_batch": 256},
        "stages": [
            {"resolution": 16, "epochs": 1, "data_fraction": 0.5, "batch_size": 256, "workers": 1},
            {
                "resolution": 22,
                "epochs": 1,
                "data_fraction": 0.5,
                "batch_size": 192,
                "workers": 1,
                "resolution_ramp_steps": ramp,
            },
            {"resolution": 28, "epochs": 1, "data_fraction": 1.0, "batch_size": 128, "workers": 1},
        ],
        "checkpoint": {"every_n_steps": 0},
        "metrics": {"every_n_steps": 1},
    }


class Collect:
    """The runner's ``report``: keeps every step record."""

    def __init__(self):
        self.records: list[dict] = []

    def __call__(self, report: dict) -> None:
        self.records += [dict(r) for r in report["records"]]
        if report.get("stage_end"):
            self.records.append(dict(report["stage_end"]))


def make(spec_dict: dict, url: str, stage: int, report=None, stop: StopAfter | None = None) -> StageRunner:
    spec = validate_spec(spec_dict)
    plan = build_plan(spec, 60000)
    return StageRunner(
        spec,
        plan,
        stage,
        "boundary",
        url,
        report=report,
        stop_requested=stop,
        on_step=stop.on_step if stop else None,
        device=torch.device("cpu"),
        store=CheckpointStore(Storage(url).child("boundary", "checkpoints")),
    )


def first_batches(runner: StageRunner, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n`` batches of the runner's stage: the images the run itself will see first."""
    return list(runner.train_data(0, n)[1])


def resized(batches, resolution: int):
    """The same images at another resolution (as ``resolution_ramp_steps`` resizes them)."""
    return [
        (F.interpolate(x, size=(resolution,) * 2, mode="bilinear", antialias=True), y) for x, y in batches
    ]


@torch.no_grad()
def train_mode_loss(model: torch.nn.Module, batches) -> float:
    """Loss in train mode (batch statistics, as the first training step sees it) without updating."""
    state = {k: v.clone() for k, v in model.state_dict().items()}  # BN running stats move in train mode
    model.train()
    loss = sum(F.cross_entropy(model(x), y).item() for x, y in batches) / len(batches)
    model.load_state_dict(state)
    return loss


@torch.no_grad()
def recalibrate_bn(model: torch.nn.Module, batches) -> None:
    """Re-estimate BatchNorm running statistics on ``batches`` (cumulative average, as in SWA's
    ``update_bn``)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = {m: m.momentum for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for x, _ in batches:
        model(x)
    for m in norms:
        m.momentum = saved[m]


def momentum_ratio(runner: StageRunner) -> float:
    buf = sum(
        float(s["momentum_buffer"].norm() ** 2)
        for s in runner.optimizer.state.values()
        if "momentum_buffer" in s
    )
    weights = sum(float(p.norm() ** 2) for p in runner.raw_model.parameters())
    return math.sqrt(buf / weights)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="resnet18")
    ap.add_argument("--steps", type=int, default=30, help="stage-2 steps per mitigation")
    ap.add_argument("--warmup", type=int, default=20, help="stage_warmup_steps of the warm-up variant")
    ap.add_argument("--ramp", type=int, default=20, help="resolution_ramp_steps of the ramp variant")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    root = tempfile.mkdtemp(prefix="boundary-")
    base = recipe(args.model)
    stage1 = Collect()
    make(base, f"{root}/stage1", 0, report=stage1).run()
    print(f"stage 1 trained in {time.perf_counter() - started:.0f} s", flush=True)

    # ---- at the boundary, before any stage-2 update
    probe = make(base, f"{root}/stage1", 1)
    plan, st = probe.plan, probe.stage
    lr_last, lr_first = lr_momentum(plan, st.step_start - 1)[0], lr_momentum(plan, st.step_start)[0]
    peak_step = max(range(plan.total_steps), key=lambda k: lr_momentum(plan, k)[0])
    b22 = first_batches(probe, 4)
    b16 = resized(b22, plan.stages[0].resolution)
    tail = [r["loss"] for r in stage1.records if r.get("kind", "step") == "step"][-6:]
    at = {
        "lr_last_stage1": lr_last,
        "lr_first_stage2": lr_first,
        "lr_rescale_factor": st.lr_scale / plan.stages[0].lr_scale,
        "peak_lr_step": peak_step,
        "boundary_step": st.step_start,
        "momentum_buffer_over_weights": momentum_ratio(probe),
        "stage1_last_losses_mean": sum(tail) / len(tail),
        "first_batches_loss_22px": train_mode_loss(probe.raw_model, b22),
        "same_images_loss_16px": train_mode_loss(probe.raw_model, b16),
    }
    val22_loss, val22_acc = probe.evaluate()
    recalibrate_bn(probe.raw_model, first_batches(probe, 20))
    at["val_22px_stage1_bn"] = {"loss": val22_loss, "acc": val22_acc}
    rl, ra = probe.evaluate()
    at["val_22px_recalibrated_bn"] = {"loss": rl, "acc": ra}
    print(json.dumps(at, indent=1), flush=True)

    # ---- mitigations: the first --steps of stage 2 from the same checkpoint
    def branch(name: str, spec_dict: dict, prepare=None) -> dict:
        url = f"{root}/{name}"
        shutil.copytree(f"{root}/stage1", url)
        collect, stop = Collect(), StopAfter(args.steps)
        runner = make(spec_dict, url, 1, report=collect, stop=stop)
        if prepare:
            prepare(runner)
        t = time.perf_counter()
        runner.run()
        records = stage1.records + collect.records
        spikes = boundary_spikes(records, plan_stage_steps(runner.plan))
        losses = [r["loss"] for r in collect.records if r.get("kind", "step") == "step"]
        out = {
            "spike": spikes.get(2),
            "first_losses": [round(v, 3) for v in losses[:8]],
            "max_loss": max(losses),
            "loss_after": sum(losses[-5:]) / 5,
            "seconds": round(time.perf_counter() - t, 1),
        }
        print(name, json.dumps(out), flush=True)
        return out

    def reset_momentum(runner: StageRunner) -> None:
        for s in runner.optimizer.state.values():
            if "momentum_buffer" in s:
                s["momentum_buffer"].zero_()

    def recalibrate(runner: StageRunner) -> None:
        recalibrate_bn(runner.raw_model, first_batches(runner, 20))

    results = {
        "as_is": branch("as_is", base),
        f"stage_warmup_{args.warmup}": branch("warmup", recipe(args.model, args.warmup)),
        "momentum_reset": branch("momentum_reset", base, reset_momentum),
        "bn_recalibrated": branch("bn_recalibrated", base, recalibrate),
        f"resolution_ramp_{args.ramp}": branch("ramp", recipe(args.model, ramp=args.ramp)),
    }
    shutil.rmtree(root, ignore_errors=True)
    print(
        json.dumps(
            {
                "model": args.model,
                "at_boundary": at,
                "mitigations": results,
                "seconds": round(time.perf_counter() - started),
            }
        )
    )


if __name__ == "__main__":
    main()
