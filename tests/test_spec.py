"""Invalid job specs fail with a clear, specific error: the exact field path and what was expected.

Each mistake in ``MISTAKES`` is one realistic edit of ``BASE_SPEC`` and the whole problem line it must
produce, so a change in wording is a visible, reviewed change. A hypothesis fuzz then checks that no
input reaches the user as anything but ``SpecError`` lines of the form ``path: message``.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.plan import build_plan
from service.spec import SpecError, load_spec, parse_spec, validate_spec
from tests.conftest import BASE_SPEC, make_spec

ROOT = Path(__file__).resolve().parents[1]
DELETE = object()


# ----------------------------------------------------------------------------------------- helpers


def _keys(path: str) -> list[str | int]:
    """``stages[2].data_fraction`` -> ``["stages", 2, "data_fraction"]``."""
    return [int(k) if k.isdigit() else k for k in re.findall(r"[^.\[\]]+", path)]


def _edit(raw: dict, path: str, value) -> dict:
    """Set (or, with ``DELETE``, remove) the field at ``path`` in place, adding missing sections."""
    *parents, last = _keys(path)
    node = raw
    for key in parents:
        node = node.setdefault(key, {}) if isinstance(node, dict) else node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = copy.deepcopy(value)
    return raw


def _get(raw: dict, path: str):
    node = raw
    for key in _keys(path):
        node = node[key]
    return node


def _spec(edits: dict) -> dict:
    raw = copy.deepcopy(BASE_SPEC)
    for path, value in edits.items():
        _edit(raw, path, value)
    return raw


def _problems(raw) -> list[str]:
    with pytest.raises(SpecError) as info:
        validate_spec(raw)
    return info.value.problems


# ---------------------------------------------------------------------------- one mistake, one line

ADAMW = {"name": "adamw", "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}

# (id, edits to BASE_SPEC, a problem line that must appear verbatim)
MISTAKES = [
    # ranges and the stage's own validator
    (
        "fraction-above-1",
        {"stages[2].data_fraction": 1.5},
        "stages[2].data_fraction: must be in (0, 1], got 1.5",
    ),
    ("fraction-zero", {"stages[0].data_fraction": 0}, "stages[0].data_fraction: must be in (0, 1], got 0.0"),
    ("resolution-too-small", {"stages[1].resolution": 4}, "stages[1].resolution: must be >= 8, got 4"),
    (
        "resolution-too-large",
        {"stages[1].resolution": 5000},
        "stages[1].resolution: must be <= 4096, got 5000",
    ),
    ("epochs-negative", {"stages[0].epochs": -1}, "stages[0].epochs: must be > 0, got -1"),
    (
        "epochs-infinite",
        {"stages[0].epochs": float("inf")},
        "stages[0].epochs: expected a finite number, got inf",
    ),
    ("batch-size-zero", {"stages[1].batch_size": 0}, "stages[1].batch_size: must be > 0, got 0"),
    ("pct-start-one", {"schedule.pct_start": 1}, "schedule.pct_start: must be < 1, got 1"),
    ("num-classes-one", {"model.num_classes": 1}, "model.num_classes: must be >= 2, got 1"),
    ("seed-negative", {"seed": -1}, "seed: must be >= 0, got -1"),
    ("max-failures", {"failure.max_failures": -2}, "failure.max_failures: must be >= -1, got -2"),
    ("capacity-wait", {"failure.capacity_wait_s": -1}, "failure.capacity_wait_s: must be >= 0, got -1"),
    ("min-workers-zero", {"failure.min_workers": 0}, "failure.min_workers: must be > 0, got 0"),
    ("notice-poll", {"preemption.notice_poll_s": 0}, "preemption.notice_poll_s: must be > 0, got 0"),
    (
        "notice-unknown",
        {"preemption.notice": "awss"},
        "preemption.notice: expected none, aws, gcp or {url: http://...}, got 'awss'; did you mean 'aws'?",
    ),
    (
        "notice-url",
        {"preemption.notice": {"url": "ftp://x"}},
        "preemption.notice: expected none, aws, gcp or {url: http://...}, got {'url': 'ftp://x'}",
    ),
    ("keep-last-zero", {"checkpoint.keep_last": 0}, "checkpoint.keep_last: must be > 0, got 0"),
    (
        "reference-batch-zero",
        {"lr_scaling.reference_batch": 0},
        "lr_scaling.reference_batch: must be > 0, got 0",
    ),
    # wrong types
    (
        "resolution-string",
        {"stages[1].resolution": "big"},
        "stages[1].resolution: expected an integer, got 'big'",
    ),
    (
        "resolution-fractional",
        {"stages[1].resolution": 16.5},
        "stages[1].resolution: expected an integer, got 16.5",
    ),
    (
        "fraction-string",
        {"stages[2].data_fraction": "half"},
        "stages[2].data_fraction: expected a number, got 'half'",
    ),
    ("bool-string", {"deterministic": "maybe"}, "deterministic: expected true or false, got 'maybe'"),
    ("name-number", {"name": 5}, "name: expected a string, got 5"),
    ("stages-mapping", {"stages": {"resolution": 16}}, "stages: expected a list, got {'resolution': 16}"),
    ("stage-null", {"stages[0]": None}, "stages[0]: expected a mapping of fields, got None"),
    ("model-list", {"model": ["resnet18"]}, "model: expected a mapping of fields, got ['resnet18']"),
    (
        "storage-options-string",
        {"checkpoint.storage_options": "region=x"},
        "checkpoint.storage_options: expected a mapping, got 'region=x'",
    ),
    (
        "name-pattern",
        {"name": "my job!"},
        "name: must match the pattern ^[A-Za-z0-9][A-Za-z0-9_.-]*$, got 'my job!'",
    ),
    ("name-empty", {"name": ""}, "name: must be at least 1 character(s) long, got ''"),
    ("name-too-long", {"name": "a" * 70}, "name: must be at most 64 characters long, got 70 characters"),
    # literals, with did-you-mean for near misses
    (
        "strategy-typo",
        {"schedule.strategy": "global_onecyle"},
        "schedule.strategy: expected one of 'global_onecycle', 'per_stage_onecycle', 'per_stage_cosine',"
        " got 'global_onecyle'; did you mean 'global_onecycle'?",
    ),
    (
        "lr-rule-typo",
        {"lr_scaling.rule": "sqr"},
        "lr_scaling.rule: expected one of 'linear', 'sqrt', 'none', got 'sqr'; did you mean 'sqrt'?",
    ),
    ("version-2", {"version": 2}, "version: expected one of 1, got 2"),
    ("in-channels-2", {"model.in_channels": 2}, "model.in_channels: expected one of 1, 3, got 2"),
    # unknown keys
    (
        "stage-key-typo",
        {"stages[0].resoluton": 16},
        "stages[0].resoluton: unknown field; did you mean 'resolution'?",
    ),
    ("schedule-key-typo", {"schedule.maxlr": 0.4}, "schedule.maxlr: unknown field; did you mean 'max_lr'?"),
    ("top-key-typo", {"stagez": []}, "stagez: unknown field; did you mean 'stages'?"),
    ("key-with-space", {"schedule.max lr": 0.4}, "schedule['max lr']: unknown field; did you mean 'max_lr'?"),
    (
        "unknown-key-far",
        {"stages[0].foo": 1},
        "stages[0].foo: unknown field; expected one of resolution, epochs, data_fraction, batch_size, "
        "workers,"
        " grad_accum, max_lr, pct_start, compile, resolution_ramp_steps, regularization_ramp_steps,"
        " min_workers, regularization",
    ),
    # missing fields and empty lists
    ("missing-max-lr", {"schedule.max_lr": DELETE}, "schedule.max_lr: required field is missing"),
    ("missing-model", {"model": DELETE}, "model: required field is missing"),
    ("missing-epochs", {"stages[0].epochs": DELETE}, "stages[0].epochs: required field is missing"),
    ("empty-stages", {"stages": []}, "stages: must have at least 1 item(s), got an empty list"),
    # model.arch against torchvision's own list
    (
        "arch-typo",
        {"model.arch": "resnt18"},
        "model.arch: unknown torchvision architecture 'resnt18'; did you mean 'resnet18'?",
    ),
    (
        "arch-unknown",
        {"model.arch": "zzzzzz"},
        "model.arch: unknown torchvision architecture 'zzzzzz'; see torchvision.models.list_models()",
    ),
    # your own model builder: exactly one of arch / builder, an import path
    (
        "builder-and-arch",
        {"model.builder": "mypkg.models:net"},
        "model.arch: give exactly one of arch (a torchvision model name) or builder "
        "('package.module:function'), got both",
    ),
    (
        "neither-arch-nor-builder",
        {"model.arch": DELETE},
        "model.arch: give exactly one of arch (a torchvision model name) or builder "
        "('package.module:function'), got neither",
    ),
    (
        "builder-not-import-path",
        {"model.arch": DELETE, "model.builder": "mypkg/models.py"},
        "model.builder: expected 'package.module:function', got 'mypkg/models.py'",
    ),
    ("builder-kwargs-not-mapping", {"model.kwargs": [1]}, "model.kwargs: expected a mapping, got [1]"),
    (
        "eval-every-negative",
        {"metrics.eval_every_n_steps": -1},
        "metrics.eval_every_n_steps: must be >= 0, got -1",
    ),
    # discriminated unions: the tag, and fields of the other variant
    (
        "data-kind-unknown",
        {"data.kind": "cifar10"},
        "data.kind: expected one of 'synthetic', 'fashion_mnist', 'imagefolder', 'custom', got 'cifar10'",
    ),
    (
        "data-kind-typo",
        {"data.kind": "synthetc"},
        "data.kind: expected one of 'synthetic', 'fashion_mnist', 'imagefolder', 'custom', got 'synthetc';"
        " did you mean 'synthetic'?",
    ),
    (
        "data-kind-number",
        {"data.kind": 3},
        "data.kind: expected one of 'synthetic', 'fashion_mnist', 'imagefolder', 'custom', got 3",
    ),
    (
        "data-kind-missing",
        {"data.kind": DELETE},
        "data.kind: required field is missing; it selects the variant, one of 'synthetic', 'fashion_mnist',"
        " 'imagefolder', 'custom'",
    ),
    (
        "data-key-typo",
        {"data.sise": 10},
        "data.sise: unknown field for kind 'synthetic'; did you mean 'size'?",
    ),
    (
        "optimizer-name-typo",
        {"optimizer.name": "adam"},
        "optimizer.name: expected one of 'sgd', 'adamw', got 'adam'; did you mean 'adamw'?",
    ),
    (
        "betas-on-sgd",
        {"optimizer.betas": [0.9, 0.99]},
        "optimizer.betas: unknown field for name 'sgd' (it belongs to name 'adamw');"
        " expected one of name, momentum, nesterov, weight_decay",
    ),
    (
        "momentum-on-adamw",
        {"optimizer": {**ADAMW, "momentum": 0.9}},
        "optimizer.momentum: unknown field for name 'adamw' (it belongs to name 'sgd');"
        " expected one of name, betas, eps, weight_decay",
    ),
    (
        "beta-out-of-range",
        {"optimizer": {**ADAMW, "betas": [0.9, 1.0]}},
        "optimizer.betas[1]: must be < 1, got 1.0",
    ),
    (
        "three-betas",
        {"optimizer": {**ADAMW, "betas": [0.9, 0.99, 0.5]}},
        "optimizer.betas: must have at most 2 item(s), got 3",
    ),
    ("eps-zero", {"optimizer": {**ADAMW, "eps": 0}}, "optimizer.eps: must be > 0, got 0"),
    # validators across fields name the field the user should change
    (
        "nesterov-no-momentum",
        {"optimizer.momentum": 0},
        "optimizer.nesterov: true needs momentum > 0, got momentum 0.0; set momentum or nesterov: false",
    ),
    (
        "momentum-order",
        {"schedule.base_momentum": 0.96},
        "schedule.base_momentum: must be <= max_momentum (0.95) when cycle_momentum is true, got 0.96",
    ),
    ("min-lr-above-max", {"schedule.min_lr": 0.5}, "schedule.min_lr: must be < max_lr (0.4), got 0.5"),
    (
        "data-classes-exceed-model",
        {"data.num_classes": 20},
        "data.num_classes: must be <= model.num_classes (10), got 20",
    ),
    (
        "fashion-mnist-classes",
        {"data": {"kind": "fashion_mnist"}, "model.num_classes": 5},
        "model.num_classes: must be >= 10 for data.kind fashion_mnist (10 classes), got 5",
    ),
    # train.ema and checkpoint.keep_best
    ("ema-decay-1", {"train.ema": {"decay": 1.0}}, "train.ema.decay: must be < 1, got 1.0"),
    ("ema-decay-0", {"train.ema": {"decay": 0}}, "train.ema.decay: must be > 0, got 0"),
    (
        "ema-every-0",
        {"train.ema": {"decay": 0.99, "every_n_steps": 0}},
        "train.ema.every_n_steps: must be > 0, got 0",
    ),
    ("ema-no-decay", {"train.ema": {"every_n_steps": 2}}, "train.ema.decay: required field is missing"),
    (
        "keep-best-metric-typo",
        {"checkpoint.keep_best": {"metric": "val_ac", "mode": "max"}},
        "checkpoint.keep_best.metric: expected one of 'val_acc', 'val_loss', 'val_top5', 'ema_val_acc', "
        "'ema_val_loss', 'ema_val_top5', got 'val_ac'; did you mean 'val_acc'?",
    ),
    (
        "keep-best-mode",
        {"checkpoint.keep_best": {"metric": "val_loss", "mode": "lowest"}},
        "checkpoint.keep_best.mode: expected one of 'max', 'min', got 'lowest'",
    ),
    (
        "keep-best-no-mode",
        {"checkpoint.keep_best": {"metric": "val_acc"}},
        "checkpoint.keep_best.mode: required field is missing",
    ),
    (
        "keep-best-ema-without-ema",
        {"checkpoint.keep_best": {"metric": "ema_val_acc", "mode": "max"}},
        "checkpoint.keep_best.metric: ema_val_acc needs train.ema (e.g. {decay: 0.999}), which is not set",
    ),
    (
        "keep-best-top5-few-classes",
        {
            "checkpoint.keep_best": {"metric": "val_top5", "mode": "max"},
            "model.num_classes": 5,
            "data.num_classes": 5,
        },
        "checkpoint.keep_best.metric: top-5 is evaluated only when model.num_classes > 5, got val_top5 "
        "with 5 classes",
    ),
    # YAML keys that are not strings (`1:` or `null:`)
    ("key-not-string", {"schedule.1": 0.4}, "schedule: field names must be strings, got the key 1"),
]


@pytest.mark.parametrize(("edits", "line"), [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_mistake_names_field_and_expectation(edits, line):
    problems = _problems(_spec(edits))
    assert line in problems, "\n".join(problems)


def test_every_mistake_is_reported_at_once():
    problems = _problems(
        _spec(
            {
                "stages[0].resoluton": 16,
                "stages[2].data_fraction": 1.5,
                "schedule.strategy": "global_onecyle",
            }
        )
    )
    assert [p.split(":")[0] for p in problems] == [
        "schedule.strategy",
        "stages[0].resoluton",
        "stages[2].data_fraction",
    ]


def test_renamed_field_reports_both_sides():
    problems = _problems(_spec({"stages[0].resolution": DELETE, "stages[0].resoluton": 16}))
    assert problems == [
        "stages[0].resolution: required field is missing",
        "stages[0].resoluton: unknown field; did you mean 'resolution'?",
    ]


def test_imagefolder_with_synthetic_fields():
    problems = _problems(_spec({"data": {"kind": "imagefolder", "size": 100}}))
    assert problems == [
        "data.train: required field is missing",
        "data.size: unknown field for kind 'imagefolder' (it belongs to kind 'synthetic'); expected one of"
        " loader_workers, val_batch_size, val_resolution, crop_scale, hflip, augment_on, normalize, kind,"
        " train, val, decode_on, on_bad_image",
    ]


def test_validators_do_not_fire_when_their_condition_is_off():
    """The counterparts of the cross-field mistakes are valid: the checks are not stricter than stated."""
    assert make_spec(schedule={"cycle_momentum": False, "base_momentum": 0.96}).schedule.base_momentum == 0.96
    assert make_spec(optimizer={"name": "sgd", "momentum": 0, "nesterov": False}).momentum == 0
    assert make_spec(stages=[{"resolution": 16, "epochs": 1, "data_fraction": 1, "batch_size": 8}])


def test_error_message_layout():
    with pytest.raises(SpecError) as info:
        validate_spec(_spec({"seed": -1}), source="job.yaml")
    assert str(info.value) == "job.yaml: invalid job spec\n  seed: must be >= 0, got -1"
    assert isinstance(info.value, ValueError)


def test_non_mapping_document():
    assert _problems(None) == ["(top level): expected a mapping of fields, got None"]
    assert _problems(["unit"]) == ["(top level): expected a mapping of fields, got ['unit']"]


def test_long_values_are_shortened():
    (line,) = _problems(_spec({"stages[0].resolution": "x" * 500}))
    assert line.startswith("stages[0].resolution: expected an integer, got 'xxx") and line.endswith("...")
    assert len(line) < 120


# ------------------------------------------------------------------------------------- YAML and files


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (
            "version: 1\nname: x\nstages: [{resolution: 16, epochs: 1\nseed: 0\n",
            "malformed YAML at line 4, column 5: expected ',' or '}', but got ':'"
            " (while parsing a flow mapping that starts at line 3, column 10)",
        ),
        (
            "name: 'abc\nseed: 1\n",
            "malformed YAML at line 3, column 1: found unexpected end of stream"
            " (while scanning a quoted scalar that starts at line 1, column 7)",
        ),
        (
            "version: 1\nmodel:\n  arch: resnet18\n   num_classes: 10\n",
            "malformed YAML at line 4, column 15: mapping values are not allowed here",
        ),
        (
            "version: 1\nmodel:\n\tarch: resnet18\n",
            "malformed YAML at line 3, column 1: found character '\\t' that cannot start any token;"
            " indent YAML with spaces, not tabs",
        ),
        ("", "(top level): expected a mapping of fields (name, model, data, ...), got an empty document"),
        ("- 1\n- 2\n", "(top level): expected a mapping of fields (name, model, data, ...), got list [1, 2]"),
    ],
    ids=["unclosed-bracket", "unclosed-quote", "bad-indent", "tab", "empty", "list"],
)
def test_yaml_problems_have_position(text, line):
    with pytest.raises(SpecError) as info:
        parse_spec(text, source="job.yaml")
    assert info.value.problems == [line] and info.value.source == "job.yaml"


def test_parse_spec_reports_field_paths_like_validate_spec():
    text = (
        (ROOT / "examples/quickstart.yaml")
        .read_text()
        .replace("epochs: 1, data_fraction: 0.5", "epochs: 1, data_fraction: 1.5", 1)
    )
    with pytest.raises(SpecError) as info:
        parse_spec(text)
    assert info.value.problems == ["stages[0].data_fraction: must be in (0, 1], got 1.5"]


def test_load_spec_missing_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.problems == [f"file not found: {path}"] and info.value.source == path


def test_quickstart_is_valid():
    spec = load_spec(str(ROOT / "examples/quickstart.yaml"))
    assert spec.name == "fmnist-quickstart" and len(spec.stages) == 3


def test_the_studied_recipe_is_the_quickstart_under_another_name():
    """docs/results.md studies examples/fashion-mnist-progressive.yaml: it stays the quickstart's recipe."""
    studied = load_spec(str(ROOT / "examples/fashion-mnist-progressive.yaml"))
    quick = load_spec(str(ROOT / "examples/quickstart.yaml"))
    assert studied.model_copy(update={"name": quick.name}) == quick


