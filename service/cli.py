"""The ``stagetrain`` command line."""

from __future__ import annotations

import functools
import json
import sys

import click
from rich.console import Console

from checkpoints.storage import StorageError
from service.layout import check_job_id
from service.spec import SpecError, json_schema, load_spec

# Wide enough for the plan table when output is piped (rich would assume 80 columns).
console = Console(width=None if sys.stdout.isatty() else 150)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 150)


def user_errors(fn):
    """Invalid input exits with code 2 and a message, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SpecError as e:
            err_console.print(f"[bold red]error:[/] {e.source}: invalid job spec", highlight=False)
            for p in e.problems:
                err_console.print(f"  {p}", highlight=False, markup=False)
            sys.exit(2)
        except (FileNotFoundError, ValueError, StorageError) as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False)
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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
@user_errors
def plan(job: str, csv_path: str | None, plot_path: str | None, compare: bool, x_axis: str, as_json: bool) -> None:
    """Show what a job will do: stages, steps, batches, LR and momentum, before any compute is spent."""
    from service.plan import build_plan
    from service.report import plan_table, plot_plans, write_csv
    from service.sources import dataset_size

    spec = load_spec(job)
    the_plan = build_plan(spec, dataset_size(spec.data))
    if as_json:
        click.echo(json.dumps({"plan_hash": the_plan.plan_hash(), **the_plan.model_dump(mode="json")}, indent=2))
    else:
        console.print(plan_table(the_plan, title=f"{spec.name}: {spec.schedule.strategy}, "
                                 f"lr_scaling {spec.lr_scaling.rule} (reference batch {the_plan.reference_batch}), "
                                 f"plan {the_plan.plan_hash()}"))
    if csv_path:
        write_csv(the_plan, csv_path)
        err_console.print(f"wrote {the_plan.total_steps} steps to {csv_path}")
    if plot_path:
        plans = {spec.schedule.strategy: the_plan}
        if compare:
            for strategy in ("global_onecycle", "per_stage_onecycle", "per_stage_cosine"):
                if strategy != spec.schedule.strategy:
                    other = spec.model_copy(update={"schedule": spec.schedule.model_copy(update={"strategy": strategy})})
                    plans[strategy] = build_plan(other, the_plan.dataset_size)
        plot_plans(plans, plot_path, x_axis)
        err_console.print(f"wrote {plot_path}")


STORAGE_HELP = "Job storage (fsspec URL or local path); default: the spec's checkpoint.storage, or ./runs."


def resolve_storage(url: str) -> str:
    """Local paths become absolute: Ray workers do not share the driver's working directory."""
    import os

    return url if "://" in url else os.path.abspath(os.path.expanduser(url))


def _job_store(job_id: str, storage: str | None, options: dict | None = None):
    from checkpoints.storage import Storage
    from service.jobs import JobStore

    return JobStore(Storage(resolve_storage(storage or "./runs"), options), job_id)


def _finish(code: int, jobs, record) -> None:
    from service.report import plot_metrics, summary_table

    console.print(summary_table(record))
    metrics = jobs.read_metrics()
    if metrics:
        import io

        buf = io.BytesIO()
        plot_metrics(metrics, buf)
        jobs.storage.write_bytes(buf.getvalue(), "metrics.png")
        err_console.print(f"job record, metrics and plot: {jobs.storage.url}/{{job.json,metrics.jsonl,metrics.png}}")
    sys.exit(code)


@cli.command()
@click.argument("job", metavar="JOB.yaml")
@click.option("--job-id", callback=_job_id_param, help="Default: <name>-<UTC time>-<random>.")
@click.option("--storage", help=STORAGE_HELP)
@click.option("--address", envvar="RAY_ADDRESS", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray).")
@user_errors
def run(job: str, job_id: str | None, storage: str | None, address: str | None) -> None:
    """Train a job: one Ray Train TorchTrainer per stage.

    Exit codes: 0 succeeded, 1 failed, 2 invalid input, 75 preempted (continue with `stagetrain resume`)."""
    from checkpoints.storage import Storage
    from service.jobs import JobRecord, JobStore, new_job_id
    from service.plan import build_plan
    from service.runner import JobRunner, RunOptions
    from service.sources import dataset_size

    spec = load_spec(job)
    url = resolve_storage(storage or spec.checkpoint.storage)
    job_id = job_id or new_job_id(spec.name)
    root = Storage(url, spec.checkpoint.storage_options)
    jobs = JobStore(root, job_id)
    if jobs.exists():
        raise ValueError(f"job {job_id!r} already exists in {url}: continue it with `stagetrain resume {job_id}` "
                         "or pick another --job-id")
    root.probe()
    plan = build_plan(spec, dataset_size(spec.data))
    record = JobRecord.create(job_id, spec, plan)
    jobs.save(record)
    err_console.print(f"job [bold]{job_id}[/] -> {jobs.storage.url}")
    code = JobRunner(spec, plan, record, jobs, RunOptions(job_id=job_id, storage=url, address=address,
                                                          console=err_console)).run()
    _finish(code, jobs, record)


@cli.command()
@JOB_ID
@click.option("--storage", help=STORAGE_HELP)
@click.option("--address", envvar="RAY_ADDRESS", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray).")
@click.option("--spec", "spec_path", metavar="JOB.yaml",
              help="An edited spec: stages that have not started may change (recorded in the job record).")
