"""Spreadsheets in and out: workbooks written by the tests with other libraries (xlsxwriter,
openpyxl, xlwt, a LibreOffice-style .ods made by hand) are uploaded through the site and read
by python-calamine; exports as .xlsx are read back with openpyxl and processed again."""

import csv
import datetime
import html
import io
import os
import zipfile

import openpyxl
import pytest
import xlsxwriter
import xlwt
from django.contrib.auth.models import Group, Permission, User
from django.urls import reverse
from msoffcrypto.format.ooxml import OOXMLFile

from datacenter.models import Job
from datacenter.workbooks import MAX_CELLS

from .conftest import tree

pytestmark = pytest.mark.django_db


def upload(client, path, name=None):
    with open(path, "rb") as handle:
        data = io.BytesIO(handle.read())
    data.name = name or os.path.basename(path)
    return client.post(reverse("datacenter:upload"), {"file": data}, follow=True)


def text(response) -> str:
    """The page as a person reads it."""
    return html.unescape(response.content.decode())


def stored(datacenter, name) -> str:
    with open(os.path.join(datacenter.storage, name), encoding="utf-8", newline="") as handle:
        return handle.read()


@pytest.fixture
def students(tmp_path):
    """An Excel workbook of two sheets, as xlsxwriter writes it: the first holds dates, a
    date-time, text with leading zeros, numbers, a formula with its cached value, booleans,
    a text that looks like a formula, an empty row and an empty trailing column."""
    path = tmp_path / "students.xlsx"
    book = xlsxwriter.Workbook(path, {"strings_to_formulas": False})
    sheet = book.add_worksheet("Students")
    book.add_worksheet("Notes").write(0, 0, "not this one")
    day = book.add_format({"num_format": "yyyy-mm-dd"})
    moment = book.add_format({"num_format": "yyyy-mm-dd hh:mm"})
    sheet.write_row(0, 0, ["username", "zip", "born", "seen", "credits", "double", "ok", "note"])
    sheet.write_string(1, 0, "ann")
    sheet.write_string(1, 1, "007")
    sheet.write_datetime(1, 2, datetime.date(2001, 2, 3), day)
    sheet.write_datetime(1, 3, datetime.datetime(2026, 11, 30, 9, 15, 30), moment)
    sheet.write_number(1, 4, 42)
    sheet.write_formula(1, 5, "=E2*2", None, 84)
    sheet.write_boolean(1, 6, True)
    sheet.write_string(1, 7, "=HYPERLINK(1)")
    sheet.write_string(3, 0, "bob")
    sheet.write_number(3, 4, 1.25)
    sheet.write_boolean(3, 6, False)
    sheet.write_string(3, 8, "")  # a cell of an otherwise empty column
    book.close()
    return path


def test_an_excel_workbook_is_stored_as_its_first_sheet_in_canonical_csv(
    clerk_client, datacenter, students
):
    response = upload(clerk_client, students)

    assert (
        "Uploaded students.csv (converted from Excel workbook, sheet 'Students' (the first of "
        "2 sheets), 1 empty column dropped): 2 data rows"
    ) in text(response)
    assert stored(datacenter, "students.csv") == (
        "username,zip,born,seen,credits,double,ok,note\n"
        "ann,007,2001-02-03,2026-11-30 09:15:30,42,84,1,'=HYPERLINK(1)\n"
        "bob,,,,1.25,,0,\n"
    )
    assert sorted(os.listdir(datacenter.storage)) == [
        "deleted",
        "finished",
        "graduated",
        "logs",
        "students.csv",
        "unfinished",
    ]


def test_a_workbook_written_by_openpyxl_keeps_its_dates_and_numbers(
    clerk_client, datacenter, tmp_path
):
    path = tmp_path / "people.xlsx"
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.title = "People"
    sheet.append(["username", "joined", "age", "code", None, None])
    sheet.append(["ann", datetime.date(2020, 1, 31), 30, "0042"])
    sheet.append(["cy", datetime.datetime(2021, 5, 6, 7, 8), 41.5, "x"])
    book.save(path)

    upload(clerk_client, path)

    assert stored(datacenter, "people.csv") == (
        "username,joined,age,code\nann,2020-01-31,30,0042\ncy,2021-05-06 07:08:00,41.5,x\n"
    )


