"""The ``stagetrain`` command line."""

from __future__ import annotations

import functools
import json
import sys

import click
from rich.console import Console

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
        except (FileNotFoundError, ValueError) as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False)
            sys.exit(2)

    return wrapper


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

    spec = load_spec(job)
    the_plan = build_plan(spec)
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


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
