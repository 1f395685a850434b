"""Human-facing views of a plan and of a run: tables, per-step CSV rows, plots."""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable

from rich.table import Table

from service.curve import lr_momentum, resolution
from service.jobs import JobStatus
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
                "stage": stage.number,
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


def calibration_table(cal, title: str = "") -> Table:
    """``plan --calibrate`` (``workers.calibrate.Calibration``): per stage the measured img/s of one
    worker, the projection on the planned workers, and the stage's time; the job's total; the baseline."""
    table = Table(title=title or None, title_justify="left")
    for col in [
        "stage",
        "res",
        "batch/worker",
        "accum",
        "workers",
        "img/s/worker",
        "img/s",
        "steps",
        "time",
        "worker time",
        "measured",
    ]:
        table.add_column(col, justify="right")

    def row(label: str, s) -> None:
        table.add_row(
            label,
            f"{s.resolution}px",
            str(s.batch_size),
            str(s.grad_accum),
            str(s.workers),
            f"{s.images_per_s_per_worker:,.0f}",
            f"{s.images_per_s:,.0f}",
            f"{s.steps:,}",
            _span(s.seconds),
            _span(s.worker_seconds),
            f"as stage {s.measured_as}" if s.measured_as else f"{s.timed_steps} steps, {s.measured_s:.2f}s",
        )

    for s in cal.stages:
        row(s.stage, s)
    table.add_section()
    steps = sum(s.steps for s in cal.stages)
    table.add_row(
        "job", "", "", "", "", "", "", f"{steps:,}", _span(cal.seconds), _span(cal.worker_seconds), ""
    )
    table.add_section()
    for s in cal.baseline.stages:
        row("baseline", s)
    return table


def calibration_lines(cal) -> list[str]:
    """Under ``calibration_table``: where it was measured, the scaling rule, and what the schedule saves."""
    saved = 1 - cal.compute_ratio
    return [
        f"measured on {cal.device}, one worker: {cal.warmup_steps} warm-up + {cal.timed_steps} timed "
        "optimizer steps a stage (fewer in a stage with fewer steps), data from the job's source",
        f"projection: {cal.scaling}; a stage's resolution ramp runs at its resolution here",
        f"progressive vs the fixed-resolution baseline (compare --baseline): time {cal.time_ratio:.2f}x "
        f"({_span(cal.seconds)} vs {_span(cal.baseline.seconds)}), compute {cal.compute_ratio:.2f}x "
        f"(worker time {_span(cal.worker_seconds)} vs {_span(cal.baseline.worker_seconds)}): "
        + (f"saves {saved:.0%} of the baseline's compute" if saved >= 0 else f"costs {-saved:.0%} more"),
    ]


def _span(seconds: float) -> str:
    """A projected time: ``0.42s``, ``12.3s``, or ``_duration``'s from a minute on."""
    return f"{seconds:.2f}s" if seconds < 10 else f"{seconds:.1f}s" if seconds < 60 else _duration(seconds)


def regularization_lines(spec, plan: Plan) -> list[str]:
    """Each stage's effective regularization (``JobSpec.stage_regularization``), one line per stage; none
    when the job regularizes nothing."""
    regs = [spec.stage_regularization(i) for i in range(len(spec.stages))]
    if all(r == type(r)() for r in regs):
        return []
    shown = sorted({s.index for s in plan.stages})
    ramps = {i: n for i in shown if (n := spec.stages[i].regularization_ramp_steps)}
    return [
        f"stage {i + 1} regularization: {regs[i].describe()}"
        + (f" (from stage {i}'s over its first {ramps[i]} steps)" if i in ramps else "")
        for i in shown
    ]


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


