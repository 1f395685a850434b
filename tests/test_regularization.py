"""Per-stage regularization (``regularization`` and ``stages[].regularization``): the spec's fields and
their per-stage merge, seeded mixup/cutmix and RandAugment/random erasing, an exact mid-stage resume with
all of them on, and the plan's per-stage line."""

from __future__ import annotations

import pytest
import torch

from checkpoints.checkpointer import load
from service.plan import build_plan
from service.report import regularization_lines
from service.spec import SpecError
from tests.conftest import make_spec
from tests.helpers import REPO, assert_same, stagetrain
from tests.jobs import TINY_IN_PROCESS
from tests.test_runner import store
from workers.control import StopAfter
from workers.data import StageDataset, SyntheticImages, mix_batch
from workers.train import StageRunner

ALL_ON = {"mixup_alpha": 0.4, "cutmix_alpha": 1.0, "mix_prob": 0.9, "switch_prob": 0.5}


def test_stage_fields_override_the_job_default_field_by_field():
    spec = make_spec(
        train={"label_smoothing": 0.05},
        regularization={"mixup_alpha": 0.1, "randaugment": {"num_ops": 2, "magnitude": 5}},
        stages=[
            {"resolution": 16, "epochs": 1, "batch_size": 64},
            {
                "resolution": 32,
                "epochs": 1,
                "batch_size": 64,
                "regularization": {"label_smoothing": 0.2, "mixup_alpha": 0.8, "random_erasing": 0.25},
            },
        ],
    )
    low, high = spec.stage_regularization(0), spec.stage_regularization(1)
    assert (low.label_smoothing, low.mixup_alpha, low.random_erasing) == (0.05, 0.1, 0.0)
    assert (high.label_smoothing, high.mixup_alpha, high.random_erasing) == (0.2, 0.8, 0.25)
    assert low.randaugment == high.randaugment and high.randaugment.magnitude == 5
    assert (high.cutmix_alpha, high.mix_prob, high.switch_prob) == (0.0, 1.0, 0.5)  # the defaults
    off = make_spec().stage_regularization(0)
    assert not off.mixes and off.randaugment is None and off.label_smoothing == 0.0


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (
            {
                "stages": [
                    {"resolution": 16, "epochs": 1, "batch_size": 64},
                    {"resolution": 32, "epochs": 1, "batch_size": 64, "regularization": {"mixup_alpha": -1}},
                ]
            },
            "stages[1].regularization.mixup_alpha: must be >= 0, got -1",
        ),
        ({"regularization": {"mix_prob": 1.5}}, "regularization.mix_prob: must be <= 1, got 1.5"),
        ({"regularization": {"dropout": 1}}, "regularization.dropout: must be < 1, got 1"),
        ({"regularization": {"drop_path": -0.1}}, "regularization.drop_path: must be >= 0, got -0.1"),
        ({"regularization": {"label_smoothing": 1}}, "regularization.label_smoothing: must be < 1, got 1"),
        (
            {"regularization": {"randaugment": {"num_ops": 2, "magnitude": 31}}},
            "regularization.randaugment.magnitude: must be <= 30, got 31",
        ),
        (
            {"regularization": {"mixup": 0.2}},
            "regularization.mixup: unknown field; did you mean 'mixup_alpha'?",
        ),
        (
            {"train": {"label_smoothing": 0.1}, "regularization": {"label_smoothing": 0.2}},
            "regularization.label_smoothing: train.label_smoothing (0.1) is also set, got 0.2; "
            "set one of them",
        ),
    ],
)
def test_bad_values_name_the_field(overrides, expected):
    with pytest.raises(SpecError) as e:
        make_spec(**overrides)
    assert expected in e.value.problems, e.value.problems


def _reg(**fields):
    return make_spec(regularization=fields).stage_regularization(0)


@pytest.mark.parametrize("fields", [{"mixup_alpha": 0.4}, {"cutmix_alpha": 1.0}, ALL_ON])
def test_mix_batch_is_a_function_of_its_keys(fields):
    reg = _reg(**fields)
    x, y = torch.rand(8, 3, 16, 16), torch.arange(8) % 10
    outs = {
        step: [mix_batch(x, y, 10, reg, seed=3, step=step, micro=0, rank=0) for _ in range(2)]
        for step in range(6)
    }
    for (a, ta), (b, tb) in outs.values():
        assert torch.equal(a, b) and torch.equal(ta, tb)
        assert torch.allclose(ta.sum(1), torch.ones(8))  # probabilities
    mixed = [s for s, ((a, _), _) in outs.items() if not torch.equal(a, x)]
    # other steps, other mixes (one image: a cutmix moves pixels within the batch, keeping its sum)
    assert mixed and len({outs[s][0][0][0].sum().item() for s in mixed}) > 1
    other = mix_batch(x, y, 10, reg, seed=3, step=mixed[0], micro=1, rank=0)[0]
    other_rank = mix_batch(x, y, 10, reg, seed=3, step=mixed[0], micro=0, rank=1)[0]
    assert not torch.equal(other, outs[mixed[0]][0][0]) or not torch.equal(other_rank, outs[mixed[0]][0][0])
    state = torch.get_rng_state()
    mix_batch(x, y, 10, reg, seed=3, step=0, micro=0, rank=0)
    assert torch.equal(state, torch.get_rng_state())  # the global stream is not touched


