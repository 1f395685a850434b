"""stagetrain's Python API, for notebooks and pipelines: the same job operations the ``stagetrain``
command runs (``service.operations``), returning values instead of printing them.

    import stagetrain

    plan = stagetrain.plan("examples/quickstart.yaml")          # before any compute is spent
    job = stagetrain.submit("examples/quickstart.yaml", storage="s3://bucket/runs",
                            address="http://HEAD:8265")          # returns at once
    job.wait()                                                   # "succeeded"
    job.metrics(as_frame=True)                                   # pandas, if installed
    job.export("model.pt")

    job = stagetrain.job("quickstart-20250101-120000-ab12", storage="s3://bucket/runs")  # attach

Bad input raises what the CLI reports as exit 2: ``SpecError``, ``ValueError`` (``LeaseHeld``,
``SubmitError``, ...), ``FileNotFoundError``, ``StorageError``. Importing this package imports neither
torch nor Ray: ``run``, ``Job.resume`` and ``Job.export`` import them when called.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from service import operations as ops
from service.operations import CancelOutcome, Exported, JobState, ScaleRequested, Voice, Waited
from service.spec import JobSpec, SpecError, validate_spec
from service.spec import load_spec as _load_file

if TYPE_CHECKING:
    import pandas

    from service.jobs import JobRecord
    from service.plan import Plan

__all__ = [
    "Job",
    "JobSpec",
    "JobState",
    "Exported",
    "ScaleRequested",
    "SpecError",
    "Voice",
    "job",
    "load_spec",
    "plan",
    "run",
    "submit",
]

SpecLike = JobSpec | dict[str, Any] | str | os.PathLike[str]
STORAGE_ENV = "STAGETRAIN_STORAGE"  # as the CLI's --storage default


def load_spec(spec: SpecLike) -> JobSpec:
    """A validated job spec from a job file (local path or fsspec URL), a dict, or a ``JobSpec``."""
    if isinstance(spec, JobSpec):
        return spec
    if isinstance(spec, dict):
        return validate_spec(spec)
    return _load_file(os.fspath(spec))


def plan(spec: SpecLike, dataset_size: int | None = None) -> Plan:
    """What the job will do (stages, steps, batches, LR, momentum), as ``stagetrain plan`` computes it.
    ``dataset_size``: the training samples, instead of reading the data's index."""
    source = os.fspath(spec) if isinstance(spec, str | os.PathLike) else "job spec"
    return ops.make_plan(load_spec(spec), dataset_size, source)


def _spec_args(spec: SpecLike | None) -> dict[str, Any]:
    """A path goes to the operation as the job file (its name is in messages), anything else as a spec."""
    if spec is None:
        return {}
    if isinstance(spec, str | os.PathLike):
        return {"job_file": os.fspath(spec)}
    return {"spec": load_spec(spec)}


def _storage(storage: str | None) -> str | None:
    return storage or os.environ.get(STORAGE_ENV) or None


