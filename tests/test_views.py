import os
import shutil

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from datacenter.models import Job, StorageLocation, Upload, current_datacenter
from datacenter.processes import HOST

from .conftest import processing_job, run_worker, tree, write

pytestmark = pytest.mark.django_db

PAGES = [
    ("datacenter:pending", {}),
    ("datacenter:upload", {}),
    ("datacenter:preview", {"name": "people.csv"}),
    ("datacenter:download", {"name": "people.csv"}),
    ("datacenter:delete", {"name": "people.csv"}),
    ("datacenter:process", {"name": "people.csv"}),
    ("datacenter:replace", {"name": "people.csv"}),
    ("datacenter:finished", {}),
    ("datacenter:jobs", {}),
    ("datacenter:download_finished", {"name": "people.create.finished.csv"}),
    ("datacenter:logs", {}),
    ("datacenter:log", {"name": "datacenter.log"}),
    ("datacenter:storage", {}),
]
VIEWER_MAY_NOT = {
    "datacenter:upload",
    "datacenter:delete",
    "datacenter:process",
    "datacenter:replace",
    "datacenter:storage",
}


@pytest.fixture
def files(datacenter):
    write(os.path.join(datacenter.storage, "people.csv"), "id,name\n1,Ann\n2,<b>Bob</b>\n")
    write(os.path.join(datacenter.finished_path, "people.create.finished.csv"), "id\n1\n")
    datacenter.log_action("clerk", "upload", "people.csv")
    return datacenter


@pytest.mark.parametrize(("url_name", "kwargs"), PAGES)
def test_anonymous_users_are_sent_to_the_login_page(client, files, url_name, kwargs):
    url = reverse(url_name, kwargs=kwargs)

    response = client.get(url)

    assert response.status_code == 302
    assert response["Location"] == f"{reverse('login')}?next={url}"


@pytest.mark.parametrize(("url_name", "kwargs"), PAGES)
def test_users_without_permission_get_403(client, stranger, files, url_name, kwargs):
    client.force_login(stranger)

    response = client.get(reverse(url_name, kwargs=kwargs))

    assert response.status_code == 403
    assert b"does not have the permission" in response.content


@pytest.mark.parametrize(("url_name", "kwargs"), PAGES)
def test_viewers_may_only_look(client, viewer, files, url_name, kwargs):
    client.force_login(viewer)

    response = client.get(reverse(url_name, kwargs=kwargs))

    assert response.status_code == (403 if url_name in VIEWER_MAY_NOT else 200)


def test_the_login_page_works(client, clerk):
    response = client.post(
        reverse("login"),
        {"username": "clerk", "password": "correct horse battery staple"},
        follow=True,
    )

    assert response.redirect_chain == [
        (reverse("home"), 302),
        (reverse("datacenter:pending"), 302),
    ]
    assert response.status_code == 200


def test_pending_page_lists_files_with_rows_and_uploader(clerk_client, clerk, files):
    Upload.objects.create(name="people.csv", uploaded_by=clerk)

    response = clerk_client.get(reverse("datacenter:pending"), {"sort": "date"})

    assert response.status_code == 200
    [file] = response.context["page"]
    assert (file.name, file.rows, file.uploader) == ("people.csv", 2, clerk)
    assert b"people.csv" in response.content


def test_pending_page_is_paginated(clerk_client, datacenter, settings):
    settings.DATACENTER_PAGE_SIZE = 2
    for number in range(5):
        write(os.path.join(datacenter.storage, f"f{number}.csv"), "a\n")

    response = clerk_client.get(reverse("datacenter:pending"), {"page": 3})

    assert [file.name for file in response.context["page"]] == ["f4.csv"]


def test_upload_stores_the_file_and_records_the_uploader(clerk_client, clerk, datacenter):
    upload = SimpleUploadedFile("New List.CSV", b"id,name\n1,Ann\n", content_type="text/csv")

    response = clerk_client.post(reverse("datacenter:upload"), {"file": upload}, follow=True)

    assert response.redirect_chain == [(reverse("datacenter:pending"), 302)]
    assert b"Uploaded New_List.csv: 1 data row," in response.content
    assert [f.name for f in datacenter.pending_files()] == ["New_List.csv"]
    assert Upload.objects.get(name="New_List.csv").uploaded_by == clerk


