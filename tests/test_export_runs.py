"""Export runs on the site: the cds_export command, claims, the admin, the pages, SFTP sources
and a killed exporter. Real servers: pyftpdlib and OpenSSH's sshd."""

import os
import subprocess
import sys

import pytest
from django.contrib.auth.models import Permission
from django.core.exceptions import ValidationError
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import CommandError, call_command
from django.urls import reverse
from pyftpdlib.handlers import ThrottledDTPHandler

from imports.models import CdsSource, ImportRun
from imports.runs import claim, run_export, run_import
from imports.sftp import fingerprint

from .conftest import ROOT, kill_when, make_source, process_env, run_worker, written
from .test_cds import spooled

pytestmark = pytest.mark.django_db


def exporting(source, files: dict[str, bytes]) -> CdsSource:
    """`source`, delivering to /inbox on its server, with `files` waiting to be sent."""
    source.export_dir = "/inbox"
    source.save()
    store = source.outgoing_store
    store.prepare()
    for name, data in files.items():
        store.add_new(name, [data])
    return source


@pytest.fixture
def inbox(ftp_server):
    path = ftp_server.root / "inbox"
    path.mkdir()
    return path


def test_cds_export_command_records_the_run_and_exits_as_cds_import(
    source, ftp_server, inbox, capsys
):
    exporting(source, {"a.xml": b"<a/>"})

    call_command("cds_export", "partner")

    run = ImportRun.objects.get()
    assert (run.direction, run.status, run.files, run.bytes) == ("export", "success", 1, 4)
    assert list(run.file_records.values_list("name", "outcome")) == [("a.xml", "delivered")]
    assert "Uploading: a.xml" in run.log_entries.values_list("message", flat=True)
    assert (inbox / "a.xml").read_bytes() == b"<a/>"
    assert "partner: success, 1 files" in capsys.readouterr().out

    (inbox / "read").write_bytes(b"")
    source.outgoing_store.add_new("b.xml", [b"b"])
    with pytest.raises(SystemExit) as exit:
        call_command("cds_export", "--all")
    assert exit.value.code == 75  # the partner's lock: try again later


def test_cds_export_names_sources_without_an_export_directory(source):
    with pytest.raises(CommandError, match="No export directory is set for: partner"):
        call_command("cds_export", "partner")
    call_command("cds_export", "--all")  # no source exports: nothing to do
    assert not ImportRun.objects.exists()


def test_an_import_and_an_export_of_one_source_go_together(source, ftp_server, inbox):
    exporting(source, {"a.xml": b"a"})
    importing = ImportRun.objects.create(source=source, trigger="cron", status="running")
    assert claim(source, importing)

    export = run_export(source, trigger="cron")
    another_import = run_import(source, trigger="cron")

    assert export.status == "success"
    assert another_import.status == "busy"


def test_admin_export_action_queues_export_runs(
    admin_client, source, ftp_server, inbox, django_capture_on_commit_callbacks
):
    other = CdsSource.objects.create(
        name="other", host="127.0.0.1", user="u", spool_dir=f"{source.spool_dir}-other"
    )
    exporting(source, {"a.xml": b"a"})
    url = reverse("admin:imports_cdssource_changelist")

    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(
            url, {"action": "export_now", "_selected_action": [source.pk, other.pk]}, follow=True
        )

    page = response.content.decode()
    assert "No export directory is set for: other." in page
    assert "Queued 1 export run(s)" in page
    run = ImportRun.objects.get()
    assert (run.direction, run.source, run.trigger) == ("export", source, "admin")


@pytest.mark.django_db(transaction=True)
def test_export_now_on_the_overview_and_the_spool_page(
    client, django_user_model, source, ftp_server, inbox, django_capture_on_commit_callbacks
):
    operator = django_user_model.objects.create_user("operator", password="x")
    operator.user_permissions.set(
        Permission.objects.filter(codename__in=["view_importrun", "run_import"])
    )
    client.force_login(operator)
    overview = reverse("imports:overview")
    assert "Export now" not in client.get(overview).content.decode()
    exporting(source, {})
    assert "Export now" in client.get(overview).content.decode()

    spool = reverse("imports:spool", kwargs={"name": "partner"})
    added = client.post(
        f"{spool}?folder=out-new",
        {"file": SimpleUploadedFile("news.xml", b"<news/>")},
        follow=True,
    )
    assert "news.xml waits in the outgoing spool" in added.content.decode()
    again = client.post(spool, {"file": SimpleUploadedFile("news.xml", b"other")})
    assert "A file named news.xml waits to be sent already." in again.content.decode()
    hidden = client.post(spool, {"file": SimpleUploadedFile(".hidden", b"x")})
    assert "This file name cannot be sent: hidden file." in hidden.content.decode()
    assert spooled(source.spool_dir, "out/new") == {"news.xml": b"<news/>"}

    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(reverse("imports:export_now", kwargs={"name": "partner"}))
    run = ImportRun.objects.get()
    assert response.url == run.get_absolute_url()
    run_worker()
    run.refresh_from_db()
    assert (run.direction, run.status) == ("export", "success")
    assert (inbox / "news.xml").read_bytes() == b"<news/>"
    sent = client.get(f"{spool}?folder=out-cur").content.decode()
    assert "news.xml" in sent
    download = reverse(
        "imports:spool_download",
        kwargs={"name": "partner", "folder": "out-cur", "filename": "news.xml"},
    )
    assert b"".join(client.get(download).streaming_content) == b"<news/>"
    assert "Export run partner" in client.get(run.get_absolute_url()).content.decode()


