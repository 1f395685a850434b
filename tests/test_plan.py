"""The plan and `stagetrain plan`, checked against numbers computed by hand."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import pytest
import yaml

from service.plan import build_plan
from tests.conftest import BASE_SPEC, make_spec, merge

# The seed scenario: 128 -> 160 -> 224 px, data fractions 0.25 / 0.5 / 1.0, per-worker batch shrinking.
SEED_STAGES = [
    {"resolution": 128, "epochs": 2, "data_fraction": 0.25, "batch_size": 64, "workers": 4},  # global 256
    {"resolution": 160, "epochs": 2, "data_fraction": 0.5, "batch_size": 48, "workers": 4},  # global 192
    {
        "resolution": 224,
        "epochs": 1,
        "data_fraction": 1.0,
        "batch_size": 32,
        "workers": 2,
        "grad_accum": 2,
    },  # 128
]
N = 10_000
# By hand: subset = floor(f N); steps/epoch = subset // global batch (drop last);
# steps = floor(epochs x that).
#   stage 1: 2500 // 256 = 9/epoch  -> 18 steps,  4608 samples, steps [0, 18)
#   stage 2: 5000 // 192 = 26/epoch -> 52 steps,  9984 samples, steps [18, 70)
#   stage 3: 10000 // 128 = 78      -> 78 steps,  9984 samples, steps [70, 148)
HAND = [
    dict(subset=2500, gb=256, per_epoch=9, steps=18, start=0, sample_start=0, factor=1.0),
    dict(subset=5000, gb=192, per_epoch=26, steps=52, start=18, sample_start=4608, factor=0.75),
    dict(subset=10000, gb=128, per_epoch=78, steps=78, start=70, sample_start=14592, factor=0.5),
]
TOTAL_STEPS, TOTAL_SAMPLES = 148, 24576
MAX_LR, DIV, FINAL_DIV = 0.4, 25, 1e4
INITIAL, MIN_LR = MAX_LR / DIV, MAX_LR / DIV / FINAL_DIV


def _cos(start, end, pct):
    return end + (start - end) / 2 * (math.cos(math.pi * pct) + 1)


def _hand_lr(strategy: str, step: int) -> float:
    stage = max(i for i, h in enumerate(HAND) if h["start"] <= step)
    h = HAND[stage]
    local = step - h["start"]
    if strategy == "global_onecycle":
        # progress: samples, in units of stage 1's global batch (256): T = 24576 / 256 = 96,
        # phase 1 ends at 23
        x = (h["sample_start"] + local * h["gb"]) / 256
        lr = _cos(INITIAL, MAX_LR, x / 23) if x <= 23 else _cos(MAX_LR, MIN_LR, min((x - 23) / (95 - 23), 1))
    elif strategy == "per_stage_onecycle":
        end1 = 0.25 * h["steps"] - 1
        lr = (
            _cos(INITIAL, MAX_LR, local / end1)
            if local <= end1
            else _cos(MAX_LR, MIN_LR, (local - end1) / (h["steps"] - 1 - end1))
        )
    else:
        lr = MAX_LR * (1 + math.cos(math.pi * local / h["steps"])) / 2
    return lr * h["factor"]


def _spec_dict(strategy: str) -> dict:
    return merge(
        BASE_SPEC,
        {
            "name": "seed-scenario",
            "data": {"kind": "synthetic", "size": N, "num_classes": 10},
            "schedule": {
                "strategy": strategy,
                "max_lr": MAX_LR,
                "div_factor": DIV,
                "final_div_factor": FINAL_DIV,
            },
            "lr_scaling": {"rule": "linear", "reference_batch": 256},
            "stages": SEED_STAGES,
        },
    )


def test_plan_numbers_match_hand_computation():
    plan = build_plan(
        make_spec(**{k: v for k, v in _spec_dict("global_onecycle").items() if k != "version"}), N
    )
    assert plan.dataset_size == N
    for stage, h in zip(plan.stages, HAND, strict=True):
        assert (stage.subset_size, stage.global_batch, stage.steps_per_epoch, stage.steps) == (
            h["subset"],
            h["gb"],
            h["per_epoch"],
            h["steps"],
        )
        assert (stage.step_start, stage.sample_start, stage.lr_scale) == (
            h["start"],
            h["sample_start"],
            h["factor"],
        )
    assert (plan.total_steps, plan.total_samples) == (TOTAL_STEPS, TOTAL_SAMPLES)
    assert plan.stage_at(17).index == 0 and plan.stage_at(18).index == 1 and plan.stage_at(147).index == 2
    assert plan.stages[1].epoch_of(18 + 25) == 0 and plan.stages[1].epoch_of(18 + 26) == 1
    with pytest.raises(IndexError):
        plan.stage_at(148)


def test_plan_hash_is_stable_and_stage_hashes_are_local():
    a = build_plan(make_spec(stages=SEED_STAGES), N)
    b = build_plan(make_spec(stages=SEED_STAGES), N)
    assert a.plan_hash() == b.plan_hash()
    changed = [dict(s) for s in SEED_STAGES]
    changed[2]["workers"] = 4
    c = build_plan(make_spec(stages=changed), N)
    assert c.plan_hash() != a.plan_hash()
    assert [c.stage_hash(i) == a.stage_hash(i) for i in range(3)] == [True, True, False]


def _run_plan(tmp_path, strategy):
    job = tmp_path / f"{strategy}.yaml"
    job.write_text(yaml.safe_dump(_spec_dict(strategy)))
    out_csv = tmp_path / f"{strategy}.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "plan", str(job), "--csv", str(out_csv)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    with open(out_csv) as f:
        return proc.stdout, list(csv.DictReader(f))


@pytest.mark.parametrize("strategy", ["global_onecycle", "per_stage_onecycle", "per_stage_cosine"])
def test_plan_cli_table_and_csv(tmp_path, strategy):
    table, rows = _run_plan(tmp_path, strategy)
    # the table: one row per stage with the hand-computed numbers, and the totals
    lines = [line for line in table.splitlines() if "px" in line]
    assert len(lines) == 3
    for line, stage, h in zip(lines, SEED_STAGES, HAND, strict=True):
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        assert cells[:11] == [
            str(SEED_STAGES.index(stage) + 1),
            f"{stage['resolution']}px",
            f"{stage['data_fraction']:g}",
            f"{h['subset']:,}",
            f"{stage['epochs']:g}",
            str(stage["workers"]),
            str(stage["batch_size"]),
            str(stage.get("grad_accum", 1)),
            str(h["gb"]),
            str(h["steps"]),
            f"{h['factor']:.4g}",
        ]
    total = next(line for line in table.splitlines() if "total" in line)
    assert f"{TOTAL_SAMPLES:,} seen" in total and f" {TOTAL_STEPS} " in total
    # the CSV: one row per optimizer step
    assert list(rows[0]) == [
        "step",
        "stage",
        "epoch",
        "resolution",
        "global_batch",
        "samples_seen",
        "lr",
        "momentum",
    ]
    assert len(rows) == TOTAL_STEPS
    seen = 0
    for row in rows:
        step = int(row["step"])
        stage = max(i for i, h in enumerate(HAND) if h["start"] <= step)
        h = HAND[stage]
        seen += h["gb"]
        assert int(row["stage"]) == stage + 1
        assert int(row["epoch"]) == (step - h["start"]) // h["per_epoch"]
        assert int(row["resolution"]) == SEED_STAGES[stage]["resolution"]
        assert int(row["global_batch"]) == h["gb"]
        assert int(row["samples_seen"]) == seen
        assert float(row["lr"]) == pytest.approx(_hand_lr(strategy, step), rel=1e-12, abs=1e-15)
    assert seen == TOTAL_SAMPLES
    # spot values written out by hand
    lr = {int(r["step"]): float(r["lr"]) for r in rows}
    if strategy == "per_stage_cosine":
        assert (lr[0], lr[18], lr[70]) == pytest.approx((0.4, 0.3, 0.2))
        assert lr[18 + 26] == pytest.approx(0.15)
    else:
        assert lr[0] == pytest.approx(0.016)
        assert lr[147] == pytest.approx(MIN_LR * 0.5)
    if strategy == "per_stage_onecycle":
        assert lr[18] == pytest.approx(0.016 * 0.75) and lr[70] == pytest.approx(0.016 * 0.5)
    if strategy == "global_onecycle":
        assert lr[18] == pytest.approx(0.75 * _cos(0.016, 0.4, 18 / 23))  # still warming up: no re-heat


def test_plan_cli_json_and_plot(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(_spec_dict("global_onecycle")))
    png = tmp_path / "lr.png"
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "plan", str(job), "--json", "--plot", str(png), "--compare"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["plan_hash"] and [s["steps"] for s in data["stages"]] == [18, 52, 78]
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
