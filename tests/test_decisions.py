"""The coordinator's decisions and re-planning, without Ray."""

from __future__ import annotations

import pytest

from checkpoints.store import FileEntry, Manifest
from service.curve import curve, lr_factor, lr_momentum
from service.decisions import (
    Cancelled,
    Completed,
    Fail,
    Failed,
    Finish,
    GiveUp,
    IncompatibleResume,
    Preempted,
    Relayout,
    Retry,
    RunStage,
    WaitForCapacity,
    after_outcome,
    check_resume,
    group_end,
    layout_history,
    next_action,
    resize_remaining,
    resize_stage,
    spec_differences,
    stage_completed,
    stage_outcome,
)
from service.jobs import JobRecord, StageEnd
from service.plan import build_plan
from service.spec import FailureSpec
from tests.conftest import make_spec
from workers.data import StageSampler, stage_subset

N = 4096
STAGES = [
    {"resolution": 16, "epochs": 1, "batch_size": 64, "workers": 2},  # 32 steps of 128
    {"resolution": 24, "epochs": 2, "batch_size": 32, "workers": 2},  # 128 steps of 64
    {"resolution": 32, "epochs": 1, "batch_size": 32, "workers": 2},  # 64 steps of 64
]
CLUSTER = {"CPU": 2.0}


def _manifest(step: int, stage: int, boundary: bool) -> Manifest:
    return Manifest(
        job_id="j",
        tag=f"t{step}",
        stage=stage,
        epoch=0,
        step=step,
        samples_seen=0,
        boundary=boundary,
        world_size=2,
        plan_hash="",
        stage_hash="",
        spec_hash="",
        created="",
        versions={},
        files={"model.pt": FileEntry(size=1, sha256="")},
    )


def _job(**overrides):
    spec = make_spec(**{"stages": STAGES, "lr_scaling": {"rule": "linear"}, **overrides})
    plan = build_plan(spec, N)
    return spec, plan, JobRecord.create("j", spec, plan)


def test_next_action_walks_the_stages_from_the_latest_checkpoint():
    spec, plan, record = _job()
    res = spec
    # all three stages on 2 workers: one stage group, rows 0..2
    assert next_action(record, plan, None, res, CLUSTER) == RunStage(stage=0, start_step=0, attempt=1, last=2)
    assert next_action(record, plan, _manifest(20, 1, False), res, CLUSTER) == RunStage(0, 20, 1, last=2)
    record.stages[1].attempts = 2
    assert next_action(record, plan, _manifest(32, 1, True), res, CLUSTER) == RunStage(1, 32, 3, last=2)
    assert next_action(record, plan, _manifest(plan.total_steps, 3, True), res, CLUSTER) == Finish()
    assert stage_completed(plan, 0, _manifest(32, 1, True))
    assert not stage_completed(plan, 0, _manifest(32, 1, False)) and not stage_completed(
        plan, 1, _manifest(32, 1, True)
    )


def test_next_action_fails_fast_when_the_cluster_cannot_hold_the_stage():
    spec, plan, record = _job(resources={"cpus_per_worker": 2})
    action = next_action(record, plan, None, spec, CLUSTER)
    assert isinstance(action, Fail)
    assert action.reason.startswith("stage 1 needs 2 workers x 2 CPUs = 4 CPUs, but the Ray cluster has 2")
    gpu = make_spec(stages=STAGES, resources={"use_gpu": True})
    action = next_action(record, build_plan(gpu, N), None, gpu, {"CPU": 64})
    assert isinstance(action, Fail) and "needs 2 GPUs" in action.reason


def test_check_resume_allows_changes_to_stages_not_started_and_records_them():
    spec, plan, record = _job()
    later = [dict(s) for s in STAGES]
    later[2].update(resolution=40, epochs=2)
    new = make_spec(stages=later, lr_scaling={"rule": "linear"})
    assert check_resume(record, plan, new, step=40) == ["stages[2]: resolution 32 -> 40, epochs 1.0 -> 2.0"]
    assert check_resume(record, plan, spec, step=40) == []
    more = make_spec(
        stages=[*STAGES, {"resolution": 48, "epochs": 1, "batch_size": 16, "workers": 2}],
        lr_scaling={"rule": "linear"},
    )
    assert check_resume(record, plan, more, step=40) == ["stages[3]: added"]


