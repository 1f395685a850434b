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
import time

import click

from checkpoints.storage import StorageError
from service import operations as ops
from service.console import make_console, styled
from service.coordination import LeaseHeld
from service.jobs import JOB_STATUSES, JobStatus
from service.layout import check_job_id
from service.operations import ERROR, Voice, open_job, open_storage, resolve_storage
from service.spec import SpecError, json_schema, load_spec

# Markup off (service.console): what is printed carries paths, errors and spec values.
console = make_console()
err_console = make_console(stderr=True)

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
@click.option(
    "--json", "as_json", is_flag=True, help="Print the plan (with --calibrate: the calibration) as JSON."
)
@click.option(
    "--dataset-size",
    type=click.IntRange(min=1),
    help="Training samples, instead of reading the data's index (a bucket this machine cannot reach).",
)
@click.option(
    "--calibrate",
    is_flag=True,
    help="Time a few steps of each stage and of the fixed-resolution baseline on this machine's device "
    "(imports torch; no Ray) and project the job's time on its planned workers.",
)
@click.option(
    "--warmup-steps",
    type=click.IntRange(min=0),
    default=3,
    show_default=True,
    help="With --calibrate: untimed optimizer steps a stage first.",
)
@click.option(
    "--timed-steps",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="With --calibrate: timed optimizer steps a stage.",
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
    calibrate: bool,
    warmup_steps: int,
    timed_steps: int,
) -> None:
    """Show what a job will do: stages, steps, batches, LR and momentum, before any compute is spent.

    --calibrate runs each stage's first few optimizer steps on this machine, one worker, with the job's
    model, precision, compile and real data (on CUDA when resources.use_gpu, else the CPU with the threads
    of a worker of resources.cpus_per_worker), and prints per stage the measured img/s of one worker, the
    img/s and time projected on the planned workers (linear scaling: all-reduce, start-ups, evaluations and
    checkpoints not counted), the job's total and the same for the fixed-resolution baseline of `compare
    --baseline`. Nothing is written to the job's storage. With --json, one object:

    \b
      job, device, warmup_steps, timed_steps, scaling (the projection rule), plan_hash,
      stages: [{stage, resolution, batch_size (per worker), grad_accum, workers, global_batch, steps,
                warmup_steps, timed_steps, measured_s, images_per_s_per_worker, images_per_s,
                seconds, worker_seconds, measured_as}],
      seconds, worker_seconds (the job's projected wall time, and x workers),
      baseline: {plan_hash, stages, seconds, worker_seconds},
      time_ratio, compute_ratio (the job's seconds and worker_seconds over the baseline's)
    """
    from service.plan import build_plan
    from service.report import peak_lr_note, plan_table, plot_plans, regularization_lines, write_csv

    ctx = click.get_current_context()
    timing = [f"--{n.replace('_', '-')}" for n in ("warmup_steps", "timed_steps") if not _default(ctx, n)]
    if timing and not calibrate:
        raise ValueError(f"{' and '.join(timing)}: only with --calibrate")
    if calibrate and dataset_size:
        raise ValueError("--calibrate reads the job's data and plans from its size: leave out --dataset-size")
    spec = load_spec(job)
    the_plan = ops.make_plan(spec, dataset_size, source=job)
    if calibrate:
        _calibrate(spec, the_plan, warmup_steps, timed_steps, as_json)
    elif as_json:
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
        for line in regularization_lines(spec, the_plan):
            console.print(line)
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


def _default(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) == click.core.ParameterSource.DEFAULT


def _calibrate(spec, the_plan, warmup_steps: int, timed_steps: int, as_json: bool) -> None:
    """``plan --calibrate``: measure (progress on stderr), then the table or the JSON object."""
    from service.report import calibration_lines, calibration_table
    from workers.calibrate import calibrate

    cal = calibrate(
        spec, the_plan, warmup_steps, timed_steps, say=lambda t: err_console.print(t, soft_wrap=True)
    )
    if as_json:
        click.echo(json.dumps(cal.model_dump(mode="json"), indent=2))
        return
    console.print(calibration_table(cal, title=f"{spec.name}: calibration, plan {cal.plan_hash}"))
    for line in calibration_lines(cal):
        console.print(line, soft_wrap=True)