def test_the_upload_message_says_what_was_converted(clerk_client, datacenter):
    data = "Name;Ort\nMüller;Köln\n".encode("cp1252")
    upload = SimpleUploadedFile("excel.csv", data, content_type="text/csv")

    response = clerk_client.post(reverse("datacenter:upload"), {"file": upload}, follow=True)

    assert (
        "Uploaded excel.csv (converted from Windows-1252, semicolon-separated): 1 data row,"
        in response.content.decode()
    )


def test_upload_errors_are_shown_on_the_form(clerk_client, files):
    before = tree(files.storage)
    upload = SimpleUploadedFile("people.csv", b"id\n2\n", content_type="text/csv")

    response = clerk_client.post(reverse("datacenter:upload"), {"file": upload})

    assert response.status_code == 200
    assert "already exists in the pending files" in response.context["form"].errors["file"][0]
    assert tree(files.storage) == before


def test_download_sends_the_file_and_logs_it(clerk_client, files):
    response = clerk_client.get(reverse("datacenter:download", kwargs={"name": "people.csv"}))

    assert response["Content-Disposition"] == 'attachment; filename="people.csv"'
    assert b"".join(response.streaming_content) == b"id,name\n1,Ann\n2,<b>Bob</b>\n"
    assert list(files.query_log("datacenter.log", "clerk - download: people.csv"))


def test_finished_download_only_serves_finished_files(clerk_client, files):
    url = reverse("datacenter:download_finished", kwargs={"name": "people.create.finished.csv"})
    assert clerk_client.get(url).status_code == 200
    url = reverse("datacenter:download_finished", kwargs={"name": "people.csv"})
    assert clerk_client.get(url).status_code == 404


@pytest.mark.parametrize("name", ["..", ".hidden.csv", "finished", "missing.csv", "a\x00.csv"])
def test_unsafe_or_unknown_names_give_404(clerk_client, files, name):
    write(os.path.join(files.storage, ".hidden.csv"), "a\n")
    for url_name in (
        "datacenter:preview",
        "datacenter:download",
        "datacenter:delete",
        "datacenter:process",
    ):
        assert clerk_client.get(reverse(url_name, kwargs={"name": name})).status_code == 404


def test_encoded_slashes_do_not_reach_outside_files(clerk_client, files):
    response = clerk_client.get("/datacenter/files/..%2F..%2Fetc%2Fpasswd/download/")
    assert response.status_code == 404


def test_preview_shows_header_and_rows_escaped(clerk_client, files):
    response = clerk_client.get(reverse("datacenter:preview", kwargs={"name": "people.csv"}))

    assert response.context["header"] == ["id", "name"]
    assert response.context["rows"] == [["1", "Ann"], ["2", "<b>Bob</b>"]]
    assert b"&lt;b&gt;Bob&lt;/b&gt;" in response.content


def test_delete_asks_then_moves_the_file_to_deleted(clerk_client, files):
    url = reverse("datacenter:delete", kwargs={"name": "people.csv"})
    assert b"Delete people.csv?" in clerk_client.get(url).content
    assert files.pending_files()

    response = clerk_client.post(url, follow=True)

    assert b"it was kept as deleted/people.csv" in response.content
    assert files.pending_files() == []
    assert os.listdir(files.deleted_path) == ["people.csv"]
    assert list(files.query_log("datacenter.log", "clerk - delete: people.csv"))


def test_finished_page_lists_finished_files(clerk_client, files):
    response = clerk_client.get(reverse("datacenter:finished"))
    assert [f.name for f in response.context["page"]] == ["people.create.finished.csv"]