@pytest.mark.parametrize(
    "change,expected",
    [
        (
            {"stages": [STAGES[0], {**STAGES[1], "resolution": 28}, STAGES[2]]},
            "stages[1] already ran (checkpoint at step 40) and cannot change: resolution 24 -> 28",
        ),
        ({"model": {"arch": "resnet34", "num_classes": 10, "in_channels": 3}}, "model: was"),
        ({"schedule": {"max_lr": 0.8}}, "schedule / lr_scaling changed"),
        ({"seed": 1}, "seed: was 0, now 1"),
        ({"train": {"ema": {"decay": 0.99}}}, "train.ema: was off, now on"),
        ({"stages": STAGES[:1]}, "stages[1] already ran (checkpoint at step 40) and cannot change: removed"),
    ],
)
def test_check_resume_refuses_what_would_contradict_what_already_ran(change, expected):
    _, plan, record = _job()
    new = make_spec(**{"stages": STAGES, "lr_scaling": {"rule": "linear"}, **change})
    with pytest.raises(IncompatibleResume, match="cannot resume job j") as e:
        check_resume(record, plan, new, step=40)
    assert expected in str(e.value)


def test_resize_keeps_the_global_batch_through_accumulation():
    spec = make_spec(stages=STAGES, keep_global_batch=True)
    resized = resize_remaining(spec, first_stage=1, workers=1)
    assert [(s.workers, s.batch_size, s.grad_accum) for s in resized.stages] == [
        (2, 64, 1),
        (1, 32, 2),
        (1, 32, 2),
    ]
    assert [s.global_batch for s in resized.stages] == [s.global_batch for s in spec.stages]
    three = make_spec(stages=STAGES, keep_global_batch=True)
    with pytest.raises(ValueError, match="global batch 64 does not split evenly over 3 workers"):
        resize_remaining(three, first_stage=1, workers=3)
    # without keep_global_batch the global batch (and LR, by the rule) follows the worker count
    plain = resize_remaining(make_spec(stages=STAGES), first_stage=1, workers=1)
    assert [s.global_batch for s in plain.stages] == [128, 32, 32]


def test_keep_global_batch_resize_mid_stage_keeps_the_plan_and_lr():
    spec, plan, record = _job(keep_global_batch=True)
    resized = resize_remaining(spec, 1, workers=1)
    assert layout_history(plan, resized, step=50) == []  # same global batch: no split
    new = build_plan(resized, N)
    assert [plan.stage_hash(i) for i in range(3)] == [new.stage_hash(i) for i in range(3)]
    assert all(lr_momentum(plan, k) == lr_momentum(new, k) for k in range(plan.total_steps))


def test_mid_stage_resize_splits_the_stage_and_rescales_the_lr_from_the_next_step():
    spec, plan, record = _job()
    resized = resize_remaining(spec, 1, workers=1)  # stage 2: global 64 -> 32
    history = layout_history(plan, resized, step=50)  # 18 steps into stage 2
    assert [h.model_dump() for h in history] == [
        {"stage": 1, "until_step": 50, "workers": 2, "batch_size": 32, "grad_accum": 1}
    ]
    new = build_plan(resized, N, history=tuple(history))
    a, b = new.stages[1], new.stages[2]
    assert (a.index, a.segment, a.last_segment, a.step_start, a.step_end) == (1, 0, False, 32, 50)
    assert (b.index, b.segment, b.last_segment, b.global_batch, b.step_start) == (1, 1, True, 32, 50)
    # b reads the rest of the stage's sample stream: (128 - 18) steps of 64 = 7040 samples = 220 steps of 32
    assert b.stream_offset == 18 * 64 and b.steps == 220 and b.sample_end == plan.stages[1].sample_end
    assert new.stages[3].sample_start == plan.stages[2].sample_start and new.stages[3].index == 2
    assert [s.label for s in new.stages] == ["1", "2.1", "2.2", "3"]
    # the LR shows the new factor (linear rule: 32/128) from the resume step on; nothing before moves
    assert lr_factor(new, 49) == 0.5 and lr_factor(new, 50) == 0.25
    for k in range(50):
        assert lr_momentum(new, k) == lr_momentum(plan, k)
    assert curve(new, 50) == pytest.approx(curve(plan, 50), rel=1e-12)  # same samples seen: same curve point
    # the data before the split is unchanged, and after it the remaining samples are re-partitioned
    subset = stage_subset(N, a.subset_size, 0)

    def ids(stage, world, first, last):
        out = []
        for rank in range(world):
            sampler = StageSampler(
                subset,
                0,
                stage.index,
                stage.epoch_samples,
                stage.global_batch,
                stage.batch_size,
                world,
                rank,
                first,
                last,
                stage.stream_offset,
            )
            out += [i for i, _ in sampler]
        return sorted(out)

    old_stage = plan.stages[1]
    assert ids(a, 2, 0, a.steps) == ids(old_stage, 2, 0, 18)
    assert ids(b, 1, 0, b.steps) == ids(old_stage, 2, 18, old_stage.steps)


