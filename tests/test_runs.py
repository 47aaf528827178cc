"""Import runs in the database, the cds_import command and the admin action."""

import io
from datetime import timedelta
from pathlib import Path

import pytest
from django.contrib.auth.models import Permission
from django.core.management import call_command
from django.urls import reverse
from django.utils import timezone

from imports.models import CdsSource, ImportRun
from imports.runs import claim, run_import

pytestmark = pytest.mark.django_db


def test_a_run_is_recorded_with_its_files_and_every_log_line(source, ftp_server, clerk):
    ftp_server.put("a.xml", b"<a/>")

    run = run_import(source, trigger="page", user=clerk)

    run.refresh_from_db()
    assert (run.status, run.trigger, run.user, run.files, run.bytes) == (
        "success",
        "page",
        clerk,
        1,
        4,
    )
    assert run.started <= run.finished
    assert (run.files_done, run.files_listed) == (1, 1)
    messages = list(run.log_entries.values_list("message", flat=True))
    assert messages[0] == "Starting import."
    assert "Downloading: a.xml" in messages
    assert messages[-1] == "Exiting with success."
    [record] = run.file_records.all()
    assert (record.name, record.outcome, record.size, record.local_name) == (
        "a.xml",
        "delivered",
        4,
        "a.xml",
    )
    assert len(record.sha256) == 64
    source.refresh_from_db()
    assert source.claimed_by is None


def test_the_traceback_of_a_failure_is_stored(source):
    source.remote_dir = "/missing"
    source.save()

    run = run_import(source, trigger="cron")

    assert run.status == "failed"
    entry = run.log_entries.get(message="Exiting with exception:")
    assert entry.level == "ERROR"
    assert entry.traceback.strip().endswith("PermanentError: 550 No such file or directory.")


def test_a_second_run_of_a_busy_source_ends_at_once(source, ftp_server):
    ftp_server.put("a.xml", b"<a/>")
    first = ImportRun.objects.create(source=source, trigger="cron")
    assert claim(source, first)

    second = run_import(source, trigger="cron")

    assert second.status == "busy"
    assert list(second.log_entries.values_list("message", flat=True)) == [
        "Another import of partner is running; this run ends."
    ]
    assert ftp_server.names() == ["a.xml"]


def test_a_claim_of_a_dead_run_expires_after_the_lease(source, ftp_server):
    dead = ImportRun.objects.create(source=source, trigger="cron", status="running")
    CdsSource.objects.filter(pk=source.pk).update(
        claimed_by=dead, claimed_until=timezone.now() - timedelta(seconds=1)
    )

    assert run_import(source, trigger="cron").status == "nothing"
    dead.refresh_from_db()
    assert dead.status == "interrupted"
    assert dead.error == "The process running it (host ?, process None) died."


def test_the_password_is_never_logged(source, ftp_server):
    ftp_server.put("a.xml", b"<a/>")
    run = run_import(source, trigger="cron")
    assert not run.log_entries.filter(message__contains="secret").exists()


# The command


def test_command_prints_the_log_and_exits_0(source, ftp_server, capsys):
    ftp_server.put("a.xml", b"<a/>")

    call_command("cds_import", "partner")

    out = capsys.readouterr().out
    assert "Downloading: a.xml" in out
    assert "partner: success, 1 files" in out
    assert "[#" not in out  # no progress bar when stdout is not a terminal


class Terminal(io.StringIO):
    """What the command writes to when run by a person at a terminal."""

    def isatty(self) -> bool:
        return True


def test_command_shows_a_progress_bar_at_a_terminal(source, ftp_server):
    for name in ("a.xml", "b.xml"):
        ftp_server.put(name, b"<x/>")
    terminal = Terminal()

    call_command("cds_import", "partner", stdout=terminal)

    out = terminal.getvalue()
    assert f"\r[{'.' * 30}] 0/2 files" in out
    assert f"\r[{'#' * 30}] 2/2 files\n" in out
    assert "partner: success, 2 files" in out


