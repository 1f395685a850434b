"""Human-facing views of a plan and of a run: tables, per-step CSV rows, plots."""

from __future__ import annotations

import csv
from collections.abc import Iterable

from rich.table import Table

from service.curve import lr_momentum, resolution
from service.plan import Plan

CSV_FIELDS = ["step", "stage", "epoch", "resolution", "global_batch", "samples_seen", "lr", "momentum"]


def step_rows(plan: Plan) -> Iterable[dict]:
    """One row per optimizer step, as the workers will run it. ``stage`` is 1-based, ``epoch`` 0-based
    within the stage, ``samples_seen`` counts this step's samples."""
    for stage in plan.stages:
        for step in range(stage.step_start, stage.step_end):
            lr, momentum = lr_momentum(plan, step)
            yield {
                "step": step,
                "stage": stage.index + 1,
                "epoch": stage.epoch_of(step),
                "resolution": resolution(plan, step),
                "global_batch": stage.global_batch,
                "samples_seen": plan.samples_before(step) + stage.global_batch,
                "lr": lr,
                "momentum": momentum,
            }


def write_csv(plan: Plan, path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in step_rows(plan):
            writer.writerow({**row, "lr": repr(row["lr"]), "momentum": repr(row["momentum"])})


def plan_table(plan: Plan, title: str = "") -> Table:
    table = Table(title=title or None, title_justify="left")
    for col in [
        "stage",
        "res",
        "data",
        "samples",
        "epochs",
        "workers",
        "batch/worker",
        "accum",
        "global batch",
        "steps",
        "LR factor",
        "LR range",
    ]:
        table.add_column(col, justify="right")
    for s in plan.stages:
        lrs = [lr_momentum(plan, k)[0] for k in range(s.step_start, s.step_end)]
        table.add_row(
            s.label,
            f"{s.resolution}px",
            f"{s.data_fraction:g}",
            f"{s.subset_size:,}",
            f"{s.epochs:g}",
            str(s.workers),
            str(s.batch_size),
            str(s.grad_accum),
            str(s.global_batch),
            f"{s.steps:,}",
            f"{s.lr_scale:.4g}",
            f"{min(lrs):.3g} - {max(lrs):.3g}",
        )
    table.add_section()
    table.add_row(
        "total", "", "", f"{plan.total_samples:,} seen", "", "", "", "", "", f"{plan.total_steps:,}", "", ""
    )
    return table


def peak_lr_note(plan: Plan) -> str:
    """What max_lr means, in numbers: the peak at the reference batch, and each stage's actual peak."""
    peaks = "; ".join(
        f"stage {s.label} {max(lr_momentum(plan, k)[0] for k in range(s.step_start, s.step_end)):.4g}"
        f" (LR factor {s.lr_scale:.4g})"
        for s in plan.stages
    )
    return (
        f"schedule.max_lr {plan.schedule.max_lr:g} is the peak LR at global batch {plan.reference_batch} "
        f"(lr_scaling.reference_batch); the LR each stage actually reaches: {peaks}"
    )


def plot_plans(plans: dict[str, Plan], path: str, x_axis: str = "samples") -> None:
    """LR, momentum, resolution and global batch against samples (or steps), stage boundaries dashed.
    Several plans (e.g. the three strategies) are overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    for label, plan in plans.items():
        rows = list(step_rows(plan))
        x = [r["samples_seen"] if x_axis == "samples" else r["step"] for r in rows]
        for ax, key in zip(axes, ["lr", "momentum", "resolution", "global_batch"], strict=True):
            ax.plot(
                x,
                [r[key] for r in rows],
                label=label,
                drawstyle="steps-post" if key in ("resolution", "global_batch") else "default",
            )
    first = next(iter(plans.values()))
    for ax, name in zip(axes, ["learning rate", "momentum", "resolution (px)", "global batch"], strict=True):
        ax.set_ylabel(name)
        for s in first.stages[1:]:
            ax.axvline(
                s.sample_start if x_axis == "samples" else s.step_start, color="grey", linestyle="--", lw=0.8
            )
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[-1].set_xlabel("samples seen" if x_axis == "samples" else "optimizer step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_table(record) -> Table:
    """Per stage: status, steps, time, throughput, validation accuracy, and the training-loss spike at the
    stage's start (``service.analysis.boundary_spikes``) (``stagetrain run`` / ``status``)."""
    table = Table(title=f"{record.job_id}: {record.status}", title_justify="left")
    for col in [
        "stage",
        "status",
        "workers",
        "attempts",
        "restarts",
        "infra",
        "time",
        "img/s",
        "val acc",
        "val loss",
        "spike",
        "checkpoint",
    ]:
        table.add_column(col, justify="right")
    for s in record.stages:
        table.add_row(
            str(s.stage),
            s.status,
            str(s.workers),
            str(s.attempts),
            str(s.restarts),
            str(s.infra_failures),
            f"{s.seconds:.0f}s" if s.seconds else "",
            f"{s.images_per_s:,.0f}" if s.images_per_s else "",
            f"{s.val_acc:.2%}" if s.val_acc is not None else "",
            f"{s.val_loss:.3f}" if s.val_loss is not None else "",
            f"{s.spike:+.3f}" if s.spike is not None else "",
            s.checkpoint or "",
        )
    return table


def plot_metrics(metrics: list[dict], path_or_file, x_axis: str = "samples") -> None:
    """Loss, validation accuracy, LR, momentum and resolution of a run, stage boundaries dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m for m in metrics if m.get("kind", "step") == "step"]
    ends = [m for m in metrics if m.get("kind") == "stage_end" and "val_acc" in m]
    key = "samples_seen" if x_axis == "samples" else "step"
    x = [m[key] for m in steps]
    fig, axes = plt.subplots(5, 1, figsize=(9, 12), sharex=True)
    axes[0].plot(x, [m["loss"] for m in steps], lw=0.8)
    axes[0].set_ylabel("train loss")
    by_step = {m["step"]: m for m in steps}
    acc_x = [by_step[e["step"] - 1][key] for e in ends if e["step"] - 1 in by_step]
    axes[1].plot(acc_x, [e["val_acc"] for e in ends if e["step"] - 1 in by_step], "o-")
    axes[1].set_ylabel("val top-1")
    for ax, k, name in zip(
        axes[2:],
        ["lr", "momentum", "resolution"],
        ["learning rate", "momentum", "resolution (px)"],
        strict=True,
    ):
        ax.plot(x, [m[k] for m in steps], drawstyle="steps-post" if k == "resolution" else "default")
        ax.set_ylabel(name)
    boundaries = [b[key] for a, b in zip(steps, steps[1:], strict=False) if a["stage"] != b["stage"]]
    for ax in axes:
        for b in boundaries:
            ax.axvline(b, color="grey", linestyle="--", lw=0.8)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("samples seen" if x_axis == "samples" else "optimizer step")
    fig.tight_layout()
    fig.savefig(path_or_file, dpi=110, format="png")
    plt.close(fig)


def _age(iso: str) -> str:
    from datetime import datetime, timezone

    seconds = (datetime.now(timezone.utc) - datetime.fromisoformat(iso)).total_seconds()
    return _duration(seconds) + " ago"


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


def status_lines(record, latest, lease, ray_state: str | None) -> list[str]:
    """``stagetrain status`` below the stage table: where the job is on its curve, what is committed,
    how long is left, and who runs it."""
    plan = record.plan()
    step = min(record.current_step, plan.total_steps)
    lines = [
        f"step {step:,} of {plan.total_steps:,} (stage {record.current_stage}/{len(record.stages)}); "
        f"updated {record.updated}"
    ]
    if step < plan.total_steps:
        stage = plan.stage_at(step)
        lr, momentum = lr_momentum(plan, step)
        lines.append(
            f"now: {stage.resolution}px, global batch {stage.global_batch} ({stage.workers} workers x "
            f"{stage.batch_size} x accum {stage.grad_accum}), lr {lr:.4g}, momentum {momentum:.3f}"
        )
        if record.images_per_s and record.status == "running":
            left = plan.total_samples - plan.samples_before(step)
            lines.append(
                f"time left: about {_duration(left / record.images_per_s)} at {record.images_per_s:,.0f} "
                "img/s "
                f"({left:,} samples; stage start-up not counted)"
            )
    lines.append(
        f"last committed checkpoint: {latest.tag} (step {latest.step:,}, {_age(latest.created)})"
        if latest
        else "last committed checkpoint: none yet"
    )
    if lease is not None:
        lines.append(f"coordinator: {lease.describe()}" + ("" if lease.alive() else " (stale: not running)"))
    else:
        lines.append("coordinator: none running")
    if record.ray_submissions:
        lines.append(f"Ray job {record.ray_submissions[-1]}: {ray_state or 'unknown'} ({record.ray_address})")
    if record.status == "waiting_for_capacity":
        lines.append(f"waiting for capacity: {record.waiting_for}")
    if record.sinks:
        lines.append(
            "metrics sinks: "
            + "; ".join(
                f"{s.name} "
                + (f"failed ({s.failed})" if s.failed else "ok")
                + (f", {s.dropped:,} record(s) dropped" if s.dropped else "")
                for s in record.sinks
            )
        )
    code = sum(s.restarts for s in record.stages)
    infra = sum(s.infra_failures for s in record.stages)
    if code or infra:
        lines.append(
            f"recovered by itself: {infra} time(s) from lost nodes or notices, {code} time(s) from crashes "
            f"of the training code (failure.max_failures {record.job_spec().failure.max_failures} per stage)"
        )
    return lines


def job_row(record) -> dict:
    """One job, as ``stagetrain list`` shows it (and prints with --json)."""
    from datetime import datetime

    last_acc = next((s.val_acc for s in reversed(record.stages) if s.val_acc is not None), None)
    started = next((s.started for s in record.stages if s.started), None)
    elapsed = (
        (datetime.fromisoformat(record.updated) - datetime.fromisoformat(started)).total_seconds()
        if started
        else 0.0
    )
    return {
        "job_id": record.job_id,
        "status": record.status,
        "stage": f"{record.current_stage}/{len(record.stages)}",
        "step": record.current_step,
        "total_steps": record.total_steps,
        "val_acc": last_acc,
        "started": started,
        "elapsed_s": round(elapsed, 1),
    }


def jobs_table(rows: list[dict]) -> Table:
    table = Table(title=f"{len(rows)} job(s)", title_justify="left")
    for col in ["job", "status", "stage", "step", "val acc", "started", "elapsed"]:
        table.add_column(col, justify="left" if col == "job" else "right")
    for r in rows:
        table.add_row(
            r["job_id"],
            r["status"],
            r["stage"],
            f"{r['step']:,}/{r['total_steps']:,}",
            f"{r['val_acc']:.2%}" if r["val_acc"] is not None else "",
            r["started"] or "",
            _duration(r["elapsed_s"]) if r["started"] else "",
        )
    return table
