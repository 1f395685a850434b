"""The job operations: what ``stagetrain run``, ``submit``, ``resume``, ``status``, ``wait``, ``cancel``,
``scale`` and ``export`` do, as plain functions. The one place each of them is implemented: the CLI
(``service.cli``) parses its arguments, calls one of these and prints what it returns; the Python API
(the ``stagetrain`` package) calls the same ones.

Bad input raises what the CLI turns into exit 2 with one line: ``SpecError``, ``ValueError`` (and its
subclasses ``LeaseHeld``, ``SubmitError``, ``IncompatibleResume``), ``FileNotFoundError``,
``StorageError``. Notes and warnings on the way (a layout kept, a job exported before it finished) go
to a ``Voice``; results come back as values.

Like the rest of the core, importing this module imports neither torch nor Ray: ``run`` and ``resume``
import them to train, ``export`` imports torch, ``submit`` Ray's job client.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rich.console import Console
from rich.text import Text

from service.console import make_console, styled
from service.jobs import JobStatus
from service.spec import JobSpec, SpecError, load_spec

if TYPE_CHECKING:
    from checkpoints.storage import Storage
    from checkpoints.store import Manifest
    from service.coordination import Lease, LeaseKeeper, ScaleRequest
    from service.jobs import JobRecord, JobStore
    from service.plan import Plan

DEFAULT_STORAGE = "./runs"
ERROR = ("error: ", "bold red")
TIMED_OUT = 124  # `wait --timeout` gave up (as timeout(1) does)


class Voice:
    """Where an operation's notes and warnings go while it works: a rich console (stderr by default),
    markup off. The coordinator's progress output (``run``, ``resume``) goes there too."""

    def __init__(self, console: Console | None = None):
        self.console = console or make_console(stderr=True)

    def note(self, text: str | Text) -> None:
        self.console.print(text, soft_wrap=True)

    def warn(self, text: str) -> None:
        self.console.print(styled((text, "yellow")), soft_wrap=True)

    def error(self, text: str) -> None:
        self.console.print(styled(ERROR, text), soft_wrap=True)  # one line, even when piped


# ------------------------------------------------------------------------------------ job storage


def resolve_storage(url: str) -> str:
    """Local paths become absolute: Ray workers do not share the driver's working directory."""
    return url if "://" in url else os.path.abspath(os.path.expanduser(url))


def open_storage(url: str, options: dict | None = None) -> Storage:
    """``Storage(url, options)``, checked once: no credentials, an unreachable endpoint or a missing
    package is one line (``StorageError``: exit 2) within seconds, before anything is read or written."""
    from checkpoints.storage import Storage

    store = Storage(url, options)
    store.check()
    return store


def open_job(job_id: str, storage: str | None) -> tuple[JobStore, JobRecord]:
    """(JobStore, JobRecord) of an existing job, with the storage options of its own spec. ``storage``
    None: ``./runs``, and a job not found there says where else to look."""
    from checkpoints.storage import Storage
    from service.jobs import JobStore

    url = resolve_storage(storage or DEFAULT_STORAGE)
    try:
        record = JobStore(open_storage(url), job_id).load()
    except FileNotFoundError as e:
        if storage:
            raise
        raise FileNotFoundError(f"{e}; pass --storage (or STAGETRAIN_STORAGE) to look elsewhere") from None
    return JobStore(Storage(url, record.job_spec().checkpoint.storage_options), job_id), record


def read_metrics(job_id: str, storage: str | None) -> list[dict]:
    """The job's metric records (``metrics.jsonl``) in step order, as dicts."""
    jobs, _ = open_job(job_id, storage)
    return jobs.read_metrics()


