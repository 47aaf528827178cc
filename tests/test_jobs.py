"""Jobs: processing and relocation carried out by the task worker, followed on their page,
and what is left when the process carrying them out is killed."""

import os
import subprocess
import sys
from datetime import timedelta

import pytest
from django.contrib.auth.hashers import make_password
from django.contrib.auth.models import Group, Permission, User
from django.urls import reverse
from django.utils import timezone

from datacenter import jobs, recovery
from datacenter.models import Job, StorageLocation, current_datacenter
from datacenter.processes import HOST
from datacenter.processing import ProcessingError, process_file
from datacenter.storage import DataCenter

from .conftest import (
    ROOT,
    fill_up,
    kill_when,
    process_env,
    processing_job,
    run_worker,
    start_manage,
    tree,
    write,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def manager(clerk):
    """Staff who may process files and manage user accounts."""
    clerk.user_permissions.add(*Permission.objects.filter(content_type__app_label="auth"))
    return User.objects.get(pk=clerk.pk)  # without cached permissions


def users_file(datacenter, name, count, start=0):
    rows = "".join(f"user{n},user{n}@example.org\n" for n in range(start, start + count))
    return write(os.path.join(datacenter.storage, name), "username,email\n" + rows)


# What a dry run shows


def test_a_dry_run_tells_per_row_what_would_change(datacenter, manager):
    Group.objects.create(name="staff")
    ann = User.objects.create(
        username="ann", email="ann@example.org", first_name="Ann", password=make_password("old")
    )
    User.objects.create(username="bob", email="bob@example.org")
    rows = (
        "username,email,first_name,groups,password\n"
        f"ann,ann@example.net,,staff,{make_password('new secret')}\n"
        "bob,bob@example.org,,,\n"
        "cy,cy@example.org,Cy,staff,\n"
    )
    write(os.path.join(datacenter.storage, "u.csv"), rows)
    before = tree(datacenter.storage)

    updated = process_file(datacenter, "u.csv", "users", "update", user=manager, dry_run=True)

    assert updated.change_counts == {"update": 1, "unchanged": 1}
    [change] = updated.changes
    assert (change.line, change.action, change.key) == (2, "update", "ann")
    assert change.fields == [
        ("email", "ann@example.org", "ann@example.net"),
        ("password", "(set)", "(new value)"),  # never the hash itself
        ("groups", "", "staff"),
    ]
    assert [error[0] for error in updated.errors] == [4]  # cy does not exist yet
    created = process_file(datacenter, "u.csv", "users", "create", user=manager, dry_run=True)
    assert created.change_counts == {"create": 1}
    assert created.changes[0].fields == [
        ("email", "", "cy@example.org"),
        ("first_name", "", "Cy"),
        ("groups", "", "staff"),
    ]
    removed = process_file(datacenter, "u.csv", "users", "remove", user=manager, dry_run=True)
    assert [(c.action, c.key) for c in removed.changes] == [("remove", "ann"), ("remove", "bob")]
    ann.refresh_from_db()
    assert (ann.email, list(ann.groups.all())) == ("ann@example.org", [])
    assert tree(datacenter.storage) == before


def test_the_dry_run_page_pages_its_changes(client, datacenter, manager, settings):
    settings.DATACENTER_PAGE_SIZE = 10
    users_file(datacenter, "many.csv", 25)
    client.force_login(manager)

    response = client.post(
        reverse("datacenter:process", kwargs={"name": "many.csv"}),
        {"processor": "users", "mode": "create", "step": "dry_run"},
        follow=True,
    )
    last = client.get(response.redirect_chain[-1][0], {"page": 3})

    assert b"25 would create a record" in response.content
    assert [change[2] for change in last.context["changes"]] == [f"user{n}" for n in range(20, 25)]


# Small work at once, large work in the worker


def test_a_small_file_is_processed_at_once_and_a_large_one_by_the_worker(
    client, datacenter, manager, settings, django_capture_on_commit_callbacks
):
    settings.DATACENTER_RUN_AT_ONCE_SIZE = 100
    write(os.path.join(datacenter.storage, "small.csv"), "username\nann\n")
    users_file(datacenter, "large.csv", 10)
    client.force_login(manager)
    choice = {"processor": "users", "mode": "create", "step": "process"}

    small = client.post(reverse("datacenter:process", kwargs={"name": "small.csv"}), choice)
    with django_capture_on_commit_callbacks() as queued:
        large = client.post(reverse("datacenter:process", kwargs={"name": "large.csv"}), choice)

    assert Job.objects.get(file_name="small.csv").status == Job.SUCCESS
    assert User.objects.filter(username="ann").exists()
    job = Job.objects.get(file_name="large.csv")
    assert (job.status, len(queued)) == (Job.QUEUED, 1)
    page = client.get(large.url)
    assert "No task worker for the data center's jobs has been heard from" in page.content.decode()
    assert b'http-equiv="refresh"' in page.content
    assert small.url != large.url


def test_jobs_are_listed_for_viewers_and_hidden_from_strangers(
    client, datacenter, manager, viewer, stranger
):
    write(os.path.join(datacenter.storage, "a.csv"), "username\nann\n")
    job = jobs.start_processing(
        name="a.csv", processor="users", mode="create", dry_run=True, user=manager
    )
    client.force_login(viewer)

    listing = client.get(reverse("datacenter:jobs"))
    page = client.get(job.get_absolute_url())

    assert b"Dry run of a.csv (create, users)" in listing.content
    assert page.context["job"].status == Job.SUCCESS
    client.force_login(stranger)
    assert client.get(reverse("datacenter:jobs")).status_code == 403
    assert client.get(job.get_absolute_url()).status_code == 403


def test_a_relocation_is_refused_while_other_jobs_are_in_progress(datacenter, manager, tmp_path):
    users_file(datacenter, "a.csv", 1)
    Job.objects.create(kind=Job.PROCESS, user=manager, file_name="a.csv", mode="create")

    with pytest.raises(ValueError, match=r"Jobs are in progress \(#\d+\)"):
        jobs.start_relocation(path=str(tmp_path / "new"), move=True, overwrite=False, user=manager)

    assert not (tmp_path / "new").exists()


# Killed processes


def share_storage(datacenter):
    """Tell processes started by the test where the storage is."""
    StorageLocation.objects.update_or_create(pk=1, defaults={"path": datacenter.storage})


KILL_BEFORE_DISTRIBUTING = """
import os, signal
from datacenter import jobs
from datacenter.models import Job
from datacenter.storage import Distribution

def killed(self, *args):
    os.kill(os.getpid(), signal.SIGKILL)

Distribution.apply = killed
jobs.run_job(Job.objects.get(pk={pk}))
"""


@pytest.mark.django_db(transaction=True)
def test_a_job_killed_between_commit_and_distribution_is_distributed_on_recovery(
    manager, small_filesystem
):
    disk = small_filesystem("1m")
    datacenter = DataCenter(str(disk / "storage"))
    share_storage(datacenter)
    write(os.path.join(datacenter.storage, "staff.csv"), "username,email\nann,a@x.org\nbob,b@\n")
    finished = os.path.join(datacenter.finished_path, "staff.create.finished.csv")
    write(finished, "username,email\r\nzed,z@x.org\r\n")  # of an earlier run: merged into
    job = Job.objects.create(kind=Job.PROCESS, user=manager, file_name="staff.csv", mode="create")
    job.processor = "users"
    job.save()

    killed = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", KILL_BEFORE_DISTRIBUTING.format(pk=job.pk)],
        cwd=ROOT,
        env=process_env(),
        capture_output=True,
    )

    assert killed.returncode == -9
    job.refresh_from_db()
    assert (job.status, job.succeeded, job.failed) == (Job.COMMITTED, 1, 1)
    assert User.objects.filter(username="ann").exists()
    assert datacenter.pending_files()[0].name == "staff.csv"  # not yet distributed

    # A recovery whose distribution fails on a full disk leaves the job to the next one.
    fill_up(disk)
    assert recovery.recover_jobs() == 0
    job.refresh_from_db()
    assert (job.status, job.pid) == (Job.COMMITTED, None)
    assert job.error == "Distributing failed: The storage failed: No space left on device."
    os.unlink(disk / "filler")

    assert recovery.recover_jobs() == 1

    job.refresh_from_db()
    assert (job.status, job.result["recovered"]) == (Job.SUCCESS, True)
    assert job.result["errors"] == [[3, "email: Enter a valid email address."]]
    assert [f.name for f in datacenter.pending_files()] == ["staff.create.pending.csv"]
    assert os.listdir(datacenter.unfinished_path) == ["staff.csv"]
    with open(finished, "rb") as handle:
        assert handle.read() == b"username,email\r\nzed,z@x.org\r\nann,a@x.org\r\n"
    assert not os.listdir(os.path.join(datacenter.storage, ".jobs"))


