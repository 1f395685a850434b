"""Small mistakes a newcomer makes get one specific line and exit 2 (or a plain note), never silence or
a misleading hint: a status that does not exist, storage that is not there, a binary job file, a
--dataset-size that makes the stages impossible."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import merge
from tests.helpers import REPO, cli_env, stagetrain
from tests.jobs import TINY, write_job


def _in(cwd, *args: str) -> subprocess.CompletedProcess:
    """``stagetrain ARGS`` run from ``cwd`` (where the default ``./runs`` is), no STAGETRAIN_STORAGE."""
    env = cli_env(PYTHONPATH=REPO)
    env.pop("STAGETRAIN_STORAGE", None)
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_list_status_must_be_a_known_status():
    proc = stagetrain("list", "--status", "bogus")
    assert proc.returncode == 2
    assert "'bogus' is not one of" in proc.stderr and "'succeeded'" in proc.stderr


def test_list_names_storage_that_is_not_there(tmp_path):
    given = stagetrain("list", "--storage", str(tmp_path / "nope"))
    assert given.returncode == 2
    assert (
        given.stderr.strip()
        == f"error: no storage at {tmp_path / 'nope'}: nothing is there (no job has run with it)"
    )
    default = _in(tmp_path, "list")  # the default ./runs before any job: a note, not an error
    assert default.returncode == 0, default.stderr
    assert f"no jobs yet: nothing at {tmp_path / 'runs'}" in default.stderr


def test_status_hints_at_storage_only_when_none_was_given(tmp_path):
    (tmp_path / "runs").mkdir()
    given = stagetrain("status", "x", "--storage", str(tmp_path / "runs"))
    assert given.returncode == 2
    assert given.stderr.strip() == f"error: no job 'x' in {tmp_path / 'runs'}; there are no jobs there"
    default = _in(tmp_path, "status", "x")
    assert default.returncode == 2
    assert "pass --storage (or STAGETRAIN_STORAGE) to look elsewhere" in default.stderr


def test_a_binary_job_file_is_named_and_called_not_yaml_text(tmp_path):
    path = tmp_path / "job.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xca\xfe" + bytes(range(256)))
    for args in (["plan", str(path)], ["run", str(path), "--storage", str(tmp_path / "runs")]):
        proc = stagetrain(*args)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.splitlines() == [
            f"error: {path}: invalid job spec",
            "  not a YAML text file: byte 0x89 at offset 0 is not UTF-8 text",
        ]
        assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()


def test_a_dataset_size_that_breaks_the_stages_says_so(tmp_path):
    stages = [dict(s) for s in TINY["stages"]]
    stages[1]["resolution_ramp_steps"] = 5  # fine for the data's 384 samples (12 steps), not for 64
    job = write_job(tmp_path, merge(TINY, {"stages": stages}))
    assert stagetrain("plan", job).returncode == 0
    proc = stagetrain("plan", job, "--dataset-size", "64")
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert lines[0] == f"error: {job}: no valid plan for --dataset-size 64"
    assert any("stages[1].resolution_ramp_steps: must be fewer than" in line for line in lines)
    assert lines[-1].strip() == "(step counts follow from --dataset-size 64; the data's may differ)"


def test_a_model_builder_that_does_not_resolve_is_invalid_input(tmp_path):
    storage = tmp_path / "runs"
    cases = {
        "workers.models:smal_resnet": "model.builder: 'workers.models' has no function 'smal_resnet'; "
        "did you mean workers.models:small_resnet?",
        "no_such_package.models:net": "model.builder: cannot import 'no_such_package.models'",
    }
    for builder, expect in cases.items():
        spec = merge(TINY, {"model": {"builder": builder}})
        proc = stagetrain("run", write_job(tmp_path, spec), "--job-id", "typo", "--storage", str(storage))
        assert proc.returncode == 2, proc.stdout + proc.stderr
        (line,) = proc.stderr.strip().splitlines()
        assert line.startswith(f"error: {expect}"), line
        assert not storage.exists()  # no record written, nothing retried


def test_run_refuses_a_job_server_address_before_writing_anything(tmp_path):
    storage = tmp_path / "runs"
    job = write_job(tmp_path, TINY)
    for how in (["--address", "http://127.0.0.1:8265"], []):
        env = cli_env(RAY_ADDRESS="http://127.0.0.1:8265") if not how else None
        proc = stagetrain("run", job, "--storage", str(storage), *how, env=env)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        (line,) = proc.stderr.strip().splitlines()
        assert "is a Ray job server (dashboard) address" in line
        assert "stagetrain submit JOB.yaml --address http://127.0.0.1:8265" in line
        assert not storage.exists()


def test_export_without_o_writes_into_the_jobs_storage_not_the_working_tree(tmp_path):
    import io

    import torch

    from checkpoints.storage import Storage
    from checkpoints.store import MODEL_FILE, CheckpointStore, tag_for
    from service.jobs import JobRecord, JobStore
    from service.layout import CHECKPOINTS
    from service.plan import build_plan
    from service.spec import validate_spec
    from tests.helpers import assert_same
    from workers.models import build_model, load_exported

    imagenet = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    spec = validate_spec(merge(TINY, {"data": {"normalize": imagenet}}))
    plan = build_plan(spec, 384)
    storage = tmp_path / "runs"
    JobStore(Storage(str(storage)), "j").save(JobRecord.create("j", spec, plan))
    weights = build_model(spec.model).state_dict()
    payload = io.BytesIO()
    torch.save(weights, payload)
    tag = tag_for(12, 1, True)
    CheckpointStore(Storage(str(storage)).child("j", CHECKPOINTS)).commit(
        tag,
        {MODEL_FILE: payload.getvalue()},
        job_id="j",
        stage=1,
        epoch=0,
        step=12,
        samples_seen=384,
        boundary=True,
        world_size=2,
        plan_hash=plan.plan_hash(),
        stage_hash=plan.stage_hash(0),
        spec_hash=spec.spec_hash(),
        versions={},
    )
    work = tmp_path / "work"
    work.mkdir()
    proc = _in(work, "export", "j", "--storage", str(storage))
    assert proc.returncode == 0, proc.stderr
    exported = storage / "j" / "export" / f"{tag}.pt"
    assert f"wrote {exported}" in proc.stdout and list(work.iterdir()) == []  # nothing in the working tree
    assert_same(load_exported(str(exported)).state_dict(), weights, "exported weights")
    # the input normalisation travels with the model (data.normalize) and is applied on request
    model = load_exported(str(exported)).eval()
    assert model.input_normalization == imagenet
    assert f"input normalised with mean {imagenet['mean']}, std {imagenet['std']}" in proc.stdout
    images = torch.rand(2, 3, 16, 16)
    taking_pixels = load_exported(str(exported), normalized_input=True).eval()
    mean, std = (torch.tensor(imagenet[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        assert torch.allclose(taking_pixels(images), model((images - mean) / std), atol=1e-6)
    again = _in(work, "export", "j", "--storage", str(storage))  # never overwrites
    assert again.returncode == 2 and "this checkpoint was exported" in again.stderr


def test_export_best_and_ema_pick_the_best_checkpoint_and_the_averaged_weights(tmp_path):
    """``export --best`` takes the checkpoint.keep_best one (not the newest), ``--ema`` the train.ema
    weights; jobs without them are told so. In-process (click's runner): torch is imported once."""
    import torch
    from click.testing import CliRunner

    from checkpoints.checkpointer import encode
    from checkpoints.storage import Storage
    from checkpoints.store import CheckpointStore, tag_for
    from service.cli import cli
    from service.jobs import JobRecord, JobStore
    from service.layout import CHECKPOINTS
    from service.plan import build_plan
    from service.spec import validate_spec
    from tests.helpers import assert_same
    from workers.models import build_model, load_exported

    storage = tmp_path / "runs"
    extras = {
        "train": {"ema": {"decay": 0.9}},
        "checkpoint": {"keep_best": {"metric": "val_acc", "mode": "max"}},
    }
    weights = {}
    for job, spec in (("j", validate_spec(merge(TINY, extras))), ("plain", validate_spec(TINY))):
        plan = build_plan(spec, 384)
        JobStore(Storage(str(storage)), job).save(JobRecord.create(job, spec, plan))
        for step, acc, seed in ((6, 0.6, 1), (12, 0.4, 2)):  # the newer one evaluates worse
            torch.manual_seed(seed)
            weights[job, step] = build_model(spec.model).state_dict()
            torch.manual_seed(seed + 100)
            weights[job, step, "ema"] = build_model(spec.model).state_dict()
            state = {"model": weights[job, step], "ema": {"module": weights[job, step, "ema"]}}
            CheckpointStore(Storage(str(storage)).child(job, CHECKPOINTS)).commit(
                tag_for(step, 1, step == 12),
                encode(state),
                job_id=job,
                stage=1,
                epoch=0,
                step=step,
                samples_seen=32 * step,
                boundary=step == 12,
                world_size=2,
                plan_hash=plan.plan_hash(),
                stage_hash=plan.stage_hash(0),
                spec_hash=spec.spec_hash(),
                versions={},
                metrics={"val_acc": acc, "val_loss": 1.0, "ema_val_acc": acc + 0.25},
            )

    def export(*args: str):
        return CliRunner().invoke(cli, ["export", *args, "--storage", str(storage)], catch_exceptions=False)

    best, newest = tag_for(6, 1, False), tag_for(12, 1, True)
    cases = [(["--best"], (6,), best), (["--ema"], (12, "ema"), f"{newest}-ema")]
    cases += [(["--best", "--ema"], (6, "ema"), f"{best}-ema"), ([], (12,), newest)]
    for flags, which, name in cases:
        result = export("j", *flags)
        assert result.exit_code == 0, result.output
        path = storage / "j" / "export" / f"{name}.pt"  # one file per checkpoint and kind of weights
        assert_same(load_exported(str(path)).state_dict(), weights[("j", *which)], f"export {flags}")
        saved = torch.load(path, weights_only=True)
        acc = (0.6 if "--best" in flags else 0.4) + (0.25 if "--ema" in flags else 0)
        assert (saved["ema"], saved["val_acc"]) == ("--ema" in flags, acc)
    said = " ".join(export("j", "--best", "-o", str(tmp_path / "b.pt")).output.split())  # as one line
    assert "(best val_acc 0.6)" in said, said
    for flag, missing in (("--best", "checkpoint.keep_best"), ("--ema", "train.ema")):
        result = export("plain", flag)
        assert result.exit_code == 2 and f"its spec has no {missing}" in result.output, result.output


def test_data_normalize_is_used_in_training_kept_in_the_export_and_applied_on_request(tmp_path):
    """ImageNet's statistics per channel: the workers' input, and load_exported's
    ``normalized_input=True`` module (InputNormalize) apply them the same way."""
    import torch

    from service.spec import SpecError, validate_spec
    from workers.data import normalize_tensors, to_input
    from workers.models import InputNormalize, build_model

    imagenet = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    spec = validate_spec(merge(TINY, {"data": {"normalize": imagenet}}))
    pixels = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    x = to_input(pixels, torch.device("cpu"), mean_std=normalize_tensors(spec.data.normalize, "cpu"))
    expected = (pixels.float() / 255 - torch.tensor(imagenet["mean"]).view(1, 3, 1, 1)) / torch.tensor(
        imagenet["std"]
    ).view(1, 3, 1, 1)
    assert torch.allclose(x, expected)
    model = build_model(spec.model).eval()
    wrapped = torch.nn.Sequential(InputNormalize(imagenet["mean"], imagenet["std"]), model).eval()
    with torch.no_grad():
        assert torch.allclose(wrapped(pixels.float() / 255), model(expected), atol=1e-6)
    for bad, words in [
        ({"mean": [0.5, 0.5], "std": [0.2, 0.2]}, "one value, or one per channel"),
        ({"mean": [0.5], "std": [0.0]}, "data.normalize.std[0]: must be > 0, got 0.0"),
    ]:
        try:
            validate_spec(merge(TINY, {"data": {"normalize": bad}}))
        except SpecError as e:
            assert any(words in p for p in e.problems), e.problems
        else:
            raise AssertionError(f"{bad} was accepted")
    grey = merge(TINY, {"model": {"in_channels": 1}, "data": {"normalize": imagenet}})
    try:
        validate_spec(grey)
    except SpecError as e:
        assert any(
            p.startswith("data.normalize.mean: one value or one per input channel") for p in e.problems
        )
    else:
        raise AssertionError("3 channel statistics for a 1-channel model were accepted")