def prepare(
    job_id: str | None,
    job_file: str | None,
    storage: str | None,
    spec: JobSpec | None = None,
    voice: Voice | None = None,
) -> tuple[JobStore, JobRecord, bool]:
    """The job to run or submit: a new one from JOB.yaml (or ``spec``), or an existing one (its stored
    spec, or the same JOB.yaml: a rerun of the same entrypoint continues the job). Returns (jobs, record,
    new)."""
    from service.jobs import JobRecord, JobStore, new_job_id
    from service.plan import build_plan
    from service.sources import check_callable, dataset_size

    spec = spec or (load_spec(job_file) if job_file else None)
    if spec is None and job_id is None:
        raise ValueError("give JOB.yaml, or --job-id of a job already in --storage")
    url = resolve_storage(storage or (spec.checkpoint.storage if spec else DEFAULT_STORAGE))
    job_id = job_id or new_job_id(spec.name)
    options = spec.checkpoint.storage_options if spec else {}
    jobs = JobStore(open_storage(url, options), job_id)
    if jobs.exists():
        jobs, record = open_job(job_id, url)
        if spec is not None and spec != record.job_spec():
            from service.decisions import spec_differences

            if not spec_differences(record.job_spec(), spec, layout=False):
                # the same job; `scale` or `resume --workers` changed its layout since: the record wins
                (voice or Voice()).note(f"job {job_id}: continuing with its recorded worker layout")
                return jobs, record, False
            raise ValueError(
                f"job {job_id} already exists in {url} with another spec ("
                + "; ".join(spec_differences(record.job_spec(), spec))
                + f"): continue it with `stagetrain resume {job_id} --spec {job_file}`, or pick another "
                "--job-id"
            )
        return jobs, record, False
    if spec is None:
        jobs.load()  # "no job ... in ...; jobs there: ..."
    if spec.model.builder:
        check_callable(spec.model.builder, "model.builder")
    jobs.root.probe()
    record = JobRecord.create(job_id, spec, build_plan(spec, dataset_size(spec.data)))
    return jobs, record, True


def ended(record: JobRecord, lease: Lease | None) -> bool:
    """The job has a final status and no coordinator holds it any more (it settles, then releases)."""
    from service.jobs import TERMINAL

    return record.status in TERMINAL and (lease is None or not lease.alive())


# ------------------------------------------------------------------------------------ plan


def make_plan(spec: JobSpec, dataset_size: int | None = None, source: str = "job spec") -> Plan:
    """The job's plan (``stagetrain plan``): stages, steps, batches, LR and momentum, before any compute
    is spent. ``dataset_size``: the training samples, instead of reading the data's index."""
    from service.plan import build_plan
    from service.sources import dataset_size as measure

    try:
        return build_plan(spec, dataset_size or measure(spec.data))
    except SpecError as e:
        if not dataset_size:
            raise
        # the spec may well be right for its data: the size given made these stages impossible
        raise SpecError(
            [
                *e.problems,
                f"(step counts follow from --dataset-size {dataset_size}; the data's may differ)",
            ],
            source=source,
            headline=f"no valid plan for --dataset-size {dataset_size}",
        ) from None


# ------------------------------------------------------------------------------------ run / resume


@dataclass
class Ran:
    """What ``run`` or ``resume`` did. ``code`` is the coordinator's exit code (``service.jobs``), None
    when no coordinator ran here: the job had already succeeded, or ``resume`` submitted it
    (``submitted``)."""

    jobs: JobStore = field(repr=False)
    record: JobRecord = field(repr=False)
    code: int | None
    submitted: Submitted | None = None

    @property
    def already_succeeded(self) -> bool:
        return self.code is None and self.submitted is None


def take_lease(jobs: JobStore) -> LeaseKeeper:
    """The job's lease for this coordinator, before anything is written (``LeaseHeld``: exit 2). Writes to
    the job are fenced by it from here on."""
    from service.coordination import LeaseKeeper
    from service.layout import CANCEL_FILE
    from service.submit import SUBMISSION_ENV

    lease = LeaseKeeper(jobs.storage, jobs.job_id, os.environ.get(SUBMISSION_ENV)).acquire()
    jobs.fence = lease.fenced
    if not os.environ.get(SUBMISSION_ENV):  # a user continues the job: an old cancel request is void
        jobs.storage.remove(CANCEL_FILE)
    return lease