@pytest.mark.django_db(transaction=True)
def test_a_relocation_killed_half_way_is_finished_by_relocating_again(
    datacenter, manager, tmp_path
):
    share_storage(datacenter)
    for number in range(200):
        data = f"n\n{number}\n".encode() + os.urandom(2 * 1024 * 1024)
        write(os.path.join(datacenter.storage, f"f{number:03}.csv"), data)
    expected = tree(datacenter.storage)
    new = tmp_path / "new"
    job = jobs.start_relocation(path=str(new), move=True, overwrite=False, user=manager)
    worker = start_manage("task_worker", "--no-reload", "--interval", "0.1")

    kill_when(worker, lambda: Job.objects.get(pk=job.pk).done > 0)
    recovery.recover_jobs()

    job.refresh_from_db()
    assert job.status == Job.INTERRUPTED
    assert "Relocate to the same path again" in job.error
    assert current_datacenter().storage == datacenter.storage
    assert StorageLocation.objects.get().relocating is None
    again = jobs.start_relocation(path=str(new), move=True, overwrite=False, user=manager)
    run_worker()

    again.refresh_from_db()
    assert (again.status, again.result["not_moved"]) == (Job.SUCCESS, [])
    assert current_datacenter().storage == str(new)
    moved = {name: data for name, data in tree(new).items() if not name.startswith("logs/")}
    assert moved == {name: data for name, data in expected.items() if "logs/" not in name}
    assert os.listdir(datacenter.storage) == []


