"""Drop boxes that let an account write but not list, or not delete, against Debian's vsftpd:
what the log says is what the server did, and a partner's file is never replaced."""

import os

from imports import cds
from imports.cds import export_, import_

from .conftest import write
from .test_cds import messages


def write_only(server) -> None:
    """The exchange folder may be written and entered, but not listed (mode 0733, root's):
    vsftpd then answers a listing with "226 Transfer done (but failed to open directory)"."""
    os.chown(server.dir, 0, 0)
    os.chmod(server.dir, 0o733)


def outgoing(tmp_path, **files) -> str:
    spool = tmp_path / "out"
    os.makedirs(spool / "new")
    for name, data in files.items():
        write(spool / "new" / name.replace("_", "."), data)
    return str(spool)


def test_an_import_from_a_folder_that_cannot_be_listed_fails_in_words(
    start_vsftpd, spool, cds_log
):
    server = start_vsftpd()
    server.put("a.xml", b"<a/>")
    server.put("b.xml", b"<b/>")
    write_only(server)

    result = import_(**server.options(spool))

    log = messages(cds_log)
    assert result.status == cds.FAILED
    assert "No new files to import." not in log
    assert "cannot be listed" in result.error
    assert "failed to open directory" in result.error
    assert "Lock file successfully removed: read" in log  # the folder allows deleting it
    assert server.names() == [b"a.xml", b"b.xml"]


def test_an_export_into_a_folder_that_cannot_be_listed_never_replaces_a_partners_file(
    start_vsftpd, tmp_path, cds_log
):
    server = start_vsftpd()
    server.put("data.bin", b"the partner's")
    write_only(server)
    store = outgoing(tmp_path, data_bin=b"ours", new_bin=b"new")

    result = export_(**server.options(store))

    log = messages(cds_log)
    assert (server.dir / "data.bin").read_bytes() == b"the partner's"
    assert (server.dir / "new.bin").read_bytes() == b"new"
    [refused] = [file for file in result.files if file.outcome == "failed"]
    assert refused.name == "data.bin"
    assert "never replaced" in refused.reason
    assert os.listdir(os.path.join(store, "new")) == ["data.bin"]
    assert os.listdir(os.path.join(store, "cur")) == ["new.bin"]
    assert any("asked for by name" in line for line in log)
    assert "Lock file successfully removed: write" in log
    assert sorted(server.names()) == [b"data.bin", b"new.bin"]  # no lock, no temporary file


def test_without_delete_rights_the_log_never_claims_a_lock_removed(
    start_vsftpd, tmp_path, cds_log
):
    # Uploads are allowed, deleting and renaming are not.
    server = start_vsftpd(anon_other_write_enable="NO")
    store = outgoing(tmp_path, new_bin=b"new")

    result = export_(**server.options(store))

    log = messages(cds_log)
    assert "Lock file successfully created: write" in log
    assert "Lock file successfully removed: write" not in log
    assert any(
        line.startswith("Could not remove lock file write: the server refused to remove it: 550")
        for line in log
    )
    assert result.status == cds.FAILED
    assert "The lock file 'write' stays on the server" in result.error
    assert "Exiting with success." not in log
    assert log[-1].startswith("Exiting with errors: ")
    assert b"write" in server.names()
    # The record stays: the next run knows the lock on the server is its own.
    assert os.path.exists(os.path.join(store, ".write.lock.json"))

    again = export_(**server.options(store))

    log = messages(cds_log)
    assert again.status == cds.FAILED
    assert log.count("Lock file successfully removed: write") == 0


def test_a_lock_the_server_refused_is_neither_created_nor_removed(start_vsftpd, spool, cds_log):
    server = start_vsftpd(anon_upload_enable="NO")
    server.put("a.xml", b"<a/>")

    result = import_(**server.options(spool))

    log = messages(cds_log)
    assert result.status == cds.FAILED
    assert "Creating lock file: read" in log
    assert any(
        line.startswith("The server refused to create the lock file read: 550") for line in log
    )
    assert "Lock file successfully created: read" not in log
    assert "Removing lock file: read" not in log
    assert "Lock file successfully removed: read" not in log
    assert not os.path.exists(spool / ".read.lock.json")
    assert server.names() == [b"a.xml"]