def plot_plans(plans: dict[str, Plan], path: str, x_axis: str = "samples", title: str | None = None) -> None:
    """``plans_figure`` as a PNG."""
    import matplotlib.pyplot as plt

    fig = plans_figure(plans, x_axis, title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plans_figure(plans: dict[str, Plan], x_axis: str = "samples", title: str | None = None):
    """LR, momentum, resolution and global batch against samples (or steps). Several plans (e.g. the
    three strategies) overlay their LR and momentum, one colour each; what they share (resolution and
    global batch: the stages) is drawn once, in black. Stage boundaries dashed, each stage labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    rows = {label: list(step_rows(plan)) for label, plan in plans.items()}
    xs = {
        label: [r["samples_seen"] if x_axis == "samples" else r["step"] for r in rs]
        for label, rs in rows.items()
    }
    for k, label in enumerate(plans):
        for ax, key in zip(axes[:2], ["lr", "momentum"], strict=True):
            ax.plot(xs[label], [r[key] for r in rows[label]], label=label, color=f"C{k}")
    for ax, key in zip(axes[2:], ["resolution", "global_batch"], strict=True):
        shared = len({tuple(r[key] for r in rs) for rs in rows.values()}) == 1
        for k, label in enumerate(plans if not shared else list(plans)[:1]):
            ax.plot(
                xs[label],
                [r[key] for r in rows[label]],
                drawstyle="steps-post",
                color="black" if shared else f"C{k}",
                label="every plan" if shared else label,
            )
    first = next(iter(plans.values()))
    names = ["learning rate", "momentum", "resolution (px)", "global batch"]
    for ax, name in zip(axes, names, strict=True):
        ax.set_ylabel(name)
        for st in first.stages[1:]:
            at = st.sample_start if x_axis == "samples" else st.step_start
            ax.axvline(at, color="grey", linestyle="--", lw=0.8, gid="stage boundary")
        ax.grid(alpha=0.3)
    for st in first.stages:
        at = st.sample_start if x_axis == "samples" else st.step_start
        axes[0].annotate(
            f"stage {st.label}: {st.resolution}px", (at, 1.0), xycoords=("data", "axes fraction"),
            xytext=(3, -3), textcoords="offset points", va="top", fontsize=8, gid="stage label",
        )  # fmt: skip
    axes[0].legend(loc="lower right")
    fig.suptitle(title or ", ".join(plans))
    axes[-1].set_xlabel("samples seen" if x_axis == "samples" else "optimizer step")
    fig.tight_layout()
    return fig


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


RESUME = re.compile(r"resumed from .* \(step (\d+)\)")
RESTART = re.compile(r"stage \d+ runs again from step (\d+)")


def plot_metrics(metrics: list[dict], path_or_file, x_axis: str = "samples", record=None) -> None:
    """``metrics_figure`` as a PNG."""
    import matplotlib.pyplot as plt

    fig = metrics_figure(metrics, x_axis, record)
    fig.savefig(path_or_file, dpi=110, format="png")
    plt.close(fig)


def metrics_figure(metrics: list[dict], x_axis: str = "samples", record=None):
    """A run on one figure: train loss; validation top-1 and loss at every evaluation (mid-stage ``eval``
    records as dots, stage ends as larger markers: the dip after a boundary shows); LR; momentum;
    resolution with the global batch beside it. Stage boundaries are grey dashed lines; with the job
    ``record``, resumes and crash restarts (red dotted) and layout changes (purple, with the new worker
    count) are marked, and the title names the job and its status."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m for m in metrics if m.get("kind", "step") == "step"]
    key = "samples_seen" if x_axis == "samples" else "step"
    x_after = {m["step"]: m[key] for m in steps}  # x once a step is done

    def before(step: int) -> float | None:
        """x where step ``step`` starts (a boundary, a resume)."""
        if x_axis == "steps":
            return step
        if step - 1 in x_after:
            return x_after[step - 1]
        return record.plan().samples_before(step) if record is not None and step >= 0 else None

    x = [m[key] for m in steps]
    evals = [m for m in metrics if m.get("kind") == "eval" and m.get("val_acc") is not None]
    ends = [m for m in metrics if m.get("kind") == "stage_end" and m.get("val_acc") is not None]
    points = sorted(
        [(e["samples_seen"] if x_axis == "samples" else e["step"], e) for e in evals]
        + [(before(e["step"]), e) for e in ends if before(e["step"]) is not None],
        key=lambda p: p[0],
    )
    fig, axes = plt.subplots(6, 1, figsize=(9, 14), sharex=True)
    if record is not None:
        fig.suptitle(f"{record.job_id} ({record.status})")
    axes[0].plot(x, [m["loss"] for m in steps], lw=0.8, label="train loss")
    axes[0].set_ylabel("train loss")
    for ax, field, name in ((axes[1], "val_acc", "val top-1"), (axes[2], "val_loss", "val loss")):
        shown = [(px, e) for px, e in points if e.get(field) is not None]
        ax.plot([px for px, _ in shown], [e[field] for _, e in shown], "-", color="C1", lw=0.8, label=name)
        for kind, marker, size in (("eval", ".", 6), ("stage_end", "o", 7)):
            sel = [(px, e[field]) for px, e in shown if e["kind"] == kind]
            label = "mid-stage evaluation" if kind == "eval" else "stage end"
            ax.plot([p[0] for p in sel], [p[1] for p in sel], marker, color="C1", ms=size, label=label)
        ax.set_ylabel(name)
    axes[1].legend(loc="lower right", fontsize=8)
    for ax, k, name in zip(axes[3:5], ["lr", "momentum"], ["learning rate", "momentum"], strict=True):
        ax.plot(x, [m[k] for m in steps], label=name)
        ax.set_ylabel(name)
    axes[5].plot(x, [m["resolution"] for m in steps], drawstyle="steps-post", label="resolution")
    axes[5].set_ylabel("resolution (px)")
    batch = axes[5].twinx()
    batch.plot(
        x,
        [m["global_batch"] for m in steps],
        drawstyle="steps-post",
        color="C2",
        lw=0.8,
        label="global batch",
    )
    batch.set_ylabel("global batch", color="C2")
    boundaries = [
        before(b["step"]) for a, b in zip(steps, steps[1:], strict=False) if a["stage"] != b["stage"]
    ]
    marks = _run_marks(record, before) if record is not None else []
    for ax in axes:
        for b in boundaries:
            ax.axvline(b, color="grey", linestyle="--", lw=0.8, gid="stage boundary")
        for at, what, color, style in marks:
            ax.axvline(at, color=color, linestyle=style, lw=1.0, gid=what)
        ax.grid(alpha=0.3)
    for at, what, color, _ in marks:
        axes[0].annotate(
            what,
            (at, 1),
            xycoords=("data", "axes fraction"),
            rotation=90,
            va="top",
            ha="right",
            fontsize=7,
            color=color,
        )
    axes[-1].set_xlabel("samples seen" if x_axis == "samples" else "optimizer step")
    fig.tight_layout()
    return fig


def _run_marks(record, before) -> list[tuple[float, str, str, str]]:
    """(x, label, colour, line style) of the run's resumes, crash restarts and layout changes."""
    marks = []
    for event in record.events:
        for pattern, what in ((RESUME, "resume"), (RESTART, "restart")):
            if (m := pattern.search(event)) and (at := before(int(m.group(1)))) is not None:
                marks.append((at, what, "red", ":"))
    for change in record.layout_changes:
        if (at := before(change.step)) is not None:
            marks.append((at, f"{change.workers} worker(s) from stage {change.from_stage}", "purple", "-."))
    return marks


def _age(iso: str) -> str:
    from datetime import datetime, timezone

    seconds = (datetime.now(timezone.utc) - datetime.fromisoformat(iso)).total_seconds()
    return _duration(seconds) + " ago"


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


def status_lines(record, latest, lease, ray_state: str | None, pending: list | None = None) -> list[str]:
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
        if record.images_per_s and record.status == JobStatus.RUNNING:
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
    if record.status == JobStatus.WAITING_FOR_CAPACITY:
        lines.append(f"waiting for capacity: {record.waiting_for}")
    for req in pending or []:
        lines.append(
            f"scale request {req.workers} worker(s) from stage {req.from_stage}: pending, applied at the "
            "next stage boundary"
        )
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
