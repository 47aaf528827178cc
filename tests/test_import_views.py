from pathlib import Path

import pytest
from django.contrib.auth.models import Permission
from django.core.management import call_command
from django.urls import reverse
from django.utils import timezone

from imports.models import CdsSource, ImportRun
from imports.runs import run_import

pytestmark = pytest.mark.django_db


@pytest.fixture
def operator(django_user_model):
    user = django_user_model.objects.create_user("operator", password="x")
    user.user_permissions.set(
        Permission.objects.filter(codename__in=["view_importrun", "run_import", "manage_spool"])
    )
    return user


@pytest.fixture
def operator_client(client, operator):
    client.force_login(operator)
    return client


@pytest.fixture
def spooled(source):
    store = source.store
    store.prepare()
    (Path(store.path) / "new" / "a.xml").write_bytes(b"<a/>")
    (Path(store.path) / "cur" / "old.xml").write_bytes(b"<old/>")
    return store


def pages(source):
    run = ImportRun.objects.create(source=source, trigger="cron")
    return [
        ("get", reverse("imports:overview")),
        ("get", reverse("imports:runs")),
        ("get", reverse("imports:run", kwargs={"pk": run.pk})),
        ("get", reverse("imports:spool", kwargs={"name": "partner"})),
        (
            "get",
            reverse(
                "imports:spool_download",
                kwargs={"name": "partner", "folder": "new", "filename": "a.xml"},
            ),
        ),
        ("post", reverse("imports:run_now", kwargs={"name": "partner"})),
        (
            "post",
            reverse("imports:mark_processed", kwargs={"name": "partner", "filename": "a.xml"}),
        ),
    ]


def test_anonymous_users_are_sent_to_log_in(client, source, spooled):
    for method, url in pages(source):
        response = getattr(client, method)(url)
        assert response.status_code == 302, url
        assert response["Location"].startswith(reverse("login")), url


def test_users_without_permission_get_403(client, stranger, source, spooled):
    client.force_login(stranger)
    for method, url in pages(source):
        assert getattr(client, method)(url).status_code == 403, url
    assert ImportRun.objects.count() == 1
    assert (Path(spooled.path) / "new" / "a.xml").exists()


def test_overview_shows_sources_last_run_waiting_files_and_chart(
    operator_client, source, ftp_server, spooled
):
    ftp_server.put("b.xml", b"<b/>")
    run = run_import(source, trigger="cron")

    response = operator_client.get(reverse("imports:overview"))

    [item] = response.context["sources"]
    assert (item["source"], item["last_run"], item["waiting"]) == (source, run, 2)
    [chart] = response.context["charts"]  # no source exports: no chart of exports
    assert chart["title"] == "Files imported per day"
    assert len(chart["bars"]) == 30
    assert chart["bars"][-1]["files"] == 1 and chart["bars"][-1]["height"] == 100
    assert chart["total"] == 1
    assert b"Run now" in response.content


# The worker commits and closes its connections as in production, which a test transaction
# around it would not survive.
@pytest.mark.django_db(transaction=True)
def test_run_now_queues_a_run_for_the_worker(
    operator_client, operator, source, ftp_server, django_capture_on_commit_callbacks
):
    ftp_server.put("a.xml", b"<a/>")

    with django_capture_on_commit_callbacks(execute=True):
        response = operator_client.post(reverse("imports:run_now", kwargs={"name": "partner"}))

    run = ImportRun.objects.get()
    assert response["Location"] == run.get_absolute_url()
    assert (run.status, run.trigger, run.user) == ("queued", "page", operator)
    page = operator_client.get(run.get_absolute_url())
    assert b'http-equiv="refresh"' in page.content
    call_command("db_worker", "--batch", "--no-startup-delay", "--no-reload", "--queue-name", "*")
    page = operator_client.get(run.get_absolute_url())
    assert b'http-equiv="refresh"' not in page.content
    assert b"Exiting with success." in page.content
    assert page.context["run"].status == "success"


def test_runs_list_filters_by_source_and_status(operator_client, source, spool):
    other = CdsSource.objects.create(name="other", host="h", user="u", spool_dir=f"{spool}-other")
    ImportRun.objects.create(source=source, trigger="cron", status="success")
    ImportRun.objects.create(source=source, trigger="cron", status="failed")
    ImportRun.objects.create(source=other, trigger="page", status="failed")

    response = operator_client.get(
        reverse("imports:runs"), {"source": "partner", "status": "failed"}
    )

    assert [(r.source.name, r.status) for r in response.context["page"]] == [("partner", "failed")]


def test_spool_browser_lists_downloads_and_marks_processed(operator_client, source, spooled):
    response = operator_client.get(reverse("imports:spool", kwargs={"name": "partner"}))
    assert [f.name for f in response.context["page"]] == ["a.xml"]
    response = operator_client.get(
        reverse("imports:spool", kwargs={"name": "partner"}), {"folder": "cur"}
    )
    assert [f.name for f in response.context["page"]] == ["old.xml"]
    download = operator_client.get(
        reverse(
            "imports:spool_download",
            kwargs={"name": "partner", "folder": "cur", "filename": "old.xml"},
        )
    )
    assert b"".join(download.streaming_content) == b"<old/>"

    operator_client.post(
        reverse("imports:mark_processed", kwargs={"name": "partner", "filename": "a.xml"})
    )

    assert sorted(p.name for p in (Path(spooled.path) / "cur").iterdir()) == ["a.xml", "old.xml"]
    assert not (Path(spooled.path) / "new" / "a.xml").exists()


