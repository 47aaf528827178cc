"""The export direction of the CDS protocol over FTP and FTPS: pyftpdlib and Debian's vsftpd.
(SFTP: test_sftp.py.)"""

import os
import subprocess
import sys

from pyftpdlib.handlers import ThrottledDTPHandler

from imports import cds
from imports.cds import export_
from imports.outgoing import TAKEN, UPLOAD_RECORD
from imports.spool import FileStore

from .conftest import ROOT, kill_when, written
from .servers import tls_options
from .test_cds import messages, spooled
from .test_sftp import outgoing


def on_server(server) -> dict:
    return {path.name: path.read_bytes() for path in sorted(server.dir.iterdir())}


def test_export_delivers_each_file_once_in_the_seed_order(ftp_server, tmp_path, cds_log):
    files = {"a.xml": b"<a/>", "b.jpg": os.urandom(700_000)}
    store = outgoing(tmp_path, files)

    result = export_(**ftp_server.options(store))

    assert result.status == cds.SUCCESS, result.error
    assert on_server(ftp_server) == files
    assert spooled(store, "cur") == files
    assert [file.sha256 for file in result.delivered] != ["", ""]
    assert messages(cds_log) == [
        "Starting export.",
        f"Accessed filestore {store}",
        f"Connecting to CDS FTP server (host 127.0.0.1, port {ftp_server.port}, user partner, "
        "dir outbox)",
        "Creating lock file: write",
        "Lock file successfully created: write",
        "Uploading: a.xml",
        "File stored on server: a.xml",
        "Moved from 'new' to 'cur': a.xml",
        "Uploading: b.jpg",
        "File stored on server: b.jpg",
        "Moved from 'new' to 'cur': b.jpg",
        "Removing lock file: write",
        "Lock file successfully removed: write",
        "Disconnected from CDS FTP server",
        "Exiting with success.",
    ]
    cds_log.clear()

    again = export_(**ftp_server.options(store))

    assert again.status == cds.NOTHING
    assert not any(line.startswith("Connecting") for line in messages(cds_log))
    assert on_server(ftp_server) == files


def test_either_lock_on_the_server_keeps_the_export_out(ftp_server, tmp_path):
    store = outgoing(tmp_path, {"a.xml": b"a"})
    for lock in ("read", "write"):
        ftp_server.put(lock, b"")
        assert export_(**ftp_server.options(store)).status == cds.LOCKED
        assert ftp_server.names() == [lock]
        (ftp_server.dir / lock).unlink()
    assert spooled(store, "new") == {"a.xml": b"a"}


def test_a_server_that_refuses_the_rename(start_ftp_server, tmp_path):
    server = start_ftp_server(perm="elradmwMT")  # no f: no renaming
    store = outgoing(tmp_path, {"a.xml": b"a"})

    result = export_(**server.options(store))

    assert result.status == cds.FAILED
    assert "550" in result.files[0].reason
    assert server.names() == []
    assert spooled(store, "new") == {"a.xml": b"a"}
    assert FileStore(store).record(UPLOAD_RECORD) is None


def test_names_no_server_could_take_are_skipped(ftp_server, tmp_path):
    store = outgoing(tmp_path, {"ok.xml": b"ok", "tab\there.xml": b"no"})

    result = export_(**ftp_server.options(store))

    assert result.status == cds.SUCCESS
    assert ftp_server.names() == ["ok.xml"]
    assert {file.name: file.outcome for file in result.files} == {
        "ok.xml": "delivered",
        "tab\there.xml": "skipped",
    }


def test_killed_mid_upload_then_rerun(start_ftp_server, tmp_path, cds_log):
    class SlowUploads(ThrottledDTPHandler):
        read_limit = 64 * 1024  # bytes per second the server takes

    slow = start_ftp_server(dtp_handler=SlowUploads)
    files = {"big.bin": os.urandom(1024 * 1024), "small.xml": b"<s/>"}
    store = outgoing(tmp_path, files)
    script = f"from imports.cds import export_; export_(**{slow.options(store)!r})"
    exporter = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    kill_when(exporter, lambda: written(slow.dir / ".big.bin.part"))
    assert slow.names() == [".big.bin.part", "write"]
    SlowUploads.read_limit = 0  # no limit from here on

    result = export_(**slow.options(store))

    assert result.status == cds.SUCCESS
    assert on_server(slow) == files
    assert spooled(store, "cur") == files
    assert "Removed an upload an earlier run left unfinished: big.bin" in messages(cds_log)


