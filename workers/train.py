"""What runs in each Ray Train worker: one stage of a job, from its latest committed checkpoint.

Read top to bottom: set up -> restore -> train (report every few steps, checkpoint periodically)
-> evaluate -> commit the stage-boundary checkpoint. The coordinator hands over between stages
through that checkpoint, which is also how a restarted worker group (Ray's ``FailureConfig``) and a
``stagetrain resume`` continue: one code path, one source of truth.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from checkpoints.checkpointer import AsyncCheckpointer, CheckpointStore, decode, package_versions, tag_for
from checkpoints.storage import Storage
from service.plan import Plan
from service.spec import AdamWSpec, JobSpec
from workers.data import StageDataset, StageSampler, open_source, split_evenly, stage_subset, to_input
from workers.models import build_model
from workers.schedules import PlanScheduler

log = logging.getLogger(__name__)

AUDIT_ENV = "STAGETRAIN_AUDIT_SAMPLES"  # tests: report which sample ids every rank read


@dataclass
class Progress:
    """Where training is: the next optimizer step and the samples consumed so far. ``stage``/``epoch``/
    ``batch`` are derivable from ``step`` and the plan; they are saved to check that on restore."""

    step: int
    samples_seen: int
    stage: int = 0
    epoch: int = 0
    batch: int = 0  # batches done within the epoch

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.__init__(**state)


class RNGState:
    """Python, numpy, torch and CUDA RNG states of every rank (gathered to rank 0 before a save)."""

    def __init__(self):
        self.per_rank: list[dict] = []

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
        # Plain containers only, so that torch.load(weights_only=True) reads it back.
        return {"per_rank": [_plain_rng(s) for s in self.per_rank]}

    def load_state_dict(self, state: dict) -> None:
        self.per_rank = [_rich_rng(s) for s in state["per_rank"]]


def _plain_rng(s: dict) -> dict:
    version, internal, gauss = s["python"]
    kind, keys, pos, has_gauss, cached = s["numpy"]
    out = {"python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
           "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
           "torch": s["torch"]}
    if "cuda" in s:
        out["cuda"] = s["cuda"]
    return out


def _rich_rng(s: dict) -> dict:
    version, internal, gauss = s["python"]
    kind, keys, pos, has_gauss, cached = s["numpy"]
    out = {"python": (version, tuple(internal.tolist()), gauss),
           "numpy": (kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached), "torch": s["torch"]}
    if "cuda" in s:
        out["cuda"] = s["cuda"]
    return out


def build_optimizer(spec: JobSpec, model: torch.nn.Module) -> torch.optim.Optimizer:
    opt = spec.optimizer
    lr = spec.schedule.max_lr  # overwritten by the scheduler before the first step
    if isinstance(opt, AdamWSpec):
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=opt.momentum, nesterov=opt.nesterov,
                           weight_decay=opt.weight_decay)


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
        if not self.on:
            return flag
        t = torch.tensor([1 if flag else 0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return bool(t.item())

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


class StageRunner:
    """One stage on one rank. ``report(metrics)`` is ``ray.train.report`` in a Ray worker; the same
    loop runs in-process for the benchmark and unit tests with a plain callable."""

    def __init__(self, spec: JobSpec, plan: Plan, stage_index: int, job_id: str, storage_url: str,
                 report=None, stop_requested=None, provenance: dict | None = None):
        self.spec, self.plan, self.stage = spec, plan, plan.stages[stage_index]
        self.job_id = job_id
        self.report = report or (lambda metrics: None)
        self.stop_requested = stop_requested or (lambda: False)
        # Recorded in every manifest: what wrote it (the driver knows the git revision, workers their versions).
        self.provenance = {"versions": package_versions(), "git_revision": (provenance or {}).get("git_revision")}
        self.dist = Distributed()
        self.device = _device(spec)
        self.store = CheckpointStore(Storage(storage_url, spec.checkpoint.storage_options).child(job_id))
        self._tail: list[dict] = []

        # Model, optimizer, schedule. The raw module is what is saved; DDP/compile wrap it.
        torch.manual_seed(spec.seed)  # identical init on every rank (DDP would broadcast it anyway)
        self.raw_model = build_model(spec.model.arch, spec.model.num_classes, spec.model.in_channels)
        seed_everything(spec.seed + 1000 * self.dist.rank, spec.deterministic)  # per-rank streams (dropout)
        self.raw_model.to(self.device)
        if self._cuda and spec.train.channels_last:
            self.raw_model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(spec, self.raw_model)
        self.scheduler = PlanScheduler(self.optimizer, plan, start_step=self.stage.step_start)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=False)  # bf16 needs no loss scaling
        self.progress = Progress(step=self.stage.step_start, samples_seen=self.stage.sample_start,
                                 stage=self.stage.index)
        self.rng = RNGState()
        self.checkpointer = AsyncCheckpointer(self.store, spec.checkpoint.keep_last,
                                              spec.checkpoint.keep_stage_checkpoints)
        self.restored_from = self.restore()

        model = self.raw_model
        if self.dist.world > 1:
            model = DDP(model, device_ids=[self.device.index] if self._cuda else None)
        self.model = torch.compile(model) if self.stage.compile else model

    @property
    def _cuda(self) -> bool:
        return self.device.type == "cuda"

    # ----------------------------------------------------------------------------------- state

    def stateful(self) -> dict:
        return {"model": self.raw_model, "optimizer": self.optimizer, "scheduler": self.scheduler,
                "scaler": self.scaler, "rng": self.rng, "data": self.progress}

    def restore(self) -> str | None:
        """Load the latest committed checkpoint, chosen by rank 0 so every rank loads the same one."""
        tag, manifest, state = None, None, None
        if self.dist.rank == 0:  # the newest checkpoint whose bytes verify; corrupt or partial ones are skipped
            latest = self.store.latest(verify=True)
            if latest:
                manifest, state = latest[0], decode(latest[1])
                tag = manifest.tag
        tag = self.dist.broadcast_object(tag)
        if tag is None:
            if self.stage.step_start > 0:
                raise RuntimeError(f"stage {self.stage.label} starts at step {self.stage.step_start}, but "
                                   f"{self.store.storage.url} has no committed checkpoint to start from")
            return None
        if state is None:  # ranks > 0 load (and verify) the tag rank 0 chose
            manifest, state = self.store.load(tag)
        if not self.stage.step_start <= manifest.step <= self.stage.step_end:
            raise RuntimeError(
                f"latest checkpoint {tag} is at step {manifest.step}, outside stage {self.stage.index + 1}'s "
                f"steps [{self.stage.step_start}, {self.stage.step_end}]: the job record and storage disagree")
        if manifest.job_id != self.job_id:
            raise RuntimeError(f"checkpoint {tag} belongs to job {manifest.job_id}, not {self.job_id}")
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.rng.load_state_dict(state["rng"])
        self.progress = Progress(**state["data"])
        # Data position and LR are functions of the step: the saved position must agree with the plan.
        if self.progress.samples_seen != self.plan.samples_before(self.progress.step):
            raise RuntimeError(f"checkpoint {tag}: samples_seen {self.progress.samples_seen} at step "
                               f"{self.progress.step} disagrees with the plan's {self.plan.samples_before(self.progress.step)}")
        self.scheduler.load_state_dict(state["scheduler"])
        if len(self.rng.per_rank) == self.dist.world:
            RNGState.restore(self.rng.per_rank[self.dist.rank])
        return tag

    def save(self, boundary: bool) -> None:
        """All ranks call this (RNG states are gathered); rank 0 writes."""
        self.rng.per_rank = self.dist.gather_objects(RNGState.capture())
        if self.dist.rank != 0:
            return
        step = self.progress.step
        self.checkpointer.save(
            {k: v.state_dict() for k, v in self.stateful().items()},
            tag_for(step, self.stage.index + 1, boundary), block=boundary,
            job_id=self.job_id, stage=self.stage.index + 1, epoch=self.progress.epoch, step=step,
            samples_seen=self.progress.samples_seen, boundary=boundary, world_size=self.dist.world,
            plan_hash=self.plan.plan_hash(), stage_hash=self.plan.stage_hash(self.plan.row(self.stage)),
            spec_hash=self.spec.spec_hash(), **self.provenance)

    # ------------------------------------------------------------------------------------ data

    def _loader(self, sampler: StageSampler) -> DataLoader:
        spec = self.spec
        return DataLoader(self.train_set, batch_size=self.stage.batch_size, sampler=sampler,
                          num_workers=spec.data.loader_workers, pin_memory=self._cuda,
                          prefetch_factor=4 if spec.data.loader_workers else None)

    # ----------------------------------------------------------------------------------- train

    def run(self) -> dict:
        st, spec = self.stage, self.spec
        if self.progress.step == st.step_end:  # restarted after the stage's checkpoint was committed
            return self._finish(evaluate=False)
        source = open_source(spec.data, spec.model.in_channels, spec.seed, "train")
        self.train_set = StageDataset(source, st.resolution, train=True, seed=spec.seed, stage=st.index,
                                      crop_scale=spec.data.crop_scale, hflip=spec.data.hflip)
        self.subset = stage_subset(self.plan.dataset_size, st.subset_size, spec.seed)
        audit = os.environ.get(AUDIT_ENV) == "1"
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self._cuda and spec.train.amp else contextlib.nullcontext()
        every_report, every_ckpt = spec.metrics.every_n_steps, spec.checkpoint.every_n_steps
        pending, window_start = [], time.perf_counter()
        self.model.train()

        first = self.progress.step - st.step_start
        sampler = StageSampler(self.subset, spec.seed, st.index, st.epoch_samples, st.global_batch, st.batch_size,
                               self.dist.world, self.dist.rank, first_step=first, last_step=st.steps,
                               stream_offset=st.stream_offset)
        batches = iter(self._loader(sampler))
        for local in range(first, st.steps):
            step = st.step_start + local
            lr, momentum = self._lr_momentum()
            loss_sum = torch.zeros((), device=self.device)
            for micro in range(st.grad_accum):
                x, y = next(batches)
                x = to_input(x, self.device, self._cuda and spec.train.channels_last)
                y = y.to(self.device, non_blocking=True)
                # Skip DDP's gradient all-reduce on all but the last micro-batch.
                sync = micro == st.grad_accum - 1 or not isinstance(self.model, DDP)
                with (contextlib.nullcontext() if sync else self.model.no_sync()), autocast:
                    loss = F.cross_entropy(self.model(x), y) / st.grad_accum
                loss.backward()
                loss_sum += loss.detach()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            epoch = st.epoch_of(step)
            next_epoch, next_batch = st.position(step + 1)
            self.progress = Progress(step=step + 1, samples_seen=self.progress.samples_seen + st.global_batch,
                                     stage=st.index, epoch=next_epoch, batch=next_batch)
            record = {"step": step, "stage": st.index + 1, "epoch": epoch,
                      "samples_seen": self.progress.samples_seen, "loss": loss_sum, "lr": lr,
                      "momentum": momentum, "resolution": st.resolution, "global_batch": st.global_batch}
            if audit:
                record["sample_ids"] = [i for micro in sampler.step_ids(local) for i, _ in micro]
            pending.append(record)
            done = self.progress.step == st.step_end
            reported = len(pending) >= every_report or done
            if reported:
                window_start = self._report(pending, window_start, final=done)
                pending = []
            if every_ckpt and self.progress.step % every_ckpt == 0 and not done:
                self.save(boundary=False)
            # Stop requests are checked with each report, not every step: a stop has
            # preemption.grace_seconds to land, and the check is a collective (one gloo round trip).
            if reported and not done and self.dist.any(self.stop_requested()):
                return self._preempt()
        return self._finish(evaluate=True)

    def _lr_momentum(self) -> tuple[float, float]:
        """What the optimizer will actually use for this step (read back, not recomputed)."""
        group = self.optimizer.param_groups[0]
        return group["lr"], group["betas"][0] if "betas" in group else group["momentum"]

    def _report(self, records: list[dict], window_start: float, final: bool) -> float:
        """Report ``records``; returns when the next window starts. Windows are back to back and end
        after the loss copy (a device sync), so images_per_s counts all the time, GPU work included."""
        losses = self.dist.mean(torch.stack([r["loss"] for r in records]).float().cpu())
        now = time.perf_counter()
        seconds = now - window_start
        if records and "sample_ids" in records[0]:
            gathered = self.dist.gather_objects([r["sample_ids"] for r in records])
            for i, r in enumerate(records):
                r["sample_ids"] = [g[i] for g in gathered]
        img_s = len(records) * self.stage.global_batch / max(seconds, 1e-9)
        for r, loss in zip(records, losses.tolist(), strict=True):
            r["loss"], r["images_per_s"] = loss, img_s
        if not final:
            self.report({"records": records if self.dist.rank == 0 else []})
        else:
            self._tail = records
        return now

    def _finish(self, evaluate: bool) -> dict:
        """Evaluate, commit the boundary checkpoint, and send the last report (with the stage summary)."""
        st = self.stage
        summary = {"stage": st.index + 1, "step": self.progress.step, "restored_from": self.restored_from}
        if evaluate:
            # DDP syncs BatchNorm buffers from rank 0 at each forward, so after the last step every rank
            # holds its own running stats; take rank 0's, which is what the checkpoint saves.
            self.dist.broadcast_buffers(self.raw_model)
            summary.update(self.evaluate())
            summary["param_digests"] = self.dist.gather_objects(param_digest(self.raw_model))
            if self.progress.step == st.step_end:
                self.save(boundary=st.last_segment)
        return self._end(summary)

    def _preempt(self) -> dict:
        """A stop was requested (checked right after a report): commit a checkpoint at the step reached
        and leave."""
        self.save(boundary=False)
        self.checkpointer.wait()
        return self._end({"stage": self.stage.index + 1, "step": self.progress.step, "preempted": True})

    def _end(self, summary: dict) -> dict:
        """The stage's last report: the records not yet sent and, from rank 0, the summary."""
        if self.dist.rank == 0:
            last = self.checkpointer.last_committed
            summary.update(checkpoint=last.tag if last else None, checkpoint_failures=self.checkpointer.failures,
                           stall_s=self.checkpointer.stall_s)
        self.report({"records": self._tail if self.dist.rank == 0 else [],
                     "stage_end": summary if self.dist.rank == 0 else None})
        return summary

    @torch.no_grad()
    def evaluate(self) -> dict:
        spec = self.spec
        source = open_source(spec.data, spec.model.in_channels, spec.seed, "val")
        val = StageDataset(source, self.stage.resolution, train=False)
        indices = split_evenly(range(len(val)), self.dist.world, self.dist.rank)
        loader = DataLoader(torch.utils.data.Subset(val, list(indices)), batch_size=spec.data.val_batch_size,
                            num_workers=spec.data.loader_workers, pin_memory=self._cuda)
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, correct, count
        self.raw_model.eval()
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self._cuda and spec.train.amp else contextlib.nullcontext()
        for x, y in loader:
            x, y = to_input(x, self.device, self._cuda and spec.train.channels_last), y.to(self.device)
            with autocast:
                logits = self.raw_model(x)
            # accumulated on the device: no host sync per batch
            totals += torch.stack([F.cross_entropy(logits.float(), y, reduction="sum").double(),
                                   (logits.argmax(1) == y).sum().double(), torch.tensor(len(y), dtype=torch.float64,
                                                                                      device=self.device)])
        self.raw_model.train()
        totals = self.dist.sum(totals)
        return {"val_loss": totals[0].item() / totals[2].item(), "val_acc": totals[1].item() / totals[2].item()}


def _device(spec: JobSpec) -> torch.device:
    if not spec.resources.use_gpu:
        return torch.device("cpu")
    import ray.train.torch

    try:
        return ray.train.torch.get_device()
    except RuntimeError:  # not in a Ray Train worker (benchmarks, torchrun): LOCAL_RANK picks the GPU
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device


def train_loop_per_worker(config: dict) -> None:
    """The ``TorchTrainer`` entry point: ``config`` carries the spec, plan, stage and storage."""
    import ray.train

    from workers.control import StopSignal

    spec = JobSpec.model_validate(config["spec"])
    plan = Plan.model_validate(config["plan"])
    job_storage = Storage(config["storage"], spec.checkpoint.storage_options).child(config["job_id"])
    runner = StageRunner(spec, plan, config["stage"], config["job_id"], config["storage"], report=ray.train.report,
                         stop_requested=StopSignal(job_storage, spec.preemption.grace_seconds),
                         provenance=config.get("provenance"))
    runner.run()

