"""The CDS protocol against a real FTP server (pyftpdlib on 127.0.0.1)."""

import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import pytest

from imports import cds, partial
from imports.cds import import_
from imports.spool import FileStore

from .conftest import fill_up, kill_when, written
from .ftp import LARGE_PAYLOAD, DroppingHandler, FaultyFS, GrowingHandler, slow_dtp

ROOT = Path(__file__).resolve().parent.parent


def messages(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "imports.cds"]


def opening(server, spool) -> list[str]:
    return [
        "Starting import.",
        f"Accessed filestore {spool}",
        f"Connecting to CDS FTP server (host 127.0.0.1, port {server.port}, user partner, "
        "dir outbox)",
    ]


LOCKED_SESSION = ["Creating lock file: read", "Lock file successfully created: read"]
CLOSING = [
    "Removing lock file: read",
    "Lock file successfully removed: read",
    "Disconnected from CDS FTP server",
    "Exiting with success.",
]


def spooled(spool, folder="new") -> dict[str, bytes]:
    path = Path(spool) / folder
    return {item.name: item.read_bytes() for item in sorted(path.iterdir())}


# The seed document's scenarios


def in_order_per_file(log: list[str], names: list[str]) -> bool:
    """Whether each file's lines come in the seed's order. Files go over several connections,
    so the lines of different files interleave."""
    steps = ["Downloading: {}", "File removed on server: {}", "Moved from 'tmp' to 'new': {}"]
    for name in names:
        lines = [step.format(name) for step in steps]
        if [line for line in log if line in lines] != lines:
            return False
    return True


def test_seed_import(ftp_server, spool, cds_log):
    ftp_server.put("a.xml", b"<a/>")
    ftp_server.put("b.xml", b"<b/>")

    result = import_(**ftp_server.options(spool))

    log = messages(cds_log)
    assert log[:5] == [*opening(ftp_server, spool), *LOCKED_SESSION]
    assert log[5:11] == [  # exactly the seed's lines, each file's three before the next's
        "Downloading: a.xml",
        "File removed on server: a.xml",
        "Moved from 'tmp' to 'new': a.xml",
        "Downloading: b.xml",
        "File removed on server: b.xml",
        "Moved from 'tmp' to 'new': b.xml",
    ]
    assert log[11:] == CLOSING
    assert spooled(spool) == {"a.xml": b"<a/>", "b.xml": b"<b/>"}
    assert ftp_server.names() == []
    assert result.status == cds.SUCCESS
    assert sorted((f.name, f.size) for f in result.delivered) == [("a.xml", 4), ("b.xml", 4)]
    assert result.bytes == 8
    assert sorted(os.listdir(spool)) == ["cur", "new", "tmp"]


def test_several_connections_keep_each_files_lines_in_order(ftp_server, spool, cds_log):
    for name in ("a.xml", "b.xml", "c.xml", "d.xml"):
        ftp_server.put(name, b"<x/>")

    result = import_(**ftp_server.options(spool), parallel=3)

    log = messages(cds_log)
    assert in_order_per_file(log, ["a.xml", "b.xml", "c.xml", "d.xml"])
    assert len(result.delivered) == 4


def test_seed_nothing_to_import(ftp_server, spool, cds_log):
    result = import_(**ftp_server.options(spool))

    assert messages(cds_log) == [
        *opening(ftp_server, spool),
        *LOCKED_SESSION,
        "No new files to import.",
        *CLOSING,
    ]
    assert result.status == cds.NOTHING
    assert ftp_server.names() == []


def test_seed_missing_directory_fails_before_any_lock(ftp_server, spool, cds_log):
    options = ftp_server.options(spool) | {"path": "missing"}

    result = import_(**options)

    assert messages(cds_log) == [
        "Starting import.",
        f"Accessed filestore {spool}",
        f"Connecting to CDS FTP server (host 127.0.0.1, port {ftp_server.port}, user partner, "
        "dir missing)",
        "Error accessing FTP server.",
        "Exiting with exception:",
    ]
    last = cds_log.records[-1]
    assert last.levelname == "ERROR"
    traceback = cds_log.text.strip().splitlines()
    assert traceback[-1].endswith("PermanentError: 550 No such file or directory.")
    assert result.status == cds.FAILED
    assert sorted(path.name for path in ftp_server.root.iterdir()) == ["outbox"]


