"""The worker loop in-process (world size 1, no Ray): save and restore through ``StageRunner`` itself,
restore's guards, exact resume for a model that draws from the global RNG (dropout), and gradient
accumulation that all-reduces once per optimizer step with and without ``torch.compile``."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from checkpoints.checkpointer import load
from checkpoints.storage import Storage
from checkpoints.store import MANIFEST, MODEL_FILE, STATE_FILE, CheckpointStore
from service.layout import HOLD_FILE
from service.plan import build_plan
from tests.conftest import make_spec
from tests.helpers import assert_same
from tests.jobs import TINY_IN_PROCESS
from workers.control import HoldRequest, StopAfter, held_marker
from workers.train import NEWEST_VERIFIED, StageRunner

# mobilenet_v3_small has dropout in its classifier: every training step draws from the global RNG.
SPEC = dict(
    name="inproc",
    deterministic=True,
    model={"arch": "mobilenet_v3_small", "num_classes": 10, "in_channels": 3},
    data={"kind": "synthetic", "size": 96, "val_size": 16, "num_classes": 10, "loader_workers": 0},
    stages=[
        {"resolution": 32, "epochs": 1, "batch_size": 16, "workers": 1},
        {"resolution": 40, "epochs": 2, "batch_size": 8, "workers": 1, "grad_accum": 2},
    ],
    metrics={"every_n_steps": 2},
    checkpoint={"every_n_steps": 0},
)


def runner(
    url: str,
    row: int,
    job_id: str = "j",
    stop: StopAfter | None = None,
    restore: str | None = NEWEST_VERIFIED,
    **spec_overrides,
) -> StageRunner:
    spec = make_spec(**{**SPEC, **spec_overrides})
    plan = build_plan(spec, spec.data.size)
    return StageRunner(
        spec,
        plan,
        row,
        job_id,
        url,
        stop_requested=stop,
        on_step=stop.on_step if stop else None,
        restore=restore,
    )


def store(url: str, job_id: str = "j") -> CheckpointStore:
    return CheckpointStore(Storage(url).child(job_id, "checkpoints"))


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> str:
    """Storage holding job j after stage 1 (its boundary checkpoint): each test starts from a copy."""
    url = str(tmp_path_factory.mktemp("stage1"))
    runner(url, 0).run()
    return url


def after_stage1(stage1: str, tmp_path) -> str:
    shutil.copytree(stage1, tmp_path, dirs_exist_ok=True)
    return str(tmp_path)


@pytest.fixture(scope="module")
def straight(stage1, tmp_path_factory):
    """Both stages without interruption: the final checkpoint's state."""
    url = after_stage1(stage1, tmp_path_factory.mktemp("straight"))
    runner(url, 1).run()
    latest = store(url).latest(verify=True)[0]
    assert latest.boundary and latest.stage == 2
    return load(store(url), latest.tag)[1]


def test_stop_mid_stage_then_restore_through_the_runner_is_exact(tmp_path, stage1, straight):
    url = after_stage1(stage1, tmp_path)
    stopped = runner(url, 1, stop=StopAfter(4)).run()  # stage 2 has 12 steps; reports every 2
    assert stopped.preempted and stopped.step == runner(url, 1).plan.stages[1].step_start + 4
    manifest, saved = load(store(url), store(url).latest()[0].tag)
    assert (manifest.step, manifest.boundary) == (stopped.step, False)

    resumed = runner(url, 1)  # a fresh worker: restores the newest checkpoint through stateful()
    assert resumed.restored_from == manifest.tag and resumed.progress.step == manifest.step
    assert resumed.scheduler.last_epoch == manifest.step
    assert_same(resumed.raw_model.state_dict(), saved["model"], "model")
    assert_same(resumed.optimizer.state_dict(), saved["optimizer"], "optimizer")
    assert resumed.optimizer.param_groups[0]["lr"] == saved["optimizer"]["param_groups"][0]["lr"]
    # This rank's RNG streams are the saved ones: the next draw is the draw the stopped run would make.
    assert_same(resumed.rng.capture()["torch"], saved["rng"]["per_rank"][0]["torch"], "torch RNG")

    end = resumed.run()
    assert not end.preempted and end.restored_from == manifest.tag
    final = load(store(url), store(url).latest()[0].tag)[1]
    # Dropout draws from the global RNG: bit-identical only if resuming kept that stream where it was.
    assert_same(final["model"], straight["model"], "model")
    assert_same(final["optimizer"], straight["optimizer"], "optimizer")
    assert_same(final["rng"], straight["rng"], "rng")
    assert final["scheduler"] == straight["scheduler"] and final["data"] == straight["data"]