# Failures of background work


@pytest.mark.django_db(transaction=True)
def test_a_background_job_that_fails_tells_why_and_leaves_no_partial_work(
    client, datacenter, manager, settings
):
    settings.DATACENTER_RUN_AT_ONCE_SIZE = 0  # to the worker
    share_storage(datacenter)
    path = users_file(datacenter, "staff.csv", 3)
    job = jobs.start_processing(
        name="staff.csv", processor="users", mode="create", dry_run=False, user=manager
    )
    # Between the request and the worker, the file was overwritten with what no CSV is.
    write(path, b"username,email\n" + b"\xff\xfe\x00" * 100)

    run_worker()

    job.refresh_from_db()
    assert job.status == Job.FAILED
    assert job.error == (
        "staff.csv is not a readable UTF-8 CSV file: line 2 holds bytes that are not UTF-8 "
        "text. Save it as UTF-8 (CSV UTF-8 in Excel) and upload it again. Nothing was changed."
    )
    assert not os.path.exists(os.path.join(datacenter.storage, ".jobs", str(job.pk)))
    assert not User.objects.filter(username__startswith="user").exists()
    client.force_login(manager)
    page = client.get(reverse("datacenter:job", kwargs={"pk": job.pk})).content.decode()
    assert job.error in page


@pytest.mark.django_db(transaction=True)
def test_a_relocation_to_another_filesystem_copies_the_files(
    datacenter, manager, small_filesystem
):
    share_storage(datacenter)
    for number in range(3):
        path = write(os.path.join(datacenter.storage, f"f{number}.csv"), f"n\n{number}\n")
        os.utime(path, (1_700_000_000 + number, 1_700_000_000 + number))
    write(os.path.join(datacenter.finished_path, "old.csv"), "n\n9\n")
    expected = {
        name: data for name, data in tree(datacenter.storage).items() if "logs/" not in name
    }
    new = small_filesystem("1m") / "storage"  # a rename there fails with EXDEV

    job = jobs.start_relocation(path=str(new), move=True, overwrite=False, user=manager)
    run_worker()

    job.refresh_from_db()
    assert (job.status, job.result["not_moved"]) == (Job.SUCCESS, [])
    assert current_datacenter().storage == str(new)
    moved = tree(new)
    assert {name: data for name, data in moved.items() if "logs/" not in name} == expected
    assert os.stat(new / "f2.csv").st_mtime == 1_700_000_002
    assert [name for name in tree(datacenter.storage) if "logs/" not in name] == []
    assert not [name for name in os.listdir(new) if name.endswith(".part")]


# Who takes a job over


def export_elsewhere(user, seconds_ago: float) -> Job:
    """An export carried out by process 4242 of another host, last heard of then."""
    return Job.objects.create(
        kind=Job.EXPORT,
        user=user,
        processor="users",
        status=Job.RUNNING,
        host="elsewhere",
        pid=4242,
        updated=timezone.now() - timedelta(seconds=seconds_ago),
    )


def test_a_job_of_another_host_is_taken_for_dead_only_after_its_lease(manager, settings):
    settings.DATACENTER_JOB_LEASE = 600
    fresh, expired = export_elsewhere(manager, 599), export_elsewhere(manager, 601)

    assert recovery.recover_jobs() == 1

    fresh.refresh_from_db()
    expired.refresh_from_db()
    assert (fresh.status, fresh.host) == (Job.RUNNING, "elsewhere")
    assert expired.status == Job.INTERRUPTED
    assert expired.error == (
        "The process carrying it out (host elsewhere, process 4242) died. No export was "
        "written; start it again."
    )