# ------------------------------------------------------------------------------------ printing results


def _voice() -> Voice:
    """Notes and warnings of an operation: to stderr, as everything but a command's answer."""
    return Voice(err_console)


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
    ran = ops.run(job, job_id=job_id, storage=storage, address=address, voice=_voice())
    if ran.already_succeeded:
        console.print(f"job {ran.record.job_id} already succeeded; nothing to run")
        return
    _finish(ran.code, ran.jobs, ran.record)


def _submitted(done: ops.Submitted, follow: bool) -> None:
    """What `submit` (and `resume --address http://...`) print once the job is handed to Ray."""
    job_id, storage = done.job_id, done.storage
    console.print(
        styled("submitted job ", (job_id, "bold"), f" as Ray job {done.submission_id} ({done.server})\n")
        + f"  stagetrain status {job_id} --storage {storage}\n"
        f"  stagetrain logs {job_id} --storage {storage} --follow\n"
        f"  stagetrain cancel {job_id} --storage {storage}",
    )
    if follow:
        sys.exit(_follow_log(done.jobs, job_id, None, until_done=True))


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
    done = ops.submit(
        job, job_id=job_id, storage=storage, address=address, max_restarts=max_restarts, voice=_voice()
    )
    if done.submission_id is None:
        console.print(f"job {done.job_id} already succeeded; nothing to submit")
        return
    _submitted(done, follow)


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

    jobs, _ = open_job(job_id, storage)
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
        jobs, record, new = ops.prepare(v.job_id, None, url, v.spec, _voice())
        what = f"[{k}/{len(runs)}] {v.label} seed {v.seed}: job {v.job_id}"
        if record.status == JobStatus.SUCCEEDED:
            err_console.print(f"{what} already succeeded; reused")
            continue
        err_console.print(f"{what}" + ("" if new else f" (continues at step {record.current_step:,})"))
        if address:
            _submitted(ops.submit_prepared(jobs, record, address), follow=False)
            code = _follow_log(jobs, v.job_id, None, until_done=True)
        else:
            lease = ops.take_lease(jobs)
            if new:
                jobs.save(record)
            code = ops.coordinate(jobs, record, None, lease, _voice())
        if code != EXIT_OK:
            err_console.print(
                f"compare stopped: {v.job_id} ended {jobs.load().status}; rerun the same command to continue"
            )
            sys.exit(code)
    results = []
    for v in runs:
        jobs, record = open_job(v.job_id, url)
        results.append(figures(v, record, jobs.read_metrics()))
    folder = out or f"compare-{spec.name}"
    os.makedirs(folder, exist_ok=True)
    command = "stagetrain compare " + " ".join(sys.argv[2:])
    text = report_markdown(results, spec, command)
    with open(os.path.join(folder, "report.md"), "w") as f:
        f.write(text)
    plan = open_job(runs[0].job_id, url)[1].plan()  # runs[0] is a strategy run: the stages' boundaries
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
    ran = ops.resume(job_id, storage, address=address, spec_path=spec_path, workers=workers, voice=_voice())
    if ran.already_succeeded:
        console.print(f"job {job_id} already succeeded; nothing to resume")
    elif ran.submitted is not None:
        _submitted(ran.submitted, follow=False)
    else:
        _finish(ran.code, ran.jobs, ran.record)


# ------------------------------------------------------------------------------------ watching


