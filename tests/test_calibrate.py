"""``stagetrain plan JOB.yaml --calibrate``: every stage and the fixed-resolution baseline measured on this
machine's CPU through the workers' own code (no Ray), their projection on the planned workers, and
nothing written where the user keeps anything."""

from __future__ import annotations

import json
import math
import os
import tempfile

from service.plan import build_plan
from tests.conftest import make_spec
from tests.helpers import stagetrain
from tests.jobs import TINY_IN_PROCESS, write_job

TOP_FIELDS = {
    "job",
    "device",
    "warmup_steps",
    "timed_steps",
    "scaling",
    "plan_hash",
    "stages",
    "seconds",
    "worker_seconds",
    "baseline",
    "time_ratio",
    "compute_ratio",
}
STAGE_FIELDS = {
    "stage",
    "resolution",
    "batch_size",
    "grad_accum",
    "workers",
    "global_batch",
    "steps",
    "warmup_steps",
    "timed_steps",
    "measured_s",
    "images_per_s_per_worker",
    "images_per_s",
    "seconds",
    "worker_seconds",
    "measured_as",
}

# 128 synthetic images: 8 steps a stage; stage 1 on 2 workers, stage 2 on 1 with accumulation.
JOB = dict(
    TINY_IN_PROCESS,
    name="calib",
    data={**TINY_IN_PROCESS["data"], "size": 128},
    stages=[
        {"resolution": 16, "epochs": 1, "batch_size": 8, "workers": 2},
        {"resolution": 24, "epochs": 1, "batch_size": 8, "workers": 1, "grad_accum": 2},
    ],
)


def test_plan_calibrate_json_measures_every_stage_and_the_baseline(tmp_path):
    storage = tmp_path / "runs"
    job = _job_file(tmp_path, **JOB, checkpoint={"storage": str(storage)})
    proc = stagetrain("plan", job, "--calibrate", "--json", "--warmup-steps", "1", "--timed-steps", "3")
    assert proc.returncode == 0, proc.stderr
    cal = json.loads(proc.stdout)
    assert set(cal) == TOP_FIELDS
    assert set(cal["baseline"]) == {"plan_hash", "stages", "seconds", "worker_seconds"}
    assert cal["device"].startswith("cpu") and "1 thread" in cal["device"]  # resources.cpus_per_worker 1
    assert [(s["stage"], s["resolution"], s["workers"]) for s in cal["stages"]] == [
        ("1", 16, 2),
        ("2", 24, 1),
    ]
    for s in cal["stages"]:
        assert set(s) == STAGE_FIELDS
        assert (s["warmup_steps"], s["timed_steps"], s["steps"]) == (1, 3, 8)
        assert s["measured_s"] > 0 and s["images_per_s_per_worker"] > 0 and s["measured_as"] is None
        assert s["images_per_s"] == s["images_per_s_per_worker"] * s["workers"]
        assert math.isclose(s["seconds"] * s["images_per_s"], s["steps"] * s["global_batch"])
    assert cal["seconds"] == sum(s["seconds"] for s in cal["stages"])
    # The baseline: the last stage's layout on all the data, as many epochs as both stages. Its step is
    # stage 2's, so it takes stage 2's measurement and the comparison carries no noise of its own.
    (base,) = cal["baseline"]["stages"]
    assert (base["resolution"], base["steps"], base["measured_as"]) == (24, 16, "2")
    assert base["images_per_s_per_worker"] == cal["stages"][1]["images_per_s_per_worker"]
    assert cal["compute_ratio"] == cal["worker_seconds"] / cal["baseline"]["worker_seconds"] > 0
    assert cal["time_ratio"] == cal["seconds"] / cal["baseline"]["seconds"] > 0
    assert "stage 1: 16px, batch 8 x accum 1: 1 warm-up + 3 timed steps" in proc.stderr  # progress
    assert not storage.exists()


def test_calibration_writes_nothing_to_the_job_storage(tmp_path, monkeypatch):
    """The runner's scratch folder is temporary and removed; the job's storage and ./runs stay absent.
    Stage 2 ramps its regularization, so the baseline's steps differ and are measured on their own."""
    from workers.calibrate import calibrate

    work, scratch = tmp_path / "work", tmp_path / "tmp"
    work.mkdir(), scratch.mkdir()
    monkeypatch.chdir(work)  # where the default ./runs would go
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    stages = [
        JOB["stages"][0],
        {**JOB["stages"][1], "regularization": {"label_smoothing": 0.1}, "regularization_ramp_steps": 2},
    ]
    spec = make_spec(**{**JOB, "stages": stages, "checkpoint": {"storage": str(tmp_path / "runs")}})
    plan = build_plan(spec, spec.data.size)
    said = []
    cal = calibrate(spec, plan, warmup_steps=1, timed_steps=2, say=said.append)
    assert [s.images_per_s_per_worker > 0 for s in cal.stages] == [True, True]
    (base,) = cal.baseline.stages
    assert base.measured_as is None and base.images_per_s_per_worker > 0 and base.timed_steps == 2
    assert said[-1] == "baseline: 24px, batch 8 x accum 2: 1 warm-up + 2 timed steps"
    assert not (tmp_path / "runs").exists()
    assert os.listdir(work) == [] and os.listdir(scratch) == []


def test_plan_calibrate_on_unreadable_data_is_one_line_and_exit_2(tmp_path):
    """The data's index lists the images (the plan is made), but they cannot be decoded."""
    for cls in ("a", "b"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for k in range(32):  # 4 steps a stage
            (tmp_path / "train" / cls / f"{k}.png").write_bytes(b"not a png")
    data = {"kind": "imagefolder", "train": str(tmp_path / "train"), "loader_workers": 0}
    job = _job_file(tmp_path, **{**JOB, "data": data, "model": {**JOB["model"], "num_classes": 2}})
    proc = stagetrain("plan", job, "--calibrate", "--timed-steps", "1")
    assert proc.returncode == 2, proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert line.startswith("error: data: cannot read the training data of stage 1 (imagefolder): ")
    assert "UnidentifiedImageError" in line and "Traceback" not in proc.stderr
    # the timing options belong to --calibrate
    alone = stagetrain("plan", job, "--timed-steps", "1")
    assert alone.returncode == 2 and alone.stderr.strip() == "error: --timed-steps: only with --calibrate"


def _job_file(tmp_path, **overrides) -> str:
    """A job file of tests.conftest's spec with ``overrides``."""
    return write_job(tmp_path, make_spec(**overrides).model_dump(mode="json"))
