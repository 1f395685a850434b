"""The Python API (``stagetrain``) and the job operations under it (``service.operations``), in-process
against job folders written here, without Ray: the API raises what the CLI prints, and writes what the
CLI writes (both call the same operations)."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

import stagetrain
from checkpoints.storage import Storage
from service.cli import cli
from service.coordination import pending_scales
from service.jobs import JobRecord, JobStore, StepRecord
from service.plan import build_plan
from service.spec import SpecError, validate_spec
from tests.conftest import merge
from tests.helpers import REPO
from tests.jobs import TINY, write_job

SPEC = merge(
    TINY,
    {
        "name": "api",
        "stages": [
            {"resolution": 16, "epochs": 1, "batch_size": 16, "workers": 2},
            {"resolution": 20, "epochs": 1, "batch_size": 16, "workers": 2},
            {"resolution": 24, "epochs": 1, "batch_size": 16, "workers": 2},
        ],
    },
)


def _job(tmp_path, job_id: str = "j", spec: dict = SPEC, **fields) -> JobStore:
    """A job record under ``tmp_path/runs`` (no coordinator, no Ray), with ``fields`` set."""
    spec = validate_spec(spec)
    record = JobRecord.create(job_id, spec, build_plan(spec, 384))
    for k, v in fields.items():
        setattr(record, k, v)
    jobs = JobStore(Storage(str(tmp_path / "runs")), job_id)
    jobs.save(record)
    return jobs


def _cli(*args: str):
    """``stagetrain ARGS`` in this process: the CLI's own output and exit code."""
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_import_stagetrain_imports_neither_torch_nor_ray():
    code = "import sys, json, stagetrain; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    heavy = [
        m for m in json.loads(out.stdout) if m.split(".")[0] in ("torch", "torchvision", "ray", "workers")
    ]
    assert heavy == []


def test_load_spec_and_plan_take_a_path_a_dict_or_a_spec(tmp_path):
    path = write_job(tmp_path, SPEC)
    spec = stagetrain.load_spec(path)
    assert stagetrain.load_spec(SPEC) == spec and stagetrain.load_spec(spec) is spec
    assert stagetrain.plan(path) == build_plan(spec, 384) == stagetrain.plan(SPEC, dataset_size=384)
    stages = [dict(s) for s in SPEC["stages"]]
    stages[1]["resolution_ramp_steps"] = 5  # fine for 384 samples, not for 64 (as test_cli_errors)
    bad = write_job(tmp_path, merge(SPEC, {"stages": stages}), "bad.yaml")
    with pytest.raises(SpecError) as info:
        stagetrain.plan(bad, dataset_size=64)
    assert f"{info.value.source}: {info.value.headline}" == f"{bad}: no valid plan for --dataset-size 64"
    cli_out = _cli("plan", bad, "--dataset-size", "64")
    assert cli_out.exit_code == 2 and f"error: {bad}: no valid plan for --dataset-size 64" in cli_out.output
    with pytest.raises(SpecError, match="unknown"):
        stagetrain.load_spec(merge(SPEC, {"bogus": 1}))


def test_attaching_to_a_missing_job_or_a_bad_id_raises_what_the_cli_prints(tmp_path):
    storage = tmp_path / "runs"
    storage.mkdir()
    with pytest.raises(FileNotFoundError) as info:
        stagetrain.job("x", storage=str(storage))
    cli_out = _cli("status", "x", "--storage", str(storage))
    assert cli_out.exit_code == 2 and cli_out.output.strip() == f"error: {info.value}"
    assert str(info.value) == f"no job 'x' in {storage}; there are no jobs there"
    with pytest.raises(ValueError, match="letters, digits"):
        stagetrain.job("../x", storage=str(storage))


def test_status_and_metrics_read_the_job_from_storage(tmp_path, monkeypatch):
    jobs = _job(tmp_path)
    steps = [
        StepRecord(
            step=k, stage=1, epoch=0, samples_seen=32 * (k + 1), loss=2.0 - k / 10, lr=0.1, momentum=0.9,
            resolution=16, global_batch=32, workers=2, grad_accum=1, images_per_s=100.0,
        )
        for k in range(3)
    ]  # fmt: skip
    jobs.append_metrics(steps)
    monkeypatch.setenv("STAGETRAIN_STORAGE", str(tmp_path / "runs"))  # as the CLI's --storage default
    job = stagetrain.job("j")
    assert job == stagetrain.Job("j", str(tmp_path / "runs"))
    state = job.status()
    assert (state.status, state.step, state.checkpoint, state.pending_scales) == ("pending", 0, None, [])
    records = job.metrics()
    assert records == jobs.read_metrics() and [r["step"] for r in records] == [0, 1, 2]
    assert records[1]["loss"] == pytest.approx(1.9)
    pandas = pytest.importorskip("pandas")
    frame = job.metrics(as_frame=True)
    assert isinstance(frame, pandas.DataFrame) and list(frame["step"]) == [0, 1, 2]