def test_mid_stage_resize_with_per_stage_curves_stays_on_the_stage_curve():
    spec, plan, record = _job(schedule={"strategy": "per_stage_cosine"})
    resized = resize_remaining(spec, 1, workers=1)
    new = build_plan(resized, N, history=tuple(layout_history(plan, resized, step=50)))
    for k in (50, 60, 100):  # same stream position -> same point of stage 2's cosine
        pos = new.stage_at(k).stream_position(k)
        old_step = 32 + pos // 64
        if pos % 64 == 0:
            assert curve(new, k) == pytest.approx(curve(plan, old_step), rel=1e-12)


# ------------------------------------------------------------------------------------- stage outcomes


@pytest.mark.parametrize(
    ("end", "error", "lost", "stop", "latest", "expect", "job_status", "stage_status"),
    [
        # the stage ran to its end and committed its boundary checkpoint
        (
            StageEnd(stage=2, step=160, val_acc=0.5, val_loss=1.0),
            None,
            None,
            None,
            (160, 2, True),
            Completed("t160", 1.0, 0.5),
            "pending",
            "completed",
        ),
        # a worker raised: the training code failed
        (
            None,
            "worker 0: ZeroDivisionError: boom",
            None,
            None,
            (64, 2, False),
            Failed("stage 2 failed: worker 0: ZeroDivisionError: boom"),
            "failed",
            "failed",
        ),
        # the worker group failed and the cluster can no longer hold the stage: a node went away
        (
            None,
            "worker 1: ActorDiedError",
            "stage 2 needs 2 CPUs, the cluster has 1",
            None,
            (64, 2, False),
            Preempted(
                "the cluster lost capacity (checkpoint t64)",
                "stage 2 needs 2 CPUs, the cluster has 1",
                cause="node",
            ),
            "preempted",
            "preempted",
        ),
        # SIGTERM to the coordinator: the workers committed a checkpoint at the step they reached
        (
            StageEnd(stage=2, step=70, preempted=True),
            None,
            None,
            "SIGTERM",
            (70, 2, False),
            Preempted("SIGTERM requested (checkpoint t70)"),
            "preempted",
            "preempted",
        ),
        # stagetrain cancel
        (
            StageEnd(stage=2, step=70, preempted=True),
            None,
            None,
            "cancel",
            (70, 2, False),
            Cancelled("cancel requested (checkpoint t70)"),
            "cancelled",
            "cancelled",
        ),
        # fit() returned without the boundary checkpoint: never completed silently
        (
            StageEnd(stage=2, step=160),
            None,
            None,
            None,
            (150, 2, False),
            Failed("stage 2 ended without committing its boundary checkpoint"),
            "failed",
            "failed",
        ),
        # a worker saw its node's termination notice: everyone stopped with a checkpoint
        (
            StageEnd(
                stage=2,
                step=70,
                preempted=True,
                notices=["aws spot/instance-action: {}"],
                notice_nodes=["n1"],
            ),
            None,
            None,
            None,
            (70, 2, False),
            Preempted(
                "termination notice: aws spot/instance-action: {} (checkpoint t70)",
                cause="notice",
                nodes=("n1",),
            ),
            "preempted",
            "preempted",
        ),
    ],
    ids=["completed", "code-failure", "lost-capacity", "sigterm", "cancel", "no-boundary-commit", "notice"],
)
def test_stage_outcome_and_the_status_it_becomes(
    end, error, lost, stop, latest, expect, job_status, stage_status
):
    spec, plan, record = _job()
    manifest = _manifest(*latest)
    outcome = stage_outcome(plan, 1, end, error, lost, stop, manifest)
    assert outcome == expect
    record.settle(1, outcome, manifest.step)
    assert record.stages[1].status == stage_status and record.current_step == manifest.step
    assert record.status == job_status
    if isinstance(outcome, Preempted) and lost:
        assert "lost capacity" in record.error and "stagetrain resume j --workers N" in record.error
    if isinstance(outcome, Failed):
        assert record.error == outcome.reason and record.events[-1].endswith(outcome.reason)


