"""One coordinator per job, for real: the lease is a compare-and-swap (a file lock locally, a conditional
PUT on S3), a coordinator that loses it stops and writes nothing more, a SIGKILLed coordinator on this
host frees it at once, and nothing writes ``job.json`` before it holds it. In-process (the coordinator on
``tests/fake_executor.py``) and with real processes and the real moto server; no Ray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone

import pytest

from checkpoints.storage import Storage, WriteConflict
from service.coordination import Lease, LeaseHeld, LeaseKeeper, LeaseLost, check_free, read_lease
from service.layout import JOB_FILE, LEASE_FILE, METRICS_FILE
from tests.conftest import merge
from tests.helpers import REPO, stagetrain
from tests.jobs import TINY, write_job
from tests.s3_server import FlakyProxy
from tests.test_coordinator import Job, quick_waits  # noqa: F401 - the runner's polls at test speed


def test_a_coordinator_whose_lease_is_taken_stops_and_writes_nothing_more(tmp_path):
    job = Job(tmp_path)
    usurper: dict[str, bytes] = {}

    def take_over(step: int) -> None:
        """At step 15 another coordinator holds the lease (as after a takeover of a stale one); the
        workers pause until this coordinator's next renewal finds out, then go on reporting."""
        if step == 15:
            lease = read_lease(job.jobs.storage).model_copy(update={"owner": "usurper", "pid": 1})
            job.jobs.storage.write_text(lease.model_dump_json(), LEASE_FILE)
            deadline = time.monotonic() + 5
            while job.lease.lost is None and time.monotonic() < deadline:  # one renewal: 1.2 s / 6
                time.sleep(0.01)
            usurper.update(files())

    def files() -> dict[str, bytes | None]:
        store = job.jobs.storage
        names = (LEASE_FILE, JOB_FILE, METRICS_FILE, "logs/attempt-1.log")
        return {n: store.read_bytes(n) if store.exists(n) else None for n in names}

    job.executor.on_step = take_over
    with pytest.raises(LeaseLost, match="another coordinator took the job's lease: coordinator usurper"):
        job.run(lease_timeout_s=1.2)
    time.sleep(0.5)  # the fake workers' last reports, the log's flush thread: nothing may land
    # the lease neither renewed over nor released; no record, metric or log line written after
    assert files() == usurper and usurper[METRICS_FILE]
    assert "lost the lease of job j" in job.out.getvalue()


def test_a_coordinator_that_cannot_renew_stops_before_another_may_take_over(tmp_path):
    """Renewals fail (the lock file is not a file): within the timeout less one interval the holder's
    writes are fenced, while its lease on storage is still fresh, so no other coordinator took it yet.
    (A 6 s lease: fenced after 5 s, so the assertions have 1 s on an idle-priority core.)"""
    store = Storage(str(tmp_path)).child("j")
    keeper = LeaseKeeper(store, "j", timeout_s=6).acquire()
    keeper.check()  # held
    os.remove(store.path(LEASE_FILE) + ".lock")
    os.mkdir(store.path(LEASE_FILE) + ".lock")
    deadline = time.monotonic() + 15
    while keeper.lost is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert keeper.lost and "could not renew the job's lease" in keeper.lost
    with pytest.raises(LeaseLost):
        keeper.check()
    assert read_lease(store).fresh()  # nobody could have taken it over yet
    keeper.release()
    assert store.exists(LEASE_FILE)  # a lost lease is never removed by its former holder