# Delivery guarantees


def test_a_refused_file_stays_on_the_server_and_the_run_goes_on(start_ftp_server, spool):
    server = start_ftp_server(
        abstracted_fs=type("FS", (FaultyFS,), {"refused": frozenset({"b.xml"})})
    )
    for name in ("a.xml", "b.xml", "c.xml"):
        server.put(name, name.encode())

    result = import_(**server.options(spool))

    assert result.status == cds.FAILED
    assert server.names() == ["b.xml"]
    assert spooled(spool) == {"a.xml": b"a.xml", "c.xml": b"c.xml"}
    assert spooled(spool, "tmp") == {}
    assert not os.listdir(Path(spool) / "tmp")
    failed = [f for f in result.files if f.outcome == "failed"]
    assert [(f.name, f.reason[:3]) for f in failed] == [("b.xml", "550")]


def test_a_file_the_server_will_not_delete_is_not_delivered(start_ftp_server, spool, cds_log):
    server = start_ftp_server(
        abstracted_fs=type("FS", (FaultyFS,), {"kept": frozenset({"b.xml"})})
    )
    for name in ("a.xml", "b.xml", "c.xml"):
        server.put(name, name.encode())

    result = import_(**server.options(spool))

    assert server.names() == ["b.xml"]
    assert spooled(spool) == {"a.xml": b"a.xml", "c.xml": b"c.xml"}
    assert os.listdir(Path(spool) / "tmp") == []
    [kept] = [f for f in result.files if f.outcome == "failed"]
    assert (kept.name, kept.reason) == (
        "b.xml",
        "could not be removed on the server (550 Permission denied.); it stays there",
    )
    assert "Could not remove b.xml on the server (550 Permission denied.)." in messages(cds_log)


def test_a_connection_lost_while_removing_a_batch_is_finished_by_the_next_run(
    start_ftp_server, spool
):
    server = start_ftp_server(
        handler_class=type("Dropping", (DroppingHandler,), {"dropped_at": "b.xml"})
    )
    for name in ("a.xml", "b.xml", "c.xml"):
        server.put(name, name.encode())

    first = import_(**server.options(spool))

    assert first.status == cds.FAILED
    assert [(f.name, f.outcome) for f in first.files] == [
        ("a.xml", "delivered"),
        ("b.xml", "failed"),
    ]
    assert first.files[1].reason == "downloaded; the next run delivers it"
    assert spooled(spool) == {"a.xml": b"a.xml"}

    second = import_(**server.options(spool))

    assert second.status == cds.SUCCESS
    assert spooled(spool) == {"a.xml": b"a.xml", "b.xml": b"b.xml", "c.xml": b"c.xml"}
    assert server.names() == []
    assert os.listdir(Path(spool) / "tmp") == []


def test_a_lock_the_new_connection_may_not_remove_is_reported_left(start_ftp_server, spool):
    server = start_ftp_server(
        handler_class=type("Dropping", (DroppingHandler,), {"dropped_at": "a.xml"}),
        abstracted_fs=type("FS", (FaultyFS,), {"kept": frozenset({"read"})}),
    )
    server.put("a.xml", b"a")

    result = import_(**server.options(spool))

    assert result.status == cds.FAILED
    assert result.error == (
        "The server closed the connection unexpectedly. The lock file 'read' stays on the "
        "server (the server refused to remove it: 550 Permission denied.): the partner cannot "
        "exchange files until it is removed; the next run tries again."
    )
    assert server.names() == ["a.xml", "read"]


def test_a_dropped_data_connection_keeps_the_file_on_the_server(start_ftp_server, spool):
    server = start_ftp_server(
        abstracted_fs=type("FS", (FaultyFS,), {"cut_short": frozenset({"big.bin"})}),
        use_sendfile=False,
    )
    server.put("big.bin", os.urandom(100_000))
    server.put("small.txt", b"small")

    result = import_(**server.options(spool))

    assert server.names() == ["big.bin"]
    assert spooled(spool) == {"small.txt": b"small"}
    assert os.listdir(Path(spool) / "tmp") == []
    assert [f.outcome for f in result.files] == ["failed", "delivered"]
    assert result.files[0].reason.startswith("426")


