"""The job spec: one versioned, validated YAML file per training job.

Field names here are a contract with users, examples and tests: add fields, never rename them.
Every validation error is reported as ``path.to.field: what was expected, got what`` (see
``SpecError``), never as a pydantic traceback.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import re
import types
import typing
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from service.archs import TORCHVISION_MODELS

SPEC_VERSION = 1


class SpecError(ValueError):
    """An invalid job spec. ``problems`` holds one ``path: message`` line per mistake."""

    def __init__(self, problems: list[str], source: str = "job spec", headline: str = "invalid job spec"):
        self.problems = problems
        self.source = source
        self.headline = headline
        super().__init__(f"{source}: {headline}\n" + "\n".join(f"  {p}" for p in problems))


class _Model(BaseModel):
    # No inf/nan: `epochs: .inf` would pass `gt=0` and then overflow in the plan.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# strict: YAML `true` is not the integer 1.
PositiveInt = Annotated[int, Field(gt=0, strict=True)]
NonNegInt = Annotated[int, Field(ge=0, strict=True)]
PositiveFloat = Annotated[float, Field(gt=0)]


def _check_import_path(v: str) -> str:
    if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*", v):
        raise ValueError(f"expected 'package.module:function', got {v!r}")
    return v


class ModelSpec(_Model):
    arch: str | None = Field(
        None,
        description="torchvision.models builder name (resnet18, resnet50, mobilenet_v3_small, ...), or "
        "timm/<name> for a timm model when timm is installed (timm/convnext_tiny)",
    )
    builder: str | None = Field(
        None,
        description="your own model: 'package.module:function', called as function(num_classes=..., "
        "**kwargs) on the workers (the package must be importable there)",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="extra keyword arguments for the builder (or torchvision's)"
    )
    num_classes: Annotated[int, Field(ge=2, strict=True)]
    in_channels: Literal[1, 3] = 3

    @field_validator("kwargs")
    @classmethod
    def _no_secrets(cls, v: dict[str, Any]) -> dict[str, Any]:
        return refuse_secrets(v, KWARGS_SECRETS)

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str | None) -> str | None:
        if v is not None and v.startswith("timm/"):
            # the name itself is checked where the model is built: listing timm's models imports torch
            if importlib.util.find_spec("timm") is None:
                raise ValueError(f"{v!r} is a timm model, and timm is not installed here (pip install timm)")
            return v
        if v is not None and v not in TORCHVISION_MODELS:
            hint = difflib.get_close_matches(v, TORCHVISION_MODELS, n=1)
            raise ValueError(
                f"unknown torchvision architecture {v!r}"
                + (f"; did you mean {hint[0]!r}?" if hint else "; see torchvision.models.list_models()")
            )
        return v

    @field_validator("builder")
    @classmethod
    def _import_path(cls, v: str | None) -> str | None:
        return v if v is None else _check_import_path(v)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.arch is None) == (self.builder is None):
            raise ValueError(
                "arch: give exactly one of arch (a torchvision model name) or builder "
                f"('package.module:function'), got {'both' if self.arch else 'neither'}"
            )
        return self

    @property
    def label(self) -> str:
        return self.arch or self.builder


class Normalize(_Model):
    """The model's input: ``(pixels / 255 - mean) / std``, one value for every channel or one per channel."""

    mean: list[float] = Field([0.5], min_length=1, max_length=3)
    std: list[Annotated[float, Field(gt=0)]] = Field([0.25], min_length=1, max_length=3)

    @model_validator(mode="after")
    def _same_length(self):
        if len(self.mean) != len(self.std) or len(self.mean) == 2:
            raise ValueError(
                "mean and std: one value, or one per channel (3), each the same length; got "
                f"{len(self.mean)} and {len(self.std)}"
            )
        return self


class _DataBase(_Model):
    loader_workers: NonNegInt = Field(2, description="DataLoader worker processes per Ray worker")
    val_batch_size: PositiveInt = 256
    val_resolution: Annotated[int, Field(ge=8, le=4096, strict=True)] | None = Field(
        None, description="evaluate at this resolution (e.g. FixRes-style higher); default: the stage's"
    )
    crop_scale: tuple[Annotated[float, Field(gt=0, le=1)], Annotated[float, Field(gt=0, le=1)]] = Field(
        (0.35, 1.0), description="random-resized-crop area range (train)"
    )
    hflip: bool = Field(True, description="random horizontal flip (train)")
    augment_on: Literal["device", "host"] = Field(
        "device",
        description="where random-resized-crop, flip and resize run: 'device', batched on the training "
        "device (loaders deliver decoded images and crop boxes); 'host', per sample in the loader workers "
        "(stages with RandAugment or random erasing always do)",
    )
    normalize: Normalize = Field(
        default_factory=Normalize,
        description="input normalisation, kept in exported models; ImageNet-pretrained weights expect "
        "{mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}",
    )


