"""``stagetrain compare``: one job per LR strategy (and seed, and an optional fixed-resolution baseline),
each an ordinary stagetrain job, then a report of how they did.

A run's job id is ``<name>-<hash of the fields the job file sets>-<label>-seed<k>``: the same job file
and options name the same runs (in later stagetrain releases too), so an interrupted compare continues
its unfinished runs and reuses the finished ones, and an edited job file starts fresh runs instead of
colliding with the old ones.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from service import analysis
from service.spec import JobSpec, validate_spec

STRATEGIES = ("global_onecycle", "per_stage_onecycle", "per_stage_cosine")
BASELINE = "baseline"


@dataclass(frozen=True)
class Variant:
    label: str  # a strategy, or "baseline"
    seed: int
    spec: JobSpec
    job_id: str


def parse_strategies(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown or not names:
        raise ValueError(
            f"--strategies: expected a comma-separated list of {', '.join(STRATEGIES)}, got {text!r}"
        )
    return list(dict.fromkeys(names))


def baseline_spec(spec: JobSpec) -> JobSpec:
    """The fixed-resolution reference: the final stage's resolution and layout on the full data, for as
    many epochs as all stages together, with a global OneCycle at the same LR-per-batch rule."""
    last = spec.stages[-1]
    raw = spec.model_dump(mode="json")
    raw["stages"] = [
        {
            **last.model_dump(mode="json"),
            "epochs": sum(s.epochs for s in spec.stages),
            "data_fraction": 1.0,
            "max_lr": None,
            "pct_start": None,
            "resolution_ramp_steps": 0,  # one stage: nothing to ramp from
            "regularization_ramp_steps": 0,
        }
    ]
    raw["schedule"]["strategy"] = "global_onecycle"
    # max_lr holds at the progressive job's reference batch, so both follow the same scaling rule
    raw["lr_scaling"]["reference_batch"] = spec.lr_scaling.reference_batch or spec.stages[0].global_batch
    raw["lr_scaling"]["ramp_steps"] = 0
    return validate_spec(raw, f"{spec.name} (baseline)")


def stable_hash(spec: JobSpec) -> str:
    """6 hex digits of the fields the job file sets (defaults left out), so a stagetrain release that
    adds a spec field with a default still names the same runs."""
    return hashlib.sha256(spec.model_dump_json(exclude_defaults=True).encode()).hexdigest()[:6]


def variants(spec: JobSpec, strategies: list[str], baseline: bool, seeds: int) -> list[Variant]:
    """Every run of the comparison, seed-major (one seed of every strategy before the next seed)."""
    stem = f"{spec.name}-{stable_hash(spec)}"
    out = []
    for seed in range(spec.seed, spec.seed + seeds):
        for strategy in strategies:
            raw = spec.model_dump(mode="json")
            raw["seed"], raw["schedule"]["strategy"] = seed, strategy
            out.append(Variant(strategy, seed, JobSpec.model_validate(raw), f"{stem}-{strategy}-seed{seed}"))
        if baseline:
            base = baseline_spec(spec).model_copy(update={"seed": seed})
            out.append(Variant(BASELINE, seed, base, f"{stem}-{BASELINE}-seed{seed}"))
    return out


@dataclass
class RunFigures:
    variant: Variant
    metrics: list[dict]
    started: str | None
    final_acc: float | None
    wall_s: float | None
    images_per_s: float | None
    spikes: dict[int, float]


def figures(variant: Variant, record, metrics: list[dict]) -> RunFigures:
    started = record.stages[0].started
    return RunFigures(
        variant,
        metrics,
        started,
        analysis.final_accuracy(metrics),
        analysis.wall_clock(metrics, started),
        analysis.images_per_s(metrics),
        analysis.boundary_spikes(metrics),
    )


def _stat(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    mean, std = analysis.mean_std(values)
    return fmt.format(mean) + (" ± " + fmt.replace("+", "").format(std) if len(values) > 1 else "")


def report_markdown(runs: list[RunFigures], spec: JobSpec, command: str) -> str:
    """The comparison table (mean ± std over seeds) and one row per run."""
    labels = list(dict.fromkeys(r.variant.label for r in runs))
    base = [r for r in runs if r.variant.label == BASELINE]
    target = analysis.mean_std([r.final_acc for r in base if r.final_acc is not None])[0] if base else None
    base_wall = analysis.mean_std([r.wall_s for r in base if r.wall_s is not None])[0] if base else None
    boundaries = list(range(2, len(spec.stages) + 1))
    seeds = sorted({r.variant.seed for r in runs})
    lines = [
        f"# stagetrain compare: {spec.name}",
        "",
        f"{len(runs)} runs: {', '.join(labels)}; seeds {', '.join(map(str, seeds))}. "
        f"Reproduce with `{command}`.",
        "",
        "Mean ± standard deviation over seeds. *spike k*: smoothed training loss over the first 5% of "
        f"stage k minus over the last 5% of stage k-1 (moving average of {analysis.SMOOTH_STEPS} steps). "
        "*wall-clock*: first stage start to last evaluation, stage start-up included.",
    ]
    if target is not None:
        lines.append(
            f"*time to baseline*: wall-clock until an evaluation first reached the baseline's final "
            f"top-1 ({target:.2%}), and its ratio to the baseline's wall-clock ({base_wall:.0f} s); "
            "`n/m` counts the runs that reached it."
        )
    header = ["strategy", "final val top-1", "wall-clock (s)", "images/s"]
    header += [f"spike {k}" for k in boundaries]
    header += ["time to baseline (s)", "ratio"] if target is not None else []
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label in labels:
        group = [r for r in runs if r.variant.label == label]
        row = [
            label,
            _stat([100 * r.final_acc for r in group if r.final_acc is not None], "{:.2f}%"),
            _stat([r.wall_s for r in group if r.wall_s is not None], "{:.0f}"),
            _stat([r.images_per_s for r in group if r.images_per_s is not None], "{:,.0f}"),
        ]
        row += [
            _stat([r.spikes[k] for r in group if k in r.spikes], "{:+.3f}") if label != BASELINE else "n/a"
            for k in boundaries
        ]
        if target is not None and label == BASELINE:
            row += ["n/a", "1×"]  # the reference itself
        elif target is not None:
            times = [analysis.time_to_accuracy(r.metrics, r.started, target) for r in group]
            reached = [t for t in times if t is not None]
            ratio = f"{analysis.mean_std(reached)[0] / base_wall:.2f}×" if reached and base_wall else "-"
            row += [f"{_stat(reached, '{:.0f}')} ({len(reached)}/{len(group)})", ratio]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "## Runs",
        "",
        "| job id | seed | final val top-1 | wall-clock (s) | spikes |",
        "|---|---|---|---|---|",
    ]
    for r in runs:
        spikes = ", ".join(f"{k}: {v:+.3f}" for k, v in sorted(r.spikes.items())) or "-"
        acc = f"{r.final_acc:.2%}" if r.final_acc is not None else "-"
        wall = f"{r.wall_s:.0f}" if r.wall_s is not None else "-"
        lines.append(f"| {r.variant.job_id} | {r.variant.seed} | {acc} | {wall} | {spikes} |")
    return "\n".join(lines) + "\n"


def plot_compare(runs: list[RunFigures], path: str, boundaries: list[int]) -> None:
    """``compare_figure`` as a PNG."""
    import matplotlib.pyplot as plt

    fig = compare_figure(runs, boundaries)
    fig.savefig(path, dpi=110)
    plt.close(fig)


GAP = 3.0  # a wall-clock step this many times the median step is a gap (a stage's start-up): no line


def compare_figure(runs: list[RunFigures], boundaries: list[int]):
    """Smoothed training loss, validation top-1 and LR, against samples (top) and wall-clock (bottom);
    one colour per strategy: the mean over its seeds, with a mean +- std band when there are several.
    Wall-clock lines break where nothing ran (stage start-ups), so no ramp is drawn across them; stage
    boundaries dashed (samples) or dotted (each strategy's own, wall-clock)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    labels = list(dict.fromkeys(r.variant.label for r in runs))
    colours = {label: f"C{k}" for k, label in enumerate(labels)}
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for label in labels:
        series = [s for r in runs if r.variant.label == label and (s := _run_series(r))]
        if not series:
            continue
        colour = colours[label]
        n = min(len(s["loss"]) for s in series)  # an interrupted seed: as far as all got
        ne = min(len(s["acc"]) for s in series)
        for row, xk, ek in ((0, "samples", "eval_samples"), (1, "time", "eval_time")):
            x = _mean([s[xk][:n] for s in series])
            ex = _mean([s[ek][:ne] for s in series])
            gaps = _gaps(x, [s["stage"][:n] for s in series][0]) if row == 1 else []
            for col, key in ((0, "loss"), (2, "lr")):
                _band(
                    axes[row][col], x, [s[key][:n] for s in series], colour, gaps, label if col == 0 else None
                )
            _band(axes[row][1], ex, [s["acc"][:ne] for s in series], colour, [], None, marker="o")
            if row == 1 and label != BASELINE:
                for i in gaps:
                    for ax in axes[row]:
                        ax.axvline(x[i], color=colour, linestyle=":", lw=0.8)
    for ax in axes[0]:
        for b in boundaries:
            ax.axvline(b, color="grey", linestyle="--", lw=0.8, gid="stage boundary")
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 1.2M, not 1200000 overlapping its neighbours
    for row, xlabel in enumerate(("samples seen", "wall-clock (s)")):
        for ax, name in zip(axes[row], ("train loss (smoothed)", "val top-1", "learning rate"), strict=True):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
            ax.tick_params(axis="x", labelrotation=20)
    axes[0][0].legend()
    seeds = len({r.variant.seed for r in runs})
    fig.suptitle(
        f"{len(labels)} variant(s) x {seeds} seed(s)" + (": mean +- std over seeds" if seeds > 1 else "")
    )
    fig.tight_layout()
    return fig


def _run_series(r: RunFigures) -> dict | None:
    from datetime import datetime

    steps = [m for m in r.metrics if m.get("kind", "step") == "step"]
    if not steps:
        return None
    evals = analysis.evaluations(r.metrics)
    t0 = datetime.fromisoformat(r.started).timestamp() if r.started else steps[0].get("time", 0)
    smooth = analysis.smoothed_losses(steps)
    return {
        "samples": [m["samples_seen"] for m in steps],
        "time": [m.get("time", t0) - t0 for m in steps],
        "stage": [m["stage"] for m in steps],
        "loss": [v for stage in sorted(smooth) for v in smooth[stage]],
        "lr": [m["lr"] for m in steps],
        "eval_samples": [_samples_at(e, steps) for e in evals],
        "eval_time": [e["time"] - t0 if e.get("time") else float("nan") for e in evals],
        "acc": [e["val_acc"] for e in evals],
    }


def _mean(rows: list[list[float]]):
    import numpy as np

    return np.nanmean(np.array(rows, dtype=float), axis=0)


def _gaps(x, stages: list[int]) -> list[int]:
    """Indices ``i`` where the wall-clock line must not join ``x[i-1]`` and ``x[i]``: a new stage's
    first step, or a step far longer than the median (a restart)."""
    import numpy as np

    if len(x) < 3:
        return []
    dt = np.diff(x)
    typical = float(np.nanmedian(dt)) or 1.0
    return [i + 1 for i, d in enumerate(dt) if stages[i + 1] != stages[i] or d > GAP * typical]


def _band(ax, x, rows, colour: str, gaps: list[int], label: str | None, marker: str = "") -> None:
    """The mean of ``rows`` against ``x`` (broken at ``gaps``), and mean +- std when there are several."""
    import numpy as np

    y = np.array(rows, dtype=float)
    mean = y.mean(axis=0)
    x = np.asarray(x, dtype=float)
    if gaps:
        x, mean = np.insert(x, gaps, np.nan), np.insert(mean, gaps, np.nan)
    style = {"color": colour, "lw": 1.0}
    ax.plot(x, mean, marker + "-", ms=3, label=label, **style)
    if len(rows) > 1:
        std = y.std(axis=0)
        if gaps:
            std = np.insert(std, gaps, np.nan)
        ax.fill_between(x, mean - std, mean + std, color=colour, alpha=0.2, lw=0, gid="band")


def _samples_at(evaluation: dict, steps: list[dict]) -> int:
    """Samples seen at an evaluation (stage-end records carry the step, not the samples)."""
    if "samples_seen" in evaluation:
        return evaluation["samples_seen"]
    before = [m["samples_seen"] for m in steps if m["step"] < evaluation["step"]]
    return before[-1] if before else 0
