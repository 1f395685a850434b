"""Bring your own model and data: a builder and a dataset factory from a module of the user's
(``tests/custom_parts.py``), training options (label smoothing, gradient clipping, validation
resolution), exact resume with all of them, and ``stagetrain export``."""

from __future__ import annotations

import shutil

import pytest
import torch

from checkpoints.checkpointer import load
from checkpoints.storage import Storage
from checkpoints.store import MODEL_FILE, CheckpointStore
from service.plan import build_plan
from service.spec import SpecError
from tests.conftest import BASE_SPEC, make_spec, merge
from tests.custom_parts import stripes
from tests.helpers import assert_same, stagetrain
from tests.jobs import read_metrics, write_job
from workers.control import StopAfter
from workers.data import open_source
from workers.models import build_model, load_exported
from workers.train import StageRunner

CUSTOM = dict(
    name="custom",
    deterministic=True,
    model={
        "arch": None,
        "builder": "tests.custom_parts:tiny_net",
        "kwargs": {"width": 6},
        "num_classes": 4,
        "in_channels": 1,
    },
    data={
        "kind": "custom",
        "factory": "tests.custom_parts:stripes",
        "kwargs": {"size": 64},
        "loader_workers": 0,
        "val_resolution": 20,
        "crop_scale": [0.8, 1.0],
    },
    train={"label_smoothing": 0.1, "grad_clip_norm": 0.5},
    stages=[
        {"resolution": 12, "epochs": 1, "batch_size": 16, "workers": 1},
        {
            "resolution": 16,
            "epochs": 2,
            "batch_size": 8,
            "workers": 1,
            "grad_accum": 2,
            "resolution_ramp_steps": 2,
        },
    ],
    metrics={"every_n_steps": 2},
    checkpoint={"every_n_steps": 0},
)


def run_stage(url: str, row: int, stop: StopAfter | None = None):
    spec = make_spec(**CUSTOM)
    runner = StageRunner(
        spec, build_plan(spec, 64), row, "c", url, stop_requested=stop, on_step=stop.on_step if stop else None
    )
    return runner, runner.run()


def store(url: str) -> CheckpointStore:
    return CheckpointStore(Storage(url).child("c", "checkpoints"))


def test_builder_gets_kwargs_and_a_one_channel_stem():
    model = build_model(make_spec(**CUSTOM).model)
    assert model[0].in_channels == 1 and model[0].out_channels == 6 and model[-1].out_features == 4
    assert model(torch.zeros(2, 1, 12, 12)).shape == (2, 4)


def test_timm_models_by_name_with_their_own_one_channel_stem():
    spec = make_spec(model={"arch": "timm/test_resnet", "num_classes": 10, "in_channels": 1})
    model = build_model(spec.model)
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 10)
    with pytest.raises(
        ValueError, match=r"model.arch: unknown timm model 'test_resnett'; did you mean 'timm/test_resnet'"
    ):
        build_model(make_spec(model={"arch": "timm/test_resnett", "num_classes": 10}).model)


def test_custom_source_converts_pil_images_and_checks_tensors():
    spec = make_spec(**CUSTOM)
    source = open_source(spec.data, 1, 0, "train")
    image, label = source[5]
    assert image.dtype == torch.uint8 and image.shape == (1, 20, 20) and label == 1
    rgb = open_source(spec.data, 3, 0, "train")[5][0]
    assert rgb.shape == (3, 20, 20)  # PIL images follow model.in_channels


def test_custom_parts_resume_exactly_mid_stage(tmp_path):
    """Stage 2 stopped after 3 steps and resumed by a fresh runner ends bit-identical to a straight run:
    the user's dataset order, augmentation, dropout, label smoothing and clipping all replay exactly."""
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    run_stage(straight, 0)
    shutil.copytree(straight, stopped)
    run_stage(straight, 1)
    _, end = run_stage(stopped, 1, stop=StopAfter(3))
    assert end.preempted
    resumed, end = run_stage(stopped, 1)
    assert not end.preempted and end.restored_from is not None
    a = load(store(straight), store(straight).latest()[0].tag)[1]
    b = load(store(stopped), store(stopped).latest()[0].tag)[1]
    for key in ("model", "optimizer", "rng"):
        assert_same(a[key], b[key], key)
    assert end.val_acc is not None  # evaluated at data.val_resolution (20 px)