class _InMemoryData(_DataBase):
    device_cache_bytes: NonNegInt = Field(
        2 * 2**30,
        description="hold a split on the training device when its uint8 images fit in this many bytes "
        "(custom datasets: when they are tensors of one size): batches are gathered there, with no loader "
        "processes (augment_on: device); 0 turns it off",
    )


class SyntheticData(_InMemoryData):
    kind: Literal["synthetic"]
    size: Annotated[int, Field(gt=0, le=10**9, strict=True)] = Field(description="training samples")
    val_size: PositiveInt = 512
    num_classes: Annotated[int, Field(ge=2, strict=True)] = 10


class FashionMNISTData(_InMemoryData):
    kind: Literal["fashion_mnist"]
    root: str | None = Field(
        None, description="folder with the IDX .gz files; default: Debian's dataset-fashion-mnist"
    )


class ImageFolderData(_DataBase):
    kind: Literal["imagefolder"]
    train: str = Field(description="local folder or fsspec URL laid out as torchvision's ImageFolder")
    val: str | None = None
    decode_on: Literal["host", "device"] = Field(
        "host",
        description="where JPEGs are decoded: 'host', in the loader workers (PIL, draft mode near the "
        "stage resolution); 'device', the loaders read bytes and the training device decodes each batch "
        "(torchvision.io.decode_jpeg: nvjpeg on CUDA, libjpeg on CPU); other formats always on the host. "
        "Needs augment_on: device",
    )
    on_bad_image: Literal["error", "skip"] = Field(
        "error",
        description="an image that cannot be decoded: 'error' stops the stage naming its index and file; "
        "'skip' leaves it out of its batch (one image fewer), names it in the worker's log and counts it "
        "in metrics.jsonl (skipped_images of the step)",
    )

    @model_validator(mode="after")
    def _device_decode(self):
        if self.decode_on == "device" and self.augment_on != "device":
            raise ValueError("decode_on: device decodes for the device's crops; it needs augment_on: device")
        return self


class CustomData(_InMemoryData):
    kind: Literal["custom"]
    factory: str = Field(
        description="'package.module:function', called as function(split='train'|'val', **kwargs) on the "
        "coordinator and the workers; returns a map-style torch Dataset of (uint8 CHW tensor or PIL image, "
        "label) with a deterministic __getitem__ and a __len__ stable across the job"
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="extra keyword arguments for the factory"
    )

    @field_validator("kwargs")
    @classmethod
    def _no_secrets(cls, v: dict[str, Any]) -> dict[str, Any]:
        return refuse_secrets(v, KWARGS_SECRETS)

    @field_validator("factory")
    @classmethod
    def _import_path(cls, v: str) -> str:
        return _check_import_path(v)


DataSpec = Annotated[
    SyntheticData | FashionMNISTData | ImageFolderData | CustomData, Field(discriminator="kind")
]


class SGDSpec(_Model):
    name: Literal["sgd"]
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    nesterov: bool = False
    weight_decay: Annotated[float, Field(ge=0)] = 0.0

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self):
        if self.nesterov and self.momentum == 0:
            raise ValueError(
                f"nesterov: true needs momentum > 0, got momentum {self.momentum}; "
                "set momentum or nesterov: false"
            )
        return self


class AdamWSpec(_Model):
    name: Literal["adamw"]
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    eps: PositiveFloat = 1e-8
    weight_decay: Annotated[float, Field(ge=0)] = 0.01


OptimizerSpec = Annotated[SGDSpec | AdamWSpec, Field(discriminator="name")]


class ScheduleSpec(_Model):
    strategy: Literal["global_onecycle", "per_stage_onecycle", "per_stage_cosine"] = "global_onecycle"
    max_lr: PositiveFloat
    pct_start: Annotated[float, Field(gt=0, lt=1)] = 0.25
    div_factor: PositiveFloat = 25.0
    final_div_factor: PositiveFloat = 1e4
    anneal: Literal["cos", "linear"] = "cos"
    cycle_momentum: bool = True
    base_momentum: Annotated[float, Field(ge=0, lt=1)] = 0.85
    max_momentum: Annotated[float, Field(ge=0, lt=1)] = 0.95
    progress: Literal["samples", "steps"] = "samples"
    min_lr: Annotated[float, Field(ge=0)] = 0.0
    stage_warmup_steps: NonNegInt = Field(
        0,
        description="ramp the LR linearly from 1/N of the curve to all of it over the first N steps of every "
        "stage after the first (eases the jump to a new resolution); 0 = off",
    )

    @model_validator(mode="after")
    def _momentum_order(self):
        if self.cycle_momentum and self.base_momentum > self.max_momentum:
            raise ValueError(
                f"base_momentum: must be <= max_momentum ({self.max_momentum}) when cycle_momentum is true,"
                f" got {self.base_momentum}"
            )
        if self.min_lr >= self.max_lr:
            raise ValueError(f"min_lr: must be < max_lr ({self.max_lr}), got {self.min_lr}")
        return self