def test_payload_is_the_runners_stateful_dict_in_plain_torch_files(stage1):
    url = stage1
    r = runner(url, 1)  # restores stage 1's boundary checkpoint: the same stateful dict that saved it
    tag = store(url).latest()[0].tag
    folder = f"{url}/j/checkpoints/{tag}"
    weights = torch.load(f"{folder}/{MODEL_FILE}", weights_only=True)
    state = torch.load(f"{folder}/{STATE_FILE}", weights_only=True)
    assert weights.keys() == r.raw_model.state_dict().keys()
    assert set(state) == set(r.stateful()) - {"model"} == {"optimizer", "scheduler", "data", "rng"}
    assert state["scheduler"] == state["data"] == {"step": r.plan.stages[0].step_end}
    assert r.restored_from == tag


def test_restore_refuses_another_jobs_checkpoint(tmp_path, stage1):
    url = after_stage1(stage1, tmp_path)
    with pytest.raises(RuntimeError, match="belongs to job j, not other"):
        StageRunner(runner(url, 1).spec, runner(url, 1).plan, 1, "other", url, store=store(url))


def test_restore_refuses_a_checkpoint_outside_the_stage(tmp_path, stage1):
    url = after_stage1(stage1, tmp_path)
    runner(url, 1, stop=StopAfter(2)).run()  # the newest checkpoint is now inside stage 2
    with pytest.raises(RuntimeError, match="outside stage 1's steps"):
        runner(url, 0)


def test_restore_refuses_samples_that_disagree_with_the_plan(tmp_path, stage1):
    url = after_stage1(stage1, tmp_path)
    tag = store(url).latest()[0].tag
    path = f"{url}/j/checkpoints/{tag}/{MANIFEST}"
    manifest = json.loads(open(path).read())
    manifest["samples_seen"] += 1
    open(path, "w").write(json.dumps(manifest))
    with pytest.raises(RuntimeError, match="disagrees with the plan"):
        runner(url, 1)


def test_restore_without_a_checkpoint_past_step_zero_says_so(tmp_path):
    with pytest.raises(RuntimeError, match="has no committed checkpoint to start from"):
        runner(str(tmp_path), 1)


def test_changed_data_is_refused(tmp_path):
    url = str(tmp_path)
    spec = make_spec(**SPEC)
    plan = build_plan(spec, 120)  # planned for 120 samples; the source now has 96
    with pytest.raises(RuntimeError, match="has 96 samples, but this job was planned for 120"):
        StageRunner(spec, plan, 0, "j", url).run()


class StopWhenHeld:
    """A stop request that arrives once rank 0 holds at ``step`` (as a test's cancel would)."""

    def __init__(self, job: Storage, step: int):
        self.job, self.step = job, step

    def on_step(self, step: int) -> None:
        pass

    def __call__(self) -> bool:
        return self.job.exists(held_marker(self.step, 0))


def test_a_hold_waits_at_its_step_for_a_stop_and_is_not_held_again(tmp_path, stage1, straight):
    url = after_stage1(stage1, tmp_path)
    job = Storage(url).child("j")
    at = runner(url, 1).stage.step_start + 3  # not a report boundary (every 2): reported first
    job.write_text(HoldRequest(steps=[at]).model_dump_json(), HOLD_FILE)
    reports = []
    held_runner = runner(url, 1, stop=StopWhenHeld(job, at))
    held_runner.report = reports.append
    end = held_runner.run()
    assert end.preempted and end.step == at
    assert json.loads(job.read_text(held_marker(at, 0)))["pid"] == os.getpid()
    reported = [r["step"] for rep in reports for r in rep["records"]]
    assert reported == list(range(at - 3, at))  # every step before the hold, none after
    assert (store(url).latest()[0].step, store(url).latest()[0].boundary) == (at, False)
    # the next attempt runs through the step already held, to the same end as the straight run
    assert not runner(url, 1).run().preempted
    assert_same(load(store(url), store(url).latest()[0].tag)[1]["model"], straight["model"], "model")


