"""The LR/momentum schedules are pure functions of (plan, step); these pin them to torch's own."""

from __future__ import annotations

import math

import pytest
import torch

from service.curve import curve, lr_factor, lr_momentum, resolution
from service.plan import build_plan
from service.report import step_rows
from service.spec import SpecError
from tests.conftest import make_spec
from workers.schedules import PlanScheduler

N = 4096


def _optimizer(name: str) -> torch.optim.Optimizer:
    params = [torch.nn.Parameter(torch.zeros(2))]
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(params, lr=0.1, betas=(0.9, 0.999))


def _momentum(opt: torch.optim.Optimizer) -> float:
    group = opt.param_groups[0]
    return group["betas"][0] if "betas" in group else group["momentum"]


def _drive(scheduler, opt, steps):
    """(lr, momentum) the optimizer holds at each optimizer step, stepping like a training loop."""
    out = []
    for _ in range(steps):
        out.append((opt.param_groups[0]["lr"], _momentum(opt)))
        opt.step()
        scheduler.step()
    return out


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b), 1e-300)


# Constant global batch (128) through stages that reach it differently.
CONSTANT_BATCH_STAGES = [
    {"resolution": 16, "epochs": 2, "data_fraction": 0.5, "batch_size": 64, "workers": 2},
    {"resolution": 24, "epochs": 1, "data_fraction": 0.75, "batch_size": 128, "workers": 1},
    {"resolution": 32, "epochs": 1.5, "data_fraction": 1.0, "batch_size": 32, "workers": 2, "grad_accum": 2},
]