class LRScalingSpec(_Model):
    rule: Literal["linear", "sqrt", "none"] = "linear"
    reference_batch: PositiveInt | None = Field(
        None, description="global batch at which max_lr holds; default: stage 1's global batch"
    )
    ramp_steps: NonNegInt = 0


class RandAugmentSpec(_Model):
    num_ops: Annotated[int, Field(ge=0, le=16, strict=True)] = Field(
        2, description="transforms applied to each image; 0 = off (turns off a job-level default)"
    )
    magnitude: Annotated[int, Field(ge=0, le=30, strict=True)] = Field(
        9, description="strength of every transform, 0..30 (torchvision's 31 magnitude bins)"
    )


class RegularizationSpec(_Model):
    """Regularization of the training batches, EfficientNetV2 progressive-learning style: set at the top
    level (the job's default) and on a stage (``stages[].regularization``), where each field given
    replaces the job's (``randaugment`` as a whole). Unset everywhere: off."""

    label_smoothing: Annotated[float, Field(ge=0, lt=1)] | None = Field(
        None, description="cross-entropy label smoothing; default train.label_smoothing"
    )
    mixup_alpha: Annotated[float, Field(ge=0, le=100)] | None = Field(
        None, description="mixup of batch pairs, lambda ~ Beta(alpha, alpha); 0 = off"
    )
    cutmix_alpha: Annotated[float, Field(ge=0, le=100)] | None = Field(
        None, description="cutmix of batch pairs, box area ~ Beta(alpha, alpha); 0 = off"
    )
    mix_prob: Annotated[float, Field(ge=0, le=1)] | None = Field(
        None, description="probability that a micro-batch is mixed at all (default 1)"
    )
    switch_prob: Annotated[float, Field(ge=0, le=1)] | None = Field(
        None, description="with both alphas > 0: probability of cutmix rather than mixup (default 0.5)"
    )
    randaugment: RandAugmentSpec | None = Field(
        None, description="per-sample RandAugment {num_ops, magnitude} after the crop and flip"
    )
    random_erasing: Annotated[float, Field(ge=0, le=1)] | None = Field(
        None, description="probability of erasing a random rectangle of each image (default 0)"
    )
    dropout: Annotated[float, Field(ge=0, lt=1)] | None = Field(
        None,
        description="p of every nn.Dropout layer of the model (e.g. torchvision EfficientNet's classifier); "
        "default: as the model was built",
    )
    drop_path: Annotated[float, Field(ge=0, lt=1)] | None = Field(
        None,
        description="stochastic depth: the deepest block's drop rate (torchvision StochasticDepth, timm "
        "DropPath), the others scaled as the model built them; default: as the model was built",
    )


class Regularization(_Model):
    """One stage's effective regularization (``JobSpec.stage_regularization``): no field left unset."""

    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    randaugment: RandAugmentSpec | None = None
    random_erasing: float = 0.0
    dropout: float | None = None  # None: the model's own rates, untouched
    drop_path: float | None = None

    @property
    def mixes(self) -> bool:
        return self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def toward(self, target: Regularization, t: float) -> Regularization:
        """``t`` (0..1) of the way from this regularization to ``target`` (``regularization_ramp_steps``):
        every number linearly, RandAugment's integers rounded (off counts as 0 ops of magnitude 0);
        dropout and drop-path only where both are set (else the target's)."""

        def lerp(a: float, b: float) -> float:
            return a + (b - a) * t

        off = RandAugmentSpec(num_ops=0, magnitude=0)
        a, b = self.randaugment or off, target.randaugment or off
        values: dict = {
            name: lerp(getattr(self, name), getattr(target, name))
            for name in ("label_smoothing", "mixup_alpha", "cutmix_alpha", "mix_prob", "switch_prob")
        }
        for name in ("dropout", "drop_path"):
            v, w = getattr(self, name), getattr(target, name)
            values[name] = w if v is None or w is None else lerp(v, w)
        return Regularization(
            **values,
            randaugment=RandAugmentSpec(
                num_ops=round(lerp(a.num_ops, b.num_ops)), magnitude=round(lerp(a.magnitude, b.magnitude))
            ),
            random_erasing=lerp(self.random_erasing, target.random_erasing),
        )

    def describe(self) -> str:
        parts = [f"label_smoothing {self.label_smoothing:g}"]
        if self.mixes:
            parts.append(
                f"mixup_alpha {self.mixup_alpha:g}, cutmix_alpha {self.cutmix_alpha:g}, "
                f"mix_prob {self.mix_prob:g}, switch_prob {self.switch_prob:g}"
            )
        else:
            parts.append("no mixup/cutmix")
        ra = self.randaugment
        parts.append(f"randaugment {ra.num_ops}x{ra.magnitude}" if ra and ra.num_ops else "no randaugment")
        parts.append(f"random_erasing {self.random_erasing:g}")
        parts += [
            f"{name} {v:g}" for name in ("dropout", "drop_path") if (v := getattr(self, name)) is not None
        ]
        return ", ".join(parts)