def test_a_short_download_is_caught_by_the_size_check(start_ftp_server, spool):
    # The server lists 20 bytes, sends 10 and reports the transfer complete: only the
    # listed size tells.
    ftp_server = start_ftp_server(
        abstracted_fs=type("Halving", (FaultyFS,), {"halved": frozenset({"a.xml"})}),
        use_sendfile=False,
    )
    ftp_server.put("a.xml", b"01234567890123456789")

    result = import_(**ftp_server.options(spool))

    assert result.files[0].reason == "received 10 of 20 bytes"
    assert ftp_server.names() == ["a.xml"]
    assert spooled(spool) == {}
    assert os.listdir(Path(spool) / "tmp") == []


def test_a_name_taken_in_the_spool_is_never_overwritten(ftp_server, spool, cds_log):
    store = FileStore(spool)
    store.prepare()
    (Path(spool) / "new" / "a.xml").write_bytes(b"old new")
    (Path(spool) / "cur" / "a.xml.1").write_bytes(b"old cur")
    ftp_server.put("a.xml", b"newcomer")

    result = import_(**ftp_server.options(spool))

    assert spooled(spool) == {"a.xml": b"old new", "a.xml.2": b"newcomer"}
    assert spooled(spool, "cur") == {"a.xml.1": b"old cur"}
    assert result.delivered[0].local_name == "a.xml.2"
    assert (
        "A file named a.xml is in the spool already; the new one is stored as a.xml.2."
        in messages(cds_log)
    )


def test_leftovers_of_a_crash_are_repaired(ftp_server, spool, cds_log):
    FileStore(spool).prepare()
    tmp = Path(spool) / "tmp"
    (tmp / ".half.xml.part").write_bytes(b"half")
    (tmp / "whole.xml").write_bytes(b"whole")

    import_(**ftp_server.options(spool))

    assert os.listdir(tmp) == []
    assert spooled(spool) == {"whole.xml": b"whole"}
    log = messages(cds_log)
    assert "Discarded a partial download of an earlier run: half.xml" in log
    assert "Moved from 'tmp' to 'new': whole.xml" in log


def journal_of(spool, *entries: tuple[str, bytes]) -> Path:
    """What a run killed after its batch was durable leaves in tmp/: the partial files and
    the batch's journal."""
    store = FileStore(spool)
    store.prepare()
    lines = []
    for name, data in entries:
        Path(store.partial_path(name)).write_bytes(data)
        entry = {"name": name, "remote": name, "raw": name.encode().hex(), "size": len(data)}
        entry |= {"modify": None, "sha256": hashlib.sha256(data).hexdigest()}
        lines.append(json.dumps(entry))
    journal = Path(spool) / "tmp" / ".batch-test.journal"
    journal.write_text("\n".join(lines) + "\n")
    return journal


def test_a_journeys_name_taken_in_new_meanwhile_is_delivered_beside_it(ftp_server, spool):
    journal = journal_of(spool, ("a.xml", b"payload"))
    (Path(spool) / "new" / "a.xml").write_bytes(b"another a.xml")
    with open(journal, "a") as handle:
        handle.write('{"name": "b.x')  # a last line the kill cut short

    result = import_(**ftp_server.options(spool))

    assert spooled(spool) == {"a.xml": b"another a.xml", "a.xml.1": b"payload"}
    assert [(f.local_name, f.reason) for f in result.delivered] == [
        ("a.xml.1", "completed the delivery of an earlier run")
    ]
    assert os.listdir(Path(spool) / "tmp") == []


def test_a_delivery_cut_off_before_the_remote_removal_is_finished_once(ftp_server, spool, cds_log):
    ftp_server.put("a.xml", b"payload")
    ftp_server.put("b.xml", b"other")
    journal_of(spool, ("a.xml", b"payload"))

    result = import_(**ftp_server.options(spool))

    assert spooled(spool) == {"a.xml": b"payload", "b.xml": b"other"}
    assert ftp_server.names() == []
    assert os.listdir(Path(spool) / "tmp") == []
    log = messages(cds_log)
    assert "Downloading: a.xml" not in log
    assert "File removed on server: a.xml" in log
    assert [f.reason for f in result.delivered] == [
        "completed the delivery of an earlier run",
        "",
    ]