def test_scale_writes_the_request_the_cli_writes_and_refuses_what_it_refuses(tmp_path):
    started = {"status": "preempted", "current_stage": 2}
    for job_id in ("api", "cli"):
        jobs = _job(tmp_path, job_id, **started)
        record = jobs.load()
        record.stages[0].status, record.stages[1].status = "completed", "preempted"
        jobs.save(record)
    storage = str(tmp_path / "runs")
    job = stagetrain.job("api", storage=storage)
    req = job.scale(1)  # default: from the next stage (3)
    assert (req.from_stage, req.stages, req.workers, req.warning) == (3, 3, 1, None)
    assert _cli("scale", "cli", "--workers", "1", "--storage", storage).exit_code == 0
    written = {j: [r.model_dump(exclude={"requested"}) for _, r in pending_scales(Storage(storage).child(j))]
               for j in ("api", "cli")}  # fmt: skip
    assert written["api"] == written["cli"] == [{"workers": 1, "from_stage": 3}]
    for args, expect in (((1, 2), "stage 2 has started"), ((1, 4), "has 3 stages")):
        with pytest.raises(ValueError, match=expect) as info:
            job.scale(*args)
        cli_out = _cli("scale", "cli", "--workers", "1", "--from-stage", str(args[1]), "--storage", storage)
        assert cli_out.exit_code == 2
        assert cli_out.output.strip() == f"error: {info.value}".replace("job api", "job cli").replace(
            "resume api", "resume cli"
        )


def test_cancel_of_a_job_no_coordinator_runs_settles_it_like_the_cli(tmp_path):
    for job_id in ("api", "cli"):
        _job(tmp_path, job_id)
    storage = str(tmp_path / "runs")
    job = stagetrain.job("api", storage=storage)
    assert job.cancel() == "cancelled"
    cli_out = _cli("cancel", "cli", "--storage", storage)
    assert cli_out.exit_code == 0 and "job cli cancelled (it was not running)" in cli_out.output
    api, by_cli = job.record(), stagetrain.job("cli", storage=storage).record()
    assert (
        (api.status, api.stages[0].status) == (by_cli.status, by_cli.stages[0].status) == ("cancelled",) * 2
    )
    assert api.events[-1].split(" ", 1)[1] == by_cli.events[-1].split(" ", 1)[1]
    with pytest.raises(ValueError, match=r"job api has finished \(cancelled\); nothing to cancel"):
        job.cancel()
    assert job.wait() == "cancelled"  # ended, nobody holds it


def test_wait_gives_up_after_its_timeout(tmp_path):
    _job(tmp_path)
    job = stagetrain.job("j", storage=str(tmp_path / "runs"))
    with pytest.raises(TimeoutError, match="job j is still pending after 0.05s"):
        job.wait(timeout=0.05, poll_s=0.01)


def test_run_and_submit_refuse_bad_targets_before_writing_anything(tmp_path):
    from service.submit import SubmitError

    storage = tmp_path / "runs"
    with pytest.raises(ValueError, match="is a Ray job server .dashboard. address"):
        stagetrain.run(SPEC, storage=str(storage), address="http://127.0.0.1:8265")
    with pytest.raises(SubmitError, match="cannot reach the Ray job server"):
        stagetrain.submit(SPEC, storage=str(storage), address="http://127.0.0.1:9", job_id="s")
    assert not Storage(str(storage)).exists("s")  # a new job that was not submitted leaves nothing


def test_export_writes_the_newest_checkpoint_into_the_jobs_storage(tmp_path):
    import torch

    from checkpoints.store import MODEL_FILE, CheckpointStore, tag_for
    from service.layout import CHECKPOINTS
    from tests.helpers import assert_same
    from workers.models import build_model, load_exported

    jobs = _job(tmp_path, status="succeeded")
    job = stagetrain.job("j", storage=str(tmp_path / "runs"))
    with pytest.raises(ValueError, match="job j has no verified checkpoint to export yet"):
        job.export()
    with pytest.raises(ValueError, match=r"--best: job j keeps no best checkpoint"):
        job.export(best=True)
    spec, plan = validate_spec(SPEC), jobs.load().plan()
    weights = build_model(spec.model).state_dict()
    payload = io.BytesIO()
    torch.save(weights, payload)
    tag = tag_for(12, 1, True)
    CheckpointStore(jobs.storage.child(CHECKPOINTS)).commit(
        tag, {MODEL_FILE: payload.getvalue()}, job_id="j", stage=1, epoch=0, step=12, samples_seen=384,
        boundary=True, world_size=2, plan_hash=plan.plan_hash(), stage_hash=plan.stage_hash(0),
        spec_hash=spec.spec_hash(), versions={},
    )  # fmt: skip
    done = job.export()
    assert done.path == f"{tmp_path}/runs/j/export/{tag}.pt" and (done.checkpoint, done.step) == (tag, 12)
    assert_same(load_exported(done.path).state_dict(), weights, "exported weights")
    with pytest.raises(ValueError, match="this checkpoint was exported"):
        job.export()
    out = tmp_path / "model.pt"
    assert job.export(str(out)).path == str(out) and out.exists()
    cli_out = _cli("export", "j", "--storage", str(tmp_path / "runs"), "-o", str(out))
    assert cli_out.exit_code == 2 and f"-o {out}: the file exists" in cli_out.output