class StageSpec(_Model):
    resolution: Annotated[int, Field(ge=8, le=4096, strict=True)]
    epochs: Annotated[float, Field(gt=0, le=10_000)]
    data_fraction: float = 1.0
    batch_size: PositiveInt = Field(description="per-worker micro-batch")
    workers: PositiveInt = 1
    grad_accum: PositiveInt = 1
    max_lr: PositiveFloat | None = Field(None, description="per_stage_onecycle / per_stage_cosine override")
    pct_start: Annotated[float, Field(gt=0, lt=1)] | None = None
    compile: bool = Field(False, description="torch.compile the model for this stage")
    resolution_ramp_steps: NonNegInt = Field(
        0,
        description="grow the resolution step by step from the previous stage's to this one's over the "
        "first N steps (batches resized on the device), instead of jumping at the boundary; 0 = jump",
    )
    regularization_ramp_steps: NonNegInt = Field(
        0,
        description="move every regularization number step by step from the previous stage's to this "
        "one's over the first N steps (RandAugment and erasing by each sample's step), instead of "
        "switching at the boundary; 0 = switch",
    )
    min_workers: PositiveInt | None = Field(
        None,
        description="when the cluster cannot hold `workers`, continue at once on as few as this many "
        "(global batch kept by gradient accumulation when it divides); default: failure.min_workers",
    )
    regularization: RegularizationSpec = Field(
        default_factory=RegularizationSpec,
        description="this stage's regularization; each field given replaces the job's (top-level "
        "regularization)",
    )

    @field_validator("data_fraction")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0 < v <= 1:
            raise ValueError(f"must be in (0, 1], got {v}")
        return v

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.workers * self.grad_accum

    def fewest_workers(self, failure: FailureSpec) -> int:
        """The fewest workers this stage may continue on when the cluster shrinks."""
        return min(self.min_workers or failure.min_workers or self.workers, self.workers)


EVAL_METRICS = ("val_acc", "val_loss", "val_top5", "ema_val_acc", "ema_val_loss", "ema_val_top5")


class KeepBestSpec(_Model):
    metric: Literal[EVAL_METRICS] = Field(
        description="an evaluated metric; ema_* need train.ema, *_top5 need model.num_classes > 5"
    )
    mode: Literal["max", "min"] = Field(description="max: higher is better (accuracy); min: lower (loss)")


class CheckpointSpec(_Model):
    storage: str = Field("./runs", description="fsspec URL or local path; s3://bucket/prefix via s3fs")
    every_n_steps: NonNegInt = Field(0, description="periodic checkpoints; 0 = stage boundaries only")
    keep_last: PositiveInt = 2
    keep_stage_checkpoints: bool = True
    keep_best: KeepBestSpec | None = Field(
        None,
        description="also keep the checkpoint with the best evaluation of this metric, never pruned by "
        "keep_last; a checkpoint is committed at every mid-stage evaluation (metrics.eval_every_n_steps)",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="non-secret fsspec options, e.g. {client_kwargs: {region_name: ...}}",
    )

    @field_validator("storage_options")
    @classmethod
    def _no_secrets(cls, v: dict[str, Any]) -> dict[str, Any]:
        return refuse_secrets(
            v,
            "use the standard AWS environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), a profile "
            "(AWS_PROFILE) or the node's instance role instead",
        )


def refuse_secrets(v: dict[str, Any], instead: str) -> dict[str, Any]:
    """The spec is stored in job.json, hashed into every manifest and sent to metric sinks as the run's
    parameters: a credential in it would be written in the clear. Report where it is, never its value."""
    found = _secret_keys(v)
    if found:
        raise ValueError(
            f"{', '.join(found)}: credentials do not belong in the job spec (it is stored in job.json and "
            f"logged as the run's parameters); {instead}"
        )
    return v