def test_a_delivery_cut_off_after_the_remote_removal_is_finished_once(ftp_server, spool):
    ftp_server.put("b.xml", b"other")  # a.xml was removed on the server before the crash
    journal_of(spool, ("a.xml", b"payload"))

    result = import_(**ftp_server.options(spool))

    assert spooled(spool) == {"a.xml": b"payload", "b.xml": b"other"}
    assert ftp_server.names() == []
    assert len(result.delivered) == 2


def test_a_delivery_cut_off_inside_the_move_to_new_is_not_doubled(ftp_server, spool):
    journal_of(spool, ("a.xml", b"payload"))
    store = FileStore(spool)
    os.link(store.partial_path("a.xml"), Path(spool) / "new" / "a.xml")  # linked, not unlinked

    import_(**ftp_server.options(spool))

    assert spooled(spool) == {"a.xml": b"payload"}
    assert os.listdir(Path(spool) / "tmp") == []


def test_a_journal_entry_whose_file_is_not_what_was_journaled_is_discarded(
    ftp_server, spool, cds_log
):
    # A crash before the batch was durable: the journal made it to disk, the data did not.
    ftp_server.put("a.xml", b"payload")
    journal_of(spool, ("a.xml", b"payload"))
    Path(FileStore(spool).partial_path("a.xml")).write_bytes(b"\0" * 7)

    import_(**ftp_server.options(spool))

    assert spooled(spool) == {"a.xml": b"payload"}  # downloaded again, from the server
    assert "Discarded a partial download of an earlier run: a.xml" in messages(cds_log)
    assert os.listdir(Path(spool) / "tmp") == []


def test_an_importer_killed_mid_file_is_repaired_by_the_next_run(start_ftp_server, spool):
    slow = slow_dtp()
    server = start_ftp_server(dtp_handler=slow)
    payload = os.urandom(LARGE_PAYLOAD)
    server.put("big.bin", payload)
    script = (
        "import sys; from imports.cds import import_; "
        f"import_({str(spool)!r}, '127.0.0.1', {server.port}, 'partner', 'secret', 'outbox')"
    )
    importer = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    kill_when(importer, lambda: written(Path(spool) / "tmp" / ".big.bin.part"))
    assert server.names() == ["big.bin", "read"]  # our lock, left by the killed process
    slow.write_limit = 0

    result = import_(**server.options(spool))

    assert result.status == cds.SUCCESS
    assert spooled(spool) == {"big.bin": payload}
    assert server.names() == []
    assert os.listdir(Path(spool) / "tmp") == []


def test_hostile_names_from_the_server_are_refused(start_ftp_server, spool, tmp_path):
    hostile = ["../escape.txt", "sub/dir.txt", "bell\x07.txt", "back\\slash.txt"]

    class HostileFS(FaultyFS):
        def listdir(self, path):
            return super().listdir(path) + hostile

        def stat(self, path):
            if os.path.basename(path) in {"escape.txt", "dir.txt", "bell\x07.txt"} or (
                "\\" in path
            ):
                return os.stat(os.path.join(self.root, "outbox", "ok.txt"))
            return super().stat(path)

        lstat = stat

    server = start_ftp_server(abstracted_fs=HostileFS)
    server.put("ok.txt", b"fine")

    result = import_(**server.options(spool))

    skipped = {f.name: f.reason for f in result.files if f.outcome == "skipped"}
    assert skipped == {
        "../escape.txt": "the name contains a path separator",
        "sub/dir.txt": "the name contains a path separator",
        "bell\x07.txt": "the name contains control characters",
        "back\\slash.txt": "the name contains a path separator",
    }
    assert spooled(spool) == {"ok.txt": b"fine"}
    assert not (tmp_path / "escape.txt").exists()
    assert not (Path(spool) / "escape.txt").exists()


