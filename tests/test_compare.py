"""``stagetrain compare`` and the figures it is made of.

The spike statistic and the report are checked on hand-made records (no Ray); one integration test runs
a tiny synthetic comparison on local Ray (2 strategies, 1 seed, baseline), interrupted after its first
run, and checks the rerun reuses that run and fills every column.
"""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest

from service import analysis
from service.compare import BASELINE, baseline_spec, figures, report_markdown, variants
from service.spec import validate_spec
from tests.conftest import BASE_SPEC, merge
from tests.helpers import stagetrain
from tests.jobs import write_job


def _steps(stage: int, start: int, losses: list[float], t0: float = 1000.0) -> list[dict]:
    return [
        {
            "kind": "step",
            "step": start + k,
            "stage": stage,
            "loss": v,
            "samples_seen": 10 * (start + k + 1),
            "lr": 0.1,
            "images_per_s": 100.0,
            "time": t0 + start + k,
        }
        for k, v in enumerate(losses)
    ]


def _end(stage: int, step: int, acc: float, t: float) -> dict:
    return {"kind": "stage_end", "stage": stage, "step": step, "val_acc": acc, "val_loss": 1.0, "time": t}


def test_spike_is_smoothed_head_minus_previous_tail():
    # stage 1: 100 steps (5% = 5), its last 5 losses 1.0 after a noisy start; stage 2: 40 steps (5% = 2)
    records = _steps(1, 0, [9.0] * 95 + [1.0] * 5) + [_end(1, 100, 0.5, 1100)]
    records += _steps(2, 100, [3.0, 2.0] + [0.5] * 38) + [_end(2, 140, 0.6, 1140)]
    smooth = analysis.smoothed_losses([r for r in records if r["kind"] == "step"], window=10)
    # trailing window of 10: stage 1's last five smoothed values still see nine down to five 9.0s
    tail = sum(smooth[1][-5:]) / 5
    assert tail == pytest.approx(sum((9 * (9 - j) + (j + 1)) / 10 for j in range(5)) / 5) == 6.6
    # stage 2's first values do not reach back across the boundary
    assert smooth[2][:2] == [3.0, 2.5]
    assert analysis.boundary_spikes(records) == {2: pytest.approx(2.75 - tail)}
    # window 1: the raw losses
    assert analysis.boundary_spikes(records, window=1) == {2: pytest.approx(2.5 - 1.0)}


def test_spike_waits_for_the_first_five_percent_of_a_running_stage():
    records = _steps(1, 0, [1.0] * 100) + [_end(1, 100, 0.5, 1100)] + _steps(2, 100, [4.0])
    assert analysis.boundary_spikes(records, {1: 100, 2: 40}) == {}  # 1 of the 2 steps in
    records += _steps(2, 101, [2.0])
    assert analysis.boundary_spikes(records, {1: 100, 2: 40}) == {2: pytest.approx((4.0 + 3.0) / 2 - 1.0)}


def test_time_to_accuracy_and_wall_clock():
    started = "2026-01-01T00:00:00+00:00"
    t0 = 1767225600.0
    records = _steps(1, 0, [1.0] * 10, t0=t0) + [
        {
            "kind": "eval",
            "stage": 1,
            "step": 5,
            "samples_seen": 50,
            "resolution": 16,
            "val_acc": 0.7,
            "val_loss": 1.0,
            "time": t0 + 30,
        },
        _end(1, 10, 0.8, t0 + 60),
    ]
    assert analysis.time_to_accuracy(records, started, 0.65) == 30
    assert analysis.time_to_accuracy(records, started, 0.75) == 60
    assert analysis.time_to_accuracy(records, started, 0.9) is None
    assert analysis.wall_clock(records, started) == 60
    assert analysis.final_accuracy(records) == 0.8


def _spec():
    return validate_spec(
        merge(
            BASE_SPEC,
            {
                "stages": [
                    {"resolution": 16, "epochs": 1, "batch_size": 16, "workers": 2},
                    {
                        "resolution": 24,
                        "epochs": 2,
                        "data_fraction": 0.5,
                        "batch_size": 8,
                        "workers": 2,
                        "resolution_ramp_steps": 2,
                    },
                ]
            },
        )
    )


def test_variants_and_baseline():
    spec = _spec()
    runs = variants(spec, ["global_onecycle", "per_stage_cosine"], baseline=True, seeds=2)
    assert [(v.label, v.seed) for v in runs] == [
        ("global_onecycle", 0),
        ("per_stage_cosine", 0),
        (BASELINE, 0),
        ("global_onecycle", 1),
        ("per_stage_cosine", 1),
        (BASELINE, 1),
    ]
    assert len({v.job_id for v in runs}) == 6
    assert runs[1].spec.schedule.strategy == "per_stage_cosine" and runs[3].spec.seed == 1
    base = baseline_spec(spec)
    (only,) = base.stages
    assert (only.resolution, only.epochs, only.data_fraction, only.batch_size) == (24, 3, 1.0, 8)
    assert base.schedule.strategy == "global_onecycle"
    assert base.lr_scaling.reference_batch == 32  # the progressive job's stage 1 global batch
    # the same file and options name the same runs; an edited file other ones
    assert [v.job_id for v in variants(spec, ["global_onecycle"], False, 1)] == [runs[0].job_id]
    edited = validate_spec({**spec.model_dump(mode="json"), "seed": 5})
    assert variants(edited, ["global_onecycle"], False, 1)[0].job_id != runs[0].job_id
    # a field written out at its default (as a later release adds one) names the same runs
    explicit = validate_spec(
        merge(spec.model_dump(mode="json", exclude_defaults=True), {"train": {"label_smoothing": 0.0}})
    )
    assert variants(explicit, ["global_onecycle"], False, 1)[0].job_id == runs[0].job_id