def coordinate(
    jobs: JobStore, record: JobRecord, address: str | None, lease: LeaseKeeper, voice: Voice
) -> int:
    """Run the coordinator here, holding ``lease`` (released when it ends). Another coordinator taking
    the lease ends it with one line and ``EXIT_LEASE_LOST``."""
    from service.coordination import LeaseLost
    from service.jobs import EXIT_LEASE_LOST
    from service.runner import JobRunner, RunOptions

    try:
        spec = record.job_spec()
        runner = JobRunner(
            spec,
            record.plan(spec),
            record,
            jobs,
            RunOptions(job_id=record.job_id, storage=jobs.root.url, address=address, console=voice.console),
            lease,
        )
    except BaseException:
        lease.release()
        raise
    try:
        return runner.run()
    except LeaseLost as e:
        voice.error(f"{e}; this coordinator stops, writing nothing more")
        return EXIT_LEASE_LOST


def _save_holding(jobs: JobStore, record: JobRecord, lease: LeaseKeeper) -> None:
    try:
        jobs.save(record)
    except BaseException:
        lease.release()
        raise


def run(
    job_file: str | None = None,
    *,
    spec: JobSpec | None = None,
    job_id: str | None = None,
    storage: str | None = None,
    address: str | None = None,
    voice: Voice | None = None,
) -> Ran:
    """Train a job in this process (``stagetrain run``): a new one from ``job_file`` or ``spec``, or the
    existing ``job_id`` continued. Blocks until the coordinator ends."""
    from service.submit import SUBMISSION_ENV

    voice = voice or Voice()
    if address and address.startswith(("http://", "https://")) and not os.environ.get(SUBMISSION_ENV):
        raise ValueError(
            f"{address} is a Ray job server (dashboard) address: `stagetrain run` trains from this process "
            "and joins a cluster by its GCS address (HOST:6379) or ray://HOST:10001. To run the job on "
            f"that cluster, use `stagetrain submit JOB.yaml --address {address}`"
        )
    jobs, record, new = prepare(job_id, job_file, storage, spec, voice)
    if record.status == JobStatus.SUCCEEDED:
        return Ran(jobs, record, None)
    lease = take_lease(jobs)
    if new:
        _save_holding(jobs, record, lease)
    voice.note(
        styled("job ", (record.job_id, "bold"), f" -> {jobs.storage.url}")
        + ("" if new else f" (continues at step {record.current_step:,})")
    )
    return Ran(jobs, record, coordinate(jobs, record, address, lease, voice))


def resume(
    job_id: str,
    storage: str | None = None,
    *,
    address: str | None = None,
    spec_path: str | None = None,
    workers: int | None = None,
    voice: Voice | None = None,
) -> Ran:
    """Continue a preempted, cancelled, failed or interrupted job from its newest verified checkpoint
    (``stagetrain resume``): here, or with an ``http://`` ``address`` as a new Ray job attempt."""
    from service.coordination import check_free
    from service.decisions import check_resume, resize_remaining

    voice = voice or Voice()
    jobs, record = open_job(job_id, storage)
    if record.status == JobStatus.SUCCEEDED:
        return Ran(jobs, record, None)
    check_free(jobs.storage, job_id)
    old_spec, old_plan = record.job_spec(), record.plan()
    latest = jobs.checkpoints.latest(verify=True)
    step = latest[0].step if latest else 0
    spec = load_spec(spec_path) if spec_path else old_spec
    first = old_plan.stage_at(min(step, old_plan.total_steps - 1)).index
    if workers:
        spec = resize_remaining(spec, first, workers)
    changes = check_resume(record, old_plan, spec, step)
    plan = old_plan
    if spec != old_spec:
        plan, _ = record.relayout(
            spec, step, "resume", changes, workers=workers, from_stage=first + 1 if workers else None
        )
    record.error = None
    record.event(f"resumed from {latest[0].tag if latest else 'the start'} (step {step})")
    if address and address.startswith(("http://", "https://")):
        return Ran(jobs, record, None, submit_prepared(jobs, record, address))
    lease = take_lease(jobs)
    _save_holding(jobs, record, lease)
    voice.note(styled("resuming ", (job_id, "bold"), f" at step {step:,} of {plan.total_steps:,}"))
    return Ran(jobs, record, coordinate(jobs, record, address, lease, voice))


# ------------------------------------------------------------------------------------ submit