def test_folders_dotfiles_and_links_stay_on_the_server(ftp_server, spool):
    ftp_server.put("real.txt", b"real")
    ftp_server.put(".hidden", b"hidden")
    (ftp_server.dir / "folder").mkdir()
    (ftp_server.dir / "folder" / "inner.txt").write_bytes(b"inner")
    os.symlink("real.txt", ftp_server.dir / "link.txt")

    result = import_(**ftp_server.options(spool))

    assert spooled(spool) == {"real.txt": b"real"}
    assert ftp_server.names() == [".hidden", "folder", "link.txt"]
    assert {f.name: f.reason for f in result.files if f.outcome == "skipped"} == {
        ".hidden": "hidden file",
        "folder": "a folder",
        "link.txt": "a symbolic link",
    }


def test_the_partners_write_lock_keeps_us_out(ftp_server, spool, cds_log):
    ftp_server.put("write", b"uploading")
    ftp_server.put("a.xml", b"<a/>")

    result = import_(**ftp_server.options(spool))

    assert messages(cds_log) == [
        *opening(ftp_server, spool),
        "Cannot access CDS FTP server as 'write' lockfile exists.",
        "Exiting.",
    ]
    assert result.status == cds.LOCKED
    assert ftp_server.names() == ["a.xml", "write"]
    assert spooled(spool) == {}


def test_somebody_elses_read_lock_is_respected(ftp_server, spool, cds_log):
    ftp_server.put("read", b"another reader")
    ftp_server.put("a.xml", b"<a/>")

    result = import_(**ftp_server.options(spool))

    assert result.status == cds.LOCKED
    assert "Cannot access CDS FTP server as 'read' lockfile exists." in messages(cds_log)
    assert ftp_server.names() == ["a.xml", "read"]


def own_lock_record(spool, server, *, pid: int, host=None, time=None, token="t") -> None:
    """The record in the spool that says the server's ``read`` lock is ours."""
    from datetime import UTC, datetime

    FileStore(spool).prepare()
    record = {
        "server": f"ftp://partner@127.0.0.1:{server.port}/outbox",
        "host": host or socket.gethostname(),
        "pid": pid,
        "run": "test",
        "token": token,
        "time": time or datetime.now(UTC).isoformat(),
    }
    (Path(spool) / ".read.lock.json").write_text(json.dumps(record))


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.fixture
def live_pid():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process.pid
    process.kill()
    process.wait()


def stale_lock_removed(caplog) -> list[str]:
    return [m for m in messages(caplog) if m.startswith("Removing a stale lock file of our own")]


def test_our_own_lock_of_a_dead_process_is_removed_without_reading_it(
    start_ftp_server, spool, cds_log
):
    # As on a write-only drop box, the server never lets us read the lock back.
    ftp_server = start_ftp_server(
        abstracted_fs=type("FS", (FaultyFS,), {"refused": frozenset({"read"})})
    )
    ftp_server.put("read", b"")
    own_lock_record(spool, ftp_server, pid=dead_pid())
    ftp_server.put("a.xml", b"<a/>")

    result = import_(**ftp_server.options(spool))

    assert result.status == cds.SUCCESS
    assert ftp_server.names() == []
    assert spooled(spool) == {"a.xml": b"<a/>"}
    [removed] = stale_lock_removed(cds_log)
    assert "which is no longer running" in removed
    assert sorted(os.listdir(spool)) == ["cur", "new", "tmp"]  # the record went with the lock


def test_our_own_lock_of_a_live_process_is_respected(ftp_server, spool, live_pid):
    ftp_server.put("read", b"")
    own_lock_record(spool, ftp_server, pid=live_pid)

    assert import_(**ftp_server.options(spool)).status == cds.LOCKED
    assert ftp_server.names() == ["read"]


def test_a_lock_we_have_no_record_of_is_respected_whatever_it_says(ftp_server, spool):
    ftp_server.put("read", f"host={socket.gethostname()}\npid={dead_pid()}\n".encode())

    assert import_(**ftp_server.options(spool)).status == cds.LOCKED
    assert ftp_server.names() == ["read"]


def test_a_lock_of_another_host_is_ours_to_remove_only_after_the_lease(ftp_server, spool):
    ftp_server.put("read", b"")
    own_lock_record(spool, ftp_server, pid=1, host="elsewhere")

    assert import_(**ftp_server.options(spool), lock_lease=3600).status == cds.LOCKED
    assert import_(**ftp_server.options(spool), lock_lease=0).status == cds.NOTHING
    assert ftp_server.names() == []


