"""Large work never blocks the site: processing commits a batch at a time and goes on after a
killed process, a file is stored with its record or not at all, and nothing waits unseen."""

import csv
import os
import random
import sqlite3
import threading
from contextlib import contextmanager
from datetime import timedelta

import pytest
from django.contrib.auth.models import Group, Permission, User
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.db.models import Count
from django.tasks import TaskResultStatus
from django.urls import reverse
from django_tasks_db.models import DBTaskResult

from datacenter import jobs, recovery
from datacenter.models import Job, StorageLocation, Upload, WorkerHeartbeat
from imports.models import CdsSource, ImportRun
from imports.runs import enqueue_import

from .conftest import kill_when, run_worker, start_manage, tree, wait_for, write

pytestmark = pytest.mark.django_db(transaction=True)

ROWS = 100_000
HEADER = "username,email,first_name,is_active,groups\n"


@pytest.fixture
def manager(clerk):
    """Staff who may process files and manage user accounts."""
    clerk.user_permissions.add(*Permission.objects.filter(content_type__app_label="auth"))
    return User.objects.get(pk=clerk.pk)  # without cached permissions


@pytest.fixture
def shared(datacenter):
    """The storage, told to the processes that the test starts."""
    StorageLocation.objects.update_or_create(pk=1, defaults={"path": datacenter.storage})
    Group.objects.get_or_create(name="staff")
    return datacenter


def users_file(count: int) -> str:
    """`count` rows that succeed and fail in each way a row can: a bad address, a key that
    appeared before, a wrong number of fields, an unknown group, a line break in a cell."""
    lines = [HEADER]
    for n in range(count):
        if n % 997 == 1:
            lines.append(f"user{n},not-an-address,First{n},1,staff\n")
        elif n % 1009 == 2:
            lines.append(f"user{n - 1},again{n}@example.org,Again,1,\n")
        elif n % 1013 == 3:
            lines.append(f"user{n},user{n}@example.org\n")
        elif n % 1019 == 4:
            lines.append(f"user{n},user{n}@example.org,First{n},1,nobody\n")
        elif n % 1021 == 5:
            lines.append(f'user{n},user{n}@example.org,"Two\nlines",0,staff\n')
        else:
            lines.append(f"user{n},user{n}@example.org,First{n},{n % 2},staff\n")
    return "".join(lines)


def accounts() -> list[tuple]:
    return list(
        User.objects.filter(username__startswith="user")
        .annotate(group_count=Count("groups"))
        .order_by("username")
        .values_list("username", "email", "first_name", "is_active", "group_count")
    )


def outcome(datacenter) -> dict:
    """What a run of people.csv left: the accounts and the files where it put them."""
    return {
        "accounts": accounts(),
        "files": {
            name: data
            for name, data in tree(datacenter.storage).items()
            if not name.startswith("logs/")
        },
    }


def process_in_this_process(datacenter, manager) -> dict:
    write(os.path.join(datacenter.storage, "people.csv"), users_file(ROWS))
    job = jobs.start_processing(
        name="people.csv", processor="users", mode="create", dry_run=False, user=manager
    )
    run_worker()
    job.refresh_from_db()
    assert job.status == Job.SUCCESS, job.error
    return outcome(datacenter)


def start_worker():
    return start_manage("task_worker", "--no-reload", "--interval", "0.1", "--queue-name", "*")


