import codecs
import io
import os
import subprocess

import pytest

from datacenter.models import Upload
from datacenter.storage import DataCenter
from datacenter.uploads import UploadError, safe_filename, save_upload

from .conftest import tree, write


def upload(datacenter, data: bytes, filename="people.csv", **kwargs):
    return save_upload(datacenter, io.BytesIO(data), filename, **kwargs)


def refused(datacenter, data: bytes, filename="people.csv", message="", **kwargs):
    """The upload is refused with `message` and the storage is exactly as before."""
    before = tree(datacenter.storage)
    with pytest.raises(UploadError, match=message):
        upload(datacenter, data, filename, **kwargs)
    assert tree(datacenter.storage) == before


def test_a_valid_csv_is_stored_in_the_root(datacenter):
    stored = upload(datacenter, b"id,name\n1,Ann\n2,Bob\n")

    assert stored.name == "people.csv"
    assert [f.name for f in datacenter.pending_files()] == ["people.csv"]
    assert stored.rows == 2
    with open(stored.path, "rb") as handle:
        assert handle.read() == b"id,name\n1,Ann\n2,Bob\n"
    [line] = datacenter.query_log("datacenter.log", "upload")
    assert line.endswith(" - INFO - system - upload: people.csv\n")


def test_the_byte_order_mark_is_accepted_and_removed(datacenter):
    stored = upload(datacenter, b"\xef\xbb\xbfid,name\n1,Ann\n")

    with open(stored.path, "rb") as handle:
        assert handle.read() == b"id,name\n1,Ann\n"


@pytest.mark.django_db
def test_the_uploader_is_recorded(datacenter, clerk):
    upload(datacenter, b"id\n1\n", user=clerk)

    assert Upload.objects.get(name="people.csv").uploaded_by == clerk
    [line] = datacenter.query_log("datacenter.log", "upload")
    assert " - clerk - upload: people.csv" in line


@pytest.mark.parametrize(
    ("filename", "stored"),
    [
        ("people.CSV", "people.csv"),
        ("../../etc/cron.d/evil.csv", "evil.csv"),
        ("C:\\Users\\ann\\Liste März 2026.csv", "Liste_Marz_2026.csv"),
        (".hidden.csv", "hidden.csv"),
        ("a;b|c$(rm).csv", "a_b_c_rm.csv"),
        ("x" * 300 + ".csv", "x" * 96 + ".csv"),
    ],
)
def test_file_names_are_made_safe(filename, stored):
    assert safe_filename(filename) == stored


@pytest.mark.parametrize("filename", ["people.txt", "people", "people.csv.exe", ""])
def test_only_csv_files_and_workbooks_are_accepted(datacenter, filename):
    refused(datacenter, b"id\n1\n", filename, "Only CSV files and workbooks can be uploaded")


def test_a_name_without_usable_characters_is_refused(datacenter):
    refused(datacenter, b"id\n1\n", "ßß.csv", "no usable characters")


@pytest.mark.parametrize(
    ("folder", "where"),
    [("", "pending"), ("finished", "finished"), ("unfinished", "unfinished")],
)
def test_an_existing_name_is_never_overwritten(datacenter, folder, where):
    write(os.path.join(datacenter.storage, folder, "people.csv"), "old content")

    refused(datacenter, b"id\n1\n", "people.csv", f"already exists in the {where} files")


def test_the_size_limit_is_enforced(datacenter):
    refused(datacenter, b"id\n" + b"1\n" * 100, max_size=100, message="larger than the limit")


def test_the_size_limit_comes_from_the_setting(datacenter, settings):
    settings.DATACENTER_MAX_UPLOAD_SIZE = 10
    refused(datacenter, b"id,name\n1,Ann\n", message="larger than the limit of 10 bytes")


def test_an_empty_file_is_refused(datacenter):
    refused(datacenter, b"", message="The file is empty")


# Files as spreadsheet programs save them


def stored_text(file) -> str:
    with open(file.path, encoding="utf-8") as handle:
        return handle.read()


def test_a_windows_1252_semicolon_file_with_quoted_semicolons_is_converted(datacenter):
    data = 'Name;Vorname;Ort\n"Müller; Söhne";Jürgen;Köln\nLeclerc;Zoë;"Aix; Provence"\n'

    stored = upload(datacenter, data.encode("cp1252"))

    assert stored.conversion == "converted from Windows-1252, semicolon-separated"
    assert stored_text(stored) == (
        "Name,Vorname,Ort\nMüller; Söhne,Jürgen,Köln\nLeclerc,Zoë,Aix; Provence\n"
    )
    [line] = datacenter.query_log("datacenter.log", "upload")
    assert "people.csv (converted from Windows-1252, semicolon-separated)" in line


def test_the_five_bytes_windows_1252_leaves_undefined_are_read_as_latin_1(datacenter):
    stored = upload(datacenter, b"id,name\n1,\x81\x8d\x80\n")

    assert stored_text(stored) == "id,name\n1,\x81\x8d€\n"


def test_excel_unicode_text_utf16_with_tabs_is_converted(datacenter):
    data = "id\tname\tcity\r\n1\tAnn, Jr.\t東京\r\n"

    stored = upload(datacenter, codecs.BOM_UTF16_LE + data.encode("utf-16-le"))

    assert stored.conversion == "converted from UTF-16, tab-separated"
    assert stored_text(stored) == 'id,name,city\n1,"Ann, Jr.",東京\n'


