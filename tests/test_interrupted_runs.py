"""Runs whose process is killed: taken over at once on the same host, marked interrupted,
with their audit, and nothing lost or doubled. Real processes, killed with SIGKILL."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import call_command
from django.tasks import TaskResultStatus
from django_tasks_db.models import DBTaskResult

from imports.models import ImportedFile, ImportRun
from imports.runs import enqueue_import, interrupt_dead_runs, run_import

from .conftest import kill_when, make_source, process_env, start_manage, written
from .ftp import LARGE_PAYLOAD, slow_dtp
from .test_cds import spooled

ROOT = Path(__file__).resolve().parent.parent
PAYLOADS = {"a.xml": b"<a/>", "b.xml": b"<bb/>", "c.bin": os.urandom(LARGE_PAYLOAD)}

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def slow_server(start_ftp_server):
    """An FTP server that sends slowly until told otherwise, with the three files."""
    dtp = slow_dtp()
    server = start_ftp_server(dtp_handler=dtp)
    server.dtp = dtp
    for name, data in PAYLOADS.items():
        server.put(name, data)
    return server


@pytest.fixture
def slow_source(slow_server, spool):
    return make_source(slow_server, spool)


def kill_during_the_large_file(process: subprocess.Popen, spool) -> None:
    """Kill `process` inside the large file, once the small ones are delivered and their
    records written (within half a second of their delivery)."""
    kill_when(
        process,
        lambda: (
            written(Path(spool) / "tmp" / ".c.bin.part")
            and ImportedFile.objects.filter(outcome="delivered").count() == 2
        ),
    )


def test_a_killed_cds_import_is_taken_over_at_once_by_the_next(slow_server, slow_source, spool):
    importer = subprocess.Popen(
        [sys.executable, "manage.py", "cds_import", "partner"],
        cwd=ROOT,
        env=process_env(),
        stdout=subprocess.DEVNULL,
    )
    kill_during_the_large_file(importer, spool)
    killed = ImportRun.objects.get()
    assert killed.status == "running"
    slow_server.dtp.write_limit = 0

    call_command("cds_import", "partner")  # exits 0: not busy, not locked out

    killed.refresh_from_db()
    assert (killed.status, killed.files, killed.bytes) == ("interrupted", 2, 9)
    assert killed.finished is not None
    assert list(killed.file_records.order_by("name").values_list("name", "outcome")) == [
        ("a.xml", "delivered"),
        ("b.xml", "delivered"),
    ]
    assert "died." in killed.error
    rerun = ImportRun.objects.exclude(pk=killed.pk).get()
    assert (rerun.status, rerun.files) == ("success", 1)
    messages = list(rerun.log_entries.values_list("message", flat=True))
    assert any("died; this run takes over." in message for message in messages)
    assert any(m.startswith("Removing a stale lock file of our own: read") for m in messages)
    assert spooled(spool) == PAYLOADS
    assert slow_server.names() == []


def test_a_killed_worker_leaves_no_run_or_task_running(slow_server, slow_source, spool):
    run = enqueue_import(slow_source, trigger="page")
    run.refresh_from_db()
    assert run.task_id
    worker = start_manage(
        "task_worker", "--no-reload", "--interval", "0.1", "--queue-name", "imports"
    )
    kill_during_the_large_file(worker, spool)
    task = DBTaskResult.objects.get(id=run.task_id)
    assert task.status == TaskResultStatus.RUNNING

    assert interrupt_dead_runs() == 1  # what every imports page and the next run do

    run.refresh_from_db()
    task.refresh_from_db()
    assert (run.status, run.files) == ("interrupted", 2)
    assert task.status == TaskResultStatus.FAILED
    assert "died" in task.traceback
    slow_server.dtp.write_limit = 0
    assert run_import(slow_source, trigger="cron").status == "success"
    assert spooled(spool) == PAYLOADS
    assert slow_server.names() == []


def test_deliveries_a_killed_run_had_not_yet_recorded_are_recorded_once(
    slow_server, slow_source, spool
):
    importer = subprocess.Popen(
        [sys.executable, "manage.py", "cds_import", "partner"],
        cwd=ROOT,
        env=process_env(),
        stdout=subprocess.DEVNULL,
    )
    # Killed as soon as the small files are in new/: before the run wrote their records.
    new = Path(spool) / "new"
    kill_when(importer, lambda: new.is_dir() and {"a.xml", "b.xml"} <= set(os.listdir(new)))
    slow_server.dtp.write_limit = 0

    call_command("cds_import", "partner")

    delivered = ImportedFile.objects.filter(outcome="delivered")
    assert sorted(delivered.values_list("local_name", flat=True)) == ["a.xml", "b.xml", "c.bin"]
    killed = ImportRun.objects.get(status="interrupted")
    assert sorted(killed.file_records.values_list("local_name", flat=True)) == ["a.xml", "b.xml"]
    assert (killed.files, killed.bytes) == (2, 9)
    assert dict(killed.file_records.values_list("local_name", "sha256")) == {
        name: hashlib.sha256(PAYLOADS[name]).hexdigest() for name in ("a.xml", "b.xml")
    }
    rerun = ImportRun.objects.exclude(pk=killed.pk).get()
    assert list(rerun.file_records.values_list("local_name", flat=True)) == ["c.bin"]
    assert spooled(spool) == PAYLOADS