def test_a_hold_without_a_stop_times_out_and_training_goes_on(tmp_path, stage1, straight):
    url = after_stage1(stage1, tmp_path)
    job = Storage(url).child("j")
    at = runner(url, 1).stage.step_start + 2
    job.write_text(HoldRequest(steps=[at], timeout_s=0.2).model_dump_json(), HOLD_FILE)
    end = runner(url, 1).run()
    assert not end.preempted and job.exists(held_marker(at, 0))
    assert_same(load(store(url), store(url).latest()[0].tag)[1]["model"], straight["model"], "model")


def test_resnet18_trains_a_stage_and_restores_in_process(tmp_path):
    """The Ray test jobs use a small ResNet; torchvision's ResNet-18 (BatchNorm, downsampling shortcuts)
    is covered here: a stage, its boundary checkpoint, and a restore that loads it back exactly."""
    url = str(tmp_path)
    overrides = {
        "model": {"arch": "resnet18", "num_classes": 10, "in_channels": 3},
        "data": {"kind": "synthetic", "size": 32, "val_size": 8, "num_classes": 10, "loader_workers": 0},
        "stages": [{"resolution": 16, "epochs": 1, "batch_size": 8, "workers": 1}] * 2,
    }
    end = runner(url, 0, **overrides).run()
    assert end.step == 4 and end.val_acc is not None
    manifest, saved = load(store(url), store(url).latest()[0].tag)
    assert manifest.boundary and manifest.step == 4
    resumed = runner(url, 1, **overrides)
    assert resumed.restored_from == manifest.tag
    assert_same(resumed.raw_model.state_dict(), saved["model"], "model")


def test_next_stage_in_place_equals_a_restore_from_the_boundary_checkpoint(tmp_path, straight):
    """A stage group: the same workers go on to stage 2 in place. The result must be what a fresh worker
    restored from stage 1's boundary checkpoint computes (``straight``), bit for bit: weights, optimizer,
    RNG streams (dropout draws from them), scheduler and data position."""
    url = str(tmp_path)
    reports = []
    r = runner(url, 0)
    r.report = reports.append
    assert not r.run().preempted
    r.next_stage()
    assert reports[-1]["started_row"] == 1 and r.restored_from is None
    end = r.run()
    assert not end.preempted and end.stage == 2
    final = load(store(url), store(url).latest()[0].tag)[1]
    assert_same(final["model"], straight["model"], "model")
    assert_same(final["optimizer"], straight["optimizer"], "optimizer")
    assert_same(final["rng"], straight["rng"], "rng")
    assert final["scheduler"] == straight["scheduler"] and final["data"] == straight["data"]


def test_workers_restore_the_tag_they_are_given_and_skip_a_corrupt_newer_one(tmp_path, stage1):
    url = after_stage1(stage1, tmp_path)
    boundary = store(url).latest()[0].tag
    runner(url, 1, stop=StopAfter(4)).run()
    newest = store(url).latest()[0].tag
    path = os.path.join(url, "j", "checkpoints", newest, MODEL_FILE)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF  # same size: only the hash tells
    open(path, "wb").write(bytes(data))
    assert runner(url, 1).restored_from == boundary  # found here: the newest that verifies
    given = runner(url, 1, restore=boundary)  # the coordinator's choice
    assert given.restored_from == boundary and given.progress.step == store(url).read_manifest(boundary).step
    assert given.checkpointer.protect == {boundary}  # never pruned while this run goes on


def test_restore_is_strict_about_the_saved_state(tmp_path, stage1):
    """A checkpoint whose state lacks a part (or has one this job does not) is refused, naming it."""
    from checkpoints.checkpointer import encode

    url = after_stage1(stage1, tmp_path)
    manifest, state = load(store(url), store(url).latest()[0].tag)
    del state["scheduler"]
    state["ema"] = {}
    meta = manifest.model_dump(exclude={"tag", "created", "files"})
    store(url).commit("step-000000006-stage-1-end-x", encode(state), **meta)
    with pytest.raises(
        RuntimeError, match="does not match this job's training state: missing scheduler; unexpected ema"
    ):
        runner(url, 1, restore="step-000000006-stage-1-end-x")