def test_cancel_between_stages_keeps_the_finished_stage_completed():
    spec, plan, record = _job()
    record.stages[0].status = "completed"
    record.settle(0, Cancelled("cancelled between stages"), 32)
    assert record.status == "cancelled" and record.stages[0].status == "completed"


def test_spec_differences_name_what_changed():
    a = make_spec(stages=STAGES)
    b = make_spec(stages=[STAGES[0], {**STAGES[1], "resolution": 28}, STAGES[2]], seed=3)
    assert spec_differences(a, b) == ["seed: 0 -> 3", "stages[1]: resolution 24 -> 28"]
    assert spec_differences(a, a) == []


def test_a_record_from_before_the_dataset_size_was_recorded_still_loads():
    spec, plan, record = _job()
    legacy = record.model_dump(mode="json")
    del legacy["dataset_size"]
    again = JobRecord.model_validate(legacy)
    assert again.dataset_size == N and again.plan().plan_hash() == plan.plan_hash()


def test_spec_differences_can_ignore_the_worker_layout():
    a = make_spec(stages=STAGES)
    scaled = resize_remaining(a, 2, 1)
    assert spec_differences(a, scaled) == ["stages[2]: workers 2 -> 1"]
    assert spec_differences(a, scaled, layout=False) == []
    other = make_spec(stages=[STAGES[0], STAGES[1], {**STAGES[2], "epochs": 2}])
    assert spec_differences(a, other, layout=False) == ["stages[2]: epochs 1.0 -> 2.0"]


def test_a_lost_node_is_the_infrastructure_even_when_the_cluster_still_holds_the_stage():
    _, plan, _ = _job()
    outcome = stage_outcome(
        plan, 1, None, "worker 1: ActorDiedError", None, None, _manifest(64, 2, False), True
    )
    assert outcome == Preempted(
        "a worker node went away (worker 1: ActorDiedError; checkpoint t64)", cause="node"
    )


def test_after_outcome_retries_lost_capacity_always_and_code_crashes_up_to_max_failures():
    """Lost capacity always; a crash of the code up to max_failures; the job's own import paths and its
    bad data (the same on every attempt) never."""
    node = Preempted("lost", "needs 2 CPUs", cause="node")
    notice = Preempted("notice", cause="notice", nodes=("n",))
    crash = Failed("stage 2 failed: worker 0: ZeroDivisionError: boom")
    none, two, forever = FailureSpec(), FailureSpec(max_failures=2), FailureSpec(max_failures=-1)
    assert after_outcome(node, none, restarts=0) == Retry("lost", infra=True)
    assert after_outcome(notice, none, restarts=99).infra  # never counted against max_failures
    assert after_outcome(crash, none, restarts=0) is None
    assert after_outcome(crash, two, restarts=1) == Retry(crash.reason + "; retry 2 of 2", infra=False)
    assert after_outcome(crash, two, restarts=2) is None
    assert after_outcome(crash, forever, restarts=1000) is not None
    for settles in (Preempted("SIGTERM requested"), Cancelled("cancel"), Completed("t")):
        assert after_outcome(settles, forever, restarts=0) is None
    # the job's own import paths failing on a worker: the same on every attempt, never retried
    for field in ("model.builder", "data.factory"):
        config = Failed(f"stage 1 failed: worker 0: ImportError: {field}: cannot import 'nope' (...)")
        assert after_outcome(config, forever, restarts=0) is None
    # the data itself: a bad image (data.on_bad_image: error), a prepared folder changed since its prepare
    for data in (
        "ValueError: data: image 25 (/d/dog/3.jpg, 200 bytes) cannot be decoded: OSError: truncated",
        "Caught PreparedFolderChanged in DataLoader worker process 0.\nOriginal Traceback (most recent call "
        "last):\n ...\nworkers.data.PreparedFolderChanged: data: image 3 (/t/160/a/0.jpg) is 33x33 px",
    ):
        assert after_outcome(Failed(f"stage 1 failed: worker 0: {data}"), forever, restarts=0) is None
    assert (
        after_outcome(Failed("stage 1 failed: worker 0: OSError: data: read timed out"), two, 0) is not None
    )