# ------------------------------------------------------------------------------- plan-level mistakes


def test_global_batch_larger_than_stage_subset():
    spec = make_spec(
        stages=[{"resolution": 16, "epochs": 1, "data_fraction": 0.01, "batch_size": 64, "workers": 2}]
    )
    with pytest.raises(SpecError) as info:
        build_plan(spec, spec.data.size)
    assert info.value.problems == [
        "stages[0].batch_size: global batch 128 (batch_size 64 x workers 2 x grad_accum 1) exceeds the "
        "stage's"
        " 40 samples (data_fraction 0.01 x 4096)"
    ]


def test_epochs_too_small_for_one_step():
    spec = make_spec(
        stages=[
            {"resolution": 16, "epochs": 1, "data_fraction": 1.0, "batch_size": 64},
            {"resolution": 24, "epochs": 0.01, "data_fraction": 0.5, "batch_size": 64, "workers": 2},
        ]
    )
    with pytest.raises(SpecError) as info:
        build_plan(spec, spec.data.size)
    assert info.value.problems == [
        "stages[1].epochs: 0.01 epochs of 16 steps is less than one optimizer step"
    ]


def test_plan_reports_every_bad_stage():
    spec = make_spec(
        stages=[
            {"resolution": 16, "epochs": 1, "data_fraction": 0.01, "batch_size": 64, "workers": 2},
            {"resolution": 24, "epochs": 1, "data_fraction": 1.0, "batch_size": 64},
            {"resolution": 32, "epochs": 0.01, "data_fraction": 0.5, "batch_size": 64, "workers": 2},
        ]
    )
    with pytest.raises(SpecError) as info:
        build_plan(spec, spec.data.size)
    assert [p.split(":")[0] for p in info.value.problems] == ["stages[0].batch_size", "stages[2].epochs"]