KWARGS_SECRETS = "read them from the environment in your function (os.environ) instead"

SECRET_KEYS = (
    "key",
    "api_key",
    "apikey",
    "private_key",
    "access_token",
    "auth_token",
    "secret",
    "token",
    "password",
    "session_token",
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
    "access_key",
    "secret_key",
    "credentials",
)


def _secret_keys(options: Any, path: str = "") -> list[str]:
    """Paths of secret-looking keys anywhere in nested options (``client_kwargs`` too)."""
    found = []
    if isinstance(options, dict):
        for k, v in options.items():
            where = f"{path}.{k}" if path else str(k)
            if str(k).lower() in SECRET_KEYS:
                found.append(where)
            found += _secret_keys(v, where)
    return found


class ResourcesSpec(_Model):
    use_gpu: bool = False
    cpus_per_worker: PositiveFloat = 1.0
    gpus_per_worker: Annotated[float, Field(ge=0)] = 1.0


class FailureSpec(_Model):
    max_failures: Annotated[int, Field(ge=-1, strict=True)] = Field(
        0,
        description="retries of a stage after a crash of the training code (-1 = always); lost nodes, "
        "lost capacity and preemption notices do not count",
    )
    capacity_wait_s: Annotated[float, Field(ge=0)] = Field(
        600.0,
        description="after losing worker nodes, wait this long for the cluster to hold the stage again "
        "(an autoscaler replacing them), then continue by itself; 0 = stop as preempted at once",
    )
    min_workers: PositiveInt | None = Field(
        None, description="default stages[].min_workers: continue on fewer workers instead of waiting"
    )


class NoticeURL(_Model):
    url: Annotated[str, Field(pattern=r"^https?://")] = Field(
        description="polled by every worker: HTTP 200 with a non-empty body is a termination notice"
    )


class MetricsSpec(_Model):
    every_n_steps: PositiveInt = Field(5, description="optimizer steps between ray.train.report calls")
    eval_every_n_steps: NonNegInt = Field(
        0, description="also evaluate every N optimizer steps inside a stage; 0 = at stage ends only"
    )
    sinks: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list,
        description="where else the coordinator writes the metrics: tensorboard (<job>/tensorboard/), "
        "mlflow (MLFLOW_TRACKING_URI; experiment MLFLOW_EXPERIMENT_NAME or the job name), wandb (WANDB_MODE, "
        "WANDB_PROJECT or the job name; run id = job id)",
    )


class PreemptionSpec(_Model):
    grace_seconds: PositiveFloat = 30.0
    notice: Literal["none", "aws", "gcp"] | NoticeURL = Field(
        "none",
        description="termination notice each worker polls: aws (IMDSv2 spot/instance-action and "
        "rebalance recommendation), gcp (instance/preempted), {url: ...}; none never polls",
    )
    notice_poll_s: PositiveFloat = Field(5.0, description="how often workers poll the notice")

    @field_validator("notice", mode="before")
    @classmethod
    def _notice(cls, v):
        """One clear message instead of one per member of the union."""
        expected = "none, aws, gcp or {url: http://...}"
        if isinstance(v, str) and v not in ("none", "aws", "gcp"):
            hint = difflib.get_close_matches(v, ["none", "aws", "gcp"], n=1)
            raise ValueError(
                f"expected {expected}, got {v!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
            )
        if isinstance(v, dict) and (
            set(v) != {"url"}
            or not isinstance(v["url"], str)
            or not v["url"].startswith(("http://", "https://"))
        ):
            raise ValueError(f"expected {expected}, got {v!r}")
        if not isinstance(v, str | dict | NoticeURL):
            raise ValueError(f"expected {expected}, got {v!r}")
        return v

    notice_window_s: PositiveFloat = Field(
        120.0,
        description="after a notice and its checkpoint, how long to wait for the node to go before "
        "continuing anyway (a rebalance recommendation may never end in a termination)",
    )


class EMASpec(_Model):
    decay: Annotated[float, Field(gt=0, lt=1)] = Field(
        description="ema = decay * ema + (1 - decay) * weights, over parameters and buffers"
    )
    every_n_steps: PositiveInt = Field(1, description="update the average every N optimizer steps")


