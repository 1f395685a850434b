"""Node loss on a two-node Ray cluster on one machine (ray.cluster_utils.Cluster): the coordinator
commits on a termination notice, waits for capacity and goes on or stops, by itself (continuing on
fewer workers, ``min_workers``, is the runner's decision: tests/test_coordinator.py).

The head and the worker node have 1 CPU each; the 2-worker stages put one worker on each. A fake
metadata server on 127.0.0.1 per node stands in for the cloud's (nothing else is contacted)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch

from service.spec import JobSpec, StageSpec
from tests.conftest import merge
from tests.fake_metadata import FakeMetadata
from tests.jobs import (
    DETERMINISTIC,
    cli_env,
    final_state,
    held,
    hold_at,
    read_record,
    stagetrain,
    write_job,
)
from tests.test_resume_ray import _committed
from workers.control import AWS_ENDPOINT_ENV

pytestmark = pytest.mark.ray


@contextlib.contextmanager
def two_nodes(monkeypatch, head_env: dict | None = None, node_env: dict | None = None):
    import ray
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "env_vars": head_env or {}})
    try:
        node = cluster.add_node(num_cpus=1, env_vars=node_env or {})
        cluster.wait_for_nodes()
        yield cluster, node
    finally:
        ray.shutdown()
        cluster.shutdown()


def start(job: str, job_id: str, storage, cluster, **env) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "run", job, "--job-id", job_id, "--storage", str(storage)]
        + ["--address", cluster.address],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cli_env(RAY_AUTH_MODE="disabled", **env),
    )


def wait_until(proc, what, timeout: float = 300, poll: float = 0.1):
    deadline = time.time() + timeout
    while not (found := what()):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "timed out"
        time.sleep(poll)
    return found


def live_train_controllers(cluster) -> int:
    """Ray Train controllers alive on the cluster (one per running ``TorchTrainer.fit``), from the GCS."""
    import ray
    from ray._private.state import actors

    if not ray.is_initialized():
        ray.init(address=cluster.address, log_to_driver=False)
    return sum(
        1 for a in actors().values() if a["ActorClassName"] == "TrainController" and a["State"] == "ALIVE"
    )


def record_of(job_dir) -> dict:
    try:
        return read_record(job_dir)
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or mid-write
        return {}


def weights(state: dict) -> list[str]:
    """Parameters, not BatchNorm running statistics (one worker updates those once per micro-batch)."""
    return [n for n in state if not n.endswith(("running_mean", "running_var", "num_batches_tracked"))]


def test_a_node_lost_with_a_notice_loses_no_step_and_one_lost_for_good_stops_then_resume_finishes(
    tmp_path, monkeypatch, straight
):
    """One run whose worker node goes twice. In stage 2 with a termination notice (AWS's
    spot/instance-action on that node's metadata server): the workers commit the step reached before
    the node goes, the job waits for capacity and goes on by itself on the node that joins, no step
    lost or repeated, bit-identical to the uninterrupted run at the stage-2 boundary. In stage 3
    without notice and for good: the run that lost its node is aborted, after failure.capacity_wait_s
    the job stops as preempted with today's message, and `resume --workers 1` finishes it: with
    keep_global_batch the weights are the uninterrupted run's up to reduction order."""
    head_md, doomed_md, fresh_md = FakeMetadata(), FakeMetadata(), FakeMetadata()
    spec = merge(
        DETERMINISTIC,
        {
            "name": "node-loss",
            "keep_global_batch": True,
            "preemption": {"notice": "aws", "notice_poll_s": 0.2},
            "failure": {"capacity_wait_s": 15},
        },
    )
    job, storage = write_job(tmp_path, spec), tmp_path / "runs"
    job_dir = storage / "nl"
    try:
        with two_nodes(
            monkeypatch, head_env={AWS_ENDPOINT_ENV: head_md.url}, node_env={AWS_ENDPOINT_ENV: doomed_md.url}
        ) as (cluster, node):
            hold_at(job_dir, 28, 39)  # mid stage 2 (steps 24-35), mid stage 3 (steps 36-47)
            proc = start(job, "nl", storage, cluster, **{AWS_ENDPOINT_ENV: head_md.url})
            held(job_dir, 28, ranks=2, proc=proc)
            doomed_md.announced = "terminate"
            record = wait_until(
                proc, lambda: (r := record_of(job_dir)) and r["stages"][1]["infra_failures"] and r
            )
            assert record["current_step"] == 28
            assert "attempt 2" not in json.dumps(record["events"])  # it waits for the node to go first
            assert _committed(job_dir, "step-000000028")  # before the node goes
            cluster.remove_node(node)  # the two minutes are up
            wait_until(proc, lambda: record_of(job_dir).get("status") == "waiting_for_capacity", 60)
            assert "needs 2 workers" in record_of(job_dir)["waiting_for"]
            node = cluster.add_node(num_cpus=1, env_vars={AWS_ENDPOINT_ENV: fresh_md.url})
            held(job_dir, 39, ranks=2, proc=proc)
            cluster.remove_node(node)  # no notice this time, and it never comes back
            wait_until(proc, lambda: record_of(job_dir).get("status") == "waiting_for_capacity", 60)
            # the run that lost its node was given up and aborted, not left running while the job waits
            wait_until(proc, lambda: live_train_controllers(cluster) == 0, 60)
            out, _ = proc.communicate(timeout=300)
            assert proc.returncode == 75, out
            record = read_record(job_dir)
            assert record["status"] == "preempted" and record["waiting_for"] is None
            assert "lost capacity" in record["error"] and "--workers" in record["error"]
            assert "needs 2 workers x 1 CPUs = 2 CPUs, but the Ray cluster has 1" in record["error"]
            assert any("termination notice: aws spot/instance-action" in e for e in record["events"])
            assert any("waited 15s for capacity" in e for e in record["events"])
            assert any("waiting up to 15s for capacity" in e for e in record["events"])
            assert any(p == ("GET", "/latest/meta-data/spot/instance-action") for p in doomed_md.requests)
            stage2, stage3 = record["stages"][1:]
            assert (stage2["status"], stage2["attempts"], stage2["infra_failures"], stage2["restarts"]) == (
                "completed",
                2,
                1,
                0,
            )
            assert stage3["infra_failures"] == 1 and stage3["status"] == "preempted"
            stopped_at = record["current_step"]
            assert 36 <= stopped_at < 48
            # across the notice every step was reported exactly once, in the metrics file as written
            lines = [json.loads(line) for line in (job_dir / "metrics.jsonl").read_text().splitlines()]
            counts = Counter(m["step"] for m in lines if m["kind"] == "step" and m["step"] < 36)
            assert sorted(counts) == list(range(36)) and set(counts.values()) == {1}
            model_a, _ = final_state(straight[0], stage=2)
            model_b, _ = final_state(job_dir, stage=2)
            for name in model_a:
                assert torch.equal(model_a[name], model_b[name]), name

            resumed = stagetrain(
                "resume",
                "nl",
                "--storage",
                str(storage),
                "--address",
                cluster.address,
                "--workers",
                "1",
                env=cli_env(RAY_AUTH_MODE="disabled"),
            )
            assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    finally:
        for md in (head_md, doomed_md, fresh_md):
            md.close()
    record = read_record(job_dir)
    assert record["status"] == "succeeded"
    assert [s["workers"] for s in record["stages"]] == [2, 2, 1]
    # stage 3 kept its global batch: one worker, half the micro-batch... (8 x 2 x 2 = 32 = 1 x 8 x 4)
    assert JobSpec.model_validate(record["spec"]).stages[2] == StageSpec(
        **{**spec["stages"][2], "workers": 1, "batch_size": 8, "grad_accum": 4}
    )
    # Same global batch, same samples, same micro-batch grouping, same LR: the weights equal the
    # uninterrupted run's up to reduction order.
    model_a, _ = final_state(straight[0])
    model_b, _ = final_state(job_dir)
    assert len(weights(model_a)) == 29  # every conv, BatchNorm and linear weight of the small ResNet
    for name in weights(model_a):
        assert torch.allclose(model_a[name], model_b[name], rtol=1e-3, atol=1e-4), name