# ------------------------------------------------------------------------------------------- fuzzing

# A field path: `(top level)`, or names, list indices and quoted keys (`schedule['max lr']`).
_SEGMENT = r"""(?:[^\W\d]\w*|\[-?\d+\]|\[(?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")\])"""
PROBLEM_LINE = re.compile(rf"^(?:\(top level\)|{_SEGMENT}(?:\.?{_SEGMENT})*): \S")


def _paths(node, prefix="") -> list[str]:
    """Every field path in a spec dict, containers and leaves."""
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        path = f"{prefix}[{key}]" if isinstance(key, int) else f"{prefix}.{key}" if prefix else key
        out += [path, *_paths(value, path)]
    return out


PATHS = _paths(BASE_SPEC)
MAPPINGS = [""] + [p for p in PATHS if isinstance(_get(BASE_SPEC, p), dict)]  # where extra keys can go

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.integers().map(lambda n: n * 10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["resnet18", "sgd", "adamw", "synthetic", "global_onecycle", "0.5"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
mutations = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(PATHS), values),
    st.tuples(st.just("delete"), st.sampled_from(PATHS), st.none()),
    st.tuples(
        st.just("extra"),
        st.sampled_from(MAPPINGS),
        st.tuples(st.one_of(st.text(max_size=10), st.integers(), st.none(), st.booleans()), values),
    ),
)