@cli.command()
@JOB_ID
@STORAGE
@user_errors
def status(job_id: str, storage: str | None) -> None:
    """Where a job is: stages, step, LR, checkpoint, time left (reads storage: works without a cluster)."""
    from service.report import status_lines, summary_table

    state = ops.read_status(job_id, storage)
    record = state.record
    console.print(summary_table(record))
    for line in status_lines(record, state.checkpoint, state.lease, state.ray_state, state.pending_scales):
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
        if until_done and record.status == JobStatus.PENDING and time.monotonic() - checked > 5:
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
        if not until_done or ops.ended(record, lease):
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

    jobs, record = open_job(job_id, storage)
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
    waited = ops.wait(job_id, storage, timeout)
    (console if waited.ended else err_console).print(waited.message)
    sys.exit(waited.code)


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
    outcome = ops.cancel(job_id, storage, now, voice=_voice())
    if not outcome.confirmed:
        err_console.print(styled((outcome.message, "yellow")))
        sys.exit(1)
    console.print(outcome.message)


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
    req = ops.scale(job_id, storage, workers, from_stage)
    console.print(
        f"requested: stage {req.from_stage}"
        + (f"..{req.stages}" if req.from_stage < req.stages else "")
        + f" of job {job_id} on {workers} worker(s) ({req.request}); applied at the next stage boundary",
    )
    if req.warning:  # accepted: the cluster may grow by then; else the coordinator ignores it, saying why
        err_console.print(styled(("warning:", "yellow"), f" {req.warning}"), soft_wrap=True)


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

    jobs, _ = open_job(job_id, storage)
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
    done = ops.export(job_id, storage, output, best, ema, voice=_voice())
    console.print(
        f"wrote {done.path}: {done.model}, checkpoint {done.checkpoint}"
        + (f" (best {done.best[0]} {done.best[1]:.4g})" if done.best else "")
        + (", the average of its weights (train.ema)" if ema else "")
        + (f", val top-1 {done.val_acc:.2%}" if done.val_acc is not None else "")
        + f"; input normalised with mean {done.mean}, std {done.std} (pixels in [0, 1])"
        + "\n  from workers.models import load_exported"
        + f"\n  model = load_exported({done.path!r}, normalized_input=True).eval()  # takes images in [0, 1]",
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

    jobs, record = open_job(job_id, storage)
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


@cli.command(name="prepare")
@click.argument("src")
@click.argument("dst")
@click.option(
    "--tiers",
    default="auto",
    show_default=True,
    help="Shorter-side caps in px, comma-separated (e.g. 160,256), or auto (160,192,224,288; a DST prepared "
    "or half-prepared keeps its own); full/: originals.",
)
@click.option("--quality", type=click.IntRange(1, 100), default=90, show_default=True, help="JPEG quality.")
@click.option("--workers", type=click.IntRange(min=1), help="Threads (default: CPUs + 4, at most 32).")
@click.option(
    "--on-bad-image",
    type=click.Choice(["error", "skip"]),
    default="error",
    show_default=True,
    help="An unreadable image: stop (error), or name it, copy it as it is and mark it (skip): jobs with "
    "data.on_bad_image: skip leave it out.",
)
@user_errors
def prepare_tiers(
    src: str, dst: str, tiers: str, quality: int, workers: int | None, on_bad_image: str
) -> None:
    """Write resolution tiers of the image folder SRC to DST (any fsspec URL), once: a job whose data.train
    or data.val is DST reads, per stage, the smallest tier that covers the stage's crops without
    upsampling. Run it again to continue an interrupted prepare; a prepared DST is never overwritten."""
    from service.prepare import parse_tiers, prepare, progress_display

    def say(line: str) -> None:
        err_console.print(line, soft_wrap=True)

    with progress_display(err_console) as progress:
        done = prepare(
            src,
            dst,
            parse_tiers(tiers),
            quality,
            workers,
            progress=progress,
            say=say,
            on_bad_image=on_bad_image,
        )
    m = done.manifest
    what = f"{m.samples:,} images in {len(m.classes)} classes from {m.source}"
    if done.already:
        line = f"{done.dst}: prepared already ({what}; same listing); nothing to do"
    else:
        line = f"prepared {done.dst}: {what} ({done.written:,} now, {done.skipped:,} done before)"
    sizes = ", ".join(f"{folder}/ {size / 1e6:,.1f} MB" for folder, size in m.tier_bytes.items())
    line += f"\n  {sizes} (source {m.source_bytes / 1e6:,.1f} MB); use it as data.train or data.val"
    if m.bad_images:
        line += (
            f"\n  {len(m.bad_images):,} unreadable image(s) copied as they are (first: {m.bad_images[0]}): "
            "set data.on_bad_image: skip in the job to leave them out"
        )
    console.print(line, soft_wrap=True)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
