"""Appends that stay cheap on object storage (segments beside the object, merged in batches; counted
through this test's own fsspec wrapper on the real moto server) and readers that survive a line torn by
a crash mid-append."""

from __future__ import annotations

import json
import logging

from checkpoints.storage import MERGE_SEGMENTS, SEGMENTS, Storage, _in_order
from service.coordination import JobLog
from service.jobs import JobRecord, JobStore
from service.layout import METRICS_FILE
from service.plan import build_plan
from tests.helpers import cli_env, stagetrain
from tests.test_coordinator import SPEC
from tests.test_sinks import record as step_record


class Counting:
    """An fsspec filesystem, counting the bytes sent (``pipe_file``) and received (``cat*``)."""

    def __init__(self, fs):
        self._fs, self.sent, self.received = fs, 0, 0

    def pipe_file(self, path, data, **kw):
        self.sent += len(data)
        return self._fs.pipe_file(path, data, **kw)

    def cat_file(self, path, **kw):
        data = self._fs.cat_file(path, **kw)
        self.received += len(data)
        return data

    def cat(self, paths, **kw):
        got = self._fs.cat(paths, **kw)
        self.received += sum(len(v) for v in (got.values() if isinstance(got, dict) else [got]))
        return got

    def __getattr__(self, name):
        return getattr(self._fs, name)


def test_a_thousand_appends_on_s3_send_each_byte_at_most_twice(s3_url, s3_server):
    from service.spec import validate_spec

    root = Storage(s3_url)
    jobs = JobStore(root, "j")
    spec = validate_spec(SPEC)
    jobs.save(JobRecord.create("j", spec, build_plan(spec, 384)))
    counting = Counting(root.fs)
    jobs.storage.fs = counting
    records = [step_record(k, 1 + k // 500, 1.0 / (k + 1)) for k in range(1000)]  # 15 merges
    for r in records:
        jobs.append_metrics([r])
    appended = sum(len(r.model_dump_json(exclude_none=True)) + 1 for r in records)
    assert counting.received == 0  # an append never reads what is there
    assert appended <= counting.sent <= 2 * appended
    names = jobs.storage.listdir(METRICS_FILE + SEGMENTS)
    assert len(names) == 1000 // MERGE_SEGMENTS + 1000 % MERGE_SEGMENTS  # merged parts + the rest
    got = JobStore(Storage(s3_url), "j").read_metrics()  # a fresh reader: listing + a few objects
    assert [m["step"] for m in got] == list(range(1000))
    assert got[734] == json.loads(records[734].model_dump_json(exclude_none=True))
    # a second writer (the next coordinator attempt) goes on after what is there
    again = JobStore(Storage(s3_url), "j")
    again.append_metrics([step_record(1000, 3, 0.5)])
    assert [m["step"] for m in again.read_metrics()][-2:] == [999, 1000]
    # the job log the same way; `logs` and `status` read them from S3
    log = JobLog(jobs.storage, 1, flush_s=3600)
    for k in range(3):
        log.line(f"line {k} [/x]")
        log.flush()
    log.close()
    env = cli_env(**s3_server.env)
    shown = stagetrain("logs", "j", "--storage", s3_url, env=env)
    assert shown.returncode == 0, shown.stderr
    lines = [ln.split(" ", 1)[1] for ln in shown.stdout.splitlines()]
    assert lines == ["line 0 [/x]", "line 1 [/x]", "line 2 [/x]"]
    status = stagetrain("status", "j", "--storage", s3_url, env=env)
    assert status.returncode == 0 and "step 0 of 36" in status.stdout, status.stderr


def test_segments_a_merged_part_holds_are_read_once():
    """A reader that lists between a merge and the deletion of the merged segments reads them once."""
    names = ["0000000000-aa.seg", "0000000001-aa.seg", "0000000000-0000000001-aa.part", "0000000002-aa.seg"]
    assert _in_order(names) == ["0000000000-0000000001-aa.part", "0000000002-aa.seg"]
    other = ["0000000005-bb.seg", "0000000003-0000000004-aa.part", "0000000004-bb.seg", "junk"]
    assert _in_order(other) == ["0000000003-0000000004-aa.part", "0000000004-bb.seg", "0000000005-bb.seg"]


def test_a_line_torn_by_a_crash_is_skipped_with_a_warning(tmp_path, caplog):
    """A coordinator died mid-append; the next one appends after it: every reader skips the torn line
    and keeps the rest (the torn record's step was re-run from the checkpoint)."""
    from service.spec import validate_spec

    jobs = JobStore(Storage(str(tmp_path)), "j")
    spec = validate_spec(SPEC)
    jobs.save(JobRecord.create("j", spec, build_plan(spec, 384)))
    jobs.append_metrics([step_record(0, 1, 1.0), step_record(1, 1, 0.9)])
    whole = jobs.storage.read_bytes(METRICS_FILE)
    jobs.storage.write_bytes(whole + step_record(2, 1, 0.8).model_dump_json().encode()[:40], METRICS_FILE)
    jobs.append_metrics([step_record(2, 1, 0.8), step_record(3, 1, 0.7)])  # the next attempt
    jobs.append_metrics([step_record(4, 1, 0.6)])
    raw = jobs.storage.read_text(METRICS_FILE).split("\n")
    assert len(raw) == 7 and raw[-1] == "" and all(raw[:-1]), raw  # 2 + torn + 2 + 1 lines, none blank
    with caplog.at_level(logging.WARNING):
        got = jobs.read_metrics()
    assert [m["step"] for m in got] == [0, 1, 2, 3, 4] and got[2]["loss"] == 0.8
    assert "metrics.jsonl line 3 is not a whole record; skipped" in caplog.text
    plotted = stagetrain("plot", "j", "--storage", str(tmp_path), "-o", str(tmp_path / "m.png"))
    assert plotted.returncode == 0 and "Traceback" not in plotted.stderr, plotted.stderr
    status = stagetrain("status", "j", "--storage", str(tmp_path))
    assert status.returncode == 0 and "Traceback" not in status.stderr, status.stderr