def test_empty_trailing_columns_are_dropped(datacenter):
    stored = upload(datacenter, b"a,b,,\n1,2,,\n3,4,,\n")

    assert stored.conversion == "2 empty columns dropped"
    assert stored_text(stored) == "a,b\n1,2\n3,4\n"


def test_a_cell_of_300_kib_is_stored(datacenter):
    cell = "x" * (300 * 1024)

    stored = upload(datacenter, f'id,text\n1,"{cell}"\n'.encode())

    assert stored.conversion == ""
    assert stored.rows == 1
    assert stored_text(stored).endswith(cell + '"\n')


@pytest.mark.parametrize(
    "data",
    [
        b"id,note\n1,a;b\n2,c;d\n",  # semicolons in the cells of a comma file
        b"name\nAnn\nBob\n",  # one column
        b'id,note\n1,"x;y;z"\n',
        b"id,note\r\n1,tab\there\r\n",
    ],
)
def test_comma_files_stay_exactly_as_they_are(datacenter, data):
    stored = upload(datacenter, data)

    assert stored.conversion == ""
    with open(stored.path, "rb") as handle:
        assert handle.read() == data


def test_the_csv_spectrum_cases_are_read_as_comma_files(datacenter):
    cases = {
        "comma_in_quotes": (
            'first,last,address,city,zip\nJohn,Doe,120 any st.,"Anytown, WW",08123\n'
        ),
        "escaped_quotes": 'a,b\n1,"ha ""ha"" ha"\n3,4\n',
        "newlines": 'a,b,c\n1,2,3\n"Once upon \na time",5,6\n7,8,9\n',
        "quotes_and_newlines": 'a,b\n1,"ha \n""ha"" \nha"\n3,4\n',
        "simple_crlf": "a,b,c\r\n1,2,3\r\n",
        "utf8": "a,b,c\n1,2,3\n4,5,ʤ\n",
        "empty": 'a,b,c\n1,"",""\n2,3,4\n',
    }
    for number, (name, text) in enumerate(cases.items()):
        stored = upload(datacenter, text.encode(), f"{name}.csv")
        assert (name, stored.conversion) == (name, ""), number
        with open(stored.path, encoding="utf-8", newline="") as handle:
            assert handle.read() == text


def test_a_broken_utf_16_file_is_refused(datacenter):
    refused(
        datacenter,
        codecs.BOM_UTF16_LE + "id\n1\n".encode("utf-16-le")[:-1] + b"\xd8",
        message="not valid UTF-16",
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\n1,2\n", "no header row"),
        (b",\n1,2\n", "no header row"),
        (b"id,,name\n1,2,3\n", "Column 2 of the header row has no name"),
        (b"id,name,id\n1,2,3\n", "more than once: id"),
        (b"id,name\n1,Ann\n2\n", "Line 3 has 1 field, but the header has 2 columns"),
        (b'id,name\n1,"Ann\n2,Bob\n', "CSV file: line 2: a quote is never closed"),
        (b'id,name\n1,"An"n\n', "not a well-formed CSV file: line 2"),
    ],
)
def test_malformed_csv_is_refused(datacenter, data, message):
    refused(datacenter, data, message=message)


def test_a_failure_half_way_leaves_no_temporary_file(datacenter):
    class Broken(io.BytesIO):
        def read(self, size=-1):
            if self.tell() > 0:
                raise OSError("connection reset")
            return super().read(4)

    with pytest.raises(OSError):
        save_upload(datacenter, Broken(b"id,name\n1,2\n"), "x.csv")

    assert [name for name in os.listdir(datacenter.storage) if name.startswith(".")] == []
    assert datacenter.pending_files() == []


# A storage that cannot take the file


@pytest.fixture
def small_storage(small_filesystem):
    """A data center on a real filesystem of 64 KiB."""
    return DataCenter(str(small_filesystem("64k") / "storage"))


def test_a_full_disk_is_a_form_error_and_leaves_nothing(small_storage):
    before = tree(small_storage.storage)

    with pytest.raises(UploadError, match=r"the storage is full \(No space left on device\)"):
        upload(small_storage, b"id,text\n" + b"1,xxxxxxxxxx\n" * 10_000)
    # The file itself fits; its conversion does not.
    with pytest.raises(UploadError, match="the storage is full"):
        upload(small_storage, b"a;b\n" + b"1;\xe9\xe9\xe9\xe9\xe9\xe9\xe9\xe9\n" * 2_500)

    assert tree(small_storage.storage) == before
    assert [name for name in os.listdir(small_storage.storage) if name.startswith(".")] == []


def test_a_storage_that_may_not_be_written_is_a_form_error(small_storage):
    subprocess.run(
        ["mount", "-o", "remount,ro", os.path.dirname(small_storage.storage)], check=True
    )

    with pytest.raises(UploadError, match="the storage folder may not be written"):
        upload(small_storage, b"id\n1\n")


def test_a_file_whose_first_line_names_no_column_is_refused(datacenter):
    refused(datacenter, b",,\n1,2,3\n", message="The file has no header row")
