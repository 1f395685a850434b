"""What runs in each Ray Train worker: one stage of a job, from its latest committed checkpoint.

Read top to bottom: set up -> restore -> train (report every few steps, checkpoint periodically)
-> evaluate -> commit the stage-boundary checkpoint. The coordinator hands over between stages
through that checkpoint, which is also how a restarted worker group (Ray's ``FailureConfig``) and a
``stagetrain resume`` continue: one code path, one source of truth.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import os
import random
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from checkpoints.checkpointer import AsyncCheckpointer, decode, load
from checkpoints.storage import Storage
from checkpoints.store import CheckpointStore, package_versions, tag_for
from service.curve import regularization, resolution, stage_first_step
from service.layout import CHECKPOINTS, REQUESTS_DIR
from service.plan import Plan
from service.records import EvalRecord, Report, StageEnd, StepRecord
from service.spec import EVAL_METRICS, AdamWSpec, ImageFolderData, JobSpec
from workers.augment import PARAMS_DTYPE, collate, crop_resize, decode_batch
from workers.control import pending_holds, write_held_marker
from workers.data import (
    InMemory,
    StageDataset,
    StageSampler,
    _mix,
    collate_host,
    mix_batch,
    normalize_tensors,
    open_source,
    split_evenly,
    stage_subset,
    to_input,
)
from workers.models import build_model, set_stage_rates
from workers.schedules import PlanScheduler

AUDIT_ENV = "STAGETRAIN_AUDIT_SAMPLES"  # tests: report which sample ids every rank read


class Progress:
    """The data position: the next optimizer step. Everything else about where training is (stage,
    epoch, batch in the epoch, samples seen) is a function of the step and the plan."""

    def __init__(self, step: int):
        self.step = step

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


class RNGState:
    """Python, numpy, torch and CUDA RNG states of every rank: ``state_dict`` gathers them to every rank
    (rank 0 saves them); ``load_state_dict`` restores this rank's own when the world size is unchanged
    (on another world size the per-rank streams cannot map one to one: each rank keeps its fresh seed)."""

    def __init__(self, gather: Callable[[dict], list[dict]] = lambda s: [s], rank: int = 0, world: int = 1):
        self.gather, self.rank, self.world = gather, rank, world

    @staticmethod
    def capture() -> dict:
        state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    @staticmethod
    def restore(state: dict) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])

    def state_dict(self) -> dict:
        # A collective: every rank calls it. Plain containers only, so torch.load(weights_only=True) reads it.
        return {"per_rank": [_plain_rng(s) for s in self.gather(self.capture())]}

    def load_state_dict(self, state: dict) -> None:
        per_rank = state["per_rank"]
        if len(per_rank) == self.world:
            self.restore(_rich_rng(per_rank[self.rank]))


def _plain_rng(s: dict) -> dict:
    version, internal, gauss = s["python"]
    kind, keys, pos, has_gauss, cached = s["numpy"]
    out = {
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": s["torch"],
    }
    if "cuda" in s:
        out["cuda"] = s["cuda"]
    return out


def _rich_rng(s: dict) -> dict:
    version, internal, gauss = s["python"]
    kind, keys, pos, has_gauss, cached = s["numpy"]
    out = {
        "python": (version, tuple(internal.tolist()), gauss),
        "numpy": (kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached),
        "torch": s["torch"],
    }
    if "cuda" in s:
        out["cuda"] = s["cuda"]
    return out


class EMA:
    """An exponential moving average of the unwrapped model's weights (``train.ema``), in a module of its
    own that is evaluated and exported like the model: ``ema = decay * ema + (1 - decay) * weights`` over
    parameters and floating-point buffers (BatchNorm statistics) every ``every`` optimizer steps; integer
    buffers (``num_batches_tracked``) are copied. It starts as the initial weights. Under DDP every rank
    averages the same parameters; BatchNorm buffers are rank 0's, as for the model, once broadcast
    (``Distributed.broadcast_buffers``) before an evaluation; rank 0's is the one saved."""

    def __init__(self, model: torch.nn.Module, decay: float, every: int):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.every = decay, every

    def due(self, steps_done: int) -> bool:
        """Update after the optimizer step that makes ``steps_done``? A function of the step only, so a
        resumed run updates at the same steps as an uninterrupted one."""
        return steps_done % self.every == 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        pairs = list(zip(self.module.parameters(), model.parameters(), strict=True))
        pairs += list(zip(self.module.buffers(), model.buffers(), strict=True))
        floats = [(a, m) for a, m in pairs if a.is_floating_point()]
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [m for _, m in floats], 1.0 - self.decay)
        for a, m in pairs:
            if not a.is_floating_point():
                a.copy_(m)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])  # strictly, like the model