@pytest.mark.parametrize("progress", ["samples", "steps"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("anneal", ["cos", "linear"])
def test_global_onecycle_equals_torch_onecycle(progress, optimizer, anneal):
    opt_spec = {"name": "sgd", "momentum": 0.9, "nesterov": True} if optimizer == "sgd" else {"name": "adamw"}
    spec = make_spec(
        stages=CONSTANT_BATCH_STAGES,
        optimizer=opt_spec,
        schedule={"progress": progress, "anneal": anneal},
        lr_scaling={"rule": "none"},
    )
    plan = build_plan(spec, N)
    assert {s.global_batch for s in plan.stages} == {128}
    sch = spec.schedule
    ours_opt, ref_opt = _optimizer(optimizer), _optimizer(optimizer)
    ours = _drive(PlanScheduler(ours_opt, plan), ours_opt, plan.total_steps)
    ref = torch.optim.lr_scheduler.OneCycleLR(
        ref_opt,
        max_lr=sch.max_lr,
        total_steps=plan.total_steps,
        pct_start=sch.pct_start,
        div_factor=sch.div_factor,
        final_div_factor=sch.final_div_factor,
        anneal_strategy=sch.anneal,
        cycle_momentum=sch.cycle_momentum,
        base_momentum=sch.base_momentum,
        max_momentum=sch.max_momentum,
    )
    theirs = _drive(ref, ref_opt, plan.total_steps)
    assert len(ours) == plan.total_steps == 32 + 24 + 48
    for step, ((lr, m), (lr_ref, m_ref)) in enumerate(zip(ours, theirs, strict=True)):
        assert _close(lr, lr_ref), (step, lr, lr_ref)
        assert _close(m, m_ref), (step, m, m_ref)


def test_per_stage_onecycle_equals_fresh_onecycle_per_stage():
    stages = [dict(s) for s in CONSTANT_BATCH_STAGES]
    stages[1]["max_lr"] = 0.2
    stages[2]["pct_start"] = 0.4
    spec = make_spec(stages=stages, schedule={"strategy": "per_stage_onecycle"})
    plan = build_plan(spec, N)
    opt = _optimizer("sgd")
    ours = _drive(PlanScheduler(opt, plan), opt, plan.total_steps)
    sch = spec.schedule
    for stage in plan.stages:
        ref_opt = _optimizer("sgd")
        ref = torch.optim.lr_scheduler.OneCycleLR(
            ref_opt,
            max_lr=stage.max_lr,
            total_steps=stage.steps,
            pct_start=stage.pct_start,
            div_factor=sch.div_factor,
            final_div_factor=sch.final_div_factor,
            anneal_strategy=sch.anneal,
            base_momentum=sch.base_momentum,
            max_momentum=sch.max_momentum,
        )
        theirs = _drive(ref, ref_opt, stage.steps)
        for k, (lr_ref, m_ref) in enumerate(theirs):
            lr, m = ours[stage.step_start + k]
            assert _close(lr, lr_ref) and _close(m, m_ref), (stage.index, k)
    assert plan.stages[1].max_lr == 0.2 and plan.stages[2].pct_start == 0.4


def test_per_stage_cosine_equals_cosine_annealing_per_stage():
    spec = make_spec(stages=CONSTANT_BATCH_STAGES, schedule={"strategy": "per_stage_cosine", "min_lr": 0.001})
    plan = build_plan(spec, N)
    opt = _optimizer("sgd")
    ours = _drive(PlanScheduler(opt, plan), opt, plan.total_steps)
    for stage in plan.stages:
        ref_opt = _optimizer("sgd")
        ref_opt.param_groups[0]["lr"] = stage.max_lr
        ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=stage.steps, eta_min=0.001)
        theirs = _drive(ref, ref_opt, stage.steps)
        for k, (lr_ref, _) in enumerate(theirs):
            lr, m = ours[stage.step_start + k]
            assert _close(lr, lr_ref), (stage.index, k, lr, lr_ref)
            assert m == 0.9  # momentum is not cycled by cosine: the optimizer's own


def test_samples_progress_gives_each_stage_the_same_share_of_the_curve():
    # Stage 2 at half the global batch takes twice the steps but covers the same samples,
    # so the curve at the end of stage 2 is at the same place either way.
    base = [
        {"resolution": 16, "epochs": 1, "data_fraction": 1.0, "batch_size": 64, "workers": 2},
        {"resolution": 24, "epochs": 1, "data_fraction": 1.0, "batch_size": 64, "workers": 2},
        {"resolution": 32, "epochs": 1, "data_fraction": 1.0, "batch_size": 64, "workers": 2},
    ]
    halved = [dict(s) for s in base]
    halved[1]["workers"] = 1
    a, b = build_plan(make_spec(stages=base), N), build_plan(make_spec(stages=halved), N)
    assert b.stages[1].steps == 2 * a.stages[1].steps
    assert a.total_samples == b.total_samples
    # stage 1 identical, stage boundaries at the same curve position
    for step in range(a.stages[0].steps):
        assert curve(a, step) == curve(b, step)
    assert curve(a, a.stages[2].step_start) == curve(b, b.stages[2].step_start)
    # and a later stage's batch/worker change does not move any LR already applied
    later = [dict(s) for s in base]
    later[2].update(batch_size=32, workers=1, grad_accum=4)  # same global batch by accumulation
    later2 = [dict(s) for s in base]
    later2[2].update(batch_size=128, workers=2)  # twice the global batch
    for other in (later, later2):
        c = build_plan(make_spec(stages=other, lr_scaling={"rule": "linear"}), N)
        for step in range(a.stages[2].step_start):
            assert lr_momentum(c, step) == lr_momentum(a, step)


def test_steps_progress_spends_more_curve_on_small_batch_stages():
    stages = [
        {"resolution": 16, "epochs": 1, "data_fraction": 1.0, "batch_size": 64, "workers": 2},
        {"resolution": 24, "epochs": 1, "data_fraction": 1.0, "batch_size": 64, "workers": 1},
    ]
    plan = build_plan(make_spec(stages=stages, schedule={"progress": "steps"}), N)
    # half the samples, but a third of the steps: the boundary is at 1/3 of the curve
    assert plan.stages[1].step_start * 3 == plan.total_steps


@pytest.mark.parametrize(
    "rule,expected",
    [("linear", [1.0, 2.0, 0.5]), ("sqrt", [1.0, math.sqrt(2), math.sqrt(0.5)]), ("none", [1.0, 1.0, 1.0])],
)
def test_lr_scaling_rules(rule, expected):
    stages = [
        {"resolution": 16, "epochs": 1, "batch_size": 64, "workers": 2},
        {"resolution": 24, "epochs": 1, "batch_size": 64, "workers": 4},
        {"resolution": 32, "epochs": 1, "batch_size": 32, "workers": 2},
    ]
    plan = build_plan(make_spec(stages=stages, lr_scaling={"rule": rule}), N)
    assert [s.lr_scale for s in plan.stages] == pytest.approx(expected)
    for stage in plan.stages:
        for step in (stage.step_start, stage.step_end - 1):
            lr, m = lr_momentum(plan, step)
            lr0, m0 = curve(plan, step)
            assert lr == pytest.approx(lr0 * stage.lr_scale, rel=1e-12)
            assert m == m0  # momentum is never scaled


def test_reference_batch_sets_where_max_lr_holds():
    stages = [{"resolution": 16, "epochs": 1, "batch_size": 64, "workers": 2}]
    plan = build_plan(make_spec(stages=stages, lr_scaling={"rule": "linear", "reference_batch": 256}), N)
    assert plan.reference_batch == 256 and plan.stages[0].lr_scale == 0.5


def test_ramp_moves_factor_linearly_from_previous_stage():
    stages = [
        {"resolution": 16, "epochs": 1, "batch_size": 64, "workers": 2},
        {"resolution": 24, "epochs": 1, "batch_size": 64, "workers": 4},
    ]
    plan = build_plan(make_spec(stages=stages, lr_scaling={"rule": "linear", "ramp_steps": 4}), N)
    start = plan.stages[1].step_start
    assert [lr_factor(plan, start + k) for k in range(6)] == [1.0, 1.25, 1.5, 1.75, 2.0, 2.0]
    assert lr_factor(plan, start - 1) == 1.0


def test_stage_warmup_ramps_the_lr_into_later_stages_only():
    stages = [
        {"resolution": 16, "epochs": 1, "batch_size": 64, "workers": 2},
        {"resolution": 24, "epochs": 1, "batch_size": 64, "workers": 2},
    ]
    plain = build_plan(make_spec(stages=stages), N)
    warm = build_plan(make_spec(stages=stages, schedule={"stage_warmup_steps": 4}), N)
    start = warm.stages[1].step_start
    for k in range(start):  # stage 1 untouched
        assert lr_momentum(warm, k) == lr_momentum(plain, k)
    for k, f in enumerate([0.25, 0.5, 0.75, 1.0, 1.0]):
        lr, momentum = lr_momentum(warm, start + k)
        assert lr == pytest.approx(f * lr_momentum(plain, start + k)[0])
        assert momentum == lr_momentum(plain, start + k)[1]  # momentum is not warmed up


def test_resolution_ramp_grows_from_the_previous_stage():
    stages = [
        {"resolution": 16, "epochs": 1, "batch_size": 64, "workers": 2},
        {"resolution": 24, "epochs": 1, "batch_size": 64, "workers": 2, "resolution_ramp_steps": 3},
    ]
    plan = build_plan(make_spec(stages=stages), N)
    start = plan.stages[1].step_start
    assert [resolution(plan, start + k) for k in range(-1, 5)] == [16, 18, 20, 22, 24, 24]
    assert [r["resolution"] for r in step_rows(plan)][start : start + 4] == [18, 20, 22, 24]


def test_resolution_ramp_errors_name_the_field():
    with pytest.raises(SpecError, match=r"stages\[0\].resolution_ramp_steps: the first stage has no earlier"):
        make_spec(stages=[{"resolution": 16, "epochs": 1, "batch_size": 64, "resolution_ramp_steps": 2}])
    stages = [
        {"resolution": 16, "epochs": 1, "batch_size": 64, "workers": 2},
        {"resolution": 24, "epochs": 1, "batch_size": 64, "workers": 2, "resolution_ramp_steps": 10_000},
    ]
    with pytest.raises(SpecError, match=r"stages\[1\].resolution_ramp_steps: must be fewer than the stage's"):
        build_plan(make_spec(stages=stages), N)


@pytest.mark.parametrize("progress", ["samples", "steps"])
def test_global_onecycle_never_reheats(progress):
    stages = [
        {"resolution": 16, "epochs": 2, "data_fraction": 0.25, "batch_size": 128, "workers": 2},
        {"resolution": 24, "epochs": 2, "data_fraction": 0.5, "batch_size": 48, "workers": 2},
        {"resolution": 32, "epochs": 1, "data_fraction": 1.0, "batch_size": 32, "workers": 1},
    ]
    plan = build_plan(
        make_spec(stages=stages, schedule={"progress": progress}, lr_scaling={"rule": "linear"}), N
    )
    lrs = [curve(plan, k)[0] for k in range(plan.total_steps)]  # scale factor removed
    diffs = [abs(b - a) for a, b in zip(lrs, lrs[1:], strict=False)]
    boundaries = {s.step_start - 1 for s in plan.stages[1:]}
    within = max(d for k, d in enumerate(diffs) if k not in boundaries)
    for k in boundaries:
        assert diffs[k] <= within, (k, diffs[k], within)
    # ...whereas per-stage OneCycle does re-heat
    per_stage = build_plan(make_spec(stages=stages, schedule={"strategy": "per_stage_onecycle"}), N)
    start = per_stage.stages[1].step_start
    assert curve(per_stage, start + per_stage.stages[1].steps // 4)[0] > 10 * curve(per_stage, start - 1)[0]


def test_stepping_past_the_end_raises_naming_the_total():
    plan = build_plan(make_spec(), N)
    opt = _optimizer("sgd")
    scheduler = PlanScheduler(opt, plan)
    for _ in range(plan.total_steps):
        opt.step()
        scheduler.step()
    with pytest.raises(ValueError, match=f"total of {plan.total_steps} optimizer steps"):
        scheduler.step()
    with pytest.raises(ValueError, match=f"it has {plan.total_steps} steps"):
        lr_momentum(plan, plan.total_steps)


def test_scheduler_state_is_the_step_counter_and_resumes_on_the_curve():
    plan = build_plan(make_spec(), N)
    opt = _optimizer("sgd")
    scheduler = PlanScheduler(opt, plan)
    straight = _drive(scheduler, opt, 40)
    state = scheduler.state_dict()
    assert state == {"step": 40}
    after = _drive(scheduler, opt, 5)

    opt2 = _optimizer("sgd")
    resumed = PlanScheduler(opt2, plan)
    resumed.load_state_dict(state)
    assert _drive(resumed, opt2, 5) == after
    opt3 = _optimizer("sgd")
    assert _drive(PlanScheduler(opt3, plan, start_step=40), opt3, 5) == after
    assert straight[0][0] == pytest.approx(0.4 / 25)
