"""Exports of records: the round trip through an upload, who sees what, the job and its
page, expiry, the command, and a worker killed half-way."""

import csv
import io
import os
import time

import pytest
from django.contrib.auth.hashers import make_password
from django.contrib.auth.models import Group, Permission, User
from django.core.management import CommandError, call_command
from django.urls import reverse

from datacenter import exports, jobs, recovery
from datacenter.models import Job, StorageLocation
from datacenter.processing import process_file
from datacenter.storage import StorageError
from datacenter.uploads import save_upload

from .conftest import fill_up, kill_when, run_worker, start_manage

pytestmark = pytest.mark.django_db

COLUMNS = ["username", "email", "first_name", "last_name", "is_active", "is_staff", "groups"]


@pytest.fixture
def exporter(clerk):
    """Staff who may export records and manage user accounts, but no superuser."""
    clerk.user_permissions.add(
        *Permission.objects.filter(content_type__app_label="auth"),
        Permission.objects.get(codename="export_records"),
    )
    return User.objects.get(pk=clerk.pk)  # without cached permissions


@pytest.fixture
def people(db):
    staff, editors = Group.objects.create(name="staff"), Group.objects.create(name="editors")
    ann = User.objects.create(
        username="ann",
        email="ann@example.org",
        first_name="Ann, Jr.",
        is_staff=True,
        password=make_password("ann's secret"),
    )
    ann.groups.set([staff, editors])
    bob = User.objects.create(username="bob", first_name='Bob "B"', is_active=False)
    bob.set_unusable_password()
    bob.save()
    User.objects.create_superuser("root", "root@example.org", "root's secret")
    return ann, bob