class TrainSpec(_Model):
    amp: bool = Field(
        True, description="mixed precision on GPU (train.precision; ignored on CPU); false = fp32"
    )
    precision: Literal["bf16", "fp16", "fp32"] = Field(
        "bf16", description="autocast dtype on GPU; fp16 adds a GradScaler whose state is checkpointed"
    )
    channels_last: bool = Field(True, description="channels_last memory format on GPU")
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.0, description="cross-entropy label smoothing"
    )
    grad_clip_norm: PositiveFloat | None = Field(
        None, description="clip the global gradient norm to this before every optimizer step"
    )
    ema: EMASpec | None = Field(
        None,
        description="keep an exponential moving average of the weights, checkpointed and evaluated beside "
        "them (ema_val_* in the eval records); default: off",
    )


class JobSpec(_Model):
    version: Literal[1] = SPEC_VERSION
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    seed: NonNegInt = 0
    deterministic: bool = False
    keep_global_batch: bool = False
    model: ModelSpec
    data: DataSpec
    optimizer: OptimizerSpec
    schedule: ScheduleSpec
    lr_scaling: LRScalingSpec = LRScalingSpec()
    stages: Annotated[list[StageSpec], Field(min_length=1)]
    checkpoint: CheckpointSpec = CheckpointSpec()
    resources: ResourcesSpec = ResourcesSpec()
    failure: FailureSpec = FailureSpec()
    metrics: MetricsSpec = MetricsSpec()
    preemption: PreemptionSpec = PreemptionSpec()
    train: TrainSpec = TrainSpec()
    regularization: RegularizationSpec = Field(
        default_factory=RegularizationSpec,
        description="every stage's default regularization (stages[].regularization overrides it per field)",
    )

    @model_validator(mode="after")
    def _consistent(self):
        if self.regularization.label_smoothing is not None and self.train.label_smoothing:
            raise ValueError(
                f"regularization.label_smoothing: train.label_smoothing ({self.train.label_smoothing}) is "
                f"also set, got {self.regularization.label_smoothing}; set one of them"
            )
        if self.stages[0].resolution_ramp_steps:
            raise ValueError(
                "stages[0].resolution_ramp_steps: the first stage has no earlier resolution to ramp from, "
                f"got {self.stages[0].resolution_ramp_steps}; set it on a later stage"
            )
        if self.stages[0].regularization_ramp_steps:
            raise ValueError(
                "stages[0].regularization_ramp_steps: the first stage has no earlier regularization to "
                f"ramp from, got {self.stages[0].regularization_ramp_steps}; set it on a later stage"
            )
        for i, st in enumerate(self.stages):
            if st.min_workers is not None and st.min_workers > st.workers:
                raise ValueError(
                    f"stages[{i}].min_workers: must be <= stages[{i}].workers ({st.workers}), got "
                    f"{st.min_workers}"
                )
        if isinstance(self.data, SyntheticData) and self.data.num_classes > self.model.num_classes:
            raise ValueError(
                f"data.num_classes: must be <= model.num_classes ({self.model.num_classes}), got "
                f"{self.data.num_classes}"
            )
        if len(self.data.normalize.mean) not in (1, self.model.in_channels):
            raise ValueError(
                f"data.normalize.mean: one value or one per input channel (model.in_channels "
                f"{self.model.in_channels}), got {len(self.data.normalize.mean)}"
            )
        best = self.checkpoint.keep_best
        if best is not None and best.metric.startswith("ema_") and self.train.ema is None:
            raise ValueError(
                f"checkpoint.keep_best.metric: {best.metric} needs train.ema (e.g. {{decay: 0.999}}), "
                "which is not set"
            )
        if best is not None and best.metric.endswith("_top5") and self.model.num_classes <= 5:
            raise ValueError(
                f"checkpoint.keep_best.metric: top-5 is evaluated only when model.num_classes > 5, got "
                f"{best.metric} with {self.model.num_classes} classes"
            )
        if isinstance(self.data, FashionMNISTData) and self.model.num_classes < 10:
            raise ValueError(
                "model.num_classes: must be >= 10 for data.kind fashion_mnist (10 classes), got "
                f"{self.model.num_classes}"
            )
        return self

    def spec_hash(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]

    def stage_regularization(self, index: int) -> Regularization:
        """Stage ``index``'s effective regularization: its own fields, else the job's, else the defaults
        (label smoothing: train.label_smoothing)."""
        job, own = self.regularization, self.stages[index].regularization
        values = {"label_smoothing": self.train.label_smoothing}
        for name in RegularizationSpec.model_fields:
            for layer in (job, own):
                if getattr(layer, name) is not None:
                    values[name] = getattr(layer, name)
        return Regularization(**values)

    @property
    def momentum(self) -> float:
        """The optimizer's own momentum (SGD momentum or AdamW beta1), used when it is not cycled."""
        return self.optimizer.momentum if isinstance(self.optimizer, SGDSpec) else self.optimizer.betas[0]


