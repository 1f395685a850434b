"""The ``stagetrain`` command line.

Read-only commands (``plan``, ``status``, ``list``, ``logs``, ``checkpoints``, ``schema``) import neither
torch nor Ray: they answer in about a second. ``run`` and ``resume`` import them to train; ``submit``
imports Ray's job client only.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import tempfile
import time

import click

from checkpoints.storage import StorageError
from service.console import make_console, styled
from service.coordination import LeaseHeld
from service.jobs import JOB_STATUSES
from service.layout import check_job_id
from service.spec import SpecError, json_schema, load_spec

# Markup off (service.console): what is printed carries paths, errors and spec values.
console = make_console()
err_console = make_console(stderr=True)

ERROR = ("error: ", "bold red")
EXIT_CODES_HELP = (
    "Exit codes: 0 succeeded, 1 failed, 2 invalid input, 3 another coordinator took the job over, "
    "75 preempted, 130 cancelled (continue both with `stagetrain resume`)."
)


def user_errors(fn):
    """Invalid input exits with code 2 and a message, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SpecError as e:
            err_console.print(styled(ERROR, f"{e.source}: {e.headline}"), soft_wrap=True)
            for p in e.problems:
                err_console.print(f"  {p}")
            sys.exit(2)
        except (FileNotFoundError, ValueError, StorageError, LeaseHeld) as e:
            err_console.print(styled(ERROR, str(e)), soft_wrap=True)  # one line, even when piped
            sys.exit(2)

    return wrapper


def _job_id_param(ctx, param, value):
    """Every JOB_ID, argument or --job-id, passes one rule: a single path component under the storage root."""
    if value is None:
        return None
    try:
        return check_job_id(value)
    except ValueError as e:
        raise click.BadParameter(str(e).split(": ", 1)[1], ctx=ctx, param=param) from None


JOB_ID = click.argument("job_id", callback=_job_id_param)
STORAGE_HELP = "Job storage (fsspec URL or local path); default: the spec's checkpoint.storage, or ./runs."
STORAGE = click.option(
    "--storage", envvar="STAGETRAIN_STORAGE", help=STORAGE_HELP + " Env: STAGETRAIN_STORAGE."
)
RAY_ADDRESS = click.option(
    "--address", envvar="RAY_ADDRESS", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)."
)
JOB_SERVER = click.option(
    "--address", envvar="RAY_ADDRESS", help="The Ray job server, http://HEAD:8265 (default: $RAY_ADDRESS)."
)


def _versions() -> str:
    """Installed versions from package metadata (nothing imported: torch and Ray take seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("stagetrain", "torch", "torchvision", "ray"):
        try:
            out.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            out.append(f"{name} not installed")
    return ", ".join(out)


def _print_versions(ctx, param, value) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(_versions())
        ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_versions,
    help="Show the versions of stagetrain, torch, torchvision and Ray, and exit.",
)
def cli() -> None:
    """stagetrain: progressive-resizing image training on Ray Train."""


@cli.command()
def schema() -> None:
    """Print the job spec's JSON Schema."""
    click.echo(json_schema())


