"""Managed recovery without Ray: the termination-notice sources against a fake metadata server on
127.0.0.1, and a worker that sees a notice stopping with a checkpoint at the step it reached."""

from __future__ import annotations

import time

import pytest

from service.spec import NoticeURL
from tests.fake_metadata import FakeMetadata
from workers.control import AWS_ENDPOINT_ENV, GCP_HOST_ENV, NoticeSource, StopSignal, notice_source


@pytest.fixture
def metadata():
    server = FakeMetadata()
    yield server
    server.close()


def test_aws_notice_uses_an_imdsv2_token_and_sees_termination_and_rebalance(metadata, monkeypatch):
    monkeypatch.setenv(AWS_ENDPOINT_ENV, metadata.url)
    source = NoticeSource("aws")
    assert source.check() is None
    assert metadata.requests[:2] == [
        ("PUT", "/latest/api/token"),
        ("GET", "/latest/meta-data/spot/instance-action"),
    ]
    metadata.token = "rotated"  # the session token expired: fetched again, once
    metadata.announced = "rebalance"
    assert source.check() == 'aws events/recommendations/rebalance: {"noticeTime": "2026-11-30T10:00:00Z"}'
    metadata.announced = "terminate"
    assert source.check().startswith('aws spot/instance-action: {"action": "terminate"')


def test_gcp_and_url_notices(metadata, monkeypatch):
    monkeypatch.setenv(GCP_HOST_ENV, metadata.host)
    gcp = NoticeSource("gcp")
    assert gcp.check() is None
    metadata.announced = "terminate"
    assert gcp.check() == "gcp instance/preempted: TRUE"
    url = notice_source(NoticeURL(url=f"{metadata.url}/computeMetadata/v1/instance/preempted"))
    assert url.check() is None  # 403: no Metadata-Flavor header, so no notice
    assert notice_source("none") is None


def test_a_worker_stops_with_a_checkpoint_at_the_step_it_reached(metadata, monkeypatch, tmp_path):
    """In-process StageRunner: the notice arrives mid-stage; the stage ends preempted at the next report
    with a committed checkpoint at the step reached, and the StageEnd names the notice."""
    from tests.test_runner import runner, store

    monkeypatch.setenv(AWS_ENDPOINT_ENV, metadata.url)
    stop = StopSignal(None, grace_seconds=30, notice=NoticeSource("aws"), notice_poll_s=0.05)
    r = runner(str(tmp_path), 0, stop=None)
    r.stop_requested = stop
    seen = []

    def on_step(step: int) -> None:
        seen.append(step)
        if step == 1:
            metadata.announced = "terminate"
            time.sleep(0.3)  # a few polls

    r.on_step = on_step
    end = r.run()
    assert end.preempted and end.notices and end.notices[0].startswith("aws spot/instance-action")
    assert end.notice_nodes == [""]  # not in a Ray worker
    assert end.step == seen[-1] + 1 < r.stage.step_end
    assert store(str(tmp_path)).latest()[0].step == end.step