def test_only_operators_send_files(client, viewer, source):
    exporting(source, {})
    client.force_login(viewer)
    spool = reverse("imports:spool", kwargs={"name": "partner"})
    assert client.post(spool, {"file": SimpleUploadedFile("a.xml", b"a")}).status_code == 403
    assert client.post(reverse("imports:export_now", kwargs={"name": "partner"})).status_code == (
        403
    )
    assert spooled(source.spool_dir, "out/new") == {}


def sftp_source(server, spool) -> CdsSource:
    return CdsSource.objects.create(
        name="ssh-partner",
        protocol="sftp",
        host="127.0.0.1",
        port=server.port,
        user=server.user,
        key_file=str(server.key_file),
        host_key=server.host_key,
        remote_dir=str(server.dir),
        spool_dir=str(spool),
        timeout=5,
    )


def test_a_changed_host_key_is_trusted_in_one_step_in_the_admin(admin_client, start_sshd, spool):
    server = start_sshd()
    server.put("a.xml")
    source = sftp_source(server, spool)
    server.restart(new_host_key=True)

    failed = run_import(source, trigger="cron")

    source.refresh_from_db()
    assert failed.status == "failed"
    assert source.offered_host_key == server.host_key
    assert server.names() == [b"a.xml"]
    url = reverse("admin:imports_cdssource_change", args=[source.pk])
    page = admin_client.get(url).content.decode()
    new_fingerprint = fingerprint(server.host_key)
    assert new_fingerprint in page and "Trust this key" in page

    stale = admin_client.post(url, {"_trust_host_key": "SHA256:another"}, follow=True)
    assert "The offered key changed since the page was shown" in stale.content.decode()
    trusted = admin_client.post(url, {"_trust_host_key": new_fingerprint}, follow=True)

    assert f"The host key {new_fingerprint} of ssh-partner is now trusted." in (
        trusted.content.decode()
    )
    source.refresh_from_db()
    assert (source.host_key, source.offered_host_key) == (server.host_key, "")
    assert run_import(source, trigger="cron").status == "success"
    assert server.names() == []


def test_sftp_export_run(start_sshd, spool):
    server = start_sshd()
    inbox = server.dir.parent / "inbox"
    inbox.mkdir()
    source = sftp_source(server, spool)
    source.export_dir = str(inbox)
    source.save()
    source.outgoing_store.prepare()
    source.outgoing_store.add_new("a.xml", [b"<a/>"])

    run = run_export(source, trigger="cron")

    assert (run.status, run.files) == ("success", 1)
    assert (inbox / "a.xml").read_bytes() == b"<a/>"


def test_sftp_settings_are_checked(start_sshd, spool, tmp_path):
    server = start_sshd()
    source = sftp_source(server, spool)
    for changes, field, message in [
        ({"host_key": "ssh-ed25519 nonsense"}, "host_key", "cannot be read"),
        ({"host_key": "hello"}, "host_key", "neither a known_hosts line"),
        ({"key_file": "relative/key"}, "key_file", "absolute path"),
        ({"key_file": str(tmp_path / "none")}, "key_file", "There is no file"),
        ({"key_file": str(server.passphrase_key_file)}, "key_file", "protected by a passphrase"),
        ({"protocol": "ftp"}, "host_key", "used with SFTP only"),
        ({"export_dir": source.remote_dir}, "export_dir", "must differ from the remote"),
    ]:
        candidate = CdsSource.objects.get(pk=source.pk)
        for name, value in changes.items():
            setattr(candidate, name, value)
        with pytest.raises(ValidationError) as error:
            candidate.save()
        assert message in " ".join(error.value.message_dict[field]), changes
    source.key_file, source.passphrase = str(server.passphrase_key_file), "sesame"
    source.save()


@pytest.mark.django_db(transaction=True)
def test_a_killed_cds_export_is_interrupted_and_the_rerun_sends_each_file_once(
    start_ftp_server, spool
):
    dtp = type("SlowUploads", (ThrottledDTPHandler,), {"read_limit": 64 * 1024})
    server = start_ftp_server(dtp_handler=dtp)
    inbox = server.root / "inbox"
    inbox.mkdir()
    files = {"a.xml": b"<a/>", "big.bin": os.urandom(1024 * 1024), "c.xml": b"<c/>"}
    source = exporting(make_source(server, spool), files)
    exporter = subprocess.Popen(
        [sys.executable, "manage.py", "cds_export", "partner"],
        cwd=ROOT,
        env=process_env(),
        stdout=subprocess.DEVNULL,
    )
    kill_when(exporter, lambda: written(inbox / ".big.bin.part"))
    killed = ImportRun.objects.get()
    assert killed.status == "running"
    dtp.read_limit = 0

    call_command("cds_export", "partner")

    killed.refresh_from_db()
    assert killed.status == "interrupted"
    rerun = ImportRun.objects.exclude(pk=killed.pk).get()
    assert rerun.status == "success"
    assert sorted(os.listdir(inbox)) == ["a.xml", "big.bin", "c.xml"]
    assert {name: (inbox / name).read_bytes() for name in files} == files
    assert spooled(source.spool_dir, "out/cur") == files