@cli.command()
@click.argument("job", metavar="JOB.yaml")
@click.option("--csv", "csv_path", metavar="FILE", help="Write one row per optimizer step.")
@click.option("--plot", "plot_path", metavar="FILE.png", help="Plot LR, momentum, resolution and batch.")
@click.option("--compare", is_flag=True, help="With --plot: overlay all three LR strategies.")
@click.option("--x-axis", type=click.Choice(["samples", "steps"]), default="samples", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option(
    "--dataset-size",
    type=click.IntRange(min=1),
    help="Training samples, instead of reading the data's index (a bucket this machine cannot reach).",
)
@user_errors
def plan(
    job: str,
    csv_path: str | None,
    plot_path: str | None,
    compare: bool,
    x_axis: str,
    as_json: bool,
    dataset_size: int | None,
) -> None:
    """Show what a job will do: stages, steps, batches, LR and momentum, before any compute is spent."""
    from service.plan import build_plan
    from service.report import peak_lr_note, plan_table, plot_plans, write_csv
    from service.sources import dataset_size as measure

    spec = load_spec(job)
    try:
        the_plan = build_plan(spec, dataset_size or measure(spec.data))
    except SpecError as e:
        if not dataset_size:
            raise
        # the spec may well be right for its data: the size given made these stages impossible
        raise SpecError(
            [
                *e.problems,
                f"(step counts follow from --dataset-size {dataset_size}; the data's may differ)",
            ],
            source=job,
            headline=f"no valid plan for --dataset-size {dataset_size}",
        ) from None
    if as_json:
        click.echo(
            json.dumps({"plan_hash": the_plan.plan_hash(), **the_plan.model_dump(mode="json")}, indent=2)
        )
    else:
        console.print(
            plan_table(
                the_plan,
                title=f"{spec.name}: {spec.schedule.strategy}, "
                f"lr_scaling {spec.lr_scaling.rule} (reference batch {the_plan.reference_batch}), "
                f"plan {the_plan.plan_hash()}",
            )
        )
        console.print(peak_lr_note(the_plan))
    if csv_path:
        write_csv(the_plan, csv_path)
        err_console.print(f"wrote {the_plan.total_steps} steps to {csv_path}")
    if plot_path:
        plans = {spec.schedule.strategy: the_plan}
        if compare:
            for strategy in ("global_onecycle", "per_stage_onecycle", "per_stage_cosine"):
                if strategy != spec.schedule.strategy:
                    other = spec.model_copy(
                        update={"schedule": spec.schedule.model_copy(update={"strategy": strategy})}
                    )
                    plans[strategy] = build_plan(other, the_plan.dataset_size)
        what = "LR strategies" if compare else spec.schedule.strategy
        plot_plans(plans, plot_path, x_axis, title=f"{spec.name}: {what}, plan {the_plan.plan_hash()}")
        err_console.print(f"wrote {plot_path}")


# ------------------------------------------------------------------------------------ job storage


def resolve_storage(url: str) -> str:
    """Local paths become absolute: Ray workers do not share the driver's working directory."""
    return url if "://" in url else os.path.abspath(os.path.expanduser(url))


def open_storage(url: str, options: dict | None = None):
    """``Storage(url, options)``, checked once: no credentials, an unreachable endpoint or a missing
    package is one line (``StorageError``: exit 2) within seconds, before anything is read or written."""
    from checkpoints.storage import Storage

    store = Storage(url, options)
    store.check()
    return store


def _open(job_id: str, storage: str | None):
    """(JobStore, JobRecord) of an existing job, with the storage options of its own spec."""
    from checkpoints.storage import Storage
    from service.jobs import JobStore

    url = resolve_storage(storage or "./runs")
    try:
        record = JobStore(open_storage(url), job_id).load()
    except FileNotFoundError as e:
        if storage:
            raise
        raise FileNotFoundError(f"{e}; pass --storage (or STAGETRAIN_STORAGE) to look elsewhere") from None
    return JobStore(Storage(url, record.job_spec().checkpoint.storage_options), job_id), record


def _prepare(job_id: str | None, job_file: str | None, storage: str | None, spec=None):
    """The job to run or submit: a new one from JOB.yaml (or ``spec``), or an existing one (its stored
    spec, or the same JOB.yaml: a rerun of the same entrypoint continues the job). Returns (jobs, record,
    new)."""
    from service.jobs import JobRecord, JobStore, new_job_id
    from service.plan import build_plan
    from service.sources import dataset_size, resolve_callable

    spec = spec or (load_spec(job_file) if job_file else None)
    if spec is None and job_id is None:
        raise ValueError("give JOB.yaml, or --job-id of a job already in --storage")
    url = resolve_storage(storage or (spec.checkpoint.storage if spec else "./runs"))
    job_id = job_id or new_job_id(spec.name)
    options = spec.checkpoint.storage_options if spec else {}
    jobs = JobStore(open_storage(url, options), job_id)
    if jobs.exists():
        jobs, record = _open(job_id, url)
        if spec is not None and spec != record.job_spec():
            from service.decisions import spec_differences

            if not spec_differences(record.job_spec(), spec, layout=False):
                # the same job; `scale` or `resume --workers` changed its layout since: the record wins
                err_console.print(f"job {job_id}: continuing with its recorded worker layout")
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
        resolve_callable(spec.model.builder, "model.builder")
    jobs.root.probe()
    record = JobRecord.create(job_id, spec, build_plan(spec, dataset_size(spec.data)))
    return jobs, record, True


def _take_lease(jobs):
    """The job's lease for this coordinator, before anything is written (``LeaseHeld``: exit 2). Writes to
    the job are fenced by it from here on."""
    from service.coordination import LeaseKeeper
    from service.layout import CANCEL_FILE
    from service.submit import SUBMISSION_ENV

    lease = LeaseKeeper(jobs.storage, jobs.job_id, os.environ.get(SUBMISSION_ENV)).acquire()
    jobs.fence = lease.check
    if not os.environ.get(SUBMISSION_ENV):  # a user continues the job: an old cancel request is void
        jobs.storage.remove(CANCEL_FILE)
    return lease


def _coordinate(jobs, record, address: str | None, lease) -> int:
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
            RunOptions(job_id=record.job_id, storage=jobs.root.url, address=address, console=err_console),
            lease,
        )
    except BaseException:
        lease.release()
        raise
    try:
        return runner.run()
    except LeaseLost as e:
        err_console.print(styled(ERROR, f"{e}; this coordinator stops, writing nothing more"), soft_wrap=True)
        return EXIT_LEASE_LOST