def read_rows(path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def exported(user) -> list[list[str]]:
    job = jobs.start_export(processor="users", user=user)
    assert job.status == Job.SUCCESS, job.error
    return read_rows(os.path.join(job_storage(), "exports", job.file_name))


def job_storage() -> str:
    from datacenter.models import current_datacenter

    return current_datacenter().storage


def test_an_export_holds_the_processor_columns_and_hides_hashes_from_non_superusers(
    exporter, people
):
    rows = exported(exporter)

    assert rows[0] == [*COLUMNS, "password"]
    by_name = {row[0]: row for row in rows[1:]}
    assert sorted(by_name) == ["ann", "bob", "clerk", "root"]
    assert by_name["ann"] == [
        "ann",
        "ann@example.org",
        "Ann, Jr.",
        "",
        "1",
        "1",
        "editors;staff",
        "",
    ]
    assert by_name["bob"] == ["bob", "", 'Bob "B"', "", "0", "0", "", ""]
    assert {row[-1] for row in rows[1:]} == {""}


def test_a_superuser_export_holds_the_password_hashes(admin_user, people):
    ann, bob = people

    by_name = {row[0]: row for row in exported(admin_user)[1:]}

    assert by_name["ann"][-1] == User.objects.get(pk=ann.pk).password
    assert by_name["bob"][-1].startswith("!")  # no usable password, as Django stores it


def test_export_edit_upload_and_the_update_dry_run_shows_only_the_edits(
    exporter, people, datacenter
):
    rows = exported(exporter)
    for row in rows:
        if row[0] == "bob":
            row[2] = "Robert"
        if row[0] == "ann":
            row[6] = "staff"
    text = io.StringIO()
    csv.writer(text).writerows(rows)
    save_upload(datacenter, io.BytesIO(text.getvalue().encode()), "users.csv", user=exporter)

    result = process_file(datacenter, "users.csv", "users", "update", user=exporter, dry_run=True)

    assert result.errors == []  # the superuser's row changes nothing, so it passes
    assert result.change_counts == {"update": 2, "unchanged": 2}
    assert [(c.key, c.fields) for c in result.changes] == [
        ("ann", [("groups", "editors;staff", "staff")]),
        ("bob", [("first_name", 'Bob "B"', "Robert")]),
    ]


def test_a_non_superuser_still_may_not_change_a_superuser_by_a_file(exporter, people, datacenter):
    text = "username,email\nroot,new@example.org\n"
    save_upload(datacenter, io.BytesIO(text.encode()), "root.csv", user=exporter)

    result = process_file(datacenter, "root.csv", "users", "update", user=exporter, dry_run=True)

    assert result.errors == [(2, result.errors[0][1])]
    assert "root is a superuser account" in result.errors[0][1]


def test_a_superuser_export_processes_back_unchanged_hashes_included(
    admin_user, people, datacenter
):
    before = {user.username: user.password for user in User.objects.all()}
    rows = exported(admin_user)
    text = io.StringIO()
    csv.writer(text).writerows(rows)
    save_upload(datacenter, io.BytesIO(text.getvalue().encode()), "all.csv", user=admin_user)

    result = process_file(datacenter, "all.csv", "users", "update", user=admin_user)

    assert (result.failed, result.succeeded) == (0, 4)
    assert {user.username: user.password for user in User.objects.all()} == before


def test_exports_need_their_permission_and_the_records_view_permission(
    client, clerk, exporter, people
):
    client.force_login(clerk)
    clerk.user_permissions.remove(Permission.objects.get(codename="export_records"))
    assert client.get(reverse("datacenter:exports")).status_code == 403

    clerk.user_permissions.add(Permission.objects.get(codename="export_records"))
    clerk.user_permissions.remove(Permission.objects.get(codename="view_user"))
    page = client.get(reverse("datacenter:exports")).content.decode()
    assert "You may not view these records." in page
    response = client.post(reverse("datacenter:exports"), {"processor": "users"}, follow=True)
    assert "that needs the permission auth.view_user" in response.content.decode()
    assert not Job.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_the_export_page_starts_a_job_whose_file_is_downloaded_and_logged(
    client, exporter, people, datacenter, settings
):
    settings.DATACENTER_EXPORT_AT_ONCE_ROWS = 2  # more records than that: a job
    StorageLocation.objects.create(pk=1, path=datacenter.storage)
    client.force_login(exporter)

    response = client.post(reverse("datacenter:exports"), {"processor": "users"})
    job = Job.objects.get()
    assert response.url == job.get_absolute_url()
    assert job.status == Job.QUEUED
    assert "Waiting for the task worker to take it." in client.get(response.url).content.decode()
    run_worker()

    job.refresh_from_db()
    assert (job.status, job.done, job.result["records"]) == (Job.SUCCESS, 4, 4)
    page = client.get(job.get_absolute_url()).content.decode()
    download = reverse("datacenter:download_export", args=[job.file_name])
    assert f"4 records exported to <code>exports/{job.file_name}</code>" in page
    assert download in page
    listing = client.get(reverse("datacenter:exports")).content.decode()
    assert job.file_name in listing and download in listing
    response = client.get(download)
    assert b"".join(response.streaming_content).startswith(b"username,email,")
    [line] = datacenter.query_log("datacenter.log", "download")
    assert line.rstrip().endswith(f"- clerk - download: exports/{job.file_name}")
    [line] = datacenter.query_log("datacenter.log", " export: ")
    assert f"users: 4 records -> exports/{job.file_name}" in line


def test_downloads_of_exports_need_the_permission_and_stay_in_the_folder(
    client, viewer, exporter, people, datacenter
):
    StorageLocation.objects.create(pk=1, path=datacenter.storage)
    job = jobs.start_export(processor="users", user=exporter)
    client.force_login(viewer)  # may view files, not exports
    assert (
        client.get(reverse("datacenter:download_export", args=[job.file_name])).status_code == 403
    )
    client.force_login(exporter)
    for name in ["..", ".job-1.part", "missing.csv"]:
        assert client.get(reverse("datacenter:download_export", args=[name])).status_code == 404


def test_exports_expire(exporter, people, datacenter, settings):
    StorageLocation.objects.create(pk=1, path=datacenter.storage)
    settings.DATACENTER_EXPORT_DAYS = 7
    old = jobs.start_export(processor="users", user=exporter).file_name
    folder = os.path.join(datacenter.storage, "exports")
    eight_days_ago = time.time() - 8 * 24 * 3600
    os.utime(os.path.join(folder, old), (eight_days_ago, eight_days_ago))
    stale_part = os.path.join(folder, ".job-99.part")
    open(stale_part, "w").close()
    os.utime(stale_part, (eight_days_ago, eight_days_ago))
    os.rename(os.path.join(folder, old), os.path.join(folder, "users-old.csv"))
    new = jobs.start_export(processor="users", user=exporter).file_name

    assert os.listdir(folder) == [new]  # the new export's job removed the expired ones
    [line] = datacenter.query_log("datacenter.log", "expire")
    assert line.rstrip().endswith("- system - expire: exports/users-old.csv")


def test_the_export_records_command(people, datacenter, tmp_path, capsys):
    StorageLocation.objects.create(pk=1, path=datacenter.storage)
    target = tmp_path / "users.csv"
    target.write_text("old content")

    call_command("export_records", "users", "--output", str(target))

    rows = read_rows(target)
    assert rows[0] == [*COLUMNS, "password"] and len(rows) == 4
    assert rows[1][-1] == User.objects.get(username=rows[1][0]).password
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]
    assert "Exported 3 records of User accounts to" in capsys.readouterr().err

    call_command("export_records", "users", "--output", "-")
    assert capsys.readouterr().out.splitlines()[0] == ",".join([*COLUMNS, "password"])

    call_command("export_records", "users")
    [file] = exports.export_files(datacenter)
    assert file.name.startswith("users-") and len(read_rows(file.path)) == 4

    with pytest.raises(CommandError, match="no processor named 'nope'.*export: users"):
        call_command("export_records", "nope")
    with pytest.raises(CommandError, match="Cannot write /proc/nope/x.csv"):
        call_command("export_records", "users", "--output", "/proc/nope/x.csv")