def test_a_lock_left_by_an_earlier_run_of_this_long_lived_process_is_stale(
    ftp_server, spool, cds_log
):
    ftp_server.put("read", b"")
    own_lock_record(spool, ftp_server, pid=os.getpid(), token="an ended run")

    assert import_(**ftp_server.options(spool)).status == cds.NOTHING
    assert "which has ended" in stale_lock_removed(cds_log)[0]


def test_the_holder_of_the_claim_takes_over_our_lock_at_once(ftp_server, spool, live_pid):
    ftp_server.put("read", b"")
    own_lock_record(spool, ftp_server, pid=live_pid)

    assert import_(**ftp_server.options(spool), claimed=True).status == cds.NOTHING
    assert ftp_server.names() == []


def test_a_record_whose_lock_is_gone_is_dropped(ftp_server, spool):
    own_lock_record(spool, ftp_server, pid=dead_pid())

    assert import_(**ftp_server.options(spool)).status == cds.NOTHING
    assert sorted(os.listdir(spool)) == ["cur", "new", "tmp"]


def test_a_server_that_never_answers_fails_within_the_timeout(spool):
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []
    thread = threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True)
    thread.start()
    try:
        result = import_(
            str(spool), "127.0.0.1", listener.getsockname()[1], "u", "p", "outbox", timeout=0.5
        )
    finally:
        listener.close()
        for connection, _ in accepted:
            connection.close()

    assert result.status == cds.FAILED
    assert result.error == "The server did not answer in time."


def test_active_mode_and_an_old_latin1_server(start_ftp_server, spool):
    server = start_ftp_server(encoding="latin-1")
    server.put("café.xml", b"<c/>")

    result = import_(**server.options(spool), passive=False)

    assert result.status == cds.SUCCESS
    assert spooled(spool) == {"café.xml": b"<c/>"}


def test_names_in_any_encoding_are_imported_side_by_side(start_ftp_server, spool):
    server = start_ftp_server(unicode_errors="surrogateescape")
    names = {
        b"caf\xe9.xml": "café.xml",  # Windows-1252 / Latin-1
        "naïve.xml".encode(): "naïve.xml",  # UTF-8
        b"\x80uro \x81.txt": "€uro \x81.txt",  # cp1252's euro; 0x81 is undefined there
    }
    for raw in names:
        with open(os.path.join(bytes(server.dir), raw), "wb") as handle:
            handle.write(raw)

    result = import_(**server.options(spool))

    assert result.status == cds.SUCCESS
    assert spooled(spool) == {text: raw for raw, text in names.items()}
    assert os.listdir(bytes(server.dir)) == []


def test_the_stability_check_waits_for_files_still_growing(start_ftp_server, spool, tmp_path):
    growing = tmp_path / "ftp0" / "outbox" / "growing.xml"
    ftp_server = start_ftp_server(
        handler_class=type("Growing", (GrowingHandler,), {"growing": growing})
    )
    assert growing.parent == ftp_server.dir
    ftp_server.put("done.xml", b"done")
    old = time.time() - 3600
    os.utime(ftp_server.dir / "done.xml", (old, old))
    ftp_server.put("young.xml", b"young")
    growing.write_bytes(b"start")
    os.utime(growing, (old, old))

    result = import_(**ftp_server.options(spool), stable_after=600, stability_interval=0.1)

    assert spooled(spool) == {"done.xml": b"done"}
    assert ftp_server.names() == ["growing.xml", "young.xml"]
    assert {f.name: f.reason for f in result.files if f.outcome == "skipped"} == {
        "growing.xml": "still being written (its size changed)",
        "young.xml": "younger than 600 s",
    }


def test_downloads_stream_in_constant_memory(ftp_server, spool):
    ftp_server.put("large.bin", os.urandom(16 * 1024 * 1024))
    tracemalloc.start()
    try:
        result = import_(**ftp_server.options(spool))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert result.status == cds.SUCCESS
    assert peak < 2 * 1024 * 1024