def _finish(code: int, jobs, record) -> None:
    from service.layout import PLOT_FILE
    from service.report import summary_table

    console.print(summary_table(record))  # the coordinator wrote the plot before releasing the lease
    if jobs.storage.exists(PLOT_FILE):
        err_console.print(
            f"job record, metrics and plot: {jobs.storage.url}/{{job.json,metrics.jsonl,{PLOT_FILE}}}"
        )
    sys.exit(code)


# ------------------------------------------------------------------------------------ run / submit


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("job", metavar="JOB.yaml", required=False)
@click.option("--job-id", callback=_job_id_param, help="Default: <name>-<UTC time>-<random>.")
@STORAGE
@RAY_ADDRESS
@user_errors
def run(job: str | None, job_id: str | None, storage: str | None, address: str | None) -> None:
    """Train a job here: one Ray Train TorchTrainer per stage.

    With --job-id of an existing job (and no JOB.yaml, or the same one) it continues that job, so rerunning
    the same entrypoint (a RayJob retry, a resubmission) picks up where it stopped."""
    from service.submit import SUBMISSION_ENV

    if address and address.startswith(("http://", "https://")) and not os.environ.get(SUBMISSION_ENV):
        raise ValueError(
            f"{address} is a Ray job server (dashboard) address: `stagetrain run` trains from this process "
            "and joins a cluster by its GCS address (HOST:6379) or ray://HOST:10001. To run the job on "
            f"that cluster, use `stagetrain submit JOB.yaml --address {address}`"
        )
    jobs, record, new = _prepare(job_id, job, storage)
    if record.status == "succeeded":
        console.print(f"job {record.job_id} already succeeded; nothing to run")
        return
    lease = _take_lease(jobs)
    try:
        if new:
            jobs.save(record)
    except BaseException:
        lease.release()
        raise
    err_console.print(
        styled("job ", (record.job_id, "bold"), f" -> {jobs.storage.url}")
        + ("" if new else f" (continues at step {record.current_step:,})")
    )
    _finish(_coordinate(jobs, record, address, lease), jobs, record)


def _submit(jobs, record, address: str | None, follow: bool, max_restarts: int = 0) -> None:
    from service.submit import check_reachable, job_server, submit_attempt

    server = job_server(address)
    check_reachable(jobs.root.url, server)
    sid = submit_attempt(jobs, record, server, keeper_restarts=max_restarts)
    storage = jobs.root.url
    console.print(
        styled("submitted job ", (record.job_id, "bold"), f" as Ray job {sid} ({server})\n")
        + f"  stagetrain status {record.job_id} --storage {storage}\n"
        f"  stagetrain logs {record.job_id} --storage {storage} --follow\n"
        f"  stagetrain cancel {record.job_id} --storage {storage}",
    )
    if follow:
        sys.exit(_follow_log(jobs, record.job_id, None, until_done=True))


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("job", metavar="JOB.yaml")
@click.option("--job-id", callback=_job_id_param, help="Default: <name>-<UTC time>-<random>.")
@STORAGE
@JOB_SERVER
@click.option("--follow", is_flag=True, help="Show the job's log until it ends; exit with its exit code.")
@click.option(
    "--max-restarts",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Resubmit a coordinator that died without a final status up to N times (a keeper Ray job).",
)
@user_errors
def submit(
    job: str, job_id: str | None, storage: str | None, address: str | None, follow: bool, max_restarts: int
) -> None:
    """Submit a job to a Ray cluster and return: its coordinator runs as a Ray job on the cluster.

    The spec and the job record go to storage first; the cluster runs `stagetrain run --job-id ID --storage
    URL`. Submitting an existing job id with the same spec continues it (a new attempt)."""
    jobs, record, new = _prepare(job_id, job, storage)
    if record.status == "succeeded":
        console.print(f"job {record.job_id} already succeeded; nothing to submit")
        return
    _submit(jobs, record, address, follow, max_restarts)


