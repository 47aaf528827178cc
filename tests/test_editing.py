"""Fixing failed rows in the browser's editor, and replacing a pending file."""

import fcntl
import os

import pytest
from django.contrib.auth.models import Permission
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from datacenter.editing import FailedRows

from .conftest import fill_up, tree, write

pytestmark = pytest.mark.django_db

PENDING = (
    "username,email,--ERRORS--\r\n"
    "bob,bob@example,email: Enter a valid email address.\r\n"
    "cy,cy@,email: Enter a valid email address.\r\n"
    "dee,dee@example,email: Enter a valid email address.\r\n"
)


@pytest.fixture
def pending(datacenter):
    return write(os.path.join(datacenter.storage, "staff.create.pending.csv"), PENDING)


def edit_url(name="staff.create.pending.csv"):
    return reverse("datacenter:edit", kwargs={"name": name})


def corrections(client, **cells):
    """The editor's form as the browser sends it, with `cells` (``cell_1_1="x"``) changed."""
    form = client.get(edit_url()).context
    data = {"version": form["table"].version, "rows": "1,2,3"}
    for row in form["page"]:
        for index, value in enumerate(row.values):
            data[f"cell-{row.number}-{index}"] = value
    data.update({name.replace("_", "-"): value for name, value in cells.items()})
    return data


def test_the_editor_shows_each_failed_row_with_its_error(clerk_client, pending):
    response = clerk_client.get(edit_url())

    rows = list(response.context["page"])
    assert [(row.number, row.values, row.error) for row in rows][:2] == [
        (1, ["bob", "bob@example"], "email: Enter a valid email address."),
        (2, ["cy", "cy@"], "email: Enter a valid email address."),
    ]
    assert b'aria-label="Row 2 email"' in response.content


def test_corrections_and_dropped_rows_are_saved_in_place_keeping_the_old_version(
    clerk_client, datacenter, pending
):
    data = corrections(clerk_client, cell_1_1="bob@example.org", drop_3="1")

    response = clerk_client.post(edit_url(), data, follow=True)

    assert b"1 rows corrected, 1 dropped" in response.content
    with open(pending, "rb") as handle:
        assert handle.read() == (
            b"username,email,--ERRORS--\r\n"
            b"bob,bob@example.org,\r\n"  # corrected: its old reason is gone
            b"cy,cy@,email: Enter a valid email address.\r\n"
        )
    with open(os.path.join(datacenter.deleted_path, "staff.create.pending.csv"), "rb") as old:
        assert old.read() == PENDING.encode()
    assert list(datacenter.query_log("datacenter.log", "clerk - edit: staff.create.pending.csv"))
    assert oct(os.stat(pending).st_mode & 0o777) == "0o644"


def test_corrections_to_a_file_that_changed_meanwhile_are_refused(
    clerk_client, datacenter, pending
):
    data = corrections(clerk_client, cell_1_1="bob@example.org")
    write(pending, PENDING + "eve,eve@,email: Enter a valid email address.\r\n")
    before = tree(datacenter.storage)

    response = clerk_client.post(edit_url(), data)

    assert "was changed since you opened it" in response.context["error"]
    assert tree(datacenter.storage) == before


def test_a_file_being_processed_is_neither_edited_nor_replaced(clerk_client, datacenter, pending):
    data = corrections(clerk_client, cell_1_1="bob@example.org")
    before = tree(datacenter.storage)
    with open(pending, "rb") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # as a run processing the file holds it

        edited = clerk_client.post(edit_url(), data)
        replaced = clerk_client.post(
            reverse("datacenter:replace", kwargs={"name": "staff.create.pending.csv"}),
            {"file": SimpleUploadedFile("x.csv", b"username,email\r\nbob,b@example.org\r\n")},
        )

    assert "being processed right now" in edited.context["error"]
    assert "being processed right now" in replaced.context["form"].errors["file"][0]
    assert tree(datacenter.storage) == before


def test_only_pending_files_of_failed_rows_open_in_the_editor(clerk_client, datacenter):
    write(os.path.join(datacenter.storage, "staff.csv"), "username\nann\n")

    assert clerk_client.get(edit_url("staff.csv")).status_code == 404


def test_editing_needs_the_upload_permission(client, viewer, pending):
    client.force_login(viewer)

    assert client.get(edit_url()).status_code == 403


