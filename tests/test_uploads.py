import io
import os

import pytest

from datacenter.models import Upload
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
def test_only_csv_files_are_accepted(datacenter, filename):
    refused(datacenter, b"id\n1\n", filename, "Only CSV files can be uploaded")


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


def test_text_in_another_encoding_is_refused_with_its_line(datacenter):
    refused(datacenter, "id,name\n1,Ann\n2,Jürgen\n".encode("latin-1"), message="line 3")
    refused(datacenter, b"id\n1\n\xe2\x82", message="not UTF-8")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\n1,2\n", "no header row"),
        (b",\n1,2\n", "no header row"),
        (b"id,,name\n1,2,3\n", "Column 2 of the header row has no name"),
        (b"id,name,id\n1,2,3\n", "more than once: id"),
        (b"id,name\n1,Ann\n2\n", "Line 3 has 1 fields, but the header has 2 columns"),
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