def test_report_has_every_column_for_every_strategy():
    spec = _spec()
    started = "2026-01-01T00:00:00+00:00"
    t0 = 1767225600.0
    runs = []
    for v in variants(spec, ["global_onecycle", "per_stage_cosine"], baseline=True, seeds=2):
        if v.label == BASELINE:
            metrics = _steps(1, 0, [1.0] * 20, t0) + [_end(1, 20, 0.80 + 0.01 * v.seed, t0 + 100)]
        else:
            metrics = _steps(1, 0, [1.0] * 20, t0) + [_end(1, 20, 0.7, t0 + 30)]
            metrics += _steps(2, 20, [2.0] * 20, t0) + [_end(2, 40, 0.82, t0 + 50 + 2 * v.seed)]
        runs.append(figures(v, SimpleNamespace(stages=[SimpleNamespace(started=started)]), metrics))
    text = report_markdown(runs, spec, "stagetrain compare job.yaml --baseline --seeds 2")
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in text.splitlines()
        if line.startswith("| ") and "seed" not in line
    }
    assert set(rows) >= {"global_onecycle", "per_stage_cosine", BASELINE}
    for label in ("global_onecycle", "per_stage_cosine"):
        acc, wall, ips, spike, tta, ratio = rows[label]
        assert acc == "82.00% ± 0.00%" and wall == "51 ± 1" and ips == "100 ± 0"
        assert spike == "+1.000 ± 0.000"
        assert tta == "51 ± 1 (2/2)" and ratio == "0.51×"  # the baseline's 100 s wall-clock
    assert rows[BASELINE][0] == "80.50% ± 0.71%"


def test_bad_strategy_list_exits_2(tmp_path):
    job = write_job(tmp_path, BASE_SPEC)
    proc = stagetrain("compare", job, "--strategies", "global_onecycle,cosine")
    assert proc.returncode == 2
    assert (
        "--strategies: expected a comma-separated list of global_onecycle, per_stage_onecycle, "
        "per_stage_cosine, got 'global_onecycle,cosine'" in proc.stderr
    )


# A job small enough that a stage is mostly Ray start-up: the runs, not the training, are under test.
COMPARE_JOB = merge(
    BASE_SPEC,
    {
        "name": "cmp",
        "model": {
            "arch": None,
            "builder": "workers.models:small_resnet",
            "kwargs": {"widths": [8, 16], "blocks": [1, 1]},
            "num_classes": 10,
        },
        "data": {"kind": "synthetic", "size": 256, "val_size": 64, "num_classes": 10, "loader_workers": 0},
        "schedule": {"max_lr": 0.1},
        "stages": [
            {"resolution": 16, "epochs": 1, "batch_size": 16, "workers": 1},
            {"resolution": 24, "epochs": 1, "batch_size": 16, "workers": 1},
        ],
        "metrics": {"every_n_steps": 4, "eval_every_n_steps": 8},
        "checkpoint": {"every_n_steps": 0},
    },
)


@pytest.mark.ray
def test_compare_runs_reports_and_reuses_finished_runs(tmp_path, on_head):
    job = write_job(tmp_path, COMPARE_JOB)
    storage, out = str(tmp_path / "runs"), str(tmp_path / "out")
    # "interrupted" after its first run: a compare of that run alone
    first_run = ("compare", job, "--strategies", "global_onecycle", "--storage", storage, "--out", out)
    stagetrain(*first_run, env=on_head, check=True)
    first = json.loads(next((tmp_path / "runs").glob("*global_onecycle-seed0/job.json")).read_text())
    # the same strategy and the fixed-resolution baseline: one new run (every strategy's columns are
    # checked without Ray in test_report_has_every_column_for_every_strategy)
    proc = stagetrain(
        "compare",
        job,
        "--strategies",
        "global_onecycle",
        "--baseline",
        "--storage",
        storage,
        "--out",
        out,
        env=on_head,
        check=True,
    )
    assert re.search(r"\[1/2\] global_onecycle seed 0: job \S+ already succeeded; reused", proc.stderr)
    again = json.loads(next((tmp_path / "runs").glob("*global_onecycle-seed0/job.json")).read_text())
    assert again["coordinator_attempts"] == first["coordinator_attempts"] == 1
    text = (tmp_path / "out" / "report.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "job id" not in line]
    table = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in rows[:3]}
    assert set(table) == {"strategy", "global_onecycle", BASELINE}
    cells = table["global_onecycle"]
    assert len(cells) == 6 and all(c not in ("", "-") for c in cells[:4]), cells
    assert re.fullmatch(r"[+-]\d\.\d{3}", cells[3]), cells  # spike at stage 2
    assert re.fullmatch(r"(\d+ \(1/1\)|- \(0/1\))", cells[4]), cells
    assert (tmp_path / "out" / "compare.png").stat().st_size > 10_000
    # mid-stage evaluations are in the metrics, between the steps they follow
    metrics = [
        json.loads(line)
        for line in next((tmp_path / "runs").glob("*global_onecycle-seed0/metrics.jsonl"))
        .read_text()
        .splitlines()
    ]
    evals = [m for m in metrics if m["kind"] == "eval"]
    assert [(e["stage"], e["step"]) for e in evals] == [(1, 8), (2, 24)]
    assert all(0 <= e["val_acc"] <= 1 and e["time"] > 0 for e in evals)
    # the summary table and status show each stage's spike
    status = stagetrain(
        "status",
        next((tmp_path / "runs").glob("*global_onecycle-seed0")).name,
        "--storage",
        storage,
        check=True,
    )
    assert "spike" in status.stdout and re.search(r"[+-]\d\.\d{3}", status.stdout)