def test_log_search_filters_pages_and_escapes(clerk_client, files, settings):
    settings.DATACENTER_PAGE_SIZE = 1  # four lines a page
    for number in range(6):
        files.log_action("clerk", "note", f"<script>{number}</script>")
    url = reverse("datacenter:log", kwargs={"name": "datacenter.log"})

    first = clerk_client.get(url, {"q": "note"})
    second = clerk_client.get(url, {"q": "note", "page": 2})
    oldest = clerk_client.get(url, {"q": "note", "order": "oldest"})

    # Newest first by default.
    assert len(first.context["page"]) == 4 and first.context["page"].has_next()
    assert first.context["page"][0].endswith("note: <script>5</script>")
    assert len(second.context["page"]) == 2 and not second.context["page"].has_next()
    assert second.context["page"][-1].endswith("note: <script>0</script>")
    assert b"Page 2 of 2" in second.content
    assert oldest.context["page"][0].endswith("note: <script>0</script>")
    assert b"&lt;script&gt;5&lt;/script&gt;" in first.content
    assert b"<script>5" not in first.content


def test_log_search_ignores_case_unless_told_to_match_it(clerk_client, files):
    files.log_action("clerk", "note", "The ZEBRA crossed")
    url = reverse("datacenter:log", kwargs={"name": "datacenter.log"})

    ignoring = clerk_client.get(url, {"q": "zebra"})
    matching = clerk_client.get(url, {"q": "zebra", "match_case": "on"})

    assert len(ignoring.context["page"]) == 1
    assert len(matching.context["page"]) == 0


def test_log_search_explains_an_invalid_expression(clerk_client, files):
    url = reverse("datacenter:log", kwargs={"name": "datacenter.log"})

    response = clerk_client.get(url, {"q": "([a-z"})

    assert response.status_code == 200
    [error] = response.context["form"].errors["q"]
    assert error == "The search expression is not valid (missing ]: [a-z)."


def test_unknown_log_is_404(clerk_client, files):
    url = reverse("datacenter:log", kwargs={"name": "passwd"})
    assert clerk_client.get(url).status_code == 404


def test_storage_page_shows_path_and_free_space(clerk_client, datacenter):
    response = clerk_client.get(reverse("datacenter:storage"))

    assert datacenter.storage.encode() in response.content
    assert response.context["free_space"] > 0


@pytest.mark.django_db(transaction=True)
def test_relocation_moves_files_and_stores_the_path(clerk_client, clerk, files, tmp_path):
    new = tmp_path / "elsewhere"
    new.mkdir()
    write(new / "people.csv", "theirs")

    choice = {"path": str(new), "move": "on"}
    confirm = clerk_client.post(reverse("datacenter:storage"), choice)
    assert not Job.objects.exists()  # asked first, with what will move
    summary = confirm.content.decode()
    assert "3 files (" in summary and "will be copied to the new folder" in summary
    assert "Relocate and move 3 files" in summary
    queued = clerk_client.post(reverse("datacenter:storage"), {**choice, "confirmed": "1"})
    assert Job.objects.get().status == Job.QUEUED
    assert current_datacenter().storage == files.storage
    run_worker()
    response = clerk_client.get(queued.url)

    assert response.context["job"].status == Job.SUCCESS
    assert b"2 files (" in response.content and b"moved." in response.content
    assert b"1 item not moved" in response.content
    assert response.context["job"].result["not_moved"] == [
        ["people.csv", "already exists in the new storage (overwrite is off)"]
    ]
    assert b"people.csv" in response.content
    location = StorageLocation.objects.get()
    assert (location.path, location.changed_by) == (str(new), clerk)
    assert current_datacenter().storage == str(new)
    assert (new / "finished" / "people.create.finished.csv").exists()
    assert (new / "people.csv").read_text() == "theirs"
    assert list(current_datacenter().query_log("datacenter.log", "clerk - relocate: "))


def test_relocation_refusals_are_shown_on_the_form(clerk_client, files):
    before = tree(files.storage)

    response = clerk_client.post(reverse("datacenter:storage"), {"path": "relative/path"})

    assert "must be absolute" in response.context["form"].errors["path"][0]
    assert tree(files.storage) == before
    assert not StorageLocation.objects.exists()


# Searching safely, and never through a link out of the storage