def _first_two_steps_move(tmp_path, clip) -> tuple[float, float]:
    """(weight change over the first 2 optimizer steps, the LRs of those steps summed)."""
    from service.curve import lr_momentum

    spec = make_spec(**merge(CUSTOM, {"train": {"grad_clip_norm": clip}}))
    plan = build_plan(spec, 64)
    runner = StageRunner(spec, plan, 0, "c", str(tmp_path), stop_requested=lambda: True)
    before = torch.cat([p.detach().flatten().clone() for p in runner.raw_model.parameters()])
    runner.run()  # stops at the first report: 2 steps
    after = torch.cat([p.detach().flatten() for p in runner.raw_model.parameters()])
    return float((after - before).norm()), lr_momentum(plan, 0)[0] + lr_momentum(plan, 1)[0]


def test_grad_clip_norm_bounds_the_update(tmp_path):
    """Clipped to 1e-3, two SGD steps (nesterov, momentum 0.9) move the weights by at most about
    (lr0 + lr1) x 2 x 1e-3 (plus weight decay); unclipped they move far more."""
    clipped, lrs = _first_two_steps_move(tmp_path / "a", 1e-3)
    free, _ = _first_two_steps_move(tmp_path / "b", None)
    assert 0 < clipped <= lrs * 2 * 1e-3 * 1.5
    assert free > 20 * clipped


@pytest.mark.parametrize(
    ("edits", "line"),
    [
        ({"data": {"kind": "custom"}}, "data.factory: required field is missing"),
        (
            {"data": {"kind": "custom", "factory": "a.b"}},
            "data.factory: expected 'package.module:function', got 'a.b'",
        ),
        (
            {"data": {"kind": "synthetic", "size": 8, "val_resolution": 4}},
            "data.val_resolution: must be >= 8, got 4",
        ),
        (
            {"train": {"precision": "fp8"}},
            "train.precision: expected one of 'bf16', 'fp16', 'fp32', got 'fp8'",
        ),
        ({"train": {"label_smoothing": 1.0}}, "train.label_smoothing: must be < 1, got 1.0"),
        ({"train": {"grad_clip_norm": 0}}, "train.grad_clip_norm: must be > 0, got 0"),
    ],
)
def test_new_fields_bad_input_names_the_field(edits, line):
    raw = merge(BASE_SPEC, {k: v for k, v in edits.items() if k != "data"})
    if "data" in edits:
        raw["data"] = edits["data"]
    from service.spec import validate_spec

    with pytest.raises(SpecError) as e:
        validate_spec(raw)
    assert line in e.value.problems


def test_factory_that_cannot_be_imported_or_returns_no_dataset_is_exit_2(tmp_path):
    for factory, words in [
        ("tests.no_such_module:f", "data.factory: cannot import 'tests.no_such_module'"),
        (
            "tests.custom_parts:stripe",
            "data.factory: 'tests.custom_parts' has no function 'stripe'; did you mean "
            "tests.custom_parts:stripes?",
        ),
        ("tests.custom_parts:not_a_dataset", "returned int, not a map-style Dataset"),
    ]:
        spec = merge(BASE_SPEC, {})
        spec["data"] = {"kind": "custom", "factory": factory}
        proc = stagetrain("run", write_job(tmp_path, spec), "--storage", str(tmp_path / "runs"))
        assert proc.returncode == 2 and words in proc.stderr, proc.stderr
        assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.ray
def test_custom_job_on_ray_then_export(tmp_path, on_head):
    spec = merge(BASE_SPEC, {k: v for k, v in CUSTOM.items() if k != "data"})
    spec["data"] = CUSTOM["data"]
    for stage in spec["stages"]:  # one worker layout: the three stages run in one fit
        stage["workers"] = 2
    spec["metrics"] = {"every_n_steps": 2, "eval_every_n_steps": 3, "sinks": ["tensorboard"]}
    storage = str(tmp_path / "runs")
    stagetrain(
        "run", write_job(tmp_path, spec), "--job-id", "byo", "--storage", storage, env=on_head, check=True
    )
    check_tensorboard(f"{storage}/byo")
    out = tmp_path / "model.pt"
    proc = stagetrain("export", "byo", "--storage", storage, "-o", str(out), check=True)
    assert "load_exported" in proc.stdout
    model = load_exported(str(out)).eval()
    final = store_of(storage).latest()[0].tag
    weights = torch.load(f"{storage}/byo/checkpoints/{final}/{MODEL_FILE}", weights_only=True)
    assert_same(model.state_dict(), weights, "exported weights")
    x = torch.stack([open_source(make_spec(**CUSTOM).data, 1, 0, "val")[i][0] for i in range(4)]).float()
    assert model(x / 255).shape == (4, 4)
    # (that export never overwrites -o: test_api.py::test_export_writes_the_newest_checkpoint_*)
    assert stripes("val")[0][1] == 0


