"""The Python API drives a real job end to end on a Ray cluster (the session's head, joined through
``RAY_ADDRESS`` as a notebook on a cluster would): ``stagetrain.run`` trains it (a script of its own), then
``status``, ``metrics`` and ``export`` read what it left."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import merge
from tests.helpers import REPO
from tests.jobs import TINY

pytestmark = pytest.mark.ray

# About the smallest job there is: one stage on one worker, 6 steps of 16 samples (global_onecycle
# needs pct_start x steps > 1).
ONE = merge(
    TINY,
    {
        "name": "api",
        "data": {"size": 96, "val_size": 32},
        "stages": [{"resolution": 16, "epochs": 1, "batch_size": 16, "workers": 1}],
        "metrics": {"every_n_steps": 1},
        "checkpoint": {"every_n_steps": 3},
    },
)

SCRIPT = """
import json, sys
import stagetrain

job = stagetrain.run(json.loads(sys.argv[1]), storage=sys.argv[2], job_id="api")
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


def test_the_python_api_runs_a_job_and_reads_it_back(tmp_path, on_head):
    from workers.models import load_exported

    storage = str(tmp_path / "runs")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(ONE), storage],
        cwd=REPO,
        env=on_head,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout + proc.stderr
    out = json.loads(lines[0].removeprefix("RESULT "))
    assert out["job"] == ["api", storage]
    assert (out["status"], out["step"]) == ("succeeded", 6)
    steps = [m for m in out["metrics"] if m["kind"] == "step"]
    assert [m["step"] for m in steps] == list(range(6)) and {m["workers"] for m in steps} == {1}
    assert [m["kind"] for m in out["metrics"]][-1] == "stage_end"
    path, tag, step = out["export"]
    assert tag == out["checkpoint"] and step == 6 and path == f"{storage}/api/export/{tag}.pt"
    assert load_exported(path).eval() is not None