@cli.command()
@JOB_ID
@STORAGE
@JOB_SERVER
@click.option("--max-restarts", type=click.IntRange(min=0), required=True)
@user_errors
def keep(job_id: str, storage: str | None, address: str | None, max_restarts: int) -> None:
    """(Run by `submit --max-restarts` as a Ray job.) Resubmit the job's coordinator when it dies without
    a final status, up to N times; end when the job ends."""
    from service.keeper import keep as keep_job
    from service.submit import job_server

    jobs, _ = _open(job_id, storage)
    sys.exit(keep_job(jobs, job_server(address), max_restarts, say=lambda t: err_console.print(t)))


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("job", metavar="JOB.yaml")
@click.option(
    "--strategies",
    default="global_onecycle,per_stage_onecycle,per_stage_cosine",
    show_default=True,
    help="Comma-separated schedule.strategy values to run.",
)
@click.option(
    "--baseline",
    is_flag=True,
    help="Also a fixed-resolution run: the final stage's resolution on the full data, as many epochs as "
    "all stages, global OneCycle.",
)
@click.option(
    "--seeds", type=click.IntRange(min=1), default=1, show_default=True, help="Seeds seed..seed+N-1."
)
@click.option("--out", type=click.Path(file_okay=False), help="Report folder (default: compare-<name>).")
@STORAGE
@click.option(
    "--address",
    help="Submit the runs to this Ray cluster (http://HEAD:8265), one after another; default: run here.",
)
@user_errors
def compare(
    job: str,
    strategies: str,
    baseline: bool,
    seeds: int,
    out: str | None,
    storage: str | None,
    address: str | None,
) -> None:
    """Run JOB.yaml once per LR strategy (and seed, and baseline) and write report.md and compare.png.

    Every run is an ordinary job (`stagetrain status`/`logs` work on it); rerunning the same command
    reuses the finished runs and continues an interrupted one."""
    from service.compare import figures, parse_strategies, plot_compare, report_markdown, variants
    from service.jobs import EXIT_OK

    spec = load_spec(job)
    runs = variants(spec, parse_strategies(strategies), baseline, seeds)
    url = resolve_storage(storage or spec.checkpoint.storage)
    for k, v in enumerate(runs, 1):
        jobs, record, new = _prepare(v.job_id, None, url, spec=v.spec)
        what = f"[{k}/{len(runs)}] {v.label} seed {v.seed}: job {v.job_id}"
        if record.status == "succeeded":
            err_console.print(f"{what} already succeeded; reused")
            continue
        err_console.print(f"{what}" + ("" if new else f" (continues at step {record.current_step:,})"))
        if address:
            _submit(jobs, record, address, follow=False)
            code = _follow_log(jobs, v.job_id, None, until_done=True)
        else:
            lease = _take_lease(jobs)
            if new:
                jobs.save(record)
            code = _coordinate(jobs, record, None, lease)
        if code != EXIT_OK:
            err_console.print(
                f"compare stopped: {v.job_id} ended {jobs.load().status}; rerun the same command to continue"
            )
            sys.exit(code)
    results = []
    for v in runs:
        jobs, record = _open(v.job_id, url)
        results.append(figures(v, record, jobs.read_metrics()))
    folder = out or f"compare-{spec.name}"
    os.makedirs(folder, exist_ok=True)
    command = "stagetrain compare " + " ".join(sys.argv[2:])
    text = report_markdown(results, spec, command)
    with open(os.path.join(folder, "report.md"), "w") as f:
        f.write(text)
    plan = _open(runs[0].job_id, url)[1].plan()  # runs[0] is a strategy run: the stages' boundaries
    plot_compare(results, os.path.join(folder, "compare.png"), [s.sample_start for s in plan.stages[1:]])
    console.print(text)
    err_console.print(f"report: {folder}/report.md, figure: {folder}/compare.png")