def topk_correct(logits: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """How many rows of ``logits`` have the label ``y`` among their ``k`` highest scores."""
    top = logits.topk(k, dim=1).indices
    return (top == y[:, None]).any(dim=1).sum()


def build_optimizer(spec: JobSpec, model: torch.nn.Module) -> torch.optim.Optimizer:
    opt = spec.optimizer
    lr = spec.schedule.max_lr  # overwritten by the scheduler before the first step
    if isinstance(opt, AdamWSpec):
        return torch.optim.AdamW(
            model.parameters(), lr=lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay
        )
    return torch.optim.SGD(
        model.parameters(), lr=lr, momentum=opt.momentum, nesterov=opt.nesterov, weight_decay=opt.weight_decay
    )


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def param_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer, to prove ranks hold identical weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class Distributed:
    """The few collectives the loop needs; a no-op world when running one process."""

    def __init__(self):
        self.on = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1
        # Control-plane collectives (stop flags, object gathers, CPU tensors) go over gloo, so they never
        # force a GPU sync, and work on a GPU job whose default group is plain nccl.
        self.cpu_group = dist.new_group(backend="gloo") if self.on and dist.get_backend() != "gloo" else None

    def gather_objects(self, obj) -> list:
        if not self.on:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.cpu_group)
        return out

    def broadcast_object(self, obj):
        if not self.on:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        if self.on:
            for buf in module.buffers():
                dist.broadcast(buf, src=0)

    def any(self, flag: bool) -> bool:
        return bool(self.max(int(flag)))

    def max(self, value: int) -> int:
        if not self.on:
            return value
        t = torch.tensor([value])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return int(t.item())

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.on:
            t = t.clone()
            dist.all_reduce(t, group=self._group_for(t))
            t /= self.world
        return t

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.on:
            t = t.clone()
            dist.all_reduce(t, group=self._group_for(t))
        return t

    def _group_for(self, t: torch.Tensor):
        # A plain "nccl" default group (what Ray's TorchConfig creates on GPU) has no CPU backend:
        # CPU tensors (report losses, eval totals) go over the gloo group.
        return self.cpu_group if t.device.type == "cpu" else None


def wrap_model(
    model: torch.nn.Module, world: int, device: torch.device, compile_model: bool
) -> tuple[torch.nn.Module, DDP | None]:
    """(what the loop calls, the DDP module or None). DDP only for a world of several processes;
    ``torch.compile`` wraps DDP, so keep the DDP handle: the compiled module is no ``DDP`` instance,
    and gradient accumulation must still switch DDP's all-reduce off (``no_sync``) through it."""
    ddp = None
    if world > 1:
        model = ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return (torch.compile(model) if compile_model else model), ddp