MIB = 1024 * 1024
# Around the edges of the direct writes' blocks (1 MiB) and alignment (4 KiB).
LARGE_FILES = {
    "exactly-two-blocks.bin": 2 * MIB,
    "a-block-and-a-byte.bin": MIB + 1,
    "with-an-aligned-rest.bin": 3 * MIB + 8192,
    "with-a-ragged-rest.bin": 3 * MIB + 8192 + 1234,
    "small.xml": 4,
}


def put_large_files(server) -> dict[str, bytes]:
    payloads = {name: os.urandom(size) for name, size in LARGE_FILES.items()}
    for name, data in payloads.items():
        server.put(name, data)
    return payloads


def assert_delivered_whole(result, spool, payloads) -> None:
    assert result.status == cds.SUCCESS
    assert spooled(spool) == payloads
    assert {f.name: f.sha256 for f in result.files} == {
        name: hashlib.sha256(data).hexdigest() for name, data in payloads.items()
    }
    assert os.listdir(Path(spool) / "tmp") == []


def test_large_files_arrive_whole_at_any_size(ftp_server, spool):
    payloads = put_large_files(ftp_server)

    result = import_(**ftp_server.options(spool))

    assert_delivered_whole(result, spool, payloads)


def test_large_files_arrive_whole_where_the_filesystem_has_no_direct_writes(
    ftp_server, spool, monkeypatch
):
    payloads = put_large_files(ftp_server)
    # Such filesystems refuse O_DIRECT with EINVAL, which no local one does on demand.
    monkeypatch.setattr(partial, "write_around_cache", lambda fd, on: False)

    result = import_(**ftp_server.options(spool))

    assert_delivered_whole(result, spool, payloads)