def _mutate(raw: dict, mutation) -> None:
    op, path, arg = mutation
    keys = _keys(path) if path else []
    node = raw
    try:
        for key in keys[:-1] if op != "extra" else keys:
            node = node[key]
    except (KeyError, IndexError, TypeError):
        return  # an earlier mutation removed or replaced this part
    if op == "extra":
        if isinstance(node, dict):
            node[arg[0]] = arg[1]
    elif isinstance(node, dict) or (
        isinstance(node, list) and isinstance(keys[-1], int) and keys[-1] < len(node)
    ):
        if op == "delete":
            if isinstance(node, dict):
                node.pop(keys[-1], None)
            else:
                del node[keys[-1]]
        else:
            node[keys[-1]] = arg


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mutations, min_size=1, max_size=3))
def test_fuzz_validate_spec_fails_only_with_field_paths(muts):
    raw = copy.deepcopy(BASE_SPEC)
    for m in muts:
        _mutate(raw, m)
    try:
        spec = validate_spec(raw)
    except SpecError as e:
        assert e.problems
        for line in e.problems:
            assert PROBLEM_LINE.match(line), line
            assert "\n" not in line, line
    else:
        # What validates is stored in job.json and re-validated on resume: it must come back the same.
        again = validate_spec(json.loads(json.dumps(spec.model_dump(mode="json"))))
        assert again == spec and again.spec_hash() == spec.spec_hash()