@click.option("--workers", type=click.IntRange(min=1),
              help="Worker count for the interrupted stage and the rest (e.g. the cluster came back smaller).")
@user_errors
def resume(job_id: str, storage: str | None, address: str | None, spec_path: str | None, workers: int | None) -> None:
    """Continue a preempted, failed or interrupted job from its newest verified checkpoint."""
    from service.decisions import check_resume, layout_history, resize_remaining
    from service.jobs import JobRecord
    from service.runner import JobRunner, RunOptions

    jobs = _job_store(job_id, storage)
    record = jobs.load()
    old_spec = record.job_spec()
    jobs = _job_store(job_id, storage, old_spec.checkpoint.storage_options)
    if record.status == "succeeded":
        console.print(f"job {job_id} already succeeded; nothing to resume")
        return
    old_plan = record.plan()
    latest = jobs.checkpoints.latest(verify=True)
    step = latest[0].step if latest else 0
    spec = load_spec(spec_path) if spec_path else old_spec
    if workers:
        spec = resize_remaining(spec, old_plan.stage_at(min(step, old_plan.total_steps - 1)).index, workers)
    changes = check_resume(record, old_plan, spec, step)
    new_layouts = layout_history(old_plan, spec, step)
    history = record.history + new_layouts
    plan = record.plan(spec, history)
    if spec != old_spec:
        fresh = JobRecord.create(job_id, spec, plan)
        kept = {s.stage: s for s in record.stages}
        record.spec, record.plan_hash, record.stage_hashes = fresh.spec, fresh.plan_hash, fresh.stage_hashes
        record.total_steps, record.history = fresh.total_steps, history
        record.stages = [kept[s.stage].model_copy(update={"workers": s.workers}) if s.stage in kept else s
                         for s in fresh.stages]
        record.event("re-planned: " + "; ".join(changes + [f"stages[{h.stage}] ran steps before {h.until_step} with "
                                                           f"{h.workers} workers" for h in new_layouts]
                                                 or ["worker layout changed"]))
    record.error = None
    record.event(f"resumed from {latest[0].tag if latest else 'the start'} (step {step})")
    jobs.save(record)
    err_console.print(f"resuming [bold]{job_id}[/] at step {step:,} of {plan.total_steps:,}")
    code = JobRunner(spec, plan, record, jobs, RunOptions(job_id=job_id, storage=jobs.root.url, address=address,
                                                          console=err_console)).run()
    _finish(code, jobs, record)


@cli.command()
@JOB_ID
@click.option("--storage", help=STORAGE_HELP)
@user_errors
def status(job_id: str, storage: str | None) -> None:
    """Where a job is (reads the job record: works without a cluster)."""
    from service.report import summary_table

    jobs = _job_store(job_id, storage)
    record = jobs.load()
    console.print(summary_table(record))
    console.print(f"step {record.current_step:,} of {record.total_steps:,} (stage {record.current_stage}); "
                  f"updated {record.updated}", highlight=False)
    if record.error:
        console.print(f"[red]error:[/] {record.error}", highlight=False)
    for line in record.events[-5:]:
        console.print(f"  {line}", highlight=False, markup=False)


@cli.command()
@JOB_ID
@click.option("--storage", help=STORAGE_HELP)
@click.option("--verify", is_flag=True, help="Download every file and check its sha256.")
@user_errors
def checkpoints(job_id: str, storage: str | None, verify: bool) -> None:
    """List a job's checkpoints: tag, stage, step, size, age, verified."""
    from datetime import datetime, timezone

    from rich.markup import escape
    from rich.table import Table

    jobs = _job_store(job_id, storage)
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
            age = f"{(datetime.now(timezone.utc) - datetime.fromisoformat(m.created)).total_seconds() / 60:.0f} min"
        size = f"{sum(f.size for f in m.files.values()) / 2**20:.1f} MiB" if m else ""
        verdict = f"[red]no: {escape(info.problem)}[/]" if info.problem else ("[green]yes[/]" if info.verified else "sizes ok")
        table.add_row(info.tag, str(m.stage) if m else "", str(m.step) if m else "", size, age, verdict)
    console.print(table)
    if verify and bad:
        sys.exit(1)


@cli.command()
@JOB_ID
@click.option("--storage", help=STORAGE_HELP)
@click.option("-o", "--output", help="PNG path (default: <storage>/<job-id>/metrics.png).")
@click.option("--x-axis", type=click.Choice(["samples", "steps"]), default="samples", show_default=True)
@user_errors
def plot(job_id: str, storage: str | None, output: str | None, x_axis: str) -> None:
    """Plot loss, accuracy, LR, momentum and resolution of a run against samples."""
    import io

    from service.report import plot_metrics

    jobs = _job_store(job_id, storage)
    jobs.load()
    metrics = jobs.read_metrics()
    if not metrics:
        raise ValueError(f"job {job_id} has no metrics yet")
    buf = io.BytesIO()
    plot_metrics(metrics, buf, x_axis)
    if output:
        with open(output, "wb") as f:
            f.write(buf.getvalue())
    else:
        jobs.storage.write_bytes(buf.getvalue(), "metrics.png")
        output = f"{jobs.storage.url}/metrics.png"
    err_console.print(f"wrote {output}")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
