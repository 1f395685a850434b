"""The layering the README describes, and the input checks every command shares.

- The core (spec, plan, curve, layout, job record, decisions, reports, checkpoint bookkeeping, CLI, job
  operations, the `stagetrain` Python API)
  imports neither torch, torchvision, ray nor anything in ``workers/``.
- ``checkpoints/`` imports nothing from ``service/`` or ``workers/``.
- ``model.arch`` is checked against the pinned torchvision's model names without importing it.
- Every JOB_ID passes one rule, and credentials never get into a spec.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from service.spec import SpecError
from tests.conftest import make_spec
from tests.helpers import REPO, stagetrain

CORE = [
    "service.spec",
    "service.plan",
    "service.curve",
    "service.layout",
    "service.sources",
    "service.jobs",
    "service.decisions",
    "service.report",
    "service.archs",
    "service.analysis",
    "service.compare",
    "service.cli",
    "service.operations",
    "stagetrain",
    "checkpoints.storage",
    "checkpoints.store",
]


def _imported_by(modules: list[str]) -> list[str]:
    code = f"import sys, json; import {', '.join(modules)}; print(json.dumps(sorted(m for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_core_imports_no_torch_ray_or_workers():
    loaded = _imported_by(CORE)
    heavy = [m for m in loaded if m.split(".")[0] in ("torch", "torchvision", "ray", "workers")]
    assert heavy == [], heavy


def test_checkpoints_import_neither_service_nor_workers():
    loaded = _imported_by(["checkpoints.storage", "checkpoints.store", "checkpoints.checkpointer"])
    assert [m for m in loaded if m.split(".")[0] in ("service", "workers")] == []


def test_workers_import_nothing_of_the_coordinator():
    """Workers share the spec, plan, curve, layout and the report records (``service.records``) with the
    coordinator; the job store, decisions, runner and CLI stay on the coordinator's side."""
    loaded = _imported_by(["workers.train", "workers.control", "workers.data"])
    coordinator = (
        "service.jobs",
        "service.runner",
        "service.cli",
        "service.coordination",
        "service.executor",
    )
    assert [m for m in loaded if m in coordinator] == []


def test_the_coordinator_checks_a_model_builder_without_importing_it():
    """``model.builder`` defined by a ``def`` in its module's source is accepted from the source: the
    coordinator does not import the model code and torch (only the workers need them); a name the source
    does not define is imported, and a typo named with the closest match (test_cli_errors)."""
    code = (
        "import sys; from service.sources import check_callable; "
        "check_callable('workers.models:small_resnet', 'model.builder'); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'workers'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['workers']"  # the package's __init__, not workers.models
    from service.sources import check_callable

    with pytest.raises(ValueError, match="'workers.models' has no function 'smal_resnet'; did you mean"):
        check_callable("workers.models:smal_resnet", "model.builder")


def test_arch_names_are_the_pinned_torchvision_models():
    import torchvision

    from service.archs import TORCHVISION_MODELS, TORCHVISION_VERSION

    assert torchvision.__version__.split("+")[0] == TORCHVISION_VERSION
    assert list(TORCHVISION_MODELS) == sorted(torchvision.models.list_models(module=torchvision.models))


def test_unknown_arch_gets_a_did_you_mean():
    with pytest.raises(
        SpecError, match=r"model.arch: unknown torchvision architecture 'resnet19'; did you mean"
    ):
        make_spec(model={"arch": "resnet19", "num_classes": 10})


@pytest.mark.parametrize(
    "options",
    [
        {"key": "AKIA-something"},
        {"secret": "s3cr3t-value"},
        {"token": "t0ken-value"},
        {"client_kwargs": {"aws_secret_access_key": "s3cr3t-value", "region_name": "us-east-1"}},
        {"client_kwargs": {"aws_session_token": "t0ken-value"}},
    ],
    ids=["key", "secret", "token", "client_kwargs.secret", "client_kwargs.session_token"],
)
def test_secrets_in_storage_options_are_refused_without_echoing_them(options):
    with pytest.raises(SpecError) as info:
        make_spec(checkpoint={"storage": "s3://bucket/runs", "storage_options": options})
    (line,) = info.value.problems
    assert line.startswith("checkpoint.storage_options: ") and "AWS_ACCESS_KEY_ID" in line
    assert not any(v in str(info.value) for v in ("AKIA-something", "s3cr3t-value", "t0ken-value"))


@pytest.mark.parametrize(
    "where, overrides",
    [
        ("model.kwargs", {"model": {"kwargs": {"api_key": "s3cr3t-value", "widths": [8]}}}),
        (
            "data.kwargs",
            {
                "data": {
                    "kind": "custom",
                    "factory": "tests.custom_parts:stripes",
                    "kwargs": {"auth": {"token": "t0ken-value"}},
                }
            },
        ),
    ],
)
def test_secrets_in_model_and_data_kwargs_are_refused_without_echoing_them(where, overrides):
    """Both kwargs go to job.json, every manifest's spec hash and the sinks' run parameters."""
    with pytest.raises(SpecError) as info:
        make_spec(**overrides)
    (line,) = [p for p in info.value.problems if "credentials" in p]
    assert line.startswith(f"{where}: ") and "credentials do not belong in the job spec" in line
    assert (
        "os.environ" in line
        and "s3cr3t-value" not in str(info.value)
        and "t0ken-value" not in str(info.value)
    )


def test_credentials_in_urls_are_shown_as_stars():
    from service.console import redact_url
    from service.sinks import _redacted

    assert redact_url("https://user:t0ken@mlflow.example:5000/x") == "https://***@mlflow.example:5000/x"
    assert redact_url("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert (
        _redacted("ConnectionError: https://u:t0ken@h/api failed")
        == "ConnectionError: https://***@h/api failed"
    )


def test_an_mlflow_tracking_uri_with_credentials_is_never_printed(monkeypatch):
    """An unreachable tracking server fails the sink at start, naming the server without its token."""
    from service.sinks import MLflowSink
    from tests.s3_server import _free_port

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:t0ken-value@127.0.0.1:{_free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with pytest.raises(ValueError) as info:
        MLflowSink(None, make_spec(metrics={"sinks": ["mlflow"]}), 0)
    assert "tracking server http://***@127.0.0.1:" in str(info.value)
    assert "t0ken-value" not in str(info.value)


def test_non_secret_storage_options_pass():
    spec = make_spec(
        checkpoint={"storage": "s3://b/p", "storage_options": {"client_kwargs": {"region_name": "x"}}}
    )
    assert spec.checkpoint.storage_options == {"client_kwargs": {"region_name": "x"}}


def test_secret_in_a_job_file_exits_2_and_writes_nothing(tmp_path):
    import yaml

    from tests.conftest import BASE_SPEC, merge

    raw = merge(
        BASE_SPEC,
        {"checkpoint": {"storage": str(tmp_path / "runs"), "storage_options": {"secret": "s3cr3t-value"}}},
    )
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(raw))
    for command in (["plan", str(job)], ["run", str(job), "--job-id", "x"]):
        out = stagetrain(*command)
        assert out.returncode == 2, out.stderr
        assert "checkpoint.storage_options: secret: credentials do not belong" in out.stderr
        assert "s3cr3t-value" not in out.stdout + out.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("command", "bad"),
    [
        (["status"], "../x"),
        (["checkpoints"], "../x"),
        (["plot"], "../x"),
        (["resume"], "../x"),
        (["logs"], "../x"),
        (["cancel"], "../x"),
        (["wait"], "../x"),
        (["scale", "--workers", "1"], "../x"),
        (["status"], "a/b"),
        (["plot"], "/abs"),
        (["resume"], "has space"),
        (["status"], ".."),
        (["status"], ""),
    ],
)
def test_every_command_refuses_a_job_id_outside_the_storage_root(tmp_path, command, bad):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "job.json").write_text("{}")  # a job one level up must stay out of reach
    out = stagetrain(command[0], bad, *command[1:], "--storage", str(tmp_path / "runs"))
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "letters, digits, '.', '_' and '-'" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_run_refuses_a_bad_job_id_option(tmp_path):
    out = stagetrain(
        "run", f"{REPO}/examples/quickstart.yaml", "--job-id", "../x", "--storage", str(tmp_path)
    )
    assert out.returncode == 2 and "--job-id" in out.stderr and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- everyday CLI comfort