@pytest.mark.django_db(transaction=True)
def test_a_worker_killed_while_exporting_leaves_no_file(exporter, datacenter, settings):
    StorageLocation.objects.create(pk=1, path=datacenter.storage)
    User.objects.bulk_create(
        User(username=f"user{n:06d}", email=f"user{n}@example.org") for n in range(50_000)
    )
    settings.DATACENTER_EXPORT_AT_ONCE_ROWS = 0
    job = jobs.start_export(processor="users", user=exporter)
    worker = start_manage("task_worker", "--no-reload", "--interval", "0.1")

    kill_when(worker, lambda: Job.objects.get(pk=job.pk).done > 0)
    assert Job.objects.get(pk=job.pk).status == Job.RUNNING
    assert recovery.recover_jobs() == 1

    job.refresh_from_db()
    assert job.status == Job.INTERRUPTED
    assert "No export was written; start it again." in job.error
    assert os.listdir(os.path.join(datacenter.storage, "exports")) == []


def test_no_export_starts_while_the_storage_is_being_relocated(exporter, datacenter):
    moving = Job.objects.create(kind=Job.RELOCATE, status=Job.RUNNING, path="/srv/new")
    StorageLocation.objects.create(pk=1, path=datacenter.storage, relocating=moving)

    with pytest.raises(StorageError, match="being relocated; export when that ends"):
        jobs.start_export(processor="users", user=exporter)
    assert list(Job.objects.all()) == [moving]


def test_only_model_processors_that_exist_export(admin_user, settings):
    settings.DATACENTER_PROCESSORS = [
        "datacenter.processing.UserProcessor",
        "tests.test_processing.GroupNames",
    ]

    with pytest.raises(exports.ExportError, match="There is no processor named 'nothing'."):
        exports.check_export("nothing", admin_user)
    with pytest.raises(exports.ExportError, match="Groups cannot export its records."):
        exports.check_export("groups", admin_user)
    assert not exports.may_view_records(admin_user, "nothing")
    assert not exports.may_view_records(admin_user, "groups")
    assert exports.may_view_records(admin_user, "users")


def test_an_export_onto_a_full_disk_fails_in_words_and_leaves_nothing(
    exporter, people, small_filesystem
):
    storage = small_filesystem("256k") / "storage"
    StorageLocation.objects.update_or_create(pk=1, defaults={"path": str(storage)})
    from datacenter.models import current_datacenter

    current_datacenter()  # its folders
    fill_up(storage.parent)

    job = jobs.start_export(processor="users", user=exporter)

    assert job.status == Job.FAILED
    assert job.error == "The storage failed: No space left on device."
    assert os.listdir(storage / "exports") == []