def test_a_job_begun_elsewhere_is_left_to_its_process(datacenter, manager):
    users_file(datacenter, "staff.csv", 2)
    job = processing_job(manager, host="elsewhere", pid=4242, updated=timezone.now())

    assert jobs.run_job(job).status == Job.RUNNING

    job.refresh_from_db()
    assert (job.status, job.host, job.done) == (Job.RUNNING, "elsewhere", 0)
    assert not User.objects.filter(username__startswith="user").exists()


def test_a_dead_job_is_recovered_by_one_process_only(manager, monkeypatch):
    job = export_elsewhere(manager, 24 * 3600)
    is_dead = recovery._is_dead

    def another_process_recovers_first(candidate):
        # The other process's conditional update lands between this one's reading of the job
        # and its own update: a moment no real timing produces on demand.
        Job.objects.filter(pk=candidate.pk).update(host="other", pid=99, updated=timezone.now())
        return is_dead(candidate)

    monkeypatch.setattr(recovery, "_is_dead", another_process_recovers_first)

    assert recovery.recover_jobs() == 0

    job.refresh_from_db()
    assert (job.status, job.host, job.pid, job.error) == (Job.RUNNING, "other", 99, "")


@pytest.mark.django_db(transaction=True)
def test_a_relocation_to_a_disk_too_small_lists_what_it_could_not_move(
    datacenter, manager, small_filesystem
):
    share_storage(datacenter)
    write(os.path.join(datacenter.storage, "a.csv"), b"n\n" + b"1" * 150_000)
    write(os.path.join(datacenter.storage, "b.csv"), b"n\n" + b"2" * 150_000)
    os.makedirs(os.path.join(datacenter.storage, "archive", "2025"))
    write(os.path.join(datacenter.storage, "archive", "2025", "c.csv"), b"n\n" + b"3" * 150_000)
    new = small_filesystem("256k") / "storage"

    job = jobs.start_relocation(path=str(new), move=True, overwrite=False, user=manager)
    run_worker()

    job.refresh_from_db()
    assert job.status == Job.SUCCESS
    not_moved = dict(job.result["not_moved"])
    assert set(not_moved) == {"archive", "b.csv"}
    assert set(not_moved.values()) == {"No space left on device"}
    assert current_datacenter().storage == str(new)
    # What could not be moved is whole at the old path; nothing half-written at the new one.
    assert os.path.getsize(os.path.join(datacenter.storage, "b.csv")) == 150_002
    assert os.path.exists(os.path.join(datacenter.storage, "archive", "2025", "c.csv"))
    assert os.path.getsize(new / "a.csv") == 150_002
    assert not [name for name in os.listdir(new) if name.startswith(".")]


@pytest.mark.django_db(transaction=True)
def test_queued_work_of_a_deleted_account_ends_in_words(datacenter, manager, settings):
    settings.DATACENTER_RUN_AT_ONCE_SIZE = 0
    settings.DATACENTER_EXPORT_AT_ONCE_ROWS = 0
    share_storage(datacenter)
    users_file(datacenter, "staff.csv", 2)
    manager.user_permissions.add(Permission.objects.get(codename="export_records"))
    manager = User.objects.get(pk=manager.pk)
    processing = jobs.start_processing(
        name="staff.csv", processor="users", mode="create", dry_run=False, user=manager
    )
    export = jobs.start_export(processor="users", user=manager)
    manager.delete()

    run_worker()

    for job in (processing, export):
        job.refresh_from_db()
        assert (job.status, job.error) == (
            Job.FAILED,
            "The account that started the job no longer exists.",
        )
    assert not User.objects.filter(username__startswith="user").exists()


def test_only_a_job_stopped_half_way_resumes(datacenter, manager):
    done = Job.objects.create(
        kind=Job.PROCESS, user=manager, file_name="staff.csv", status=Job.SUCCESS
    )

    with pytest.raises(ProcessingError, match=f"Job #{done.pk} has not stopped half-way"):
        jobs.resume_job(done, manager)


def test_a_job_that_died_twice_at_the_same_place_is_not_started_a_third_time(datacenter, manager):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its process number now names no process
    job = processing_job(
        manager,
        host=HOST,
        pid=gone.pid,
        result={"resumed": [{"line": 1, "at": "2026-11-30T00:00:00", "reason": "died"}]},
    )

    assert recovery.recover_jobs() == 1

    job.refresh_from_db()
    assert job.status == Job.INTERRUPTED
    assert job.error == (
        f"The process carrying it out (host {HOST}, process {gone.pid}) died. It died before "
        "at the same place, after line 1. Nothing was changed; start it again."
    )