# --------------------------------------------------------------------------------------------------
# Loading and error formatting


def load_spec(path: str) -> JobSpec:
    """Read and validate a job file (local path or fsspec URL)."""
    import fsspec

    try:
        with fsspec.open(path, "r") as f:
            text = f.read()
    except FileNotFoundError:
        raise SpecError([f"file not found: {path}"], source=path) from None
    except UnicodeDecodeError as e:
        raise SpecError(
            [f"not a YAML text file: byte 0x{e.object[e.start]:02x} at offset {e.start} is not UTF-8 text"],
            source=path,
        ) from None
    return parse_spec(text, source=path)


def parse_spec(text: str, source: str = "job spec") -> JobSpec:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        problem = getattr(e, "problem", None) or str(e)
        # The context says where the unfinished construct began (an unclosed bracket or quote).
        context, start = getattr(e, "context", None), getattr(e, "context_mark", None)
        if context and start and (start.line, start.column) != (mark.line, mark.column):
            problem += f" ({context} that starts at line {start.line + 1}, column {start.column + 1})"
        if "'\\t'" in problem:
            problem += "; indent YAML with spaces, not tabs"
        raise SpecError([f"malformed YAML at {where}: {problem}"], source=source) from None
    if not isinstance(raw, dict):
        got = "an empty document" if raw is None else f"{type(raw).__name__} {_show(raw)}"
        raise SpecError(
            [f"(top level): expected a mapping of fields (name, model, data, ...), got {got}"], source
        )
    return validate_spec(raw, source)


def validate_spec(raw: dict, source: str = "job spec") -> JobSpec:
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError([_describe(err) for err in e.errors()], source=source) from None


