"""Training on a real Ray cluster (CPU workers, gloo), checked from the recorded metrics: the Python API
on a local Ray of its own (the embedded default: no address, no ``RAY_ADDRESS``), and a stage too big for
the session's head."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from service.curve import curve, lr_momentum
from service.plan import build_plan
from service.spec import validate_spec
from tests.conftest import merge
from tests.helpers import REPO
from tests.jobs import TINY, cli_env, read_metrics, read_record, stagetrain, write_job

pytestmark = pytest.mark.ray

# A script of its own, as a notebook or a pipeline step would drive a job: run, then read it back.
SCRIPT = """
import json, sys
import stagetrain

job = stagetrain.run(json.loads(sys.argv[1]), storage=sys.argv[2], job_id="t1")
state = job.status()
exported = job.export()
print("RESULT " + json.dumps({
    "job": [job.job_id, job.storage],
    "status": state.status,
    "step": state.step,
    "checkpoint": state.checkpoint.tag,
    "metrics": job.metrics(),
    "export": [exported.path, exported.checkpoint, exported.step],
}))
"""


def test_the_python_api_runs_a_job_on_a_local_ray_that_follows_the_plan_and_reads_it_back(tmp_path):
    """``stagetrain.run`` with no address starts a local Ray (the README's embedded default) and trains
    three stages on one layout (2 workers: one ``fit``): 16 a worker, then 8 x accum 2 (the same global
    batch, LR factor 1), then 8 without accumulation (global batch 16: linear rule, factor 0.5);
    ``status``, ``metrics`` and ``export`` read back what it left, and every step follows the plan. (A
    rescaled LR on fewer workers: test_service_ray.py's scale.)"""
    from workers.models import load_exported

    spec_dict = merge(TINY, {"name": "plan-check"})
    spec_dict["stages"] = [
        {"resolution": 16, "epochs": 1, "batch_size": 16, "workers": 2},
        {"resolution": 24, "epochs": 1, "batch_size": 8, "workers": 2, "grad_accum": 2},
        {"resolution": 24, "epochs": 0.5, "batch_size": 8, "workers": 2},
    ]
    storage = tmp_path / "runs"
    env = cli_env(STAGETRAIN_AUDIT_SAMPLES="1")
    assert "RAY_ADDRESS" not in env
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(spec_dict), str(storage)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout + proc.stderr
    out = json.loads(lines[0].removeprefix("RESULT "))
    plan = build_plan(validate_spec(spec_dict), spec_dict["data"]["size"])
    assert out["job"] == ["t1", str(storage)]
    assert (out["status"], out["step"]) == ("succeeded", plan.total_steps)
    assert out["metrics"] == read_metrics(storage / "t1")
    assert [m["kind"] for m in out["metrics"]][-1] == "stage_end"
    path, tag, step = out["export"]
    assert tag == out["checkpoint"] and step == plan.total_steps and path == f"{storage}/t1/export/{tag}.pt"
    assert load_exported(path).eval() is not None

    metrics = out["metrics"]
    steps = [m for m in metrics if m.get("kind", "step") == "step"]
    ends = [m for m in metrics if m.get("kind") == "stage_end"]
    # one record per optimizer step, in order
    assert [m["step"] for m in steps] == list(range(plan.total_steps))
    for stage in plan.stages:
        mine = [m for m in steps if m["stage"] == stage.index + 1]
        assert len(mine) == stage.steps
        assert {m["global_batch"] for m in mine} == {stage.global_batch}
        assert {m["resolution"] for m in mine} == {stage.resolution}
    # LR/momentum read from the optimizer equal the plan's at every step
    for m in steps:
        lr, momentum = lr_momentum(plan, m["step"])
        assert m["lr"] == pytest.approx(lr, rel=1e-12) and m["momentum"] == pytest.approx(momentum, rel=1e-12)
    # stage 2 has half the micro-batch x accum 2 (global 32 = stage 1's): linear rule keeps factor 1 ...
    assert plan.stages[1].global_batch == 32 and plan.stages[1].lr_scale == 1.0
    # ... stage 3 has no accumulation (global 16): the global curve at half the LR
    assert plan.stages[2].global_batch == 16 and plan.stages[2].lr_scale == 0.5
    for m in steps:
        expected = curve(plan, m["step"])[0] * (0.5 if m["stage"] == 3 else 1.0)
        assert m["lr"] == pytest.approx(expected, rel=1e-12)
    # ... every rank holds identical weights at each stage end
    assert len(ends) == 3
    assert all(len(e["param_digests"]) == 2 and len(set(e["param_digests"])) == 1 for e in ends)
    assert len({e["param_digests"][0] for e in ends}) == 3  # and the weights moved in every stage
    # ... and the ranks read disjoint samples that together make each step's global batch
    for m in steps:
        per_rank = m["sample_ids"]
        stage = plan.stages[m["stage"] - 1]
        assert len(per_rank) == stage.workers
        flat = [i for ids in per_rank for i in ids]
        assert len(flat) == len(set(flat)) == stage.global_batch
    # each epoch is a permutation: no sample twice within it
    first = [i for m in steps if m["stage"] == 1 for ids in m["sample_ids"] for i in ids]
    assert len(first) == len(set(first))
    record = read_record(storage / "t1")
    assert record["status"] == "succeeded"
    assert [s["status"] for s in record["stages"]] == ["completed"] * 3
    assert all(s["val_acc"] is not None for s in record["stages"])
    assert (storage / "t1" / "metrics.png").exists()
    plot = stagetrain("plot", "t1", "--storage", str(storage), "-o", str(tmp_path / "run.png"), check=True)
    assert "wrote" in plot.stderr and (tmp_path / "run.png").read_bytes()[:4] == b"\x89PNG"


def test_stage_that_cannot_fit_fails_fast(tmp_path, on_head):
    spec_dict = merge(
        TINY,
        {
            "name": "too-big",
            "resources": {"cpus_per_worker": 2},
            "stages": [{"resolution": 16, "epochs": 1, "batch_size": 8, "workers": 4}],
        },
    )
    job = write_job(tmp_path, spec_dict)
    proc = stagetrain(
        "run", job, "--job-id", "t3", "--storage", str(tmp_path / "runs"), env=on_head, timeout=120
    )
    assert proc.returncode == 1
    assert "needs 4 workers x 2 CPUs = 8 CPUs" in proc.stderr
    assert read_record(tmp_path / "runs" / "t3")["status"] == "failed"
