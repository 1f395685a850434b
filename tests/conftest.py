"""Shared fixtures. Ray and S3 fixtures live in their own modules' conftest helpers (see below)."""

from __future__ import annotations

import copy
import os

import pytest

from service.spec import JobSpec, validate_spec

pytest_plugins = ["tests.s3_server", "tests.ray_head"]

# No process the suite starts (they inherit this environment: stagetrain commands, Ray clusters and
# their workers, moto, MLflow) lets a cloud SDK look for instance credentials at a metadata address;
# the tests that need metadata point it at a local fake (tests/fake_metadata.py).
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ["NO_GCE_CHECK"] = "True"  # google-auth: do not probe the GCE metadata server

BASE_SPEC = {
    "version": 1,
    "name": "unit",
    "seed": 0,
    "model": {"arch": "resnet18", "num_classes": 10, "in_channels": 3},
    "data": {"kind": "synthetic", "size": 4096, "num_classes": 10},
    "optimizer": {"name": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 5e-5},
    "schedule": {
        "strategy": "global_onecycle",
        "max_lr": 0.4,
        "pct_start": 0.25,
        "div_factor": 25,
        "final_div_factor": 1e4,
        "anneal": "cos",
        "cycle_momentum": True,
        "base_momentum": 0.85,
        "max_momentum": 0.95,
        "progress": "samples",
    },
    "lr_scaling": {"rule": "none"},
    "stages": [
        {"resolution": 16, "epochs": 2, "data_fraction": 0.5, "batch_size": 64, "workers": 2},
        {"resolution": 24, "epochs": 1, "data_fraction": 0.75, "batch_size": 128, "workers": 1},
        {
            "resolution": 32,
            "epochs": 1.5,
            "data_fraction": 1.0,
            "batch_size": 32,
            "workers": 2,
            "grad_accum": 2,
        },
    ],
}


def merge(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def make_spec(**overrides) -> JobSpec:
    """BASE_SPEC with ``overrides`` merged in; ``data`` and ``optimizer`` (tagged variants) are replaced."""
    raw = merge(BASE_SPEC, {k: v for k, v in overrides.items() if k not in ("data", "optimizer")})
    raw.update({k: copy.deepcopy(v) for k, v in overrides.items() if k in ("data", "optimizer")})
    return validate_spec(raw)


@pytest.fixture
def spec_dict() -> dict:
    return copy.deepcopy(BASE_SPEC)


# Session fixtures shared by the resume tests (imported last: tests.jobs uses BASE_SPEC above).
from tests.jobs import on_head, straight  # noqa: E402,F401