def test_next_action_after_a_capacity_loss_waits_then_gives_up_with_todays_message():
    spec, plan, record = _job(failure={"capacity_wait_s": 300})
    small = {"CPU": 1.0}
    latest = _manifest(64, 2, False)
    # no loss seen: a cluster too small from the start fails at once (as before)
    assert isinstance(next_action(record, plan, latest, spec, small), Fail)
    wait = next_action(record, plan, latest, spec, small, waiting_s=20)
    assert wait == WaitForCapacity(
        need="stage 2 needs 2 workers x 1 CPUs = 2 CPUs, but the Ray cluster has 1; lower stages[1].workers "
        "or resources.cpus_per_worker, or add nodes",
        left_s=280,
    )
    assert next_action(record, plan, latest, spec, CLUSTER, waiting_s=20) == RunStage(1, 64, 1, last=2)
    give_up = next_action(record, plan, latest, spec, small, waiting_s=300)
    assert isinstance(give_up, GiveUp) and give_up.outcome.lost_capacity == wait.need
    record.settle(1, give_up.outcome, 64)
    assert record.status == "preempted" and "stagetrain resume j --workers N" in record.error
    # capacity_wait_s: 0 is the old behaviour: preempted at once
    spec0, plan0, record0 = _job(failure={"capacity_wait_s": 0})
    assert isinstance(next_action(record0, plan0, latest, spec0, small, waiting_s=0.0), GiveUp)


def test_next_action_continues_on_fewer_workers_when_min_workers_allows():
    stages = [dict(s) for s in STAGES]
    stages[1]["min_workers"] = 1
    spec, plan, record = _job(stages=stages)
    latest = _manifest(64, 2, False)
    action = next_action(record, plan, latest, spec, {"CPU": 1.0})
    assert action == Relayout(stage=1, workers=1, reason=action.reason) and "needs 2 workers" in action.reason
    # a job-level default, capped by the stage's own worker count
    spec, plan, record = _job(failure={"min_workers": 1})
    assert isinstance(next_action(record, plan, _manifest(0, 1, False), spec, {"CPU": 1.0}), Relayout)
    assert isinstance(next_action(record, plan, latest, spec, {"CPU": 0.5}, waiting_s=1), WaitForCapacity)


def test_resize_stage_keeps_the_global_batch_when_it_divides_else_the_lr_rule_applies():
    spec = make_spec(stages=STAGES)
    one = resize_stage(spec, 1, 1)
    assert [(s.workers, s.batch_size, s.grad_accum) for s in one.stages] == [
        (2, 64, 1),
        (1, 32, 2),
        (2, 32, 1),
    ]
    odd = make_spec(stages=[STAGES[0], {**STAGES[1], "workers": 4, "batch_size": 16}, STAGES[2]])
    three = resize_stage(odd, 1, 3)  # 64 does not split over 3: 3 x 16 = 48, the LR follows the rule
    assert (three.stages[1].workers, three.stages[1].global_batch) == (3, 48)
    # elastic continuation mid-stage: the steps already run keep their layout in the history
    plan = build_plan(odd, N)
    assert layout_history(plan, three, 40)[0].workers == 4


def test_min_workers_above_workers_is_refused_naming_the_field():
    from service.spec import SpecError, validate_spec
    from tests.conftest import BASE_SPEC, merge

    raw = merge(BASE_SPEC, {})
    raw["stages"] = [{**STAGES[0], "min_workers": 3}]
    with pytest.raises(SpecError) as e:
        validate_spec(raw)
    assert "stages[0].min_workers: must be <= stages[0].workers (2), got 3" in str(e.value)


