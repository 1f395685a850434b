"""Text from outside the program is never read as rich markup: exception messages (gloo's name source
files in brackets: ``[/__w/pytorch/.../pair.cc:545]``), paths, spec values and job records reach the
terminal as they are, never crash the printer, and keep their brackets. No Ray."""

from __future__ import annotations

import pytest
from rich.console import Console

from checkpoints.storage import Storage
from service.console import make_console, styled
from service.jobs import JobRecord, JobStore
from service.plan import build_plan
from service.report import job_row, jobs_table, summary_table
from service.spec import validate_spec
from tests.conftest import BASE_SPEC, merge
from tests.helpers import stagetrain

# A closing tag that matches nothing (rich raises MarkupError), a style, a link: all must print verbatim.
NASTY = "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] [/x] [bold]b[/bold] [link=http://e]l"


def capture(console: Console, *renderables) -> str:
    with console.capture() as cap:
        for r in renderables:
            console.print(r)
    return cap.get()


def test_consoles_print_outside_text_verbatim():
    console = make_console(stderr=True)
    assert NASTY in capture(console, NASTY, styled(("error: ", "bold red"), NASTY), f"  {NASTY}")


def test_styled_keeps_style_without_parsing_text():
    text = styled(("error:", "bold red"), " ", NASTY)
    assert text.plain == f"error: {NASTY}"
    assert [str(span.style) for span in text.spans] == ["bold red"]


def record_with(job_id: str, text: str) -> JobRecord:
    spec = validate_spec(merge(BASE_SPEC, {"name": "nasty"}))
    record = JobRecord.create(job_id, spec, build_plan(spec, 4096))
    record.status, record.error = "failed", f"stage 1 failed: worker 1: RuntimeError: {text}"
    record.event(f"stage 1 runs again from step 0: {text}")
    return record


def test_tables_print_their_cells_verbatim():
    from service.report import plan_table

    spec = validate_spec(BASE_SPEC)
    record = record_with("j1", NASTY)
    record.stages[0].checkpoint = NASTY
    out = capture(
        make_console(),
        summary_table(record),
        jobs_table([job_row(record)]),
        plan_table(build_plan(spec, 4096), title="[/x] [bold]b"),
    )
    assert NASTY[:20] in out and "[/x] [bold]b" in out, out  # a checkpoint cell, the plan's title


@pytest.mark.parametrize("command", [["status", "nasty"], ["list"], ["logs", "nasty"]])
def test_cli_prints_a_record_with_markup_like_text_verbatim(tmp_path, command):
    jobs = JobStore(Storage(str(tmp_path)), "nasty")
    jobs.save(record_with("nasty", NASTY))
    jobs.storage.write_text(f"worker 1 failed: {NASTY}\n", "logs", "attempt-1.log")
    out = stagetrain(*command, "--storage", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr and "MarkupError" not in out.stderr
    if command[0] != "list":
        assert NASTY in out.stdout.replace("\n", ""), out.stdout


def test_cli_errors_naming_a_path_with_brackets_print_it_verbatim(tmp_path):
    folder = tmp_path / "a["
    folder.mkdir()
    job = folder / "x]job[bold].yaml"  # the path reads .../a[/x]job[bold].yaml
    job.write_text("version: 1\nname: x\nstages: []\n")
    out = stagetrain("plan", str(job))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert str(job) in out.stderr, out.stderr
    missing = stagetrain("plan", f"{folder}/[link=mailto:e]nope.yaml")
    assert missing.returncode == 2 and "[link=mailto:e]nope.yaml" in missing.stderr, missing.stderr


def test_checkpoints_table_prints_a_garbled_manifest_verbatim(tmp_path):
    jobs = JobStore(Storage(str(tmp_path)), "nasty")
    jobs.save(record_with("nasty", NASTY))
    jobs.storage.write_text('{"tag": "[/x] [bold]b"}', "checkpoints", "step-000000001", "manifest.json")
    out = stagetrain("checkpoints", "nasty", "--storage", str(tmp_path))
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert "unreadable manifest" in out.stdout and "[/x] [bold]b" in out.stdout.replace("\n", ""), out.stdout


def test_an_error_from_a_dataloader_worker_is_summed_up_by_its_own_line():
    """A bad image read by a DataLoader worker process reaches the coordinator's summary as the image's
    own error (index, file), not as DataLoader's "Caught ValueError in DataLoader worker process 0."; the
    coordinator then does not retry it (the same files on every attempt)."""
    import torch

    from service.console import error_line
    from service.decisions import Failed, after_outcome
    from service.spec import FailureSpec

    class Bad(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise ValueError(f"data: image {i} (/d/dog/{i}.jpg, 200 bytes) cannot be decoded: truncated")

    with pytest.raises(ValueError) as caught:
        next(iter(torch.utils.data.DataLoader(Bad(), num_workers=1)))
    assert str(caught.value).startswith("Caught ValueError in DataLoader worker process 0")
    line = error_line(caught.value)
    assert line == "ValueError: data: image 0 (/d/dog/0.jpg, 200 bytes) cannot be decoded: truncated"
    assert after_outcome(Failed(f"stage 1 failed: worker 0: {line}"), FailureSpec(max_failures=3), 0) is None
    assert error_line(KeyError("x")) == "KeyError: 'x'"