@dataclass
class Submitted:
    """A coordinator attempt handed to a Ray cluster (``submission_id`` on ``server``); both None when
    the job had already succeeded and nothing was submitted."""

    jobs: JobStore = field(repr=False)
    record: JobRecord = field(repr=False)
    server: str | None
    submission_id: str | None

    @property
    def job_id(self) -> str:
        return self.record.job_id

    @property
    def storage(self) -> str:
        """The storage root the job lives under."""
        return self.jobs.root.url


def submit_prepared(
    jobs: JobStore, record: JobRecord, address: str | None, max_restarts: int = 0
) -> Submitted:
    """Submit a prepared job's next coordinator attempt to the Ray job server at ``address`` (default:
    ``$RAY_ADDRESS``), after checking the cluster can reach its storage."""
    from service.submit import check_reachable, job_server, submit_attempt

    server = job_server(address)
    check_reachable(jobs.root.url, server)
    sid = submit_attempt(jobs, record, server, keeper_restarts=max_restarts)
    return Submitted(jobs, record, server, sid)


def submit(
    job_file: str | None = None,
    *,
    spec: JobSpec | None = None,
    job_id: str | None = None,
    storage: str | None = None,
    address: str | None = None,
    max_restarts: int = 0,
    voice: Voice | None = None,
) -> Submitted:
    """Submit a job to a Ray cluster and return (``stagetrain submit``): its coordinator runs there as a
    Ray job. Submitting an existing job id with the same spec continues it (a new attempt)."""
    jobs, record, _ = prepare(job_id, job_file, storage, spec, voice)
    if record.status == JobStatus.SUCCEEDED:
        return Submitted(jobs, record, None, None)
    return submit_prepared(jobs, record, address, max_restarts)


# ------------------------------------------------------------------------------------ watching


@dataclass
class JobState:
    """What ``stagetrain status`` shows: the record (a job whose Ray job died before its coordinator
    started is settled ``failed`` first), the newest checkpoint, the lease, the Ray job's state, the
    scale requests not applied yet."""

    record: JobRecord = field(repr=False)
    checkpoint: Manifest | None = field(repr=False)
    lease: Lease | None = field(repr=False)
    ray_state: str | None
    pending_scales: list[ScaleRequest]

    @property
    def status(self) -> str:
        return self.record.status

    @property
    def step(self) -> int:
        return self.record.current_step


def read_status(job_id: str, storage: str | None) -> JobState:
    """Where a job is, from storage alone (no cluster needed)."""
    from service.coordination import pending_scales, read_lease
    from service.submit import settle_never_started

    jobs, record = open_job(job_id, storage)
    record = settle_never_started(jobs, record)
    latest = jobs.checkpoints.latest(verify=False)
    if record.status == JobStatus.RUNNING:  # the running stage's spike, once its first 5% is in
        from service.analysis import boundary_spikes, plan_stage_steps

        for stage, spike in boundary_spikes(jobs.read_metrics(), plan_stage_steps(record.plan())).items():
            record.stages[stage - 1].spike = spike
    ray_state = None
    if record.ray_address and record.ray_submissions:
        from service.submit import ray_job_state

        ray_state = ray_job_state(record.ray_address, record.ray_submissions[-1]) or "unreachable"
    pending = [req for _, req in pending_scales(jobs.storage)]
    return JobState(record, latest[0] if latest else None, read_lease(jobs.storage), ray_state, pending)


@dataclass
class Waited:
    """How ``wait`` ended: ``ended`` (the job has a final status; ``code`` is its exit code), or not:
    its coordinator stopped without one (``code`` EXIT_FAILED), or the timeout passed (``TIMED_OUT``).
    ``message`` says which, in one line."""

    record: JobRecord = field(repr=False)
    ended: bool
    code: int
    message: str