def test_randaugment_and_erasing_are_seeded_per_sample():
    source = SyntheticImages(8, 10, 3, seed=0, split="train")

    def dataset(**kw):
        return StageDataset(source, 16, train=True, seed=1, stage=0, **kw)

    strong = dataset(randaugment=(3, 15), random_erasing=1.0)
    first = [strong[(i, 0)][0] for i in range(8)]
    assert all(torch.equal(a, strong[(i, 0)][0]) for i, a in enumerate(first))  # same keys, same pixels
    assert all(
        torch.equal(a, dataset(randaugment=(3, 15), random_erasing=1.0)[(i, 0)][0])
        for i, a in enumerate(first)
    )
    assert any(not torch.equal(a, strong[(i, 1)][0]) for i, a in enumerate(first))  # another epoch
    plain = dataset()
    assert any(not torch.equal(a, plain[(i, 0)][0]) for i, a in enumerate(first))  # it does something
    assert all((a == 0).any() for a in first)  # p=1 erasing: a black rectangle in every image


# The smallest job that runs all of it: a tiny ResNet at 8 px, 8 steps, grad_accum 2.
JOB = dict(
    name="reg",
    **TINY_IN_PROCESS,
    regularization={"label_smoothing": 0.1, "randaugment": {"num_ops": 2, "magnitude": 9}},
    stages=[
        {
            "resolution": 8,
            "epochs": 2,
            "batch_size": 4,
            "workers": 1,
            "grad_accum": 2,
            "regularization": {**ALL_ON, "random_erasing": 0.5},
        }
    ],
    metrics={"every_n_steps": 2},
    checkpoint={"every_n_steps": 0, "keep_last": 1},
)


def run_job(url: str, stop: StopAfter | None = None):
    spec = make_spec(**JOB)
    return StageRunner(
        spec,
        build_plan(spec, spec.data.size),
        0,
        "j",
        url,
        stop_requested=stop,
        on_step=stop.on_step if stop else None,
    ).run()


def test_all_regularization_on_resumes_mid_stage_exactly(tmp_path):
    straight_url, resumed_url = str(tmp_path / "straight"), str(tmp_path / "resumed")
    run_job(straight_url)
    straight = _newest(straight_url)
    stopped = run_job(resumed_url, stop=StopAfter(4))
    assert stopped.preempted and stopped.step == 4
    end = run_job(resumed_url)
    assert end.restored_from == "step-000000004"
    final = _newest(resumed_url)
    for part in ("model", "optimizer", "rng"):
        assert_same(final[part], straight[part], part)


def _rates(model: torch.nn.Module) -> tuple[list[float], list[float]]:
    from torchvision.ops import StochasticDepth

    return (
        [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)],
        [round(m.p, 6) for m in model.modules() if isinstance(m, StochasticDepth)],
    )


def test_dropout_and_drop_path_follow_the_schedule_the_model_was_built_with():
    import torchvision

    from workers.models import set_stage_rates

    model = torchvision.models.efficientnet_b0(num_classes=10)  # stochastic depth 0.2, built growing
    built = _rates(model)[1]
    set_stage_rates(model, 0.3, 0.1, "efficientnet_b0")
    dropout, depth = _rates(model)
    assert dropout == [0.3] and depth[-1] == 0.1 and depth[0] == 0.0
    assert depth == pytest.approx([0.1 * b / max(built) for b in built], abs=1e-6)
    set_stage_rates(model, None, 0.4, "efficientnet_b0")  # the next stage: shares of the built rates
    assert _rates(model) == ([0.3], pytest.approx([0.4 * b / max(built) for b in built], abs=1e-6))
    with pytest.raises(ValueError, match=r"^regularization.dropout: tiny has no dropout layers"):
        set_stage_rates(torch.nn.Sequential(torch.nn.Linear(2, 2)), 0.1, None, "tiny")
    with pytest.raises(ValueError, match=r"^regularization.drop_path: tiny has no stochastic-depth"):
        set_stage_rates(torch.nn.Sequential(torch.nn.Dropout()), None, 0.1, "tiny")