@cli.command(epilog=EXIT_CODES_HELP)
@JOB_ID
@STORAGE
@click.option(
    "--address",
    envvar="RAY_ADDRESS",
    help="http://HEAD:8265 resubmits the job to that Ray cluster as a new attempt; another Ray "
    "address runs the coordinator here against it (default: $RAY_ADDRESS, else a local Ray).",
)
@click.option(
    "--spec",
    "spec_path",
    metavar="JOB.yaml",
    help="An edited spec: stages that have not started may change (recorded in the job record).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="Worker count for the interrupted stage and the rest (e.g. the cluster came back smaller).",
)
@user_errors
def resume(
    job_id: str, storage: str | None, address: str | None, spec_path: str | None, workers: int | None
) -> None:
    """Continue a preempted, cancelled, failed or interrupted job from its newest verified checkpoint."""
    from service.coordination import check_free
    from service.decisions import check_resume, resize_remaining

    jobs, record = _open(job_id, storage)
    if record.status == "succeeded":
        console.print(f"job {job_id} already succeeded; nothing to resume")
        return
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
        _submit(jobs, record, address, follow=False)
        return
    lease = _take_lease(jobs)
    try:
        jobs.save(record)
    except BaseException:
        lease.release()
        raise
    err_console.print(styled("resuming ", (job_id, "bold"), f" at step {step:,} of {plan.total_steps:,}"))
    _finish(_coordinate(jobs, record, address, lease), jobs, record)


# ------------------------------------------------------------------------------------ watching


@cli.command()
@JOB_ID
@STORAGE
@user_errors
def status(job_id: str, storage: str | None) -> None:
    """Where a job is: stages, step, LR, checkpoint, time left (reads storage: works without a cluster)."""
    from service.coordination import pending_scales, read_lease
    from service.report import status_lines, summary_table
    from service.submit import settle_never_started

    jobs, record = _open(job_id, storage)
    record = settle_never_started(jobs, record)
    latest = jobs.checkpoints.latest(verify=False)
    if record.status == "running":  # the running stage's spike, once its first 5% is in
        from service.analysis import boundary_spikes, plan_stage_steps

        for stage, spike in boundary_spikes(jobs.read_metrics(), plan_stage_steps(record.plan())).items():
            record.stages[stage - 1].spike = spike
    console.print(summary_table(record))
    ray_state = None
    if record.ray_address and record.ray_submissions:
        from service.submit import ray_job_state

        ray_state = ray_job_state(record.ray_address, record.ray_submissions[-1]) or "unreachable"
    pending = [req for _, req in pending_scales(jobs.storage)]
    for line in status_lines(
        record, latest[0] if latest else None, read_lease(jobs.storage), ray_state, pending
    ):
        console.print(line)
    if record.error:
        console.print(styled(("error:", "red"), f" {record.error}"))
    for line in record.events[-5:]:
        console.print(f"  {line}")


@cli.command(name="list")
@STORAGE
@click.option("--status", "only", type=click.Choice(JOB_STATUSES), help="Only jobs with this status.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per job, in a list.")
@user_errors
def list_jobs(storage: str | None, only: str | None, as_json: bool) -> None:
    """Every job under the storage root: status, stage, step, accuracy, age (works with no cluster)."""
    from service.jobs import JobStore
    from service.report import job_row, jobs_table

    root = open_storage(resolve_storage(storage or "./runs"))
    if not root.exists():
        if storage:  # given (--storage or STAGETRAIN_STORAGE): most likely a typo
            raise FileNotFoundError(f"no storage at {root.url}: nothing is there (no job has run with it)")
        err_console.print(
            f"no jobs yet: nothing at {root.url} (pass --storage to look elsewhere)", soft_wrap=True
        )
    rows = [job_row(r) for r in JobStore.all(root)]
    rows = [r for r in rows if only is None or r["status"] == only]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        console.print(jobs_table(rows))


def _ended(record, lease) -> bool:
    """The job has a final status and no coordinator holds it any more (it settles, then releases)."""
    from service.jobs import TERMINAL

    return record.status in TERMINAL and (lease is None or not lease.alive())


def _log_names(jobs) -> list[str]:
    """The job's coordinator logs, ``attempt-<k>.log``, in attempt order."""
    from service.layout import LOGS_DIR

    names = [n for n in jobs.storage.list_appended(LOGS_DIR) if re.fullmatch(r"attempt-\d+\.log", n)]
    return sorted(names, key=lambda n: int(n.split("-")[1].split(".")[0]))