def wait(job_id: str, storage: str | None, timeout: float | None = None, poll_s: float = 1.0) -> Waited:
    """Block until the job ends, its coordinator is gone without a final status, or ``timeout`` seconds
    pass (``stagetrain wait``)."""
    from service.coordination import read_lease
    from service.jobs import EXIT_FAILED, exit_code
    from service.submit import keeper_running, settle_never_started

    jobs, record = open_job(job_id, storage)
    deadline = time.monotonic() + timeout if timeout else None
    checked = 0.0
    while True:
        lease = read_lease(jobs.storage)
        record = jobs.load()  # after the lease: a coordinator settles the record before releasing it
        if ended(record, lease):
            said = f"job {job_id} {record.status}" + (f": {record.error}" if record.error else "")
            return Waited(record, True, exit_code(record.status), said)
        if record.status in (JobStatus.RUNNING, JobStatus.WAITING_FOR_CAPACITY) and (
            lease is None or not lease.alive()
        ):
            if keeper_running(record):
                time.sleep(poll_s)  # the keeper resubmits the coordinator (submit --max-restarts)
                continue
            said = (
                f"job {job_id}: its coordinator stopped without a final status (no lease renewed for "
                f"{lease.age_s() if lease else 0:.0f}s); continue it with `stagetrain resume {job_id}`"
            )
            return Waited(record, False, EXIT_FAILED, said)
        if record.status == JobStatus.PENDING and time.monotonic() - checked > 5:
            # submitted, but no coordinator has started: did the Ray job itself die?
            checked = time.monotonic()
            if settle_never_started(jobs, record).status != JobStatus.PENDING:
                continue
        if deadline and time.monotonic() > deadline:
            return Waited(
                record, False, TIMED_OUT, f"job {job_id} is still {record.status} after {timeout:g}s"
            )
        time.sleep(poll_s)


# ------------------------------------------------------------------------------------ changing a job


@dataclass
class CancelOutcome:
    """How ``cancel`` ended: ``confirmed`` (the job is settled; ``message`` says how), or the coordinator
    did not confirm in time (the request stays for it; ``message`` says to check ``status``)."""

    record: JobRecord = field(repr=False)
    confirmed: bool
    message: str


def cancel(job_id: str, storage: str | None, now: bool = False, voice: Voice | None = None) -> CancelOutcome:
    """Stop a job gracefully (``stagetrain cancel``): a running coordinator is asked to checkpoint and end
    the job ``cancelled``; a job nobody runs is settled ``cancelled`` here. Without confirmation within
    the grace period (or with ``now``) its Ray job is stopped too."""
    from service.coordination import holding, read_lease, request_cancel, wait_for
    from service.decisions import Cancelled

    voice = voice or Voice()
    jobs, record = open_job(job_id, storage)
    if record.status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED):
        raise ValueError(f"job {job_id} has finished ({record.status}); nothing to cancel")
    lease = read_lease(jobs.storage)
    if lease is None or not lease.alive():  # nobody runs it: mark it ourselves
        # the request first: a coordinator (or a keeper) starting meanwhile ends the job cancelled
        request_cancel(jobs.storage, now)
        if record.status == JobStatus.PENDING and record.ray_address and record.ray_submissions:
            # submitted, coordinator not started yet: stop the Ray job so that it never starts one
            from service.submit import stop

            try:
                stop(record.ray_address, record.ray_submissions[-1])
            except Exception as e:  # noqa: BLE001 - unreachable cluster: the record still says cancelled
                voice.warn(f"could not stop Ray job {record.ray_submissions[-1]}: {e}")
        with holding(jobs):
            record = jobs.load()
            record.settle(
                max(record.current_stage - 1, 0), Cancelled("cancelled while stopped"), record.current_step
            )
            jobs.save(record)
        if lease is None:
            why = "it was not running"
        elif lease.fresh():
            why = f"its coordinator, pid {lease.pid}, has ended"
        else:
            why = "it was not renewing its lease"
        return CancelOutcome(record, True, f"job {job_id} cancelled ({why})")
    request_cancel(jobs.storage, now)
    grace = record.job_spec().preemption.grace_seconds

    def confirmed() -> bool:
        return ended(jobs.load(), read_lease(jobs.storage))

    if now or not wait_for(confirmed, timeout=grace + 15):
        if record.ray_address and record.ray_submissions:
            from service.submit import stop

            voice.note(f"stopping Ray job {record.ray_submissions[-1]}")
            try:
                stop(record.ray_address, record.ray_submissions[-1])
            except ValueError as e:  # unreachable head: the cancel request stays for the coordinator
                voice.warn(str(e))
        if not wait_for(confirmed, timeout=grace + 45):
            return CancelOutcome(
                jobs.load(),
                False,
                f"job {job_id}: the coordinator has not confirmed the cancel yet; "
                f"check with `stagetrain status {job_id}`",
            )
    record = jobs.load()
    return CancelOutcome(
        record,
        True,
        f"job {job_id} {record.status} at step {record.current_step:,}; "
        f"continue with `stagetrain resume {job_id}`",
    )


