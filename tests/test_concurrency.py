"""Many processes at one source, as in production: task workers and cron's cds_import
started together while the partner keeps adding files, and a worker killed mid-run. Real
processes on the configured database (SQLite or PostgreSQL)."""

import itertools
import os
import signal
import subprocess
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from imports.models import ImportRun
from imports.runs import enqueue_import, run_import

from .conftest import make_source, start_manage, wait_for, written
from .ftp import LARGE_PAYLOAD, slow_dtp
from .test_cds import spooled

# Far longer than the test: the source can only be free again because the dead worker's
# claim is taken over at once on this host.
LEASE = 3600

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def manage(*args: str) -> subprocess.Popen:
    return start_manage(*args, CDS_CLAIM_LEASE=str(LEASE))


class Partner(threading.Thread):
    """Adds `count` files to the server's folder, one every few milliseconds, each written
    under a hidden name and renamed, as a partner's upload appears."""

    def __init__(self, folder: Path, count: int):
        super().__init__()
        self.folder, self.count = folder, count
        self.files: dict[str, bytes] = {}

    def run(self) -> None:
        for number in range(self.count):
            name, data = f"story-{number:03d}.xml", f"<story n='{number}'/>".encode()
            (self.folder / f".{name}").write_bytes(data)
            os.rename(self.folder / f".{name}", self.folder / name)
            self.files[name] = data
            time.sleep(0.02)


class CronLoop(threading.Thread):
    """Runs ``manage.py cds_import partner`` again and again, as cron would, until stopped."""

    def __init__(self, stop: threading.Event):
        super().__init__()
        self.stop, self.exit_codes = stop, []

    def run(self) -> None:
        while not self.stop.is_set():
            self.exit_codes.append(manage("cds_import", "partner").wait())


def test_workers_and_cron_at_one_source_deliver_every_file_once(start_ftp_server, spool, settings):
    settings.CDS_CLAIM_LEASE = LEASE
    dtp = slow_dtp()
    server = start_ftp_server(dtp_handler=dtp)
    large = os.urandom(LARGE_PAYLOAD)
    server.put("large.bin", large)
    source = make_source(server, spool)
    first = enqueue_import(source, trigger="page")
    workers = [
        manage("task_worker", "--no-reload", "--interval", "0.1", "--queue-name", "imports")
        for _ in range(3)
    ]
    by_pid = {worker.pid: worker for worker in workers}

    # SIGKILL the worker that carries the first run, inside the large file.
    def carrier():
        first.refresh_from_db()
        inside = first.status == "running" and written(Path(spool) / "tmp" / ".large.bin.part")
        return by_pid.get(first.pid) if inside else None

    wait_for(carrier)
    killed = carrier()
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    dtp.write_limit = 0

    partner = Partner(server.dir, 100)
    stop = threading.Event()
    loops = [CronLoop(stop) for _ in range(3)]
    partner.start()
    for loop in loops:
        loop.start()
    queued = []
    while partner.is_alive():
        queued.append(enqueue_import(source, trigger="page"))
        time.sleep(0.3)
    partner.join()
    try:
        wait_for(lambda: server.names() == [])
    finally:
        stop.set()
        for loop in loops:
            loop.join()
    wait_for(lambda: not ImportRun.objects.filter(status__in=["queued", "running"]).exists())
    for worker in workers:
        if worker is not killed:
            worker.terminate()
            worker.wait()

    assert spooled(spool) == {"large.bin": large, **partner.files}
    assert os.listdir(Path(spool) / "tmp") == []
    first.refresh_from_db()
    assert first.status == "interrupted"
    runs = list(ImportRun.objects.exclude(status="busy").order_by("started"))
    assert "failed" not in {run.status for run in runs}
    assert all(earlier.finished <= later.started for earlier, later in itertools.pairwise(runs)), (
        "two runs of the source overlapped"
    )
    assert sum(run.files for run in runs) == 1 + len(partner.files)
    assert {code for loop in loops for code in loop.exit_codes} <= {0, 75}
    assert len(queued) >= 3 and all(
        run.status != "queued" for run in ImportRun.objects.filter(pk__in=[r.pk for r in queued])
    )


def test_a_long_run_renews_its_claim_and_keeps_others_out(start_ftp_server, spool, settings):
    settings.CDS_CLAIM_LEASE = 3
    dtp = slow_dtp()
    server = start_ftp_server(dtp_handler=dtp)
    server.put("large.bin", os.urandom(LARGE_PAYLOAD))  # 16 s at the slow rate
    source = make_source(server, spool)
    importer = start_manage("cds_import", "partner", CDS_CLAIM_LEASE="3")
    try:
        wait_for(lambda: written(Path(spool) / "tmp" / ".large.bin.part"), importer)
        source.refresh_from_db()
        first_lease = source.claimed_until
        # Past the lease the run took at its start: only a renewal keeps it.
        wait_for(lambda: timezone.now() > first_lease + timedelta(seconds=1), importer)

        second = run_import(source, trigger="cron")

        source.refresh_from_db()
        assert source.claimed_until > first_lease
        assert second.status == ImportRun.BUSY
    finally:
        dtp.write_limit = 0
        assert importer.wait(timeout=60) == 0
    assert server.names() == []