def test_a_catastrophic_expression_is_answered_at_once(viewer_client, files):
    # With a backtracking engine this search takes about 2**40 steps.
    files.log_action("viewer", "note", "a" * 40 + "!")
    url = reverse("datacenter:log", kwargs={"name": "datacenter.log"})

    response = viewer_client.get(url, {"q": "(a+)+$"})

    assert response.status_code == 200
    assert list(response.context["page"]) == []
    assert response.context["form"].errors == {}


def test_expressions_that_re2_does_not_support_or_too_long_are_explained(viewer_client, files):
    url = reverse("datacenter:log", kwargs={"name": "datacenter.log"})

    backreference = viewer_client.get(url, {"q": r"(a)\1"})
    lookahead = viewer_client.get(url, {"q": "a(?=b)"})
    too_long = viewer_client.get(url, {"q": "a" * 501})

    assert "Back-references (\\1) and look-around" in backreference.context["form"].errors["q"][0]
    assert "not supported" in lookahead.context["form"].errors["q"][0]
    assert "at most 500 characters" in too_long.context["form"].errors["q"][0]


@pytest.fixture
def secret(tmp_path):
    """A file outside the storage that no page may show."""
    outside = tmp_path / "outside"
    outside.mkdir()
    write(outside / "passwd", "root:x:0:0:secret\n")
    write(outside / "leak.finished.csv", "username\nsecret\n")
    write(outside / "datacenter.log", "secret line\n")
    return outside


def test_a_backup_that_is_a_link_is_never_searched(viewer_client, files, secret):
    files.log_action("viewer", "note", "visible")
    os.symlink(secret / "passwd", os.path.join(files.logs_path, "datacenter.log.1"))
    url = reverse("datacenter:log", kwargs={"name": "datacenter.log"})

    lines = list(viewer_client.get(url, {"q": "."}).context["page"])

    assert lines[0].endswith("note: visible")
    assert not [line for line in lines if "secret" in line]


def test_pending_files_that_are_links_are_neither_listed_nor_served(viewer_client, files, secret):
    os.symlink(secret / "passwd", os.path.join(files.storage, "passwd.csv"))

    listed = [f.name for f in viewer_client.get(reverse("datacenter:pending")).context["page"]]
    for view in ("preview", "download"):
        url = reverse(f"datacenter:{view}", kwargs={"name": "passwd.csv"})
        assert viewer_client.get(url).status_code == 404
    assert "passwd.csv" not in listed


def test_subfolders_that_are_links_out_of_the_storage_show_nothing(viewer_client, files, secret):
    for folder in ("finished", "logs"):
        shutil.rmtree(os.path.join(files.storage, folder))
        os.symlink(secret, os.path.join(files.storage, folder))

    finished = viewer_client.get(reverse("datacenter:finished"))
    download = viewer_client.get(
        reverse("datacenter:download_finished", kwargs={"name": "leak.finished.csv"})
    )
    logs = viewer_client.get(reverse("datacenter:logs"))
    search = viewer_client.get(
        reverse("datacenter:log", kwargs={"name": "datacenter.log"}), {"q": "."}
    )

    assert list(finished.context["page"]) == []
    assert download.status_code == 404
    assert b"datacenter.log" not in logs.content.replace(b"datacenter.log.", b"")
    assert search.status_code == 404
    assert b"secret" not in finished.content + logs.content + search.content


def test_a_job_that_does_not_exist_is_not_found(clerk_client):
    assert clerk_client.get(reverse("datacenter:job", kwargs={"pk": 999_999})).status_code == 404


def test_a_file_a_job_is_processing_is_not_deleted(clerk, clerk_client, datacenter):
    path = write(os.path.join(datacenter.storage, "staff.csv"), "username\nann\n")
    job = processing_job(clerk, host=HOST, pid=os.getpid())  # alive: this very process

    response = clerk_client.post(
        reverse("datacenter:delete", kwargs={"name": "staff.csv"}), follow=True
    )

    assert (
        f"staff.csv is being processed by job #{job.pk}; nothing was changed. Try again when "
        "it has ended."
    ) in response.content.decode()
    assert os.path.exists(path)