def check_tensorboard(job_dir: str) -> None:
    """The event files hold what metrics.jsonl holds, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = read_metrics(job_dir)
    steps = [m for m in metrics if m["kind"] == "step"]
    acc = EventAccumulator(f"{job_dir}/tensorboard", size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [m["step"] for m in steps]
    assert [e.value for e in loss] == pytest.approx([m["loss"] for m in steps], rel=1e-6)
    assert [e.value for e in acc.Scalars("train/resolution")] == [m["resolution"] for m in steps]
    assert [e.value for e in acc.Scalars("train/lr")] == pytest.approx([m["lr"] for m in steps], rel=1e-6)
    boundary = next(e.step for e in acc.Scalars("train/stage") if e.value == 2)
    assert boundary == next(m["step"] for m in steps if m["stage"] == 2)
    evals = [m for m in metrics if m["kind"] in ("eval", "stage_end") and "val_acc" in m]
    assert [(e.step, e.value) for e in acc.Scalars("val/top1")] == [
        (m["step"], pytest.approx(m["val_acc"])) for m in evals
    ]
    spec_text = acc.Tensors("spec/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "tests.custom_parts:tiny_net" in spec_text


def store_of(storage: str) -> CheckpointStore:
    return CheckpointStore(Storage(storage).child("byo", "checkpoints"))


@pytest.mark.parametrize("root", ["local", "memory://tb-sink"])
def test_tensorboard_sink_writes_and_continues_on_any_storage(tmp_path, root):
    """Local storage gets the event files directly; an object store (memory:// here) gets them uploaded
    at each stage end; a second coordinator continuing at step 3 purges what came after it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from service.jobs import JobStore, StageEnd, StepRecord
    from service.sinks import TensorBoardSink

    url = str(tmp_path / "runs") if root == "local" else root
    jobs = JobStore(Storage(url), "tb")
    spec = make_spec(metrics={"sinks": ["tensorboard"]})

    def step(k: int, loss: float) -> StepRecord:
        return StepRecord(
            step=k,
            stage=1,
            epoch=0,
            samples_seen=8 * (k + 1),
            loss=loss,
            lr=0.1,
            momentum=0.9,
            resolution=16,
            global_batch=8,
            workers=1,
            grad_accum=1,
            images_per_s=10.0,
            time=1e9 + k,
        )

    first = TensorBoardSink(jobs, spec, start_step=0)
    first.write(
        [step(k, 1.0) for k in range(5)] + [StageEnd(stage=1, step=5, val_acc=0.5, val_loss=1.0, time=2e9)]
    )
    first.writer.close()  # a coordinator that died after its stage end
    second = TensorBoardSink(jobs, spec, start_step=3)
    second.write(
        [step(k, 2.0) for k in range(3, 6)] + [StageEnd(stage=1, step=5, val_acc=0.6, val_loss=0.9, time=3e9)]
    )
    second.close()
    local = tmp_path / "read"
    local.mkdir()
    for name in jobs.storage.listdir("tensorboard"):
        (local / name).write_bytes(jobs.storage.read_bytes("tensorboard", name))
    acc = EventAccumulator(str(local), size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [
        (0, 1.0),
        (1, 1.0),
        (2, 1.0),
        (3, 2.0),
        (4, 2.0),
        (5, 2.0),
    ]
    assert [(e.step, e.value) for e in acc.Scalars("val/top1")] == [(5, pytest.approx(0.6))]


def test_missing_sink_package_is_named(monkeypatch):
    import builtins

    from service.sinks import TensorBoardSink

    real = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ValueError, match="metrics.sinks: tensorboard needs the tensorboard package"):
        TensorBoardSink(None, make_spec(), 0)