def test_version_names_the_stack_without_importing_it():
    out = stagetrain("--version", check=True)
    assert out.stdout.startswith("stagetrain 0.1.0, torch 2.14.1, torchvision 0.29.1, ray 2.60.0")


def test_storage_comes_from_stagetrain_storage(tmp_path):
    from checkpoints.storage import Storage
    from service.jobs import JobRecord, JobStore
    from service.plan import build_plan

    spec = make_spec()
    JobStore(Storage(str(tmp_path)), "envjob").save(JobRecord.create("envjob", spec, build_plan(spec, 4096)))
    from tests.helpers import cli_env

    out = stagetrain("list", "--json", env=cli_env(STAGETRAIN_STORAGE=str(tmp_path)), check=True)
    assert [r["job_id"] for r in json.loads(out.stdout)] == ["envjob"]


def test_plan_states_each_stages_peak_lr_without_reading_the_data():
    out = stagetrain(
        "plan", f"{REPO}/examples/imagenet-resnet50.yaml", "--dataset-size", "1281167", check=True
    )
    note = " ".join(out.stdout.split())
    assert "schedule.max_lr 2 is the peak LR at global batch 1024" in note
    assert "stage 1 3.229 (LR factor 2)" in note


def test_plan_of_unreadable_data_is_a_clear_error(tmp_path):
    import yaml

    from tests.conftest import BASE_SPEC, merge

    raw = merge(BASE_SPEC, {})
    raw["data"] = {
        "kind": "imagefolder",
        "train": str(tmp_path / "missing"),
        "val": str(tmp_path / "missing"),
    }
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(raw))
    out = stagetrain("plan", str(job))
    assert out.returncode == 2 and "data.train: cannot list" in out.stderr and "--dataset-size" in out.stderr


def test_no_process_of_the_suite_looks_for_cloud_instance_credentials():
    """Every process a test starts inherits the suite's environment: metadata lookups are off."""
    import subprocess
    import sys

    from tests.helpers import cli_env

    code = "import os; print(os.environ['AWS_EC2_METADATA_DISABLED'], os.environ['NO_GCE_CHECK'])"
    out = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True)
    assert out.stdout.split() == ["true", "True"], out.stderr
