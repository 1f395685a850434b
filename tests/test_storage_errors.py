"""Storage that cannot be used is one line and exit 2 (README's "invalid input"), never a traceback, and
nothing is written: no credentials (against the real moto server), an endpoint that cannot be reached
(a closed port on 127.0.0.1), a filesystem whose package is not installed."""

from __future__ import annotations

import importlib.util
import socket

import pytest

from tests.helpers import cli_env, stagetrain
from tests.jobs import TINY, write_job

CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def _one_line_error(proc, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _no_credentials_env(tmp_path) -> dict:
    """The moto endpoint, and no credentials anywhere botocore looks (metadata off, as everywhere)."""
    env = cli_env(
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    for var in CREDENTIAL_VARS:
        env.pop(var, None)
    return env


@pytest.mark.parametrize("command", ["list", "status", "run"])
def test_no_credentials_is_one_line_and_writes_nothing(command, s3_url, s3_server, tmp_path):
    import s3fs

    args = {
        "list": ["list"],
        "status": ["status", "somejob"],
        "run": ["run", write_job(tmp_path, TINY), "--job-id", "nocreds"],
    }[command]
    proc = stagetrain(*args, "--storage", s3_url, env=_no_credentials_env(tmp_path), timeout=60)
    _one_line_error(proc, s3_url, "no credentials found", "AWS_ACCESS_KEY_ID")
    # with the credentials (this process has them): the bucket is as the fixture made it, empty
    fs = s3fs.S3FileSystem(endpoint_url=s3_server.endpoint, skip_instance_cache=True)
    assert fs.find(s3_url.removeprefix("s3://").split("/")[0]) == []


def test_an_unreachable_endpoint_is_one_line_naming_it(tmp_path):
    with socket.socket() as s:  # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    env = cli_env(AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s", AWS_ENDPOINT_URL=endpoint)
    env.pop("AWS_ENDPOINT_URL_S3", None)
    for args in (["list"], ["run", write_job(tmp_path, TINY), "--job-id", "far"]):
        proc = stagetrain(*args, "--storage", "s3://bucket/runs", env=env, timeout=60)
        _one_line_error(proc, "s3://bucket/runs", endpoint, "cannot be reached")


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed here")
def test_a_filesystem_whose_package_is_missing_names_the_package(tmp_path):
    for args in (["list"], ["status", "j"], ["run", write_job(tmp_path, TINY)]):
        proc = stagetrain(*args, "--storage", "gs://bucket/runs", timeout=60)
        _one_line_error(proc, "gs://bucket/runs", "`gcsfs` is not installed", "pip install gcsfs")