# Two stages on one layout; dropout and stochastic depth grow at the boundary.
DEPTH_JOB = dict(
    name="depth",
    **{
        **TINY_IN_PROCESS,
        "model": {"arch": None, "builder": "tests.custom_parts:depth_net", "num_classes": 10},
    },
    stages=[
        {"resolution": 8, "epochs": 1, "batch_size": 8, "regularization": {"dropout": 0.1, "drop_path": 0.1}},
        {
            "resolution": 12,
            "epochs": 1,
            "batch_size": 8,
            "regularization": {"dropout": 0.5, "drop_path": 0.3},
        },
    ],
    metrics={"every_n_steps": 2},
    checkpoint={"every_n_steps": 0, "keep_last": 1},
)


def test_dropout_and_drop_path_per_stage_resume_mid_stage_exactly(tmp_path):
    """Built without stochastic depth, the blocks get drop_path x (i+1)/n; the rates change at the stage
    boundary in place (same workers), and a restore mid-stage 2 sets stage 2's rates and ends bit for
    bit as the run straight through."""
    spec = make_spec(**DEPTH_JOB)
    plan = build_plan(spec, spec.data.size)
    straight_url, resumed_url = str(tmp_path / "straight"), str(tmp_path / "resumed")
    runner = StageRunner(spec, plan, 0, "j", straight_url)
    assert _rates(runner.raw_model) == ([0.1], [0.05, 0.1])
    runner.run()
    runner.next_stage()
    assert _rates(runner.raw_model) == ([0.5], [0.15, 0.3])
    runner.run()
    straight = _newest(straight_url)

    resumed = _stopped_in_stage_2_and_restored(spec, plan, resumed_url)
    assert _rates(resumed.raw_model) == ([0.5], [0.15, 0.3])
    resumed.run()
    final = _newest(resumed_url)
    for part in ("model", "optimizer", "rng"):
        assert_same(final[part], straight[part], part)


def _stopped_in_stage_2_and_restored(spec, plan, url: str) -> StageRunner:
    """Stage 1 run, stage 2 stopped after its first 2 steps: the runner restored from there, not run yet."""
    StageRunner(spec, plan, 0, "j", url).run()
    stop = StopAfter(2)  # steps of this runner
    assert StageRunner(spec, plan, 1, "j", url, stop_requested=stop, on_step=stop.on_step).run().preempted
    resumed = StageRunner(spec, plan, 1, "j", url)
    assert resumed.restored_from == f"step-{plan.stages[1].step_start + 2:09d}"
    return resumed


def _newest(url: str) -> dict:
    """The newest committed checkpoint's state under ``url``."""
    return load(store(url), store(url).latest()[0].tag)[1]


def test_plan_prints_each_stages_effective_regularization():
    assert regularization_lines(make_spec(), build_plan(make_spec(), 4096)) == []  # nothing on: no lines
    result = stagetrain(
        "plan", f"{REPO}/examples/imagenet-progressive-learning.yaml", "--dataset-size", "1281167", check=True
    )
    out = " ".join(result.stdout.split())  # rich wraps long lines
    assert (
        "stage 1 regularization: label_smoothing 0.1, no mixup/cutmix, randaugment 2x5, random_erasing 0"
        in out
    )
    assert (
        "stage 3 regularization: label_smoothing 0.1, mixup_alpha 0.2, cutmix_alpha 1, mix_prob 1, "
        "switch_prob 0.5, randaugment 2x15, random_erasing 0.25"
    ) in out


# ---------------------------------------------------------------------------- regularization_ramp_steps

# DEPTH_JOB with everything growing at the boundary, stage 2 ramping over its first 4 of 8 steps.
RAMP_JOB = {
    **DEPTH_JOB,
    "name": "ramp",
    "stages": [
        {
            "resolution": 8,
            "epochs": 1,
            "batch_size": 8,
            "regularization": {"dropout": 0.1, "drop_path": 0.1, "label_smoothing": 0.1},
        },
        {
            "resolution": 12,
            "epochs": 1,
            "batch_size": 8,
            "regularization_ramp_steps": 4,
            "regularization": {
                "dropout": 0.5,
                "drop_path": 0.3,
                "label_smoothing": 0.2,
                "mixup_alpha": 0.8,
                "cutmix_alpha": 1.0,
                "randaugment": {"num_ops": 2, "magnitude": 10},
                "random_erasing": 0.5,
            },
        },
    ],
}