# train.ema and checkpoint.keep_best on a tiny ResNet: 8 steps of 8 images of 8 px, an evaluation every
# 3 steps (a checkpoint with each: keep_best), the average updated every 2 steps.
EMA = dict(
    name="ema",
    **TINY_IN_PROCESS,
    stages=[{"resolution": 8, "epochs": 1, "batch_size": 8, "workers": 1}],
    metrics={"every_n_steps": 2, "eval_every_n_steps": 3},
    checkpoint={"every_n_steps": 0, "keep_last": 1, "keep_best": {"metric": "ema_val_loss", "mode": "min"}},
    train={"ema": {"decay": 0.5, "every_n_steps": 2}},
)


def ema_run(url: str, stop: StopAfter | None = None) -> list[dict]:
    """Run the stage (restoring the newest checkpoint); returns what it reported."""
    spec = make_spec(**EMA)
    reports = []
    StageRunner(
        spec,
        build_plan(spec, spec.data.size),
        0,
        "j",
        url,
        report=reports.append,
        stop_requested=stop,
        on_step=stop.on_step if stop else None,
    ).run()
    return reports


def test_ema_is_checkpointed_evaluated_and_resumes_exactly(tmp_path):
    straight_url, resumed_url = str(tmp_path / "straight"), str(tmp_path / "resumed")
    reports = ema_run(straight_url)
    evals = [e for r in reports for e in r["evals"]]
    (end,) = [r["stage_end"] for r in reports if r["stage_end"]]
    assert [e["step"] for e in evals] == [3, 6]
    for record in [*evals, end]:  # the average is evaluated beside the weights; top-5 with 10 classes
        assert {"val_top5", "ema_val_loss", "ema_val_acc", "ema_val_top5"} <= {
            k for k, v in record.items() if v is not None
        }
        assert record["val_acc"] <= record["val_top5"] and record["ema_val_acc"] <= record["ema_val_top5"]
    latest = store(straight_url).latest()[0]
    _, straight = load(store(straight_url), latest.tag)
    assert straight["ema"]["module"].keys() == straight["model"].keys()
    ema, model = straight["ema"]["module"], straight["model"]
    assert not all(torch.equal(ema[k], model[k]) for k in model)  # an average, not a copy
    assert latest.metrics == {k: end[k] for k in latest.metrics} and "ema_val_loss" in latest.metrics

    stopped = ema_run(resumed_url, stop=StopAfter(4))  # after the evaluation at 3, before the one at 6
    assert [r["stage_end"] for r in stopped if r["stage_end"]][0]["step"] == 4
    resumed = ema_run(resumed_url)
    assert resumed[-1]["stage_end"]["restored_from"] == "step-000000004"
    _, final = load(store(resumed_url), store(resumed_url).latest()[0].tag)
    for part in ("model", "ema", "optimizer", "rng"):
        assert_same(final[part], straight[part], part)
    resumed_end = resumed[-1]["stage_end"]
    assert {k: resumed_end[k] for k in end if k.startswith(("val", "ema"))} == {
        k: end[k] for k in end if k.startswith(("val", "ema"))
    }
    # keep_best: the best evaluated checkpoint of the whole run survives keep_last=1, in both runs
    for url in (straight_url, resumed_url):
        best = store(url).best("ema_val_loss", "min")
        assert best is not None and best.tag in store(url).tags()
        evaluated = {e["step"]: e["ema_val_loss"] for e in evals} | {end["step"]: end["ema_val_loss"]}
        assert best.manifest.step == min(evaluated, key=lambda s: (evaluated[s], s))


def test_top5_counts_labels_among_the_five_highest_scores():
    from workers.train import topk_correct

    logits = torch.tensor(
        [
            [9.0, 8, 7, 6, 5, 4, 3],  # label 0: top-1
            [9.0, 8, 7, 6, 5, 4, 3],  # label 4: fifth highest
            [9.0, 8, 7, 6, 5, 4, 3],  # label 5: sixth, missed
            [0.0, 1, 2, 3, 4, 5, 6],  # label 2: fifth highest
        ]
    )
    y = torch.tensor([0, 4, 5, 2])
    assert topk_correct(logits, y, 5).item() == 3
    assert topk_correct(logits, y, 1).item() == 1