def accumulate(
    model: torch.nn.Module,
    ddp: DDP | None,
    batches,
    grad_accum: int,
    loss_fn,
    autocast=contextlib.nullcontext,
    scaler=None,
) -> torch.Tensor:
    """Forward and backward ``grad_accum`` micro-batches from ``batches`` into the gradients; DDP
    all-reduces once, on the last micro-batch. Returns the summed (already 1/grad_accum-scaled) loss."""
    loss_sum = None
    for micro in range(grad_accum):
        x, y = next(batches)
        last = micro == grad_accum - 1
        with contextlib.nullcontext() if last or ddp is None else ddp.no_sync():
            with autocast():
                loss = loss_fn(model(x), y) / grad_accum
            (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
    return loss_sum


def training_loss(logits: torch.Tensor, y: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Cross-entropy with label smoothing; ``y``: class indices, or probabilities after mixup/cutmix
    (then in float32)."""
    return F.cross_entropy(logits.float() if y.is_floating_point() else logits, y, label_smoothing=smoothing)


NEWEST_VERIFIED = "newest-verified"  # StageRunner(restore=...): find it here (in-process runs, tests)


class StageRunner:
    """One stage on one rank. ``report(metrics)`` is ``ray.train.report`` in a Ray worker; the same
    loop runs in-process for the benchmarks and tests with a plain callable.

    Injected for benchmarks and tests: ``device`` (default: the job's, from Ray Train), ``store`` (the
    job's checkpoint store), ``on_step(step)`` (called after every optimizer step)."""

    def __init__(
        self,
        spec: JobSpec,
        plan: Plan,
        row: int,
        job_id: str,
        storage_url: str,
        report=None,
        stop_requested=None,
        provenance: dict | None = None,
        device: torch.device | None = None,
        store: CheckpointStore | None = None,
        on_step: Callable[[int], None] | None = None,
        restore: str | None = NEWEST_VERIFIED,
    ):
        self.spec, self.plan, self.row, self.stage = spec, plan, row, plan.stages[row]
        self.job_id = job_id
        self.report = report or (lambda metrics: None)
        self.stop_requested = stop_requested or (lambda: False)
        self.on_step = on_step or (lambda step: None)
        # Recorded in every manifest: what wrote it (the driver knows the git revision, workers their
        # versions).
        self.provenance = {
            "versions": package_versions(),
            "git_revision": (provenance or {}).get("git_revision"),
        }
        self.dist = Distributed()
        self.device = device or _device(spec)
        self.job_storage = Storage(storage_url, spec.checkpoint.storage_options).child(job_id)
        self.store = store or CheckpointStore(self.job_storage.child(CHECKPOINTS))
        # control/hold.json (tests, demos): steps to hold at, decided by rank 0 for every rank
        self.holds = self.dist.broadcast_object(
            pending_holds(self.job_storage) if self.dist.rank == 0 else None
        )
        self.resolution = self.stage.resolution  # of the step being trained (resolution_ramp_steps)
        self._tail: list[StepRecord] = []  # the stage's last records, sent with the stage end
        self._evals: list[EvalRecord] = []  # mid-stage evaluations not yet reported
        self._sources: dict = {}  # split (folders: and resolution) -> (source, InMemory copy or None)
        self.skipped = 0  # training images data.on_bad_image: skip left out, on this rank
        self._skip_bad = getattr(spec.data, "on_bad_image", "error") == "skip"  # image folders only

        # Model, optimizer, schedule. The raw module is what is saved; DDP/compile wrap it.
        torch.manual_seed(spec.seed)  # identical init on every rank (DDP would broadcast it anyway)
        self.raw_model = build_model(spec.model)
        self._set_stage_rates()
        seed_everything(spec.seed + 1000 * self.dist.rank, spec.deterministic)  # per-rank streams (dropout)
        self.raw_model.to(self.device)
        if self._cuda and spec.train.channels_last:
            self.raw_model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(spec, self.raw_model)
        # fp16 needs loss scaling (bf16 and fp32 do not); its scale then belongs to the checkpoint
        fp16 = self._cuda and spec.train.amp and spec.train.precision == "fp16"
        self.scaler = torch.amp.GradScaler("cuda") if fp16 else None
        ema = spec.train.ema
        self.ema = EMA(self.raw_model, ema.decay, ema.every_n_steps) if ema else None
        self.scheduler = PlanScheduler(self.optimizer, plan, start_step=self.stage.step_start)
        self.progress = Progress(step=self.stage.step_start)
        self.rng = RNGState(self.dist.gather_objects, self.dist.rank, self.dist.world)
        best = spec.checkpoint.keep_best
        self.checkpointer = AsyncCheckpointer(
            self.store,
            spec.checkpoint.keep_last,
            spec.checkpoint.keep_stage_checkpoints,
            keep_best=(best.metric, best.mode) if best else None,
        )
        self.restored_from = self.restore(restore)
        self.checkpointer.protect = frozenset({self.restored_from} - {None})
        self.model, self.ddp = wrap_model(self.raw_model, self.dist.world, self.device, self.stage.compile)

    @property
    def _cuda(self) -> bool:
        return self.device.type == "cuda"

    def next_stage(self) -> None:
        """Go on with the next plan row on the same workers (a stage group): its resolution, batch,
        data subset and LR factor are functions of the plan and the step, so nothing but the row moves;
        model, optimizer, scheduler, RNG streams and the DDP wrapper carry over exactly as a restore from
        the boundary checkpoint just committed would set them."""
        compiled = self.stage.compile
        self.row += 1
        self.stage = self.plan.stages[self.row]
        assert self.progress.step == self.stage.step_start, (self.progress.step, self.stage.step_start)
        self.resolution = self.stage.resolution
        self._tail, self._evals, self.restored_from = [], [], None
        self._set_stage_rates()
        if self.stage.compile != compiled:
            self.model, self.ddp = wrap_model(
                self.raw_model, self.dist.world, self.device, self.stage.compile
            )
        # the coordinator starts the stage's bookkeeping (status, attempt, clock) on this report
        self.report(Report(started_row=self.row if self.dist.rank == 0 else None).model_dump())

    def _set_stage_rates(self) -> None:
        """The stage's dropout and drop-path rates (``regularization.dropout`` / ``drop_path``) on the
        model, in place: the optimizer state is untouched."""
        reg = self.spec.stage_regularization(self.stage.index)
        set_stage_rates(self.raw_model, reg.dropout, reg.drop_path, self.spec.model.label)

    def group_ends_here(self) -> bool:
        """At a stage boundary inside a group: stop here rather than go on with the next stage? Yes when
        a stop was requested, or a ``stagetrain scale`` request waits in the job folder (the coordinator
        applies it between runs). Decided together by every rank."""
        pending = self.stop_requested()
        if self.dist.rank == 0 and not pending:
            pending = any(n.startswith("scale-") for n in self.job_storage.listdir(REQUESTS_DIR))
        return self.dist.any(pending)

    # ----------------------------------------------------------------------------------- state

    def stateful(self) -> dict:
        """The worker's whole training state: saved and restored through this one dict. The RNG entry
        goes last on restore: loading the others must not move the restored streams."""
        state = {
            "model": self.raw_model,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "data": self.progress,
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler
        if self.ema is not None:
            state["ema"] = self.ema
        return {**state, "rng": self.rng}

    def restore(self, tag: str | None = NEWEST_VERIFIED) -> str | None:
        """Load checkpoint ``tag`` (the coordinator's choice: the newest verified one, hashed once there;
        None: start afresh), or with ``NEWEST_VERIFIED`` the one rank 0 finds so. Every rank loads the
        same tag, checking sizes only: its bytes were verified once."""
        manifest, state = None, None
        if tag == NEWEST_VERIFIED:
            if self.dist.rank == 0:  # corrupt or partial newer ones are skipped
                latest = self.store.latest(verify=True)
                if latest:
                    manifest, state = latest[0], decode(latest[1])
            tag = self.dist.broadcast_object(manifest.tag if manifest else None)
        if tag is None:
            if self.stage.step_start > 0:
                raise RuntimeError(
                    f"stage {self.stage.label} starts at step {self.stage.step_start}, but "
                    f"{self.store.storage.url} has no committed checkpoint to start from"
                )
            return None
        if state is None:
            manifest, state = load(self.store, tag, verify=False)
        if manifest.job_id != self.job_id:
            raise RuntimeError(f"checkpoint {tag} belongs to job {manifest.job_id}, not {self.job_id}")
        if not self.stage.step_start <= manifest.step <= self.stage.step_end:
            raise RuntimeError(
                f"latest checkpoint {tag} is at step {manifest.step}, outside stage {self.stage.label}'s "
                f"steps [{self.stage.step_start}, {self.stage.step_end}]: the job record and storage disagree"
            )
        # Data position and LR are functions of the step: the checkpoint must agree with the plan.
        if manifest.samples_seen != self.plan.samples_before(manifest.step):
            raise RuntimeError(
                f"checkpoint {tag}: samples_seen {manifest.samples_seen} at step {manifest.step} "
                f"disagrees with the plan's {self.plan.samples_before(manifest.step)}"
            )
        stateful = self.stateful()
        optional = {"scaler"}  # fp16 loss scaling: saved with it and restored without, or the reverse
        missing, unexpected = set(stateful) - set(state) - optional, set(state) - set(stateful) - optional
        if missing or unexpected:
            raise RuntimeError(
                f"checkpoint {tag} does not match this job's training state: "
                + "; ".join(
                    [f"missing {', '.join(sorted(missing))}"] * bool(missing)
                    + [f"unexpected {', '.join(sorted(unexpected))}"] * bool(unexpected)
                )
            )
        for name, obj in stateful.items():
            if name in state:
                obj.load_state_dict(state[name])  # the model strictly: a missing/unexpected key raises
        if self.progress.step != manifest.step or self.scheduler.last_epoch != manifest.step:
            raise RuntimeError(
                f"checkpoint {tag}: its state is at step {self.progress.step} (scheduler "
                f"{self.scheduler.last_epoch}), its manifest says {manifest.step}"
            )
        return tag

    def save(self, boundary: bool, metrics: dict[str, float] | None = None) -> None:
        """All ranks call this (RNG states are gathered); rank 0 writes. ``metrics``: the evaluation at
        this step, recorded in the manifest (``checkpoint.keep_best`` ranks by it)."""
        state = {name: obj.state_dict() for name, obj in self.stateful().items()}
        if self.dist.rank != 0:
            return
        step = self.progress.step
        self.checkpointer.save(
            state,
            tag_for(step, self.stage.number, boundary),
            block=boundary,
            job_id=self.job_id,
            stage=self.stage.number,
            epoch=self.stage.epoch_of(step),
            step=step,
            samples_seen=self.plan.samples_before(step),
            boundary=boundary,
            world_size=self.dist.world,
            plan_hash=self.plan.plan_hash(),
            stage_hash=self.plan.stage_hash(self.plan.row(self.stage)),
            spec_hash=self.spec.spec_hash(),
            # finite values only: JSON has no NaN (a diverged run's loss), and a manifest must read back
            metrics={k: v for k, v in metrics.items() if math.isfinite(v)} if metrics else None,
            **self.provenance,
        )

    # ------------------------------------------------------------------------------------ data

    def _loader(self, dataset, sampler=None, batch_size: int | None = None, on_device=False) -> DataLoader:
        workers = self.spec.data.loader_workers
        # Its own generator: a DataLoader without one draws its base seed from the global torch RNG when
        # its iterator is made, so where a resumed run makes it would shift every dropout mask after it.
        generator = torch.Generator().manual_seed(_mix(self.spec.seed, self.stage.index, self.dist.rank))
        return DataLoader(
            dataset,
            batch_size=batch_size or self.stage.batch_size,
            sampler=sampler,
            num_workers=workers,
            pin_memory=self._cuda,
            prefetch_factor=4 if workers else None,
            persistent_workers=False,
            generator=generator,
            collate_fn=collate if on_device else collate_host,  # (images, labels[, crop params])
        )

    def _source(self, split: str, resolution: int) -> tuple:
        """(the split's source, its ``InMemory`` copy on the device or None), opened once per runner:
        the stages of a group and every evaluation share them (an image folder: per resolution, which
        picks a prepared folder's tier)."""
        data = self.spec.data
        key = (split, resolution) if isinstance(data, ImageFolderData) else split
        if key not in self._sources:
            source = open_source(data, self.spec.model.in_channels, self.spec.seed, split, resolution)
            memory = None
            cache_bytes = getattr(data, "device_cache_bytes", 0)  # image folders: never
            if data.augment_on == "device" and cache_bytes:
                memory = InMemory.load(source, self.device, cache_bytes)
            self._sources[key] = (source, memory)
        return self._sources[key]

    def _batches(self, batches, size: Callable[[], int], source=None, expected: int | None = None):
        """Batches as model input on the device, at ``size()`` pixels (the step's resolution, read as each
        batch is made: a resolution ramp moves it). (uint8 images, labels, crop params) are cropped and
        resized there (``workers.augment``), encoded JPEGs (a list) decoded there first; host-augmented
        (uint8 images, labels) only resized where a ramp moved the resolution. Then uint8 -> normalised
        float (``data.normalize``). ``source``: names a file that cannot be decoded. ``expected``: the
        batch size, to count the images ``data.on_bad_image: skip`` left out (``self.skipped``)."""
        channels_last = self._cuda and self.spec.train.channels_last
        mean_std = normalize_tensors(self.spec.data.normalize, self.device)
        channels = self.spec.model.in_channels
        for batch in batches:
            labels, params = batch[1], batch[2] if len(batch) == 3 else None
            if isinstance(batch[0], dict):  # data.decode_on: device (workers.augment.pack_encoded)
                x, kept = decode_batch(batch[0], params, self.device, channels, source.path, self._skip_bad)
                labels, params = labels[kept], params[kept]
            else:
                x = batch[0].to(self.device, non_blocking=True)
            if not len(labels):
                raise ValueError("data: every image of a batch was skipped (data.on_bad_image: skip)")
            if expected:
                self.skipped += expected - len(labels)
            if params is not None:
                x = to_input(crop_resize(x, params, size()), self.device, channels_last, mean_std)
            else:
                x = to_input(x, self.device, channels_last, mean_std)
                if x.shape[-1] != size():
                    size_ = (size(), size())
                    x = F.interpolate(x, size=size_, mode="bilinear", antialias=True, align_corners=False)
            yield x, labels.to(self.device, non_blocking=True)

    def _gathered(self, memory: InMemory, dataset: StageDataset, keys):
        """The batches a loader of ``dataset`` would deliver for ``keys`` (each batch's samples as (id,
        epoch)), gathered from ``memory`` on the device: (images, labels, crop params), the same samples
        and draws."""
        height, width = memory.images.shape[-2:]
        for batch in keys:
            images, labels = memory.gather(torch.tensor([i for i, _ in batch]))
            params = [(*dataset.params(i, epoch, height, width), i, 0) for i, epoch in batch]
            yield images, labels, torch.tensor(params, dtype=PARAMS_DTYPE)

    def ramped(self, first: int, last: int | None = None) -> dict:
        """{step: its ``Regularization``} for the steps among ``[first, last)`` (counted as
        ``train_data``'s) that fall in the stage's ``regularization_ramp_steps``; the others use the
        stage's own."""
        st = self.stage
        ramp_end = (
            stage_first_step(self.plan, st.step_start) + self.spec.stages[st.index].regularization_ramp_steps
        )
        last_step = st.step_start + (st.steps if last is None else last)
        steps = range(st.step_start + first, min(last_step, ramp_end))
        return {step: regularization(self.spec, self.plan, step) for step in steps}

    def train_data(self, first: int, last: int | None = None):
        """(sampler, batches on the device, ``ramped``) of this rank for the stage's steps
        ``[first, last)`` (counted from the stage's start; ``last`` defaults to the stage's end)."""
        st, spec = self.stage, self.spec
        reg = spec.stage_regularization(st.index)
        ramped = self.ramped(first, last)
        # per sample (RandAugment, erasing), by the sampler's step: the dataset sees only the sample
        augment_at = {
            step - st.step_start: ((r.randaugment.num_ops, r.randaugment.magnitude), r.random_erasing)
            for step, r in ramped.items()
        }
        source, memory = self._source("train", st.resolution)
        if len(source) != self.plan.dataset_size:
            raise RuntimeError(
                f"data: the training split has {len(source)} samples, but this job was planned "
                f"for {self.plan.dataset_size}: the data changed since the job started"
            )
        randaugment = (reg.randaugment.num_ops, reg.randaugment.magnitude) if reg.randaugment else None
        # RandAugment and random erasing work per sample, on the host (in the loader workers). Decided for
        # the whole stage, ramp included, wherever this run starts: a resume reads as the first run did.
        ramp = self.ramped(0).values()
        per_sample = any(r.randaugment and r.randaugment.num_ops or r.random_erasing for r in ramp)
        per_sample |= bool(randaugment and randaugment[0]) or reg.random_erasing > 0
        on_device = spec.data.augment_on == "device" and not per_sample
        train_set = StageDataset(
            source,
            st.resolution,
            train=True,
            seed=spec.seed,
            stage=st.index,
            crop_scale=spec.data.crop_scale,
            hflip=spec.data.hflip,
            randaugment=randaugment,
            random_erasing=reg.random_erasing,
            augment_at=None if on_device else augment_at or None,
            on_device=on_device,
        )
        sampler = StageSampler(
            stage_subset(self.plan.dataset_size, st.subset_size, spec.seed),
            spec.seed,
            st.index,
            st.epoch_samples,
            st.global_batch,
            st.batch_size,
            self.dist.world,
            self.dist.rank,
            first_step=first,
            last_step=st.steps if last is None else last,
            stream_offset=st.stream_offset,
            with_step=bool(augment_at) and not on_device,
        )
        last_local = st.steps if last is None else last
        if on_device and memory is not None:
            micro_batches = (micro for local in range(first, last_local) for micro in sampler.step_ids(local))
            raw = self._gathered(memory, train_set, micro_batches)
        else:
            raw = self._loader(train_set, sampler, on_device=on_device)
        batches = self._batches(raw, lambda: self.resolution, source, expected=st.batch_size)
        mixes = reg.mixes or any(r.mixes for r in ramped.values())
        return sampler, (self._mixed(batches, reg, ramped, first) if mixes else batches), ramped

    def _mixed(self, batches, reg, ramped: dict, first: int):
        """Mixup/cutmix of each micro-batch (``mix_batch``; ``ramped``: the steps with their own), keyed
        by its global step, its index within the step and the rank: a function of where training is, so
        a resume mixes as before."""
        for k, (x, y) in enumerate(batches):
            step = self.stage.step_start + first + k // self.stage.grad_accum
            micro = k % self.stage.grad_accum
            yield mix_batch(
                x,
                y,
                self.spec.model.num_classes,
                ramped.get(step, reg),
                self.spec.seed,
                step,
                micro,
                self.dist.rank,
            )

    # ----------------------------------------------------------------------------------- train

    def run(self) -> StageEnd:
        st, spec = self.stage, self.spec
        if self.progress.step == st.step_end:  # restarted after the stage's checkpoint was committed
            return self._finish(evaluate=False)
        audit = os.environ.get(AUDIT_ENV) == "1"
        every_report, every_ckpt = spec.metrics.every_n_steps, spec.checkpoint.every_n_steps
        every_eval = spec.metrics.eval_every_n_steps
        pending, window_start = [], time.perf_counter()
        self.model.train()
        first = self.progress.step - st.step_start
        sampler, batches, ramped = self.train_data(first)
        reg = spec.stage_regularization(st.index)
        smoothing = reg.label_smoothing

        def loss_fn(logits, y):  # reads ``smoothing`` when called: a regularization ramp moves it
            return training_loss(logits, y, smoothing)

        for local in range(first, st.steps):
            step = st.step_start + local
            if self.holds and step in self.holds.steps:
                if pending:  # reported first: a stop during the hold leaves no step unreported
                    window_start, pending = self._report(pending, window_start, final=False), []
                if self._hold(step):
                    return self._preempt()
                window_start = time.perf_counter()
            self.resolution = resolution(self.plan, step)
            if step in ramped or ramped and step == max(ramped) + 1:  # regularization_ramp_steps
                r = ramped.get(step, reg)
                smoothing = r.label_smoothing  # loss_fn reads it when called
                set_stage_rates(self.raw_model, r.dropout, r.drop_path, spec.model.label)
            lr, momentum = self._lr_momentum()
            skipped = self.skipped
            loss = self.optimizer_step(batches, loss_fn, step)
            self.progress.step = step + 1
            self.on_step(step)
            ids = sampler.step_ids(local) if audit else None
            pending.append((step, loss, lr, momentum, self.resolution, ids, self.skipped - skipped))
            done = self.progress.step == st.step_end
            evaluated = None
            if every_eval and self.progress.step % every_eval == 0 and not done:
                started = time.perf_counter()
                self._evals.append(self._eval_record())
                evaluated = self._evals[-1].model_dump(include=set(EVAL_METRICS), exclude_none=True)
                window_start += time.perf_counter() - started  # throughput counts training time only
            reported = len(pending) >= every_report or done
            if reported:
                window_start = self._report(pending, window_start, final=done)
                pending = []
            # checkpoint.keep_best: a checkpoint at every evaluation, so the best one can be kept
            best_here = evaluated is not None and spec.checkpoint.keep_best is not None
            if (best_here or (every_ckpt and self.progress.step % every_ckpt == 0)) and not done:
                self.save(boundary=False, metrics=evaluated)
            # Stop requests are checked with each report, not every step: a stop has
            # preemption.grace_seconds to land, and the check is a collective (one gloo round trip).
            if reported and not done and self.dist.any(self.stop_requested()):
                return self._preempt()
        return self._finish(evaluate=True)

    def optimizer_step(self, batches, loss_fn, step: int) -> torch.Tensor:
        """Optimizer step ``step``: its ``grad_accum`` micro-batches from ``batches``, clipping, the
        update, the EMA and the schedule (also what ``stagetrain plan --calibrate`` times). The loss."""
        loss = accumulate(
            self.model, self.ddp, batches, self.stage.grad_accum, loss_fn, self._autocast, self.scaler
        )
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if clip := self.spec.train.grad_clip_norm:  # DDP all-reduced the gradients: every rank clips alike
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None and self.ema.due(step + 1):
            self.ema.update(self.raw_model)
        self.scheduler.step()
        return loss

    def _hold(self, step: int) -> bool:
        """Wait before ``step`` (``control/hold.json``) until a stop is requested (True) or the hold
        times out (False). Every rank polls together, so all leave at the same moment."""
        write_held_marker(self.job_storage, step, self.dist.rank)
        deadline = time.monotonic() + self.holds.timeout_s
        while True:  # 2: a stop was requested on some rank, 1: some rank timed out
            verdict = self.dist.max(2 if self.stop_requested() else int(time.monotonic() > deadline))
            if verdict:
                return verdict == 2
            time.sleep(0.05)

    def _autocast(self):
        precision = self.spec.train.precision if self._cuda and self.spec.train.amp else "fp32"
        if precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)

    def _lr_momentum(self) -> tuple[float, float]:
        """What the optimizer will actually use for this step (read back, not recomputed)."""
        group = self.optimizer.param_groups[0]
        return group["lr"], group["betas"][0] if "betas" in group else group["momentum"]

    def _report(self, pending: list[tuple], window_start: float, final: bool) -> float:
        """Report the steps in ``pending``; returns when the next window starts. Windows are back to
        back and end after the loss copy (a device sync), so images_per_s counts all the time, GPU work
        included."""
        st = self.stage
        losses = self.dist.mean(torch.stack([p[1] for p in pending]).float().cpu())
        now, stamp = time.perf_counter(), time.time()
        img_s = len(pending) * st.global_batch / max(now - window_start, 1e-9)
        audit = pending[0][5] is not None
        ids = self.dist.gather_objects([p[5] for p in pending]) if audit else None
        skipped = None  # data.on_bad_image: skip: per step, over all ranks
        if self._skip_bad:
            skipped = self.dist.sum(torch.tensor([p[6] for p in pending])).tolist()
        records = [
            StepRecord(
                step=step,
                stage=st.number,
                epoch=st.epoch_of(step),
                samples_seen=self.plan.samples_before(step + 1),
                loss=loss,
                lr=lr,
                momentum=momentum,
                resolution=res,
                global_batch=st.global_batch,
                workers=self.dist.world,
                grad_accum=st.grad_accum,
                images_per_s=img_s,
                time=stamp,
                sample_ids=[[i for micro in rank[k] for i, _ in micro] for rank in ids] if audit else None,
                skipped_images=skipped[k] if skipped else None,
            )
            for k, ((step, _, lr, momentum, res, _, _), loss) in enumerate(
                zip(pending, losses.tolist(), strict=True)
            )
        ]
        if final:
            self._tail = records
        else:
            mine = self.dist.rank == 0
            self.report(
                Report(records=records if mine else [], evals=self._evals if mine else []).model_dump()
            )
            self._evals = []
        return now

    def _eval_record(self) -> EvalRecord:
        """Evaluate inside the stage (all ranks); rank 0 sends the record with the next report."""
        self.dist.broadcast_buffers(self.raw_model)  # rank 0's BatchNorm statistics, as at stage ends
        metrics = self.evaluations()
        step = self.progress.step
        return EvalRecord(
            step=step,
            stage=self.stage.number,
            samples_seen=self.plan.samples_before(step),
            resolution=self.spec.data.val_resolution or self.stage.resolution,
            time=time.time(),
            **metrics,
        )

    def _finish(self, evaluate: bool) -> StageEnd:
        """Evaluate, commit the boundary checkpoint, and send the last report (with the stage summary)."""
        st = self.stage
        end = StageEnd(stage=st.number, step=self.progress.step, restored_from=self.restored_from)
        if evaluate:
            # DDP syncs BatchNorm buffers from rank 0 at each forward, so after the last step every rank
            # holds its own running stats; take rank 0's, which is what the checkpoint saves.
            self.dist.broadcast_buffers(self.raw_model)
            metrics = self.evaluations()
            for name, value in metrics.items():
                setattr(end, name, value)
            end.time = time.time()
            end.param_digests = self.dist.gather_objects(param_digest(self.raw_model))
            if self.progress.step == st.step_end:
                self.save(boundary=st.last_segment, metrics=metrics)
        return self._end(end)

    def _preempt(self) -> StageEnd:
        """A stop was requested (checked right after a report): commit a checkpoint at the step reached
        and leave."""
        self.save(boundary=False)
        self.checkpointer.wait()
        notices = [n for n in self.dist.gather_objects(getattr(self.stop_requested, "notice", None)) if n]
        return self._end(
            StageEnd(
                stage=self.stage.number,
                step=self.progress.step,
                preempted=True,
                restored_from=self.restored_from,
                notices=[n["text"] for n in notices],
                notice_nodes=sorted({n["node"] for n in notices}),
            )
        )

    def _end(self, end: StageEnd) -> StageEnd:
        """The stage's last report: the records not yet sent and, from rank 0, the summary."""
        if self.dist.rank == 0:
            last = self.checkpointer.last_committed
            end.checkpoint = last.tag if last else None
            end.checkpoint_failures, end.stall_s = self.checkpointer.failures, self.checkpointer.stall_s
        mine = self.dist.rank == 0
        self.report(
            Report(
                records=self._tail if mine else [],
                evals=self._evals if mine else [],
                stage_end=end if mine else None,
            ).model_dump()
        )
        return end

    def evaluations(self) -> dict[str, float]:
        """The evaluation (all ranks) of the model and, with ``train.ema``, of its average beside it:
        ``{"val_loss", "val_acc", "val_top5", "ema_val_loss", ...}`` (top-5 when num_classes > 5)."""
        metrics = self.validate(self.raw_model)
        if self.ema is not None:
            self.dist.broadcast_buffers(self.ema.module)  # rank 0's averaged BatchNorm statistics
            metrics |= {f"ema_{name}": value for name, value in self.validate(self.ema.module).items()}
        return metrics

    def evaluate(self) -> tuple[float, float]:
        """(loss, top-1 accuracy) of the model (``validate``)."""
        metrics = self.validate(self.raw_model)
        return metrics["val_loss"], metrics["val_acc"]

    @torch.no_grad()
    def validate(self, model: torch.nn.Module) -> dict[str, float]:
        """Loss, top-1 and (num_classes > 5) top-5 accuracy of ``model`` on the validation split at the
        stage's resolution (or ``data.val_resolution``), over all ranks."""
        spec = self.spec
        top5 = spec.model.num_classes > 5
        size = spec.data.val_resolution or self.stage.resolution
        source, memory = self._source("val", size)
        on_device = spec.data.augment_on == "device"
        val = StageDataset(source, size, train=False, on_device=on_device)
        indices = list(split_evenly(range(len(val)), self.dist.world, self.dist.rank))
        if on_device and memory is not None:
            per = spec.data.val_batch_size
            keys = ([(i, 0) for i in indices[k : k + per]] for k in range(0, len(indices), per))
            loader = self._gathered(memory, val, keys)
        else:
            subset = torch.utils.data.Subset(val, indices)
            loader = self._loader(subset, batch_size=spec.data.val_batch_size, on_device=on_device)
        # loss sum, top-1 correct, count, top-5 correct
        totals = torch.zeros(4, dtype=torch.float64, device=self.device)
        was_training = model.training
        model.eval()
        for x, y in self._batches(loader, lambda: size, source):
            with self._autocast():
                logits = model(x)
            # accumulated on the device: no host sync per batch
            totals[0] += F.cross_entropy(logits.float(), y, reduction="sum").double()
            totals[1] += (logits.argmax(1) == y).sum().double()
            totals[2] += len(y)
            if top5:
                totals[3] += topk_correct(logits, y, 5).double()
        model.train(was_training)
        loss, top1, count, top5_correct = self.dist.sum(totals).tolist()
        metrics = {"val_loss": loss / count, "val_acc": top1 / count}
        if top5:
            metrics["val_top5"] = top5_correct / count
        return metrics


def _device(spec: JobSpec) -> torch.device:
    if not spec.resources.use_gpu:
        return torch.device("cpu")
    import ray.train.torch

    try:
        return ray.train.torch.get_device()
    except RuntimeError:  # not in a Ray Train worker (torchrun): LOCAL_RANK picks the GPU
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device


def train_loop_per_worker(config: dict) -> None:
    """The ``TorchTrainer`` entry point: ``config`` carries the spec, plan, storage and the plan rows
    to run, ``stage``..``last_stage`` (a stage group: the same workers go from one stage to the next)."""
    import ray.train

    from workers.control import StopSignal, notice_source

    spec = JobSpec.model_validate(config["spec"])
    plan = Plan.model_validate(config["plan"])
    job_storage = Storage(config["storage"], spec.checkpoint.storage_options).child(config["job_id"])
    runner = StageRunner(
        spec,
        plan,
        config["stage"],
        config["job_id"],
        config["storage"],
        restore=config.get("restore", NEWEST_VERIFIED),
        report=ray.train.report,
        stop_requested=StopSignal(
            job_storage,
            spec.preemption.grace_seconds,
            notice=notice_source(spec.preemption.notice),
            notice_poll_s=spec.preemption.notice_poll_s,
        ),
        provenance=config.get("provenance"),
    )
    end = runner.run()
    while (
        not end.preempted
        and runner.row < config.get("last_stage", runner.row)
        and not runner.group_ends_here()
    ):
        runner.next_stage()
        end = runner.run()