# ------------------------------------------------------------------------------------------------ CLI


def _cli() -> list[str]:
    exe = shutil.which("stagetrain") or str(Path(sys.executable).with_name("stagetrain"))
    return [exe] if Path(exe).exists() else [sys.executable, "-m", "service.cli"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*_cli(), *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_cli_invalid_spec_exits_2_without_traceback(tmp_path):
    raw = _spec({"stages[2].data_fraction": 1.5, "stages[0].resoluton": 16, "stages[0].resolution": DELETE})
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(raw))
    result = _run("plan", str(job))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "stages[2].data_fraction: must be in (0, 1], got 1.5" in result.stderr
    assert "stages[0].resoluton: unknown field; did you mean 'resolution'?" in result.stderr
    assert "invalid job spec" in result.stderr


def test_cli_malformed_yaml_and_plan_errors_exit_2(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: 'abc\nseed: 1\n")
    too_big = tmp_path / "big.yaml"
    too_big.write_text(yaml.safe_dump(_spec({"stages[0].data_fraction": 0.01})))
    for job, needle in [
        (bad_yaml, "malformed YAML at line 3, column 1"),
        (too_big, "stages[0].batch_size: global batch"),
    ]:
        result = _run("plan", str(job))
        assert result.returncode == 2 and needle in result.stderr, result.stderr
        assert "Traceback" not in result.stderr + result.stdout


def test_cli_schema_is_json_schema():
    result = _run("schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert {"stages", "schedule", "lr_scaling"} <= set(schema["properties"])
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(json.loads(json.dumps(BASE_SPEC)), schema)


def test_cli_plan_quickstart():
    result = _run("plan", "examples/quickstart.yaml")
    assert result.returncode == 0, result.stderr
    assert "fmnist-quickstart" in result.stdout


@pytest.mark.parametrize(
    "override,expected",
    [
        (
            {"stages": [{"resolution": 16, "epochs": 1, "batch_size": 8, "workers": True}]},
            "stages[0].workers: expected an integer, got True",
        ),
        ({"data": {"kind": "synthetic", "size": 10**400}}, "data.size: must be <= 1000000000"),
        (
            {"stages": [{"resolution": 16, "epochs": 1e300, "batch_size": 8}]},
            "stages[0].epochs: must be <= 10000",
        ),
    ],
)
def test_no_silent_coercion_or_overflow(override, expected):
    with pytest.raises(SpecError) as e:
        make_spec(**override)
    assert any(p.startswith(expected) for p in e.value.problems), e.value.problems


def test_ema_and_keep_best_are_off_by_default_and_parse_when_given():
    default = make_spec()
    assert default.train.ema is None and default.checkpoint.keep_best is None
    spec = validate_spec(
        _spec(
            {
                "train.ema": {"decay": 0.999},
                "checkpoint.keep_best": {"metric": "ema_val_top5", "mode": "max"},
            }
        )
    )
    assert (spec.train.ema.decay, spec.train.ema.every_n_steps) == (0.999, 1)
    assert (spec.checkpoint.keep_best.metric, spec.checkpoint.keep_best.mode) == ("ema_val_top5", "max")