@dataclass(frozen=True)
class Job:
    """A job under a storage root (fsspec URL or absolute path). Every method reads or writes storage
    only; none needs the cluster, except ``resume`` (which runs or submits the coordinator)."""

    job_id: str
    storage: str

    def record(self) -> JobRecord:
        """The job record (``job.json``): spec, plan hash, status, stages, events."""
        return ops.open_job(self.job_id, self.storage)[1]

    def status(self) -> JobState:
        """Where the job is (``stagetrain status``): ``.status``, ``.step``, ``.record``, ``.checkpoint``
        (the newest), ``.lease``, ``.ray_state``, ``.pending_scales``."""
        return ops.read_status(self.job_id, self.storage)

    def wait(self, timeout: float | None = None, poll_s: float = 1.0) -> str:
        """Block until the job ends (``stagetrain wait``) and return its final status (``succeeded``,
        ``failed``, ``preempted``, ``cancelled``). ``TimeoutError`` after ``timeout`` seconds;
        ``RuntimeError`` when its coordinator stopped without a final status (resume it)."""
        waited: Waited = ops.wait(self.job_id, self.storage, timeout, poll_s)
        if waited.ended:
            return waited.record.status
        if waited.code == ops.TIMED_OUT:
            raise TimeoutError(waited.message)
        raise RuntimeError(waited.message)

    def metrics(self, as_frame: bool = False) -> list[dict[str, Any]] | pandas.DataFrame:
        """The metric records (``metrics.jsonl``) in step order: step, eval and stage_end records as
        dicts (the ``kind`` key says which), or with ``as_frame`` one pandas DataFrame of them."""
        records = ops.read_metrics(self.job_id, self.storage)
        if not as_frame:
            return records
        try:
            import pandas
        except ImportError:
            raise ImportError("Job.metrics(as_frame=True) needs pandas: pip install pandas") from None
        return pandas.DataFrame.from_records(records)

    def cancel(self, now: bool = False) -> str:
        """Stop the job gracefully (``stagetrain cancel``): checkpoint, then ``cancelled`` (resumable).
        Returns its status; ``TimeoutError`` if its coordinator did not confirm in time (the request
        stays for it)."""
        outcome: CancelOutcome = ops.cancel(self.job_id, self.storage, now)
        if not outcome.confirmed:
            raise TimeoutError(outcome.message)
        return outcome.record.status

    def scale(self, workers: int, from_stage: int | None = None) -> ScaleRequested:
        """Run stages not started yet (from ``from_stage``, 1-based; default the next one) on ``workers``
        workers (``stagetrain scale``): applied at the next stage boundary, or by ``resume``."""
        return ops.scale(self.job_id, self.storage, workers, from_stage)

    def export(self, output: str | None = None, best: bool = False, ema: bool = False) -> Exported:
        """Write the newest verified checkpoint's weights (``best``: the checkpoint.keep_best one;
        ``ema``: the train.ema average) with what rebuilds the module (``stagetrain export``) to
        ``output``, default ``export/<checkpoint>.pt`` in the job's storage. ``.path`` is where; load it
        with ``workers.models.load_exported``."""
        return ops.export(self.job_id, self.storage, output, best, ema)

    def resume(
        self, address: str | None = None, spec: str | None = None, workers: int | None = None
    ) -> int | None:
        """Continue the job from its newest verified checkpoint (``stagetrain resume``): here, blocking,
        returning the coordinator's exit code; with an ``http://`` job server ``address``, as a new Ray
        job attempt (returns None at once). ``spec``: an edited job file; ``workers``: the worker count
        of the interrupted stage and the rest."""
        return ops.resume(self.job_id, self.storage, address=address, spec_path=spec, workers=workers).code


def job(job_id: str, storage: str | None = None) -> Job:
    """Attach to an existing job (``FileNotFoundError`` if there is none). ``storage``: default
    ``$STAGETRAIN_STORAGE``, else ``./runs``."""
    from service.layout import check_job_id

    jobs, _ = ops.open_job(check_job_id(job_id), _storage(storage))
    return Job(job_id, jobs.root.url)


def submit(
    spec: SpecLike,
    storage: str | None = None,
    address: str | None = None,
    job_id: str | None = None,
    max_restarts: int = 0,
) -> Job:
    """Submit a job to a Ray cluster (``stagetrain submit``) and return at once: its coordinator runs
    there as a Ray job. ``storage``: default ``$STAGETRAIN_STORAGE``, else the spec's
    ``checkpoint.storage``; ``address``: the Ray job server, default ``$RAY_ADDRESS``. An existing
    ``job_id`` with the same spec is continued (a new attempt); a succeeded one is left as it is."""
    from service.layout import check_job_id

    done = ops.submit(
        **_spec_args(spec),
        job_id=check_job_id(job_id) if job_id else None,
        storage=_storage(storage),
        address=address or os.environ.get("RAY_ADDRESS") or None,
        max_restarts=max_restarts,
    )
    return Job(done.job_id, done.storage)


def run(
    spec: SpecLike | None = None,
    storage: str | None = None,
    address: str | None = None,
    job_id: str | None = None,
    voice: Voice | None = None,
) -> Job:
    """Train a job in this process (``stagetrain run``), blocking until it ends: a new one from ``spec``,
    or the existing ``job_id`` continued. ``address``: a Ray cluster's GCS address; default
    ``$RAY_ADDRESS``, else a local Ray. ``job.status()`` says how it ended."""
    from service.layout import check_job_id

    ran = ops.run(
        **_spec_args(spec),
        job_id=check_job_id(job_id) if job_id else None,
        storage=_storage(storage),
        address=address or os.environ.get("RAY_ADDRESS") or None,
        voice=voice,
    )
    return Job(ran.record.job_id, ran.jobs.root.url)