def _follow_log(jobs, job_id: str, attempt: int | None, until_done: bool) -> int:
    """Print the job's log (``attempt``: that coordinator attempt's; default: the newest) and, with
    ``until_done``, keep printing new lines until the job ends; returns the job's exit code."""
    from service.coordination import log_name, read_lease
    from service.jobs import exit_code
    from service.layout import LOGS_DIR
    from service.submit import settle_never_started

    shown: dict[str, int] = {}
    checked = 0.0
    while True:
        record = jobs.load()
        if until_done and record.status == "pending" and time.monotonic() - checked > 5:
            checked = time.monotonic()  # a Ray job that failed before its coordinator started ends it
            record = settle_never_started(jobs, record)
        names = _log_names(jobs)
        wanted = [log_name(attempt)] if attempt else (names[-1:] if not until_done else names)
        for name in wanted:
            if name in names:
                text = jobs.storage.read_appended(LOGS_DIR, name)
                sys.stdout.write(text[shown.get(name, 0) :])
                sys.stdout.flush()
                shown[name] = len(text)
        lease = read_lease(jobs.storage)
        if not until_done or _ended(record, lease):
            if until_done and record.error and not shown:  # it never started: no log, only why
                err_console.print(
                    styled(ERROR, f"job {job_id} {record.status}: {record.error}"), soft_wrap=True
                )
            return exit_code(record.status)
        time.sleep(1.0)


@cli.command()
@JOB_ID
@STORAGE
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines until the job ends.")
@click.option(
    "--attempt", type=click.IntRange(min=1), help="A coordinator attempt's log (default: the newest)."
)
@user_errors
def logs(job_id: str, storage: str | None, follow: bool, attempt: int | None) -> None:
    """The coordinator's log, from storage: events, stage summaries, progress, worker errors.

    It outlives the Ray head and the cluster."""
    from service.coordination import log_name

    jobs, record = _open(job_id, storage)
    names = _log_names(jobs)
    if attempt and log_name(attempt) not in names:
        raise ValueError(
            f"--attempt {attempt}: job {job_id} has logs of attempts "
            f"{', '.join(n.split('-')[1].split('.')[0] for n in names) or 'none yet'}"
        )
    if not names and not follow:
        raise ValueError(f"job {job_id} has no log yet (no coordinator has started)")
    code = _follow_log(jobs, job_id, attempt, until_done=follow)
    if follow:
        sys.exit(code)


@cli.command(epilog=EXIT_CODES_HELP)
@JOB_ID
@STORAGE
@click.option("--timeout", type=float, help="Give up after this many seconds (exit 124).")
@user_errors
def wait(job_id: str, storage: str | None, timeout: float | None) -> None:
    """Block until the job ends; exit with its exit code (as `run` would)."""
    from service.coordination import read_lease
    from service.jobs import EXIT_FAILED, exit_code
    from service.submit import keeper_running

    jobs, record = _open(job_id, storage)
    deadline = time.monotonic() + timeout if timeout else None
    checked = 0.0
    while True:
        lease = read_lease(jobs.storage)
        record = jobs.load()  # after the lease: a coordinator settles the record before releasing it
        if _ended(record, lease):
            console.print(
                f"job {job_id} {record.status}" + (f": {record.error}" if record.error else ""),
            )
            sys.exit(exit_code(record.status))
        if record.status in ("running", "waiting_for_capacity") and (lease is None or not lease.alive()):
            if keeper_running(record):
                time.sleep(1.0)  # the keeper resubmits the coordinator (submit --max-restarts)
                continue
            err_console.print(
                f"job {job_id}: its coordinator stopped without a final status (no lease renewed for "
                f"{lease.age_s() if lease else 0:.0f}s); continue it with `stagetrain resume {job_id}`"
            )
            sys.exit(EXIT_FAILED)
        if record.status == "pending" and time.monotonic() - checked > 5:
            # submitted, but no coordinator has started: did the Ray job itself die?
            from service.submit import settle_never_started

            checked = time.monotonic()
            if settle_never_started(jobs, record).status != "pending":
                continue
        if deadline and time.monotonic() > deadline:
            err_console.print(f"job {job_id} is still {record.status} after {timeout:g}s")
            sys.exit(124)
        time.sleep(1.0)