def test_killed_after_the_rename_is_not_sent_twice(ftp_server, tmp_path, cds_log):
    """What a kill between the rename on the server and the move to cur/ leaves: the file on
    the server under its name, still in new/, the upload recorded as renaming, our lock."""
    store = outgoing(tmp_path, {"a.xml": b"a", "b.xml": b"b"})
    spool = FileStore(store)
    ftp_server.put("a.xml", b"a")
    ftp_server.put("write", b"")
    spool.write_lock_record("write", {"host": "elsewhere", "pid": 1, "time": "2000-01-01"})
    record = {"name": "a.xml", "raw": b"a.xml".hex(), "temp": b".a.xml.part".hex(), "size": 1}
    spool.write_record(UPLOAD_RECORD, {**record, "phase": "renaming"})

    result = export_(**ftp_server.options(store))

    assert result.status == cds.SUCCESS
    assert on_server(ftp_server) == {"a.xml": b"a", "b.xml": b"b"}
    assert spooled(store, "cur") == {"a.xml": b"a", "b.xml": b"b"}
    assert [(file.name, file.reason) for file in result.delivered] == [
        ("a.xml", "completed the export of an earlier run"),
        ("b.xml", ""),
    ]
    assert "Uploading: a.xml" not in messages(cds_log)


def test_a_renamed_upload_of_another_size_is_the_partners_file_and_never_counted(
    ftp_server, tmp_path, cds_log
):
    """A record says our a.xml was being renamed, but the a.xml on the server is not ours
    (another size): it is the partner's, kept as it is, and our file is not delivered."""
    store = outgoing(tmp_path, {"a.xml": b"ours"})
    spool = FileStore(store)
    ftp_server.put("a.xml", b"the partner's")
    record = {"name": "a.xml", "raw": b"a.xml".hex(), "temp": b".a.xml.part".hex(), "size": 4}
    spool.write_record(UPLOAD_RECORD, {**record, "phase": "renaming"})

    result = export_(**ftp_server.options(store))

    assert on_server(ftp_server) == {"a.xml": b"the partner's"}
    assert spooled(store) == {"a.xml": b"ours"}
    assert spooled(store, "cur") == {}
    assert result.delivered == []
    assert [(file.name, file.reason) for file in result.files] == [("a.xml", TAKEN)]
    assert "Completed the export of an earlier run: a.xml" not in messages(cds_log)
    assert spool.record(UPLOAD_RECORD) is None


def test_an_unreadable_upload_record_is_dropped(ftp_server, tmp_path, cds_log):
    store = outgoing(tmp_path, {"a.xml": b"a"})
    FileStore(store).write_record(UPLOAD_RECORD, {"name": "a.xml"})  # cut off

    result = export_(**ftp_server.options(store))

    assert result.status == cds.SUCCESS
    assert "Dropped an unreadable record of an earlier upload." in messages(cds_log)
    assert on_server(ftp_server) == {"a.xml": b"a"}
    assert spooled(store, "cur") == {"a.xml": b"a"}
    assert FileStore(store).record(UPLOAD_RECORD) is None


# Debian's vsftpd: an anonymous write-only drop box that lists no hidden files.


def test_vsftpd_drop_box_export_with_lock_and_refused_rename(start_vsftpd, tmp_path):
    server = start_vsftpd()
    store = outgoing(tmp_path, {"a.xml": b"<a/>", "b.bin": os.urandom(300_000)})
    server.put("read", b"")

    assert export_(**server.options(store)).status == cds.LOCKED

    os.unlink(server.dir / "read")
    result = export_(**server.options(store))

    assert result.status == cds.SUCCESS, result.error
    assert server.names() == [b"a.xml", b"b.bin"]
    assert spooled(store, "new") == {}
    assert (server.dir / "b.bin").read_bytes() == spooled(store, "cur")["b.bin"]

    server.restart(cmds_denied="RNFR,RNTO")
    (store / "new" / "c.xml").write_bytes(b"c")
    refused = export_(**server.options(store))

    assert refused.status == cds.FAILED
    assert server.names() == [b"a.xml", b"b.bin"]
    assert spooled(store, "new") == {"c.xml": b"c"}


def test_vsftpd_ftps_export(start_vsftpd, certificate, tmp_path):
    server = start_vsftpd(**tls_options(certificate))
    store = outgoing(tmp_path, {"é.xml": b"tls"})

    result = export_(**server.options(store, protocol="ftps", ca_file=str(certificate[0])))

    assert result.status == cds.SUCCESS, result.error
    assert server.names() == ["é.xml".encode()]


def test_vsftpd_exporter_killed_mid_upload_then_rerun(start_vsftpd, tmp_path):
    server = start_vsftpd(anon_max_rate=64 * 1024)
    files = {"big.bin": os.urandom(1024 * 1024), "small.xml": b"<s/>"}
    store = outgoing(tmp_path, files)
    script = f"from imports.cds import export_; export_(**{server.options(store)!r})"
    exporter = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    kill_when(exporter, lambda: written(server.dir / ".big.bin.part"))
    server.restart()  # without the throttle

    result = export_(**server.options(store))

    assert result.status == cds.SUCCESS, result.error
    assert server.names() == [b"big.bin", b"small.xml"]
    assert (server.dir / "big.bin").read_bytes() == files["big.bin"]
    assert spooled(store, "cur") == files