def test_a_write_under_way_when_the_lease_is_found_taken_lands_before_the_loss_and_none_after(tmp_path):
    """The fence is held for the whole write, not only checked before it: a renewal that finds the lease
    taken while a write is under way waits for it, so once ``lost`` is set nothing of this coordinator
    can still land (a check-then-write let one job.json write land after the loss: seen under load)."""
    store = Storage(str(tmp_path)).child("j")
    keeper = LeaseKeeper(store, "j", timeout_s=30).acquire()
    keeper._stop.set()  # renewals by hand below
    inside, release, lost_seen = threading.Event(), threading.Event(), []

    def write():
        with keeper.fenced():
            inside.set()
            release.wait(10)
            store.write_text("last", "written-while-held")

    writer = threading.Thread(target=write)
    writer.start()
    assert inside.wait(10)
    usurper = read_lease(store).model_copy(update={"owner": "usurper", "pid": 1})
    store.write_text(usurper.model_dump_json(), LEASE_FILE)
    renewal = threading.Thread(target=lambda: lost_seen.append(keeper.renew()))
    renewal.start()
    renewal.join(0.5)
    assert renewal.is_alive() and keeper.lost is None  # waits for the write under way
    release.set()
    writer.join(10)
    renewal.join(10)
    assert lost_seen == [False] and "coordinator usurper" in keeper.lost
    assert store.read_text("written-while-held") == "last"
    with pytest.raises(LeaseLost), keeper.fenced():
        store.write_text("never", "after-the-loss")
    assert not store.exists("after-the-loss") and read_lease(store).owner == "usurper"