# ------------------------------------------------------------------------------------ changing a job


@cli.command()
@JOB_ID
@STORAGE
@click.option("--now", is_flag=True, help="Stop the Ray job at once (SIGTERM: still a graceful stop).")
@user_errors
def cancel(job_id: str, storage: str | None, now: bool) -> None:
    """Stop a job gracefully: the workers finish the step and commit a checkpoint; the job ends `cancelled`
    (resumable with `stagetrain resume`). Without confirmation within the grace period (or with --now)
    the Ray job is stopped too."""
    from service.coordination import holding, read_lease, request_cancel, wait_for
    from service.decisions import Cancelled

    jobs, record = _open(job_id, storage)
    if record.status in ("succeeded", "failed", "cancelled"):
        raise ValueError(f"job {job_id} has finished ({record.status}); nothing to cancel")
    lease = read_lease(jobs.storage)
    if lease is None or not lease.alive():  # nobody runs it: mark it ourselves
        # the request first: a coordinator (or a keeper) starting meanwhile ends the job cancelled
        request_cancel(jobs.storage, now)
        if record.status == "pending" and record.ray_address and record.ray_submissions:
            # submitted, coordinator not started yet: stop the Ray job so that it never starts one
            from service.submit import stop

            try:
                stop(record.ray_address, record.ray_submissions[-1])
            except Exception as e:  # noqa: BLE001 - unreachable cluster: the record still says cancelled
                err_console.print(
                    styled((f"could not stop Ray job {record.ray_submissions[-1]}: {e}", "yellow"))
                )
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
        console.print(f"job {job_id} cancelled ({why})")
        return
    request_cancel(jobs.storage, now)
    grace = record.job_spec().preemption.grace_seconds

    def confirmed() -> bool:
        current = read_lease(jobs.storage)
        return _ended(jobs.load(), current)

    if now or not wait_for(confirmed, timeout=grace + 15):
        if record.ray_address and record.ray_submissions:
            from service.submit import stop

            err_console.print(f"stopping Ray job {record.ray_submissions[-1]}")
            try:
                stop(record.ray_address, record.ray_submissions[-1])
            except ValueError as e:  # unreachable head: the cancel request stays for the coordinator
                err_console.print(styled((str(e), "yellow")), soft_wrap=True)
        if not wait_for(confirmed, timeout=grace + 45):
            err_console.print(
                styled(
                    (
                        f"job {job_id}: the coordinator has not confirmed the cancel yet; "
                        f"check with `stagetrain status {job_id}`",
                        "yellow",
                    )
                )
            )
            sys.exit(1)
    record = jobs.load()
    console.print(
        f"job {job_id} {record.status} at step {record.current_step:,}; "
        f"continue with `stagetrain resume {job_id}`",
    )


@cli.command()
@JOB_ID
@STORAGE
@click.option("--workers", type=click.IntRange(min=1), required=True, help="The new worker count.")
@click.option(
    "--from-stage", type=click.IntRange(min=1), help="First stage to change (default: the next one)."
)
@user_errors
def scale(job_id: str, storage: str | None, workers: int, from_stage: int | None) -> None:
    """Change the worker count of stages that have not started, on a running or a stopped job.

    The coordinator applies the request at the next stage boundary (or `resume` does), through the same
    re-layout as `resume --workers` (keep_global_batch, or the LR scaling rule)."""
    from service.coordination import request_scale
    from service.decisions import fits_cluster, resize_remaining

    jobs, record = _open(job_id, storage)
    n = len(record.stages)
    if record.status == "succeeded" or record.current_step >= record.total_steps:
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
    console.print(
        f"requested: stage {from_stage}"
        + (f"..{n}" if from_stage < n else "")
        + f" of job {job_id} on {workers} worker(s) ({name}); applied at the next stage boundary",
    )
    if short:  # accepted: the cluster may grow by then; else the coordinator ignores it, saying why
        err_console.print(
            styled(
                ("warning:", "yellow"),
                f" when the job last started a stage, {short.split('; ')[0]}: unless the cluster grows "
                "by the boundary, the coordinator ignores this request (`stagetrain status` says why)",
            ),
            soft_wrap=True,
        )


# ------------------------------------------------------------------------------------ checkpoints, plots