# What pydantic's type errors expect, in the words a spec author would use.
_EXPECTED = {
    "model_type": "a mapping of fields",
    "model_attributes_type": "a mapping of fields",
    "dict_type": "a mapping",
    "list_type": "a list",
    "tuple_type": "a list",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _describe(err: dict) -> str:
    """One ``path: what was expected, got what`` line for one pydantic error."""
    path, owner, here = _path(err["loc"])
    kind, ctx, got = err["type"], err.get("ctx", {}), err.get("input")
    if kind == "extra_forbidden":
        key = str(err["loc"][-1])
        known = list(owner.model_fields) if owner else []
        hint = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        suffix = (
            f"; did you mean {hint[0]!r}?"
            if hint
            else (f"; expected one of {', '.join(known)}" if known else "")
        )
        return f"{path}: unknown field{_variant_note(err['loc'], key)}{suffix}"
    if kind == "missing":
        return f"{path}: required field is missing"
    if kind == "invalid_key":  # a YAML key such as `1:`, `true:` or `null:`
        return f"{_path(err['loc'][:-1])[0]}: field names must be strings, got the key {_show(got)}"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        # pydantic reports these at the union; name the tag field itself (data.kind, optimizer.name).
        tag = str(ctx.get("discriminator", "kind")).strip("'")
        path = _join(path, tag)
        options = list(_union_members(here)) or _split_options(ctx.get("expected_tags", ""))
        expected = ", ".join(repr(o) for o in options)
        if kind == "union_tag_not_found":
            return f"{path}: required field is missing; it selects the variant, one of {expected}"
        value = got.get(tag, ctx.get("tag")) if isinstance(got, dict) else ctx.get("tag")
        return f"{path}: expected one of {expected}, got {_show(value)}" + _did_you_mean(value, options)
    if kind == "literal_error":
        options = list(typing.get_args(here)) if typing.get_origin(here) is Literal else None
        options = options or _split_options(ctx.get("expected", ""))
        return (
            f"{path}: expected one of {', '.join(repr(o) for o in options)}, got {_show(got)}"
            + _did_you_mean(got, options)
        )
    if kind in _BOUNDS:
        limit = next(iter(ctx.values()))
        if isinstance(limit, float) and limit.is_integer():
            limit = int(limit)  # "> 0", not "> 0.0"
        return f"{path}: must be {_BOUNDS[kind]} {limit}, got {_show(got)}"
    if kind == "too_short":
        n = ctx["actual_length"]
        return (
            f"{path}: must have at least {ctx['min_length']} item(s), got {'an empty list' if n == 0 else n}"
        )
    if kind == "too_long":
        return f"{path}: must have at most {ctx['max_length']} item(s), got {ctx['actual_length']}"
    if kind == "string_too_short":
        return f"{path}: must be at least {ctx['min_length']} character(s) long, got {_show(got)}"
    if kind == "string_too_long":
        return f"{path}: must be at most {ctx['max_length']} characters long, got {len(got)} characters"
    if kind == "string_pattern_mismatch":
        return f"{path}: must match the pattern {ctx['pattern']}, got {_show(got)}"
    if kind in ("value_error", "assertion_error"):
        message = str(ctx.get("error", err["msg"]))
        # Model validators name the field they are about (``field: message``); move it into the path.
        field, sep, rest = message.partition(": ")
        if sep and _is_model(here) and field.split(".")[0] in here.model_fields:
            return f"{_join(path, field)}: {rest}"
        return f"{path}: {message}"
    if kind in _EXPECTED:
        return f"{path}: expected {_EXPECTED[kind]}, got {_show(got)}"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        expected = kind.replace("_parsing", "").replace("_type", "").replace("_", " ")
        return f"{path}: expected {expected}, got {_show(got)}"
    return f"{path}: {err['msg'][0].lower()}{err['msg'][1:]}, got {_show(got)}"


def _variant_note(loc: tuple, key: str) -> str:
    """For an unknown field inside a tagged variant: which variant was chosen, and which variants
    do have the field (``betas`` on ``name: sgd`` belongs to ``adamw``)."""
    if len(loc) < 2:
        return ""
    members = _union_members(_path(loc[:-2])[2])
    chosen = members.get(loc[-2])
    if chosen is None:
        return ""
    tag = next(name for name in ("kind", "name") if name in chosen.model_fields)
    others = [repr(t) for t, m in members.items() if m is not chosen and key in m.model_fields]
    return f" for {tag} {loc[-2]!r}" + (f" (it belongs to {tag} {' or '.join(others)})" if others else "")


def _show(value: Any, limit: int = 60) -> str:
    """``repr`` of a user's value, shortened so that one bad field cannot flood the message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _did_you_mean(value: Any, options: list) -> str:
    hint = difflib.get_close_matches(str(value), [str(o) for o in options], n=1)
    return f"; did you mean {hint[0]!r}?" if hint and hint[0] != str(value) else ""


def _split_options(expected: str) -> list[str]:
    """Options from pydantic's ``'a', 'b' or 'c'`` text (fallback when the type is not at hand)."""
    return [o.strip().strip("'") for o in str(expected).replace(" or ", ",").split(",") if o.strip()]


def _join(path: str, field: str) -> str:
    return field if path == "(top level)" else f"{path}.{field}"


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _path(loc: tuple) -> tuple[str, type[BaseModel] | None, Any]:
    """Render a pydantic error location as ``stages[2].data_fraction``. Also returns the model that
    owns the last key (for did-you-mean) and the type found at the location itself. Discriminator tags
    that pydantic inserts are dropped; an integer is an index only inside a list; a key that is not an
    identifier is written ``['max lr']``."""
    parts: list[str] = []
    tp: Any = JobSpec
    owner: type[BaseModel] | None = None
    for item in loc:
        tp = _unwrap(tp)
        owner = tp if _is_model(tp) else None
        members = _union_members(tp)
        if members and item in members:  # discriminator tag inserted by pydantic
            tp = members[item]
            continue
        if isinstance(item, int) and typing.get_origin(tp) in (list, tuple):
            parts.append(f"[{item}]")
            args = [a for a in typing.get_args(tp) if a is not Ellipsis]
            tp = args[min(item, len(args) - 1)] if args else Any
            continue
        # Keys that are not identifiers (`max lr`, `a.b`) are quoted so the path stays unambiguous.
        if isinstance(item, str) and item.isidentifier():
            parts.append(("." if parts else "") + item)
        else:
            parts.append(f"[{item!r}]")
        tp = tp.model_fields[item].annotation if _is_model(tp) and item in tp.model_fields else Any
    return ("".join(parts) or "(top level)"), owner, _unwrap(tp)


def _unwrap(tp: Any) -> Any:
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _unwrap(args[0])
    return tp


def _union_members(tp: Any) -> dict[str, type[BaseModel]]:
    tp = _unwrap(tp)
    if typing.get_origin(tp) not in (Union, types.UnionType):
        return {}
    out = {}
    for member in typing.get_args(tp):
        member = _unwrap(member)
        if isinstance(member, type) and issubclass(member, BaseModel):
            for name in ("kind", "name"):
                field = member.model_fields.get(name)
                if field is not None and typing.get_origin(field.annotation) is Literal:
                    out[typing.get_args(field.annotation)[0]] = member
    return out


def json_schema() -> str:
    return json.dumps(JobSpec.model_json_schema(), indent=2)
