"""What the figures show, read back from their artists: every evaluation, validation loss, the title,
stage boundaries, resumes, restarts and layout changes (metrics.png); breaks at gaps and bands over
seeds (compare.png); one colour per strategy and stage labels (plan --plot --compare)."""

from __future__ import annotations

from datetime import datetime, timezone

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from service.jobs import LayoutChange, now  # noqa: E402
from tests.test_coordinator import Job  # noqa: E402


def _step(k: int, stage: int, res: int, batch: int = 32) -> dict:
    return dict(
        kind="step", step=k, stage=stage, epoch=0, samples_seen=32 * (k + 1), loss=2.0 - k / 40, lr=0.01 * k,
        momentum=0.9, resolution=res, global_batch=batch, workers=2, grad_accum=1, images_per_s=100.0,
    )  # fmt: skip


def _metrics() -> list[dict]:
    """3 stages of 12 steps; two mid-stage evaluations per stage; stage ends; stage 3 on 1 worker."""
    out = [_step(k, 1 + k // 12, (16, 20, 24)[k // 12], 32 if k < 24 else 16) for k in range(36)]
    for k in (4, 8, 16, 20, 28, 32):
        stage = 1 + k // 12
        out.append(
            {"kind": "eval", "step": k, "stage": stage, "samples_seen": 32 * k, "resolution": 16,
             "val_loss": 1.0 + k / 100, "val_acc": 0.5 + k / 100}
        )  # fmt: skip
    for stage in (1, 2, 3):
        out.append(
            dict(kind="stage_end", stage=stage, step=12 * stage, val_loss=0.9, val_acc=0.6 + stage / 10)
        )
    return out


def test_metrics_png_shows_every_evaluation_boundaries_resumes_and_layout_changes(tmp_path):
    from service.report import metrics_figure

    record = Job(tmp_path).record
    record.status = "succeeded"
    record.events += [
        f"{now()} resumed from step-000000016 (step 16)",
        f"{now()} stage 2 runs again from step 20: x",
    ]
    record.layout_changes.append(LayoutChange(at=now(), source="scale", step=24, from_stage=3, workers=1))
    fig = metrics_figure(_metrics(), "samples", record)
    axes = {ax.get_ylabel(): ax for ax in fig.axes}
    assert fig._suptitle.get_text() == "j (succeeded)"

    def line(ax, label):
        (found,) = [ln for ln in ax.get_lines() if ln.get_label() == label]
        return list(found.get_xdata()), list(found.get_ydata())

    xs, accs = line(axes["val top-1"], "val top-1")
    assert len(accs) == 6 + 3  # every mid-stage evaluation and every stage end
    assert xs == sorted(xs) and xs[0] == 32 * 4
    assert line(axes["val top-1"], "stage end")[0] == [32 * 12, 32 * 24, 32 * 36]
    assert len(line(axes["val loss"], "val loss")[1]) == 9
    assert line(axes["global batch"], "global batch")[1][-1] == 16
    vlines = {(ln.get_gid(), ln.get_xdata()[0]) for ln in axes["train loss"].get_lines() if ln.get_gid()}
    assert vlines == {
        ("stage boundary", 32 * 12),
        ("stage boundary", 32 * 24),
        ("resume", 32 * 16),
        ("restart", 32 * 20),
        ("1 worker(s) from stage 3", 32 * 24),
    }
    plt.close(fig)


def _run(label: str, seed: int, start: float):
    """A compare run: 36 steps in 3 stages, 1 s a step, 20 s of start-up before each stage."""
    from service.compare import RunFigures, Variant
    from tests.conftest import make_spec

    metrics = []
    for m in _metrics():
        m = dict(m)
        stage = m["stage"]
        if m["kind"] == "step":
            m["time"] = start + 20 * stage + m["step"] + seed * 0.1
            m["loss"] += 0.05 * seed
        else:
            m["time"] = start + 20 * stage + m["step"] + 0.5
            m["val_acc"] += 0.02 * seed
        metrics.append(m)
    variant = Variant(label=label, seed=seed, spec=make_spec(), job_id=f"{label}-{seed}")
    started = datetime.fromtimestamp(start, timezone.utc).isoformat()
    return RunFigures(variant, metrics, started, None, None, None, {})


def test_compare_png_draws_mean_and_band_per_strategy_and_breaks_at_start_ups():
    import math

    from matplotlib.ticker import EngFormatter

    from service.compare import compare_figure

    runs = [_run(label, seed, 1e9) for label in ("global_onecycle", "per_stage_cosine") for seed in (0, 1)]
    fig = compare_figure(runs, [32 * 12, 32 * 24])
    samples_loss, time_loss = fig.axes[0], fig.axes[3]
    for ax in (samples_loss, time_loss):
        lines = [ln for ln in ax.get_lines() if not ln.get_gid() and len(ln.get_xdata()) > 2]
        assert [ln.get_label() for ln in lines] == ["global_onecycle", "per_stage_cosine"]  # one mean each
        assert len([c for c in ax.collections if c.get_gid() == "band"]) == 2  # mean +- std over 2 seeds
    mean = [ln for ln in samples_loss.get_lines() if ln.get_label() == "global_onecycle"][0]
    assert list(mean.get_ydata()[:2]) == [2.025, 2.025 - 0.0125]  # (seed 0 + seed 1) / 2, smoothed
    # wall-clock: no line across the 20 s start-ups before stages 2 and 3
    xs = [ln for ln in time_loss.get_lines() if ln.get_label() == "global_onecycle"][0].get_xdata()
    assert sum(math.isnan(v) for v in xs) == 2 and len(xs) == 36 + 2
    assert isinstance(samples_loss.xaxis.get_major_formatter(), EngFormatter)
    assert fig._suptitle.get_text() == "2 variant(s) x 2 seed(s): mean +- std over seeds"
    plt.close(fig)


def test_plan_plot_compare_gives_each_strategy_its_colour_and_labels_the_stages():
    from service.plan import build_plan
    from service.report import plans_figure
    from tests.conftest import make_spec

    spec = make_spec()
    plans = {}
    for strategy in ("global_onecycle", "per_stage_onecycle", "per_stage_cosine"):
        other = spec.model_copy(update={"schedule": spec.schedule.model_copy(update={"strategy": strategy})})
        plans[strategy] = build_plan(other, 4096)
    fig = plans_figure(plans, title="t: LR strategies")
    lr, momentum, res, batch = fig.axes

    def curves(ax):
        return {ln.get_label(): ln.get_color() for ln in ax.get_lines() if not ln.get_gid()}

    assert curves(lr) == {"global_onecycle": "C0", "per_stage_onecycle": "C1", "per_stage_cosine": "C2"}
    assert curves(res) == {"every plan": "black"} and curves(batch) == {"every plan": "black"}  # shared
    stages = [t.get_text() for t in lr.texts if t.get_gid() == "stage label"]
    assert stages == [f"stage {s.label}: {s.resolution}px" for s in plans["global_onecycle"].stages]
    assert fig._suptitle.get_text() == "t: LR strategies"
    plt.close(fig)