def test_a_job_killed_at_random_points_goes_on_and_ends_as_an_uninterrupted_run(
    shared, manager, client
):
    clean = process_in_this_process(shared, manager)
    assert 90_000 < len(clean["accounts"]) < ROWS
    User.objects.filter(username__startswith="user").delete()
    for name in clean["files"]:
        os.unlink(os.path.join(shared.storage, name))

    write(os.path.join(shared.storage, "people.csv"), users_file(ROWS))
    job = jobs.start_processing(
        name="people.csv", processor="users", mode="create", dry_run=False, user=manager
    )
    # Far apart, so that each worker commits rows before it is killed.
    kills = [
        random.randrange(ROWS // 10, ROWS * 4 // 10),
        random.randrange(ROWS * 6 // 10, ROWS * 9 // 10),
    ]
    for done in kills:
        worker = start_worker()
        kill_when(worker, lambda done=done: Job.objects.get(pk=job.pk).done >= done)
    worker = start_worker()
    try:
        wait_for(lambda: Job.objects.get(pk=job.pk).status == Job.SUCCESS, worker, 120)
    finally:
        worker.kill()
        worker.wait()

    job.refresh_from_db()
    assert outcome(shared) == clean, f"killed when {kills} rows were done"
    assert [resumed["line"] > 1 for resumed in job.result["resumed"]] == [True, True]
    assert (job.done, job.succeeded) == (ROWS, len(clean["accounts"]))
    client.force_login(manager)
    page = client.get(job.get_absolute_url()).content.decode()
    for resumed in job.result["resumed"]:
        assert f"The job went on after line {resumed['line']}," in page


def test_a_dry_run_whose_process_died_runs_again(shared, manager, client):
    write(os.path.join(shared.storage, "people.csv"), users_file(20_000))
    job = jobs.start_processing(
        name="people.csv", processor="users", mode="create", dry_run=True, user=manager
    )
    worker = start_worker()
    kill_when(worker, lambda: Job.objects.get(pk=job.pk).done > 0)

    recovery.recover_jobs()
    job.refresh_from_db()
    assert (job.status, job.done) == (Job.QUEUED, 0)
    run_worker()

    job.refresh_from_db()
    assert (job.status, job.done) == (Job.SUCCESS, 20_000)
    assert job.failed > 0 and job.succeeded + job.failed == 20_000
    assert not accounts()
    client.force_login(manager)
    page = client.get(job.get_absolute_url()).content.decode()
    assert "died. The dry run was started again." in page


@contextmanager
def database_held():
    """Another connection holds the database's write lock, as a long writer would, while
    this one gives up after a second."""
    if connection.vendor == "sqlite":
        other = sqlite3.connect(connection.settings_dict["NAME"])
        other.execute("BEGIN IMMEDIATE")
        connection.close()
        options = connection.settings_dict["OPTIONS"]
        timeout, options["timeout"] = options.get("timeout"), 1
        try:
            yield
        finally:
            options["timeout"] = timeout
            other.rollback()
            other.close()
            connection.close()
    else:
        import psycopg

        params = connection.get_connection_params()
        params.pop("cursor_factory", None)
        params.pop("context", None)
        with psycopg.connect(**params) as other:
            other.execute("LOCK TABLE datacenter_upload, django_session IN EXCLUSIVE MODE")
            with connection.cursor() as cursor:
                cursor.execute("SET lock_timeout = '1s'")
            try:
                yield
            finally:
                other.rollback()
                connection.close()


def test_an_upload_whose_record_cannot_be_written_leaves_no_file(shared, manager, client):
    client.force_login(manager)
    before = tree(shared.storage)
    upload = SimpleUploadedFile("new.csv", b"username\nann\n", content_type="text/csv")

    with database_held():
        response = client.post(reverse("datacenter:upload"), {"file": upload})

    assert response.status_code == 200
    assert "The site is busy; nothing was stored. Try again in a moment." in (
        response.content.decode()
    )
    assert tree(shared.storage) == before
    assert not Upload.objects.filter(name="new.csv").exists()


def test_a_busy_database_is_a_page_in_words_not_a_server_error(shared, manager, client):
    client.force_login(manager)

    with database_held():
        response = client.post(reverse("logout"))

    assert response.status_code == 503
    assert response["Retry-After"] == "5"
    assert "The site is busy" in response.content.decode()


def test_uploads_during_a_long_job_all_succeed(shared, manager, client):
    write(os.path.join(shared.storage, "people.csv"), users_file(ROWS))
    job = jobs.start_processing(
        name="people.csv", processor="users", mode="create", dry_run=False, user=manager
    )
    worker = start_worker()
    client.force_login(manager)
    try:
        wait_for(lambda: Job.objects.get(pk=job.pk).done > 0, worker)
        statuses = []
        for number in range(10):
            upload = SimpleUploadedFile(f"more{number}.csv", b"username\nann\n")
            statuses.append(client.post(reverse("datacenter:upload"), {"file": upload}))
        assert Job.objects.get(pk=job.pk).status == Job.RUNNING  # all during the job
    finally:
        worker.kill()
        worker.wait()
    assert [response.status_code for response in statuses] == [302] * 10
    assert Upload.objects.filter(name__startswith="more").count() == 10


def stopped_by_a_full_disk(small_filesystem, manager, settings, rows: int):
    """A job on a storage whose disk fills up half-way, and the filler to free it again."""
    storage = small_filesystem("3m")
    StorageLocation.objects.update_or_create(pk=1, defaults={"path": str(storage)})
    Group.objects.get_or_create(name="staff")
    settings.DATACENTER_RUN_AT_ONCE_SIZE = 0
    data = users_file(rows)
    write(storage / "people.csv", data)
    filler = write(storage / "filler.bin", b"\0" * (3 * 1024 * 1024 - 2 * len(data)))
    job = jobs.start_processing(
        name="people.csv", processor="users", mode="create", dry_run=False, user=manager
    )
    run_worker()
    job.refresh_from_db()
    assert job.status == Job.INTERRUPTED and job.resumable, job.error
    assert 0 < len(accounts()) == job.succeeded < rows
    return storage, job, filler


def test_a_job_stopped_by_a_full_disk_keeps_its_rows_and_is_resumed_from_its_page(
    manager, client, small_filesystem, settings
):
    storage, job, filler = stopped_by_a_full_disk(small_filesystem, manager, settings, 20_000)
    assert "No space left on device" in job.error
    assert "resume the job to process the rest" in job.error
    client.force_login(manager)
    replace = client.post(
        reverse("datacenter:replace", kwargs={"name": "people.csv"}),
        {"file": SimpleUploadedFile("people.csv", b"username\nann\n")},
    )
    assert f"was processed in part by job #{job.pk}" in replace.content.decode()

    os.unlink(filler)
    client.post(job.get_absolute_url(), {"action": "resume"})
    run_worker()

    job.refresh_from_db()
    assert job.status == Job.SUCCESS, job.error
    assert (job.done, job.succeeded) == (20_000, len(accounts()))
    with open(storage / "finished" / "people.create.finished.csv", newline="") as handle:
        assert len(list(csv.reader(handle))) == 1 + job.succeeded
    with open(storage / "people.create.pending.csv", newline="") as handle:
        assert len(list(csv.reader(handle))) == 1 + job.failed


def test_a_stopped_job_whose_file_was_changed_behind_the_site_keeps_what_it_did(
    manager, client, small_filesystem, settings
):
    storage, job, filler = stopped_by_a_full_disk(small_filesystem, manager, settings, 10_000)
    os.unlink(filler)
    write(storage / "people.csv", HEADER + "someone,someone@example.org,Some,1,staff\n")
    client.force_login(manager)
    client.post(job.get_absolute_url(), {"action": "resume"})
    run_worker()

    job.refresh_from_db()
    assert job.status == Job.FAILED
    assert "The file changed while its processing was stopped" in job.error
    outputs = storage / ".jobs" / str(job.pk) / "outputs"
    assert f".jobs/{job.pk}/outputs" in job.error
    with open(outputs / "finished.csv", newline="") as handle:
        assert len(list(csv.reader(handle))) == 1 + job.succeeded
    assert not User.objects.filter(username="someone").exists()


def test_only_the_person_who_started_a_job_or_a_superuser_resumes_it(
    manager, client, small_filesystem, settings, django_user_model
):
    _, job, filler = stopped_by_a_full_disk(small_filesystem, manager, settings, 10_000)
    os.unlink(filler)
    other = django_user_model.objects.create_user("other")
    other.user_permissions.set(
        Permission.objects.filter(codename__in=["process_files", "view_files"])
    )
    client.force_login(other)

    page = client.get(job.get_absolute_url()).content.decode()
    refused = client.post(job.get_absolute_url(), {"action": "resume"}, follow=True)

    assert 'value="resume"' not in page
    assert "Only the person who started the job, or a superuser, resumes it." in (
        refused.content.decode()
    )
    assert Job.objects.get(pk=job.pk).status == Job.INTERRUPTED


def test_a_job_whose_task_was_removed_is_ended_with_the_reason(shared, manager, settings):
    settings.DATACENTER_RUN_AT_ONCE_SIZE = 0
    write(os.path.join(shared.storage, "people.csv"), users_file(10))
    job = jobs.start_processing(
        name="people.csv", processor="users", mode="create", dry_run=True, user=manager
    )
    DBTaskResult.objects.all().delete()
    long_ago = job.created - timedelta(seconds=recovery.ENQUEUE_SECONDS + 1)
    Job.objects.filter(pk=job.pk).update(created=long_ago, updated=long_ago)

    recovery.recover_jobs()

    job.refresh_from_db()
    assert job.status == Job.INTERRUPTED
    assert "Its task is no longer in the queue" in job.error


def test_work_waiting_on_a_queue_that_no_worker_serves_says_so(shared, client, tmp_path):
    source = CdsSource.objects.create(
        name="partner",
        host="127.0.0.1",
        user="partner",
        remote_dir="/",
        spool_dir=str(tmp_path / "spool"),
    )
    client.force_login(User.objects.create_superuser("root"))
    worker = start_manage("task_worker", "--no-reload", "--queue-name", "datacenter")
    try:
        wait_for(lambda: WorkerHeartbeat.objects.filter(pid=worker.pid).exists(), worker)
        run = enqueue_import(source, trigger="page", user=None)
        page = client.get(reverse("imports:run", kwargs={"pk": run.pk})).content.decode()
    finally:
        worker.kill()
        worker.wait()
    assert ImportRun.objects.get(pk=run.pk).status == ImportRun.QUEUED
    assert "No task worker for CDS runs has been heard from recently" in page
    assert DBTaskResult.objects.get().status == TaskResultStatus.READY


def test_an_upload_during_a_relocation_is_refused_in_words_and_lands_nowhere(
    shared, manager, client
):
    client.force_login(manager)
    before = tree(shared.storage)
    held = threading.Event()
    release = threading.Event()

    def relocation():
        with shared.held(exclusive=True):
            held.set()
            release.wait(30)

    mover = threading.Thread(target=relocation)
    mover.start()
    held.wait(10)
    try:
        response = client.post(
            reverse("datacenter:upload"),
            {"file": SimpleUploadedFile("new.csv", b"username\nann\n")},
        )
    finally:
        release.set()
        mover.join()

    assert "The storage is being relocated; nothing was changed." in response.content.decode()
    assert tree(shared.storage) == before