@cli.command()
@JOB_ID
@STORAGE
@click.option("--verify", is_flag=True, help="Download every file and check its sha256.")
@user_errors
def checkpoints(job_id: str, storage: str | None, verify: bool) -> None:
    """List a job's checkpoints: tag, stage, step, size, age, verified."""
    from datetime import datetime, timezone

    from rich.table import Table

    jobs, _ = _open(job_id, storage)
    infos = jobs.checkpoints.list(verify=verify)
    table = Table(title=f"{job_id}: {len(infos)} checkpoint folders", title_justify="left")
    for col in ["tag", "stage", "step", "size", "age", "verified"]:
        table.add_column(col, justify="right")
    bad = 0
    for info in infos:
        m = info.manifest
        if info.problem:
            bad += 1
        age = ""
        if m is not None:
            minutes = (datetime.now(timezone.utc) - datetime.fromisoformat(m.created)).total_seconds() / 60
            age = f"{minutes:.0f} min"
        size = f"{sum(f.size for f in m.files.values()) / 2**20:.1f} MiB" if m else ""
        verdict = (
            styled((f"no: {info.problem}", "red"))
            if info.problem
            else (styled(("yes", "green")) if info.verified else "sizes ok")
        )
        table.add_row(info.tag, str(m.stage) if m else "", str(m.step) if m else "", size, age, verdict)
    console.print(table)
    if verify and bad:
        sys.exit(1)


@cli.command()
@JOB_ID
@STORAGE
@click.option(
    "-o",
    "--output",
    help="Where to write the model (a local path). Default: export/<checkpoint>.pt in the job's storage.",
)
@click.option(
    "--best", is_flag=True, help="The best evaluated checkpoint (checkpoint.keep_best) instead of the newest."
)
@click.option("--ema", is_flag=True, help="The average of the weights (train.ema) instead of the weights.")
@user_errors
def export(job_id: str, storage: str | None, output: str | None, best: bool, ema: bool) -> None:
    """Write a job's final weights (its newest verified checkpoint) with what rebuilds the module.

    The file is weights-only (plain torch.load(f, weights_only=True)); load it with
    workers.models.load_exported(path)."""
    import io

    import torch

    from checkpoints.store import MODEL_FILE, STATE_FILE
    from service.layout import EXPORT_DIR

    jobs, record = _open(job_id, storage)
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
    if record.status != "succeeded" and not best:
        err_console.print(
            styled(
                (
                    f"job {job_id} is {record.status}: exporting its newest checkpoint, {manifest.tag} "
                    f"(step {manifest.step:,} of {record.total_steps:,})",
                    "yellow",
                )
            )
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
    console.print(
        f"wrote {output}: {spec.model.label}, checkpoint {manifest.tag}"
        + (f" (best {keep.metric} {manifest.metrics[keep.metric]:.4g})" if best else "")
        + (", the average of its weights (train.ema)" if ema else "")
        + (f", val top-1 {last_acc:.2%}" if last_acc is not None else "")
        + f"; input normalised with mean {norm.mean}, std {norm.std} (pixels in [0, 1])"
        + "\n  from workers.models import load_exported"
        + f"\n  model = load_exported({output!r}, normalized_input=True).eval()  # takes images in [0, 1]",
    )


@cli.command()
@JOB_ID
@STORAGE
@click.option("-o", "--output", help="PNG path (default: <storage>/<job-id>/metrics.png).")
@click.option("--x-axis", type=click.Choice(["samples", "steps"]), default="samples", show_default=True)
@user_errors
def plot(job_id: str, storage: str | None, output: str | None, x_axis: str) -> None:
    """Plot loss, every evaluation (top-1, loss), LR, momentum, resolution and global batch of a run, with
    stage boundaries, resumes, restarts and layout changes marked."""
    import io

    from service.layout import PLOT_FILE
    from service.report import plot_metrics

    jobs, record = _open(job_id, storage)
    metrics = jobs.read_metrics()
    if not metrics:
        raise ValueError(f"job {job_id} has no metrics yet")
    buf = io.BytesIO()
    plot_metrics(metrics, buf, x_axis, record)
    if output:
        with open(output, "wb") as f:
            f.write(buf.getvalue())
    else:
        jobs.storage.write_bytes(buf.getvalue(), PLOT_FILE)
        output = f"{jobs.storage.url}/{PLOT_FILE}"
    err_console.print(f"wrote {output}")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