def test_a_regularization_ramp_moves_every_number_from_the_previous_stages():
    from service.curve import regularization

    spec = make_spec(**RAMP_JOB)
    plan = build_plan(spec, spec.data.size)
    start = plan.stages[1].step_start
    ramp = [regularization(spec, plan, start + k) for k in range(5)]
    for k, r in enumerate(ramp[:4]):
        t = (k + 1) / 5
        assert r.dropout == pytest.approx(0.1 + 0.4 * t) and r.drop_path == pytest.approx(0.1 + 0.2 * t)
        assert r.label_smoothing == pytest.approx(0.1 + 0.1 * t) and r.mixup_alpha == pytest.approx(0.8 * t)
        assert r.random_erasing == pytest.approx(0.5 * t)
        assert (r.randaugment.num_ops, r.randaugment.magnitude) == (round(2 * t), round(10 * t))
    assert ramp[4] == spec.stage_regularization(1)  # the ramp is over
    assert regularization(spec, plan, start - 1) == spec.stage_regularization(0)
    lines = regularization_lines(spec, plan)
    assert lines[1].endswith("(from stage 1's over its first 4 steps)") and "from" not in lines[0]


@pytest.mark.parametrize(
    "stages,expected",
    [
        (
            [{"resolution": 8, "epochs": 1, "batch_size": 8, "regularization_ramp_steps": 2}],
            "stages[0].regularization_ramp_steps: the first stage has no earlier regularization",
        ),
        (
            [
                {"resolution": 8, "epochs": 1, "batch_size": 8},
                {"resolution": 8, "epochs": 1, "batch_size": 8, "regularization_ramp_steps": 8},
            ],
            "stages[1].regularization_ramp_steps: must be fewer than the stage's 8 steps, got 8",
        ),
        (
            [
                {"resolution": 8, "epochs": 1, "batch_size": 8},
                {"resolution": 8, "epochs": 1, "batch_size": 8, "regularization_ramp_steps": -1},
            ],
            "stages[1].regularization_ramp_steps: must be >= 0, got -1",
        ),
    ],
)
def test_a_bad_regularization_ramp_names_the_field(stages, expected):
    with pytest.raises(SpecError) as e:
        spec = make_spec(**{**TINY_IN_PROCESS, "stages": stages})
        build_plan(spec, spec.data.size)
    assert any(expected in p for p in e.value.problems), e.value.problems


def test_a_ramped_stage_augments_each_sample_by_its_step():
    source = SyntheticImages(8, 10, 3, seed=0, split="train")

    def dataset(**kw):
        return StageDataset(source, 16, train=True, seed=1, stage=0, **kw)

    ramped = dataset(randaugment=(3, 15), random_erasing=1.0, augment_at={0: ((0, 0), 0.0), 1: ((2, 7), 0.5)})
    plain, strong, middle = (
        dataset(),
        dataset(randaugment=(3, 15), random_erasing=1.0),
        dataset(randaugment=(2, 7), random_erasing=0.5),
    )
    for i in range(8):
        assert torch.equal(ramped[(i, 0, 0)][0], plain[(i, 0)][0])  # the ramp's start: none yet
        assert torch.equal(ramped[(i, 0, 1)][0], middle[(i, 0)][0])  # on the way
        assert torch.equal(ramped[(i, 0, 5)][0], strong[(i, 0)][0])  # past the ramp: the stage's own
        assert torch.equal(ramped[(i, 0, 1)][0], ramped[(i, 0, 1)][0])  # same keys, same pixels


def test_a_regularization_ramp_resumes_mid_ramp_exactly(tmp_path):
    """Stage 2 ramps dropout, drop-path, label smoothing, mixup/cutmix, RandAugment and erasing over its
    first 4 steps: a run stopped 2 steps into the ramp and restored ends bit for bit as the run straight
    through, with stage 2's own rates once the ramp is over."""
    spec = make_spec(**RAMP_JOB)
    plan = build_plan(spec, spec.data.size)
    straight_url, resumed_url = str(tmp_path / "straight"), str(tmp_path / "resumed")
    runner = StageRunner(spec, plan, 0, "j", straight_url)
    runner.run()
    runner.next_stage()
    runner.run()
    assert _rates(runner.raw_model) == ([0.5], [0.15, 0.3])
    straight = _newest(straight_url)

    _stopped_in_stage_2_and_restored(spec, plan, resumed_url).run()
    final = _newest(resumed_url)
    for part in ("model", "optimizer", "rng"):
        assert_same(final[part], straight[part], part)
    # and the ramp changed the training: without it, another end
    flat = make_spec(
        **{
            **RAMP_JOB,
            "stages": [RAMP_JOB["stages"][0], {**RAMP_JOB["stages"][1], "regularization_ramp_steps": 0}],
        }
    )
    other_url = str(tmp_path / "flat")
    runner = StageRunner(flat, build_plan(flat, flat.data.size), 0, "j", other_url)
    runner.run()
    runner.next_stage()
    runner.run()
    other = _newest(other_url)
    assert any(not torch.equal(other["model"][k], straight["model"][k]) for k in straight["model"])