def test_large_files_arrive_whole_where_direct_writes_are_refused_after_all(
    ftp_server, spool, monkeypatch
):
    payloads = put_large_files(ftp_server)

    def refuse_direct(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return os.write(fd, data)

    # Filesystems that take O_DIRECT but not in these sizes, which no local one is: only the
    # spool's writes (imports/partial.py's os) are refused, not the FTP server's.
    monkeypatch.setattr(partial, "os", SimpleNamespace(**vars(os) | {"write": refuse_direct}))

    result = import_(**ftp_server.options(spool))

    assert_delivered_whole(result, spool, payloads)


def test_a_disk_filling_up_under_a_large_download_loses_nothing(
    ftp_server, small_filesystem, cds_log
):
    spool = small_filesystem("2m") / "spool"
    payloads = {"large.bin": os.urandom(3 * MIB), "small.xml": b"<s/>"}
    for name, data in payloads.items():
        ftp_server.put(name, data)

    result = import_(**ftp_server.options(spool))

    log = messages(cds_log)
    assert result.status == cds.FAILED
    assert "Could not write to the spool: No space left on device" in log
    assert "Could not store large.bin; it stays on the server." in log
    assert "large.bin" in ftp_server.names()
    assert "large.bin" not in spooled(spool)
    # The small file came in beside it or waits on the server; nothing is half-written.
    assert ("small.xml" in spooled(spool)) != ("small.xml" in ftp_server.names())
    assert os.listdir(Path(spool) / "tmp") == []


def resident_bytes(path) -> int:
    """How much of the file `path` is in the page cache (fincore, util-linux)."""
    output = subprocess.run(
        ["fincore", "--bytes", "--raw", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(output)


def filesystem_type(path) -> str:
    return subprocess.run(
        ["stat", "--file-system", "--format", "%T", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


@pytest.fixture
def disk_folder(tmp_path):
    """A folder on a disk's filesystem: tmpfs keeps every file in the page cache, so where
    the temporary folder is one, /var/tmp."""
    if filesystem_type(tmp_path) != "tmpfs":
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="datacenter-test-"))
    if filesystem_type(folder) == "tmpfs":
        shutil.rmtree(folder)
        if os.environ.get("DATACENTER_REQUIRE_SERVERS"):
            pytest.fail("Neither the temporary folder nor /var/tmp is on a disk.")
        pytest.skip("neither the temporary folder nor /var/tmp is on a disk")
    yield folder
    shutil.rmtree(folder)


def test_large_files_are_written_around_the_page_cache(ftp_server, disk_folder):
    spool = disk_folder / "spool"
    payloads = put_large_files(ftp_server)

    result = import_(**ftp_server.options(spool))

    assert result.status == cds.SUCCESS
    new = Path(spool) / "new"
    # Only the ragged rest went through the cache.
    assert {name: resident_bytes(new / name) for name in payloads} == {
        "exactly-two-blocks.bin": 0,
        "a-block-and-a-byte.bin": 4096,
        "with-an-aligned-rest.bin": 0,
        "with-a-ragged-rest.bin": 4096,
        "small.xml": 4096,
    }


def test_the_devserver_command_serves_a_folder(tmp_path, spool):
    (tmp_path / "outbox").mkdir()
    (tmp_path / "outbox" / "a.xml").write_bytes(b"<a/>")
    server = subprocess.Popen(
        [sys.executable, "manage.py", "cds_devserver", "--root", str(tmp_path), "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(server.stdout.readline().split("ftp://127.0.0.1:")[1].split("/")[0])
        result = import_(str(spool), "127.0.0.1", port, "cds", "cds", "outbox")
    finally:
        server.terminate()
        server.wait()

    assert result.status == cds.SUCCESS
    assert spooled(spool) == {"a.xml": b"<a/>"}


def test_a_full_disk_is_reported_as_such_and_loses_nothing(ftp_server, small_filesystem, cds_log):
    ftp_server.put("a.xml", b"<a/>")
    ftp_server.put("b.xml", b"<b/>")
    spool = small_filesystem("256k") / "spool"
    FileStore(spool).prepare()
    fill_up(spool.parent, leave=4096)  # a page for our lock's record, none for the files

    result = import_(**ftp_server.options(spool))

    log = messages(cds_log)
    assert "Could not write to the spool: No space left on device" in log
    assert "Error accessing FTP server." not in log
    # One connection takes the files in order; a full spool ends the run at the first.
    assert "Could not store a.xml; it stays on the server." in log
    assert "Downloading: b.xml" not in log
    assert "File removed on server: a.xml" not in log
    assert log[-4:] == [
        "Removing lock file: read",
        "Lock file successfully removed: read",
        "Disconnected from CDS FTP server",
        "Exiting with exception:",
    ]
    assert result.status == cds.FAILED
    assert ftp_server.names() == ["a.xml", "b.xml"]  # the lock is gone, the files are kept
    assert spooled(spool) == {}
    assert os.listdir(Path(spool) / "tmp") == []
    assert sorted(os.listdir(spool)) == ["cur", "new", "tmp"]


class ScriptedServer:
    """A TCP server on 127.0.0.1 that does one thing to every connection: stays silent,
    closes at once, or sends `greeting` and closes: servers that fail before the login."""

    def __init__(self, behaviour: str, greeting: bytes = b""):
        self.behaviour, self.greeting = behaviour, greeting
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.held = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            if self.behaviour == "silent":
                self.held.append(connection)
                continue
            if self.greeting:
                connection.sendall(self.greeting)
            connection.close()

    def close(self):
        for connection in self.held:
            connection.close()
        self.socket.close()


@pytest.mark.parametrize(
    ("behaviour", "greeting", "error"),
    [
        ("silent", b"", "The server did not answer in time."),
        ("close", b"", "The server closed the connection unexpectedly."),
        (
            "greet",
            b"421 Too many users, try again later.\r\n",
            "The server cannot do it for now: 421 Too many users, try again later.",
        ),
        ("greet", b"550 Not for you.\r\n", "The server refused: 550 Not for you."),
        ("greet", b"hello\r\n", "The server's answer is not FTP: hello"),
    ],
)
def test_a_server_that_fails_before_the_login_is_told_in_words(
    spool, cds_log, behaviour, greeting, error
):
    server = ScriptedServer(behaviour, greeting)
    try:
        result = import_(str(spool), "127.0.0.1", server.port, "u", "p", "/", timeout=1)
    finally:
        server.close()

    assert (result.status, result.error) == (cds.FAILED, error)
    assert f"Could not connect to CDS FTP server: {error}" in messages(cds_log)


def test_a_port_where_nothing_listens_is_told_in_words(spool):
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]  # free again once closed

    result = import_(str(spool), "127.0.0.1", port, "u", "p", "/")

    assert result.error == (
        "The server refused the connection: nothing answers at that host and port."
    )