@dataclass
class ScaleRequested:
    """A scale request left for the coordinator (``control/requests/<request>``): stages
    ``from_stage``..``stages`` on ``workers`` workers. ``warning``: why the cluster, as the job last saw
    it, would not fit them (the coordinator ignores the request then, unless the cluster grows)."""

    job_id: str
    from_stage: int
    stages: int
    workers: int
    request: str
    warning: str | None = None


def scale(job_id: str, storage: str | None, workers: int, from_stage: int | None = None) -> ScaleRequested:
    """Change the worker count of stages that have not started, on a running or a stopped job
    (``stagetrain scale``); default: from the next stage. Applied at the next stage boundary (or by
    ``resume``), through the same re-layout as ``resume --workers``."""
    from service.coordination import request_scale
    from service.decisions import fits_cluster, resize_remaining

    if workers < 1:
        raise ValueError(f"--workers {workers}: give 1 or more")
    jobs, record = open_job(job_id, storage)
    n = len(record.stages)
    if record.status == JobStatus.SUCCEEDED or record.current_step >= record.total_steps:
        raise ValueError(f"job {job_id} has finished ({record.status}); nothing to scale")
    started = [s.stage for s in record.stages if s.status != "pending"]
    default = (max(started) + 1) if started else 1
    from_stage = from_stage or default
    if from_stage > n:
        raise ValueError(
            f"--from-stage {from_stage}: job {job_id} has {n} stages"
            + (" and all of them have started" if default > n else "")
        )
    if from_stage in started or from_stage < default:
        raise ValueError(
            f"--from-stage {from_stage}: stage {from_stage} has started; scale stages "
            f"{default}..{n}, or resume the interrupted stage with `stagetrain resume {job_id} "
            f"--workers {workers}`"
        )
    spec = resize_remaining(record.job_spec(), from_stage - 1, workers)  # refuses a batch that does not split
    res = spec.resources
    short = record.cluster and fits_cluster(
        record.plan(spec, record.history), from_stage - 1, res.use_gpu, res.cpus_per_worker,
        res.gpus_per_worker, record.cluster,
    )  # fmt: skip
    name = request_scale(jobs.storage, workers, from_stage)
    warning = None
    if short:  # accepted: the cluster may grow by then; else the coordinator ignores it, saying why
        warning = (
            f"when the job last started a stage, {short.split('; ')[0]}: unless the cluster grows by the "
            "boundary, the coordinator ignores this request (`stagetrain status` says why)"
        )
    return ScaleRequested(job_id, from_stage, n, workers, name, warning)


# ------------------------------------------------------------------------------------ export


@dataclass
class Exported:
    """A checkpoint's weights written with what rebuilds the module (``workers.models.load_exported``)."""

    path: str
    checkpoint: str
    step: int
    model: str  # the model's label
    ema: bool  # the average of the weights (train.ema), not the weights
    val_acc: float | None
    best: tuple[str, float] | None  # (metric, value) of a checkpoint.keep_best export
    mean: list[float] = field(repr=False, default_factory=list)  # data.normalize the input was trained with
    std: list[float] = field(repr=False, default_factory=list)


