"""Node loss on a two-node Ray cluster on one machine (ray.cluster_utils.Cluster)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from service.spec import JobSpec, StageSpec
from tests.conftest import merge
from tests.jobs import DETERMINISTIC, cli_env, final_state, read_record, stagetrain, steps_reported, write_job

pytestmark = pytest.mark.ray


def test_node_loss_stops_as_preempted_and_resume_with_fewer_workers_finishes(tmp_path, monkeypatch, straight):
    import ray
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    spec = merge(DETERMINISTIC, {"name": "node-loss", "keep_global_batch": True})
    job = write_job(tmp_path, spec)
    storage = tmp_path / "runs"
    job_dir = storage / "nl"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        worker_node = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        env = cli_env(RAY_AUTH_MODE="disabled")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service.cli",
                "run",
                job,
                "--job-id",
                "nl",
                "--storage",
                str(storage),
                "--address",
                cluster.address,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        deadline = time.time() + 300
        while steps_reported(job_dir) < 30 and time.time() < deadline:  # mid stage 2 (2 workers, 1 per node)
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.1)
        cluster.remove_node(worker_node)
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 75, out
        record = read_record(job_dir)
        assert record["status"] == "preempted"
        assert "lost capacity" in record["error"] and "--workers" in record["error"]
        assert "needs 2 workers x 1 CPUs = 2 CPUs, but the Ray cluster has 1" in record["error"]
        stopped_at = record["current_step"]
        assert 24 <= stopped_at < 36

        resumed = stagetrain(
            "resume", "nl", "--storage", str(storage), "--address", cluster.address, "--workers", "1", env=env
        )
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    finally:
        ray.shutdown()
        cluster.shutdown()
    record = read_record(job_dir)
    assert record["status"] == "succeeded"
    assert [s["workers"] for s in record["stages"]] == [2, 1, 1]
    # stage 2 kept its global batch: half the workers, the same micro-batch, twice the accumulation
    assert JobSpec.model_validate(record["spec"]).stages[1] == StageSpec(
        **{**spec["stages"][1], "workers": 1, "batch_size": 16, "grad_accum": 2}
    )
    # Same global batch, same samples, same micro-batch grouping, same LR: the weights equal the
    # uninterrupted run's up to reduction order. (BatchNorm running statistics are not weights: one
    # worker updates them once per micro-batch, two workers once per step from rank 0's micro-batch.)
    model_a, _ = final_state(straight[0])
    model_b, _ = final_state(job_dir)
    weights = [n for n in model_a if not n.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(weights) > 50
    for name in weights:
        assert torch.allclose(model_a[name], model_b[name], rtol=1e-3, atol=1e-4), name