def test_two_coordinators_racing_for_a_lease_get_one_holder(tmp_path):
    """Ten rounds of two keepers acquiring the same stale lease at the same moment: one holds it."""
    store = Storage(str(tmp_path)).child("j")
    for _ in range(10):
        barrier, won, refused = threading.Barrier(2), [], []

        def acquire(barrier=barrier, won=won, refused=refused):
            keeper = LeaseKeeper(store, "j", timeout_s=30)
            barrier.wait()
            try:
                won.append(keeper.acquire())
            except LeaseHeld as e:
                refused.append(str(e))

        threads = [threading.Thread(target=acquire) for _ in range(2)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert len(won) == 1 and len(refused) == 1, (won, refused)
        assert read_lease(store).owner == won[0].lease.owner
        won[0]._stop.set()  # stops renewing: stale for the next round, as after a crash
        stale = read_lease(store).model_copy(update={"heartbeat": "2000-01-01T00:00:00+00:00", "pid": 1})
        store.write_text(stale.model_dump_json(), LEASE_FILE)


def test_conditional_writes_on_s3(s3_url):
    store = Storage(s3_url)
    v1 = store.write_versioned(b"one", "x.json", expect=None)
    with pytest.raises(WriteConflict):
        store.write_versioned(b"again", "x.json", expect=None)  # If-None-Match: *
    v2 = store.write_versioned(b"two", "x.json", expect=v1)
    with pytest.raises(WriteConflict):
        store.write_versioned(b"stale", "x.json", expect=v1)  # If-Match: an old ETag
    assert store.read_versioned("x.json") == (b"two", v2)


def _holder(job_dir: str) -> subprocess.Popen:
    """A process that takes the job's lease, says so, and keeps renewing it until killed."""
    code = (
        "import sys, time; from checkpoints.storage import Storage; "
        "from service.coordination import LeaseKeeper; "
        "LeaseKeeper(Storage(sys.argv[1]), 'j', timeout_s=600).acquire(); print('held', flush=True); "
        "time.sleep(600)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, job_dir], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_sigkilled_coordinator_on_this_host_frees_the_lease_at_once(tmp_path):
    store = Storage(str(tmp_path)).child("j")
    holder = _holder(store.url)
    try:
        with pytest.raises(LeaseHeld, match=rf"job j is running: coordinator \w+ on .* \(pid {holder.pid}\)"):
            check_free(store, "j")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lease = read_lease(store)
    assert lease.fresh() and lease.holder_gone()  # heartbeat seconds old, process gone
    keeper = LeaseKeeper(store, "j").acquire()  # at once, not after the 600 s timeout
    assert keeper.took_over.pid == holder.pid
    keeper.release()


def test_a_reused_pid_is_not_the_holder(tmp_path):
    lease = Lease.model_validate_json(
        LeaseKeeper(Storage(str(tmp_path)), "j").lease.model_dump_json()  # this process, now
    )
    assert lease.alive()
    assert not lease.model_copy(update={"pid_started": lease.pid_started + 1}).alive()
    assert lease.model_copy(update={"host": "elsewhere", "pid": 999_999_999}).alive()  # heartbeat only


def test_run_resume_submit_and_cancel_of_a_job_held_elsewhere_write_nothing(tmp_path):
    """A live coordinator holds the job: every command that would write its record is refused first."""
    storage = str(tmp_path / "runs")
    unreachable = "http://127.0.0.1:9"  # never reached: the lease refuses first
    new = write_job(tmp_path, merge(TINY, {"name": "new"}), "new.yaml")
    proc = stagetrain("submit", new, "--job-id", "n", "--storage", storage, "--address", unreachable)
    assert proc.returncode == 2 and "cannot reach the Ray job server" in proc.stderr
    assert not Storage(storage).exists("n")  # a new job that was not submitted leaves nothing
    job = Job(tmp_path / "runs")  # job "j", pending
    spec = write_job(tmp_path, job.spec.model_dump(mode="json"))
    holder = _holder(job.jobs.storage.url)
    try:
        before = job.jobs.storage.read_bytes(JOB_FILE)
        for args in (
            ("run", spec, "--job-id", "j"),
            ("run", "--job-id", "j"),
            ("resume", "j"),
            ("submit", spec, "--job-id", "j", "--address", unreachable),
        ):
            proc = stagetrain(*args, "--storage", storage, timeout=120)
            assert proc.returncode == 2, (args, proc.stderr)
            assert "job j is running: coordinator" in proc.stderr and f"(pid {holder.pid}" in proc.stderr
            assert job.jobs.storage.read_bytes(JOB_FILE) == before, args
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the holder is gone: cancel settles the job at once instead of waiting for a confirmation
    proc = stagetrain("cancel", "j", "--storage", storage, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"job j cancelled (its coordinator, pid {holder.pid}, has ended)" in proc.stdout
    assert job.record.status == "cancelled"
    assert read_lease(job.jobs.storage).pid == holder.pid  # left as found: the next coordinator takes it over


@pytest.mark.s3
def test_a_lease_on_s3_outlives_an_endpoint_that_stops_answering_for_less_than_its_timeout(
    s3_url, s3_server, monkeypatch
):
    """The endpoint stops answering for 4 s of a 12 s lease (renewed every 2 s; fenced after 10 s
    without a renewal): each renewal gives up after one interval and the next one tries again, so a
    renewal after the outage keeps the lease. (Before, the one renewal sent into the outage waited for
    its answer past the lease: botocore retries with backoff, and aiohttp waits for a PUT's
    ``100 Continue`` with no timeout at all.) Generous margins: the in-process tests run on idle CPU."""
    proxy = FlakyProxy(s3_server.port)
    proxy.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    store = Storage(s3_url).child("j")
    keeper = LeaseKeeper(store, "j", timeout_s=12).acquire()
    try:
        proxy.mute(4)
        back = datetime.now(timezone.utc).isoformat()
        deadline = time.monotonic() + 20
        while read_lease(store).heartbeat < back and time.monotonic() < deadline:
            time.sleep(0.1)
        assert keeper.lost is None
        keeper.check()  # not LeaseLost
        lease = read_lease(store)
        assert lease.heartbeat >= back and lease.owner == keeper.lease.owner
        keeper.release()
        assert not store.exists(LEASE_FILE)  # released: it was still ours
    finally:
        keeper.release()
        proxy.close()


def test_a_renewal_whose_answer_was_lost_keeps_the_lease(tmp_path):
    """A renewal given up on may still take effect: the next one finds the lease changed, but still
    this coordinator's, and carries on from it (taking it for another coordinator's lost it)."""
    store = Storage(str(tmp_path)).child("j")
    keeper = LeaseKeeper(store, "j", timeout_s=60).acquire()
    try:
        ours = read_lease(store)
        later = ours.model_copy(update={"heartbeat": datetime.now(timezone.utc).isoformat()})
        store.write_text(later.model_dump_json(), LEASE_FILE)  # what the lost write left
        assert keeper.renew() and keeper.lost is None  # found it changed, but ours
        assert keeper.renew()  # renewed over it
        assert read_lease(store).heartbeat > later.heartbeat
        keeper.check()
    finally:
        keeper.release()
    assert not store.exists(LEASE_FILE)