def test_marking_processed_never_overwrites_cur(operator_client, source, spooled):
    (Path(spooled.path) / "cur" / "a.xml").write_bytes(b"earlier")

    response = operator_client.post(
        reverse("imports:mark_processed", kwargs={"name": "partner", "filename": "a.xml"}),
        follow=True,
    )

    assert b"is in cur/ already" in response.content
    assert (Path(spooled.path) / "cur" / "a.xml").read_bytes() == b"earlier"
    assert (Path(spooled.path) / "new" / "a.xml").read_bytes() == b"<a/>"


@pytest.mark.parametrize(
    ("folder", "filename"), [("tmp", "a.xml"), ("new", ".."), ("new", ".hidden"), ("new", "nope")]
)
def test_spool_downloads_only_serve_files_of_new_and_cur(
    operator_client, source, spooled, folder, filename
):
    url = reverse(
        "imports:spool_download",
        kwargs={"name": "partner", "folder": folder, "filename": filename},
    )
    assert operator_client.get(url).status_code == 404


def test_the_spool_browser_never_follows_a_folder_link_out_of_the_spool(
    operator_client, source, spooled, tmp_path
):
    secret = tmp_path / "elsewhere"
    secret.mkdir()
    (secret / "passwd").write_bytes(b"root:x:0:0")
    new = Path(spooled.path) / "new"
    (new / "a.xml").unlink()
    new.rmdir()
    new.symlink_to(secret)

    listing = operator_client.get(reverse("imports:spool", kwargs={"name": "partner"}))
    download = operator_client.get(
        reverse(
            "imports:spool_download",
            kwargs={"name": "partner", "folder": "new", "filename": "passwd"},
        )
    )
    mark = operator_client.post(
        reverse("imports:mark_processed", kwargs={"name": "partner", "filename": "passwd"})
    )

    assert list(listing.context["page"]) == []
    assert download.status_code == 404
    assert mark.status_code == 404
    assert (secret / "passwd").read_bytes() == b"root:x:0:0"


def test_an_interrupted_run_is_shown_as_such_on_every_page(operator_client, admin_client, source):
    from datacenter.processes import HOST

    from .test_cds import dead_pid

    run = ImportRun.objects.create(
        source=source, trigger="cron", status="running", host=HOST, pid=dead_pid()
    )
    CdsSource.objects.filter(pk=source.pk).update(claimed_by=run)

    overview = operator_client.get(reverse("imports:overview")).content.decode()
    run_page = operator_client.get(run.get_absolute_url()).content.decode()
    runs = operator_client.get(reverse("imports:runs")).content.decode()
    admin = admin_client.get(reverse("admin:imports_importrun_changelist")).content.decode()

    run.refresh_from_db()
    assert run.status == "interrupted" and run.finished is not None
    assert ">interrupted</a>" in overview
    assert 'id="run-status">interrupted' in run_page
    assert "<td>interrupted</td>" in runs
    assert '<td class="field-status">interrupted</td>' in admin
    assert 'http-equiv="refresh"' not in run_page
    assert "died." in run_page


@pytest.mark.django_db(transaction=True)
def test_a_failed_run_says_why_in_one_sentence_and_its_task_fails_too(
    operator_client, admin_client, source, django_capture_on_commit_callbacks
):
    from django_tasks_db.models import DBTaskResult

    CdsSource.objects.filter(pk=source.pk).update(password="wrong")
    with django_capture_on_commit_callbacks(execute=True):
        operator_client.post(reverse("imports:run_now", kwargs={"name": "partner"}))
    call_command("db_worker", "--batch", "--no-startup-delay", "--no-reload", "--queue-name", "*")

    run = ImportRun.objects.get()
    staff = operator_client.get(run.get_absolute_url()).content.decode()
    admin = admin_client.get(run.get_absolute_url()).content.decode()

    assert run.status == ImportRun.FAILED
    assert run.error == "The server refused the login: 530 Authentication failed."
    assert run.error in staff
    assert "Traceback" not in staff and "Technical details" not in staff
    assert "Technical details" in admin and "Traceback" in admin
    assert 'id="run-progress"' not in staff  # nothing was listed: no bar of "0 of 0 files"
    assert DBTaskResult.objects.get().status == "FAILED"


def test_imports_and_exports_are_charted_apart(operator_client, source):
    CdsSource.objects.filter(pk=source.pk).update(export_dir="/inbox")
    now = timezone.now()
    ImportRun.objects.create(
        source=source, trigger="cron", status="success", files=1, finished=now
    )
    ImportRun.objects.create(
        source=source, trigger="cron", status="success", files=3, finished=now, direction="export"
    )

    response = operator_client.get(reverse("imports:overview"))

    imported, exported = response.context["charts"]
    assert (imported["title"], imported["total"]) == ("Files imported per day", 1)
    assert (exported["title"], exported["total"]) == ("Files exported per day", 3)