def test_an_old_excel_workbook_is_read_too(clerk_client, datacenter, tmp_path):
    path = tmp_path / "old.xls"
    book = xlwt.Workbook()
    sheet = book.add_sheet("Old")
    for column, value in enumerate(["username", "zip", "born"]):
        sheet.write(0, column, value)
    sheet.write(1, 0, "ann")
    sheet.write(1, 1, "007")
    sheet.write(1, 2, datetime.date(2001, 2, 3), xlwt.easyxf(num_format_str="YYYY-MM-DD"))
    book.save(str(path))

    response = upload(clerk_client, path)

    assert "converted from Excel 97-2003 workbook, sheet 'Old'" in text(response)
    assert stored(datacenter, "old.csv") == "username,zip,born\nann,007,2001-02-03\n"


def libreoffice_ods(path, rows):
    """An .ods file as LibreOffice Calc writes it: the sheet spans every column and row,
    the empty ones as repeated cells and rows, and no white space between the elements."""
    cells = []
    for row in rows:
        xml = []
        for value in row:
            if isinstance(value, datetime.date):
                xml.append(
                    f'<table:table-cell office:value-type="date" office:date-value="{value}">'
                    f"<text:p>{value:%d.%m.%y}</text:p></table:table-cell>"
                )
            elif isinstance(value, float):
                xml.append(
                    f'<table:table-cell office:value-type="float" office:value="{value}">'
                    f"<text:p>{value}</text:p></table:table-cell>"
                )
            else:
                xml.append(
                    '<table:table-cell office:value-type="string">'
                    f"<text:p>{value}</text:p></table:table-cell>"
                )
        rest = 16384 - len(row)
        xml.append(f'<table:table-cell table:number-columns-repeated="{rest}"/>')
        cells.append(f"<table:table-row>{''.join(xml)}</table:table-row>")
    empty = 1048576 - len(rows)
    content = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<office:document-content xmlns:office="urn:oasis:names:tc:opendocument:xmlns:office:1.0"'
        ' xmlns:table="urn:oasis:names:tc:opendocument:xmlns:table:1.0"'
        ' xmlns:text="urn:oasis:names:tc:opendocument:xmlns:text:1.0" office:version="1.3">'
        '<office:body><office:spreadsheet><table:table table:name="Staff">'
        '<table:table-column table:number-columns-repeated="16384"/>'
        f"{''.join(cells)}"
        f'<table:table-row table:number-rows-repeated="{empty}">'
        '<table:table-cell table:number-columns-repeated="16384"/></table:table-row>'
        "</table:table></office:spreadsheet></office:body></office:document-content>"
    )
    manifest = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<manifest:manifest xmlns:manifest="urn:oasis:names:tc:opendocument:xmlns:manifest:1.0"'
        ' manifest:version="1.3"><manifest:file-entry manifest:full-path="/"'
        ' manifest:media-type="application/vnd.oasis.opendocument.spreadsheet"/>'
        '<manifest:file-entry manifest:full-path="content.xml" manifest:media-type="text/xml"/>'
        "</manifest:manifest>"
    )
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("mimetype", "application/vnd.oasis.opendocument.spreadsheet")
        archive.writestr("META-INF/manifest.xml", manifest, zipfile.ZIP_DEFLATED)
        archive.writestr("content.xml", content, zipfile.ZIP_DEFLATED)
    return path


def test_a_libreoffice_spreadsheet_is_read_without_its_empty_expanse(
    clerk_client, datacenter, tmp_path
):
    path = libreoffice_ods(
        tmp_path / "staff.ods",
        [["username", "zip", "born", "score"], ["ann", "007", datetime.date(2001, 2, 3), 9.0]],
    )

    response = upload(clerk_client, path)

    assert "converted from OpenDocument spreadsheet, sheet 'Staff'" in text(response)
    assert stored(datacenter, "staff.csv") == "username,zip,born,score\nann,007,2001-02-03,9\n"