def test_keeper_resubmits_only_a_coordinator_that_died_without_a_final_status():
    from service.decisions import keeper_action

    assert keeper_action("succeeded", False, "SUCCEEDED", 0, 1) == "done"
    assert keeper_action("preempted", False, "SUCCEEDED", 0, 1) == "done"  # gave up waiting: final
    assert keeper_action("succeeded", True, "RUNNING", 0, 1) == "watch"  # still writing its summary
    assert keeper_action("pending", False, "PENDING", 0, 1) == "watch"  # not started yet
    assert keeper_action("running", True, "RUNNING", 0, 1) == "watch"
    assert keeper_action("running", False, "RUNNING", 0, 1) == "watch"  # its Ray job has not ended yet
    assert keeper_action("running", False, "FAILED", 0, 1) == "resubmit"  # SIGKILL, OOM
    assert keeper_action("waiting_for_capacity", False, "STOPPED", 0, 2) == "resubmit"
    assert keeper_action("running", False, "FAILED", 1, 1) == "give_up"
    # a cancel request nobody took while the coordinator was down: the job ends cancelled
    assert keeper_action("running", False, "FAILED", 0, 1, cancel_requested=True) == "cancel"
    assert keeper_action("running", True, "RUNNING", 0, 1, cancel_requested=True) == "watch"  # it takes it


def test_a_stage_group_is_the_rows_on_one_worker_layout():
    spec, plan, _ = _job(
        stages=[{**STAGES[0], "workers": 1}, STAGES[1], STAGES[2], {**STAGES[2], "workers": 1}]
    )
    assert [group_end(plan, row) for row in range(4)] == [0, 2, 2, 3]


def test_relayout_mid_stage_keeps_the_layout_of_the_steps_already_run():
    """``JobRecord.relayout``, the one re-layout behind resume --workers, scale requests and elastic
    continuation: a stage interrupted at step 40 whose global batch halves is split there."""
    spec, plan, record = _job()
    resized = resize_remaining(spec, 1, 1)  # stage 2 (steps 32..159) and 3 on one worker
    new_plan, added = record.relayout(resized, 40, "resume", [], workers=1, from_stage=2)
    assert [(h.stage, h.until_step, h.workers) for h in added] == [(1, 40, 2)]
    assert record.history == added and [s.label for s in new_plan.stages] == ["1", "2.1", "2.2", "3"]
    assert new_plan.stages[1].step_end == 40 and new_plan.stages[2].global_batch == 32
    assert (
        record.layout_changes[-1].from_stage == 2
        and "ran steps before 40 with 2 workers" in record.events[-1]
    )
    assert record.plan() == new_plan  # the record now plans what the runner runs


def test_job_status_is_an_enum_spelled_as_in_job_json_and_a_succeeded_job_stays_succeeded():
    import json

    from service.decisions import Preempted
    from service.jobs import TERMINAL, JobStatus

    spec, plan, record = _job()
    assert record.status is JobStatus.PENDING and not record.status.terminal
    assert json.loads(record.model_dump_json())["status"] == "pending"
    record.move("running")  # as read from a job file or a CLI option
    assert record.status is JobStatus.RUNNING and f"{record.status}" == "running" == record.status
    record.settle(0, Preempted("stopped"), step=3)
    assert record.status is JobStatus.PREEMPTED and record.stages[0].status == "preempted"
    assert record.events[-1].endswith("preempted at step 3: stopped")  # the value, not JobStatus.PREEMPTED
    again = type(record).model_validate_json(record.model_dump_json())
    assert again.status is JobStatus.PREEMPTED and again.status.terminal and again.status in TERMINAL
    record.move(JobStatus.RUNNING)  # resumed
    record.finish(plan.total_steps)
    with pytest.raises(ValueError, match="job j has succeeded: its status cannot become running"):
        record.move(JobStatus.RUNNING)
    with pytest.raises(ValueError):
        record.move("finished")  # not a status
    assert record.status is JobStatus.SUCCEEDED