def test_replace_converts_the_upload_and_keeps_the_old_version(clerk_client, datacenter):
    path = write(os.path.join(datacenter.storage, "people.csv"), "Name,Ort\r\nAnn,Wien\r\n")
    spreadsheet = "Name;Ort\r\nAnn;Köln\r\n".encode("cp1252")

    response = clerk_client.post(
        reverse("datacenter:replace", kwargs={"name": "people.csv"}),
        {"file": SimpleUploadedFile("whatever.csv", spreadsheet)},
        follow=True,
    )

    assert b"Replaced people.csv (converted from Windows-1252, semicolon-separated)" in (
        response.content
    )
    with open(path, encoding="utf-8") as handle:
        assert handle.read() == "Name,Ort\nAnn,Köln\n"
    assert os.listdir(datacenter.deleted_path) == ["people.csv"]
    assert list(datacenter.query_log("datacenter.log", "clerk - replace: people.csv"))


def test_an_invalid_replacement_changes_nothing(clerk_client, datacenter):
    write(os.path.join(datacenter.storage, "people.csv"), "Name\nAnn\n")
    before = tree(datacenter.storage)

    response = clerk_client.post(
        reverse("datacenter:replace", kwargs={"name": "people.csv"}),
        {"file": SimpleUploadedFile("people.csv", b"")},
    )

    assert response.context["form"].errors["file"]
    assert tree(datacenter.storage) == before


def test_the_editor_pages_long_files(client, clerk, datacenter, settings):
    rows = "".join(f"u{n},bad,email: Enter a valid email address.\n" for n in range(120))
    write(
        os.path.join(datacenter.storage, "x.update.pending.csv"),
        "username,email,--ERRORS--\n" + rows,
    )
    clerk.user_permissions.add(*Permission.objects.filter(codename="upload_files"))
    client.force_login(clerk)

    third = client.get(edit_url("x.update.pending.csv"), {"page": 3})

    assert [row.number for row in third.context["page"]] == list(range(101, 121))
    assert len(FailedRows(third.context["file"])) == 120


def test_the_editor_numbers_lines_as_the_job_page_does_and_marks_the_failing_cell(
    clerk_client, datacenter, django_user_model
):
    from django.contrib.auth.models import Permission

    from datacenter.models import Job

    clerk = django_user_model.objects.get(username="clerk")
    clerk.user_permissions.add(*Permission.objects.filter(content_type__app_label="auth"))
    write(
        os.path.join(datacenter.storage, "staff.csv"),
        "username,email\nann,a@example.org\nbob,not-an-email\ncy,c@example.org\ndee,dee@\n",
    )
    url = reverse("datacenter:process", args=["staff.csv"])
    clerk_client.post(url, {"processor": "users", "mode": "create", "step": "process"})
    job = clerk_client.get(Job.objects.get().get_absolute_url())

    editor = clerk_client.get(reverse("datacenter:edit", args=["staff.create.pending.csv"]))

    assert [(line, pending) for line, _, pending in job.context["errors"]] == [(3, 2), (5, 3)]
    assert b"Line in staff.create.pending.csv" in job.content
    assert [row.line for row in editor.context["page"]] == [2, 3]
    page = editor.content.decode()
    assert page.count('aria-invalid="true"') == 2  # the email cell of each row
    assert (
        'class="form-control form-control-sm is-invalid" aria-invalid="true" name="cell-1-1"'
        in page
    )


def test_an_incomplete_form_saves_nothing(clerk_client, pending):
    data = corrections(clerk_client, cell_1_1="bob@example.org")
    del data["cell-2-1"]
    garbled = {**data, "rows": "1,two"}

    for form in (data, garbled):
        response = clerk_client.post(edit_url(), form, follow=True)
        assert b"The form is incomplete; open the file again." in response.content

    with open(pending, "rb") as handle:
        assert handle.read() == PENDING.encode()


def test_corrections_on_a_full_disk_save_nothing(clerk_client, small_filesystem):
    from datacenter.models import StorageLocation, current_datacenter

    storage = small_filesystem("256k") / "storage"
    StorageLocation.objects.update_or_create(pk=1, defaults={"path": str(storage)})
    pending = write(
        os.path.join(current_datacenter().storage, "staff.create.pending.csv"), PENDING
    )
    data = corrections(clerk_client, cell_1_1="bob@example.org")
    fill_up(storage.parent)

    response = clerk_client.post(edit_url(), data, follow=True)

    assert (
        b"The corrections could not be saved: No space left on device. Nothing was changed."
        in response.content
    )
    with open(pending, "rb") as handle:
        assert handle.read() == PENDING.encode()
    assert [name for name in os.listdir(storage) if name.startswith(".")] == []