def export(
    job_id: str,
    storage: str | None,
    output: str | None = None,
    best: bool = False,
    ema: bool = False,
    voice: Voice | None = None,
) -> Exported:
    """Write a job's final weights (its newest verified checkpoint; ``best``: the checkpoint.keep_best
    one; ``ema``: the train.ema average) to ``output`` (a local path, never overwritten) or, by default,
    ``export/<checkpoint>.pt`` in the job's storage (``stagetrain export``). Weights-only: plain
    ``torch.load(f, weights_only=True)``."""
    import io
    import tempfile

    import torch

    from checkpoints.store import MODEL_FILE, STATE_FILE
    from service.layout import EXPORT_DIR

    jobs, record = open_job(job_id, storage)
    spec = record.job_spec()
    if ema and spec.train.ema is None:
        raise ValueError(f"--ema: job {job_id} keeps no average of its weights (its spec has no train.ema)")
    keep = spec.checkpoint.keep_best
    if best and keep is None:
        raise ValueError(
            f"--best: job {job_id} keeps no best checkpoint (its spec has no checkpoint.keep_best)"
        )
    if best:
        found = jobs.checkpoints.best(keep.metric, keep.mode)
        if found is None:
            raise ValueError(f"--best: job {job_id} has no evaluated checkpoint yet")
        info, payload = jobs.checkpoints.inspect(found.tag, verify=True)
        if info.problem is not None:
            raise ValueError(f"--best: checkpoint {found.tag} is not usable: {info.problem}")
        manifest = info.manifest
    else:
        latest = jobs.checkpoints.latest(verify=True)
        if latest is None:
            raise ValueError(f"job {job_id} has no verified checkpoint to export yet")
        manifest, payload = latest
    if record.status != JobStatus.SUCCEEDED and not best:
        (voice or Voice()).warn(
            f"job {job_id} is {record.status}: exporting its newest checkpoint, {manifest.tag} "
            f"(step {manifest.step:,} of {record.total_steps:,})"
        )
    if ema:
        state = torch.load(io.BytesIO(payload[STATE_FILE]), map_location="cpu", weights_only=True)
        state_dict = state["ema"]["module"]
    else:
        state_dict = torch.load(io.BytesIO(payload[MODEL_FILE]), map_location="cpu", weights_only=True)
    last_acc = next((s.val_acc for s in reversed(record.stages) if s.val_acc is not None), None)
    # the evaluation at the checkpoint's step when its manifest has one (keep_best), else the last stage's
    last_acc = (manifest.metrics or {}).get("ema_val_acc" if ema else "val_acc", None if ema else last_acc)
    if output and os.path.exists(output):
        raise ValueError(f"-o {output}: the file exists; choose another path or remove it")
    name = f"{manifest.tag}{'-ema' if ema else ''}.pt"
    if not output and jobs.storage.exists(EXPORT_DIR, name):
        raise ValueError(
            f"{jobs.storage.url}/{EXPORT_DIR}/{name} exists (this checkpoint was exported); pass -o PATH"
        )
    buffer = io.BytesIO()
    torch.save(
        {
            "format": "stagetrain-export/1",
            "job_id": job_id,
            "checkpoint": manifest.tag,
            "step": manifest.step,
            "ema": ema,  # the weights' average (train.ema), not the weights
            "val_acc": last_acc,
            "resolution": spec.stages[-1].resolution,
            "model": spec.model.model_dump(mode="json"),
            "normalize": spec.data.normalize.model_dump(mode="json"),  # what the input was trained with
            "state_dict": state_dict,
        },
        buffer,
    )
    if output:  # atomically: a crash leaves no half file, and an existing file is never replaced
        folder = os.path.dirname(os.path.abspath(output))
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".export-", delete=False) as f:
            f.write(buffer.getvalue())
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(f.name, output)  # fails if `output` appeared meanwhile
        except FileExistsError:
            raise ValueError(f"-o {output}: the file exists; choose another path or remove it") from None
        finally:
            os.unlink(f.name)
    else:
        jobs.storage.write_bytes(buffer.getvalue(), EXPORT_DIR, name)
        output = f"{jobs.storage.url}/{EXPORT_DIR}/{name}"
    norm = spec.data.normalize
    return Exported(
        path=output,
        checkpoint=manifest.tag,
        step=manifest.step,
        model=spec.model.label,
        ema=ema,
        val_acc=last_acc,
        best=(keep.metric, manifest.metrics[keep.metric]) if best else None,
        mean=list(norm.mean),
        std=list(norm.std),
    )