def test_a_sheet_of_a_million_cells_is_stored_whole(clerk_client, datacenter, tmp_path):
    path = tmp_path / "many.xlsx"
    book = xlsxwriter.Workbook(path, {"constant_memory": True})
    sheet = book.add_worksheet()
    sheet.write_row(0, 0, [f"c{column}" for column in range(10)])
    for row in range(1, 100_001):
        sheet.write_row(row, 0, [f"r{row}"] + list(range(9)))
    book.close()

    upload(clerk_client, path)

    with open(os.path.join(datacenter.storage, "many.csv"), encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert len(rows) == 100_001
    assert rows[-1] == ["r100000", *map(str, range(9))]


def refused(client, datacenter, path, message):
    before = tree(datacenter.storage)

    response = upload(client, path)

    assert message in text(response)
    assert "Nothing was stored." in text(response)
    assert tree(datacenter.storage) == before
    assert not [name for name in os.listdir(datacenter.storage) if name.startswith(".")]


def test_a_damaged_workbook_is_refused_in_words(clerk_client, datacenter, tmp_path):
    path = tmp_path / "broken.xlsx"
    path.write_bytes(b"PK\x03\x04 the rest of the file was lost")

    refused(clerk_client, datacenter, path, "The workbook cannot be read: it is damaged")


def test_a_password_protected_workbook_is_refused_in_words(
    clerk_client, datacenter, students, tmp_path
):
    path = tmp_path / "locked.xlsx"
    with open(students, "rb") as plain, open(path, "wb") as locked:
        OOXMLFile(plain).encrypt("secret", locked)

    refused(clerk_client, datacenter, path, "The workbook is protected by a password")


def test_a_tiny_workbook_spanning_too_many_cells_is_refused_without_reading_it_here(
    clerk_client, datacenter, tmp_path
):
    # A few kilobytes whose sheet spans a hundred million cells, which a reader would lay
    # out in memory whole: the child process that reads it hits its limit, not the site.
    path = tmp_path / "bomb.xlsx"
    book = xlsxwriter.Workbook(path)
    sheet = book.add_worksheet()
    sheet.write(0, 0, "a")
    sheet.write(999_999, 100, "z")
    book.close()
    assert os.path.getsize(path) < 10_000

    refused(clerk_client, datacenter, path, f"must span at most {MAX_CELLS:,} cells")


def test_replace_takes_a_workbook(clerk_client, datacenter, students):
    with open(os.path.join(datacenter.storage, "students.csv"), "w") as handle:
        handle.write("username\nold\n")
    with open(students, "rb") as handle:
        data = io.BytesIO(handle.read())
    data.name = "students-fixed.xlsx"

    response = clerk_client.post(
        reverse("datacenter:replace", args=["students.csv"]), {"file": data}, follow=True
    )

    assert "converted from Excel workbook, sheet 'Students'" in text(response)
    assert stored(datacenter, "students.csv").startswith("username,zip,born,")


# Exports as workbooks and as CSV for Excel


@pytest.fixture
def manager_client(client, clerk):
    clerk.user_permissions.add(
        *Permission.objects.filter(content_type__app_label="auth"),
        Permission.objects.get(codename="export_records"),
    )
    client.force_login(clerk)
    return client


@pytest.fixture
def people(db):
    staff = Group.objects.create(name="staff")
    ann = User.objects.create(username="007", email="ann@example.org", first_name="Fürst")
    ann.groups.add(staff)
    User.objects.create(username="bob", first_name="=1+1", last_name="'-x", is_active=False)


def export(client, file_format):
    response = client.post(
        reverse("datacenter:exports"), {"processor": "users", "format": file_format}, follow=True
    )
    job = response.context["job"]
    assert job.status == Job.SUCCESS
    return job.file_name


def test_an_xlsx_export_has_a_header_text_columns_and_processes_back_unchanged(
    manager_client, datacenter, people
):
    name = export(manager_client, "xlsx")
    path = os.path.join(datacenter.storage, "exports", name)

    assert name.endswith(".xlsx")
    book = openpyxl.load_workbook(path)
    sheet = book.active
    assert sheet.title == "User accounts"
    assert [cell.value for cell in sheet[1]] == [
        *("username", "email", "first_name", "last_name", "is_active", "is_staff", "groups"),
        "password",
    ]
    assert sheet["A1"].font.bold
    rows = {row[0].value: row for row in sheet.iter_rows(min_row=2)}
    assert rows["007"][0].number_format == "@" and rows["007"][0].data_type == "s"
    assert rows["bob"][2].value == "=1+1" and rows["bob"][2].data_type == "s"
    assert (rows["bob"][4].value, rows["007"][4].value) == (0, 1)
    assert rows["007"][6].value == "staff"
    assert sheet.freeze_panes == "A2"

    with open(path, "rb") as handle:
        data = io.BytesIO(handle.read())
    data.name = "edited.xlsx"
    manager_client.post(reverse("datacenter:upload"), {"file": data})
    url = reverse("datacenter:process", args=["edited.csv"])
    dry_run = manager_client.post(url, {"processor": "users", "mode": "update"}, follow=True)

    assert dry_run.context["job"].result["change_counts"] == {"unchanged": 3}
    manager_client.post(url, {"processor": "users", "mode": "update", "step": "process"})
    bob = User.objects.get(username="bob")
    assert (bob.first_name, bob.last_name, bob.is_active) == ("=1+1", "'-x", False)


def test_a_csv_export_for_excel_has_a_byte_order_mark_and_processes_back_unchanged(
    manager_client, datacenter, people
):
    name = export(manager_client, "excel-csv")
    with open(os.path.join(datacenter.storage, "exports", name), "rb") as handle:
        data = handle.read()

    assert name.endswith("-excel.csv")
    assert data.startswith(b"\xef\xbb\xbfusername,")
    assert "Fürst".encode() in data
    upload_file = io.BytesIO(data)
    upload_file.name = "back.csv"
    response = manager_client.post(
        reverse("datacenter:upload"), {"file": upload_file}, follow=True
    )
    assert "byte order mark removed" in text(response)
    url = reverse("datacenter:process", args=["back.csv"])
    dry_run = manager_client.post(url, {"processor": "users", "mode": "update"}, follow=True)
    assert dry_run.context["job"].result["change_counts"] == {"unchanged": 3}


def test_an_unknown_export_format_is_refused(manager_client, datacenter, people):
    response = manager_client.post(
        reverse("datacenter:exports"), {"processor": "users", "format": "pdf"}, follow=True
    )

    assert "Unknown export format 'pdf'" in text(response)
    assert not Job.objects.exists()


def test_the_export_command_writes_a_workbook(datacenter, people, tmp_path):
    from django.core.management import call_command

    target = tmp_path / "users.xlsx"
    call_command("export_records", "users", "--output", str(target), "--format", "xlsx")

    rows = list(openpyxl.load_workbook(target, read_only=True).active.values)
    assert rows[0][0] == "username" and len(rows) == 3  # the header, 007 and bob


def test_a_workbook_keeps_times_truths_and_durations_as_a_person_reads_them(
    clerk_client, datacenter, tmp_path
):
    path = tmp_path / "times.xlsx"
    book = openpyxl.Workbook()
    book.active.append(["username", "midnight", "time", "active", "took", "ratio"])
    book.active.append(
        [
            "ann",
            datetime.datetime(2022, 3, 4, 0, 0),
            datetime.time(9, 30),
            True,
            datetime.timedelta(hours=1, minutes=30),
            0.1,
        ]
    )
    book.save(path)

    upload(clerk_client, path)

    assert stored(datacenter, "times.csv") == (
        "username,midnight,time,active,took,ratio\nann,2022-03-04,09:30:00,1,1:30:00,0.1\n"
    )