def test_command_exit_codes(source, ftp_server):
    call_command("cds_import", "--all")  # nothing to do: 0

    ftp_server.put("write", b"busy partner")
    with pytest.raises(SystemExit) as locked:
        call_command("cds_import", "partner")
    assert locked.value.code == 75

    source.remote_dir = "/missing"
    source.save()
    with pytest.raises(SystemExit) as failed:
        call_command("cds_import", "partner")
    assert failed.value.code == 1


def test_command_exit_75_when_busy(source):
    claim(source, ImportRun.objects.create(source=source, trigger="cron"))
    with pytest.raises(SystemExit) as busy:
        call_command("cds_import", "partner")
    assert busy.value.code == 75


def test_command_refuses_unknown_sources_and_missing_arguments(source):
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match=r"Unknown source: nope \(known: partner\)"):
        call_command("cds_import", "nope")
    with pytest.raises(CommandError, match="Name one or more sources"):
        call_command("cds_import")
    assert not ImportRun.objects.exists()


def test_command_all_takes_only_enabled_sources(source, spool):
    CdsSource.objects.create(
        name="off", host="127.0.0.1", port=1, user="u", spool_dir=f"{spool}-off", enabled=False
    )

    call_command("cds_import", "--all")

    assert list(ImportRun.objects.values_list("source__name", flat=True)) == ["partner"]


# The admin


# The worker commits and closes its connections as in production, which a test transaction
# around it would not survive.
@pytest.mark.django_db(transaction=True)
def test_admin_action_queues_a_run_that_the_worker_carries_out(
    admin_client, source, ftp_server, django_capture_on_commit_callbacks
):
    ftp_server.put("a.xml", b"<a/>")
    url = reverse("admin:imports_cdssource_changelist")

    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(
            url, {"action": "run_now", "_selected_action": [source.pk]}, follow=True
        )

    assert "Queued 1 import run(s)" in response.content.decode()
    run = ImportRun.objects.get()
    assert (run.status, run.trigger) == ("queued", "admin")
    call_command("db_worker", "--batch", "--no-startup-delay", "--no-reload", "--queue-name", "*")
    run.refresh_from_db()
    assert (run.status, run.files) == ("success", 1)
    assert (Path(source.spool_dir) / "new" / "a.xml").exists()


def test_admin_action_needs_the_run_permission(client, clerk, source):
    clerk.is_staff = True
    clerk.save()
    clerk.user_permissions.add(Permission.objects.get(codename="view_cdssource"))
    client.force_login(clerk)

    url = reverse("admin:imports_cdssource_changelist")

    assert client.get(url).context["action_form"] is None  # no action is offered
    client.post(url, {"action": "run_now", "_selected_action": [source.pk]})
    assert not ImportRun.objects.exists()


def test_admin_never_shows_the_password_and_keeps_it_when_left_empty(admin_client, source):
    url = reverse("admin:imports_cdssource_change", args=[source.pk])

    page = admin_client.get(url).content.decode()
    assert "secret" not in page

    data = {
        "name": "partner",
        "host": source.host,
        "port": source.port,
        "user": "partner",
        "password": "",
        "remote_dir": "/outbox",
        "spool_dir": source.spool_dir,
        "enabled": "on",
        "timeout": 5,
        "passive": "on",
        "parallel": 4,
        "protocol": "ftp",
        "ca_file": "",
        "stable_after": "",
    }
    assert admin_client.post(url, data).status_code == 302
    source.refresh_from_db()
    assert source.password == "secret"


def test_admin_runs_are_read_only_with_their_log(admin_client, source, ftp_server):
    run = run_import(source, trigger="cron")

    page = admin_client.get(reverse("admin:imports_importrun_change", args=[run.pk]))

    assert "Exiting with success." in page.content.decode()
    assert "Save" not in page.content.decode()
