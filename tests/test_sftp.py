"""The CDS protocol over SFTP, against Debian's OpenSSH server (internal-sftp).

The server is started by the tests on 127.0.0.1 with a host key and a client key of their own;
the test logs in with that key as the user running the tests.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from imports import cds
from imports.cds import export_, import_
from imports.protocol import in_words
from imports.sftp import SftpTransport, fingerprint, pinned_key

from .conftest import (
    ROOT,
    import_with_fault,
    kill_when,
    sessions_frozen,
    sessions_killed,
    written,
)
from .test_cds import messages, spooled


def test_import_with_a_key_names_as_bytes_and_skipped_entries(start_sshd, spool, cds_log):
    server = start_sshd()
    server.put("a.xml", b"<a/>")
    server.put(b"caf\xe9.xml", b"latin-1 name")
    server.put(".hidden", b"skipped")
    (server.dir / "folder").mkdir()
    os.symlink("a.xml", server.dir / "link.xml")

    result = import_(**server.options(spool))

    assert result.status == cds.SUCCESS, result.error
    assert spooled(spool) == {"a.xml": b"<a/>", "café.xml": b"latin-1 name"}
    assert server.names() == [b".hidden", b"folder", b"link.xml"]
    assert {file.name: file.reason for file in result.files if file.outcome == "skipped"} == {
        ".hidden": "hidden file",
        "folder": "a folder",
        "link.xml": "a symbolic link",
    }
    log = messages(cds_log)
    assert any(line.startswith("Connecting to CDS SFTP server (host ") for line in log)
    assert log[log.index("Creating lock file: read") :][:2] == [
        "Creating lock file: read",
        "Lock file successfully created: read",
    ]
    assert log[-3:] == [
        "Lock file successfully removed: read",
        "Disconnected from CDS SFTP server",
        "Exiting with success.",
    ]


def test_key_with_a_passphrase(start_sshd, spool):
    server = start_sshd()
    server.put("a.xml")
    key = str(server.passphrase_key_file)

    without = import_(**server.options(spool, key_file=key))
    wrong = import_(**server.options(spool, key_file=key, passphrase="wrong"))
    right = import_(**server.options(spool, key_file=key, passphrase="sesame"))

    assert without.status == cds.FAILED
    assert "protected by a passphrase (enter it on the source)" in without.error
    assert wrong.status == cds.FAILED
    assert "the passphrase is wrong" in wrong.error
    assert "sesame" not in wrong.error
    assert right.status == cds.SUCCESS
    assert spooled(spool) == {"a.xml": b"data"}


def test_a_login_the_server_refuses(start_sshd, spool, tmp_path):
    from .servers import make_ssh_key

    server = start_sshd()
    server.put("a.xml")
    stranger, _ = make_ssh_key(tmp_path / "stranger")

    result = import_(**server.options(spool, key_file=str(stranger), password="guess"))

    assert result.status == cds.FAILED
    assert "Login refused" in result.error
    assert server.names() == [b"a.xml"]


def test_partner_write_lock_is_respected(start_sshd, spool, cds_log):
    server = start_sshd()
    server.put("write", b"")
    server.put("a.xml")

    result = import_(**server.options(spool))

    assert result.status == cds.LOCKED
    assert messages(cds_log)[-2:] == [
        "Cannot access CDS SFTP server as 'write' lockfile exists.",
        "Exiting.",
    ]
    assert server.names() == [b"a.xml", b"write"]


def test_missing_folder(start_sshd, spool, cds_log):
    server = start_sshd()

    result = import_(**server.options(spool, path=f"{server.dir}/missing"))

    assert result.status == cds.FAILED
    last = cds_log.records[-1]
    assert last.getMessage() == "Exiting with exception:"
    assert last.exc_info[0] is cds.PermanentError
    assert "No such file" in str(last.exc_info[1])


def test_changed_host_key_fails_before_login_and_can_be_trusted(start_sshd, spool, cds_log):
    server = start_sshd()
    server.put("a.xml")
    pinned = server.options(spool)["host_key"]
    server.restart(new_host_key=True)

    result = import_(**server.options(spool, host_key=pinned))

    new_fingerprint = fingerprint(server.host_key)
    assert result.status == cds.FAILED
    assert result.offered_host_key == server.host_key
    assert f"The server's host key {new_fingerprint} (ssh-ed25519) is not the one pinned" in (
        result.error
    )
    assert server.names() == [b"a.xml"]  # not even the lock: nothing was sent
    assert "publickey" not in server.log.read_text().split("Server listening")[-1]

    trusted = import_(**server.options(spool, host_key=new_fingerprint))

    assert trusted.status == cds.SUCCESS
    assert server.names() == []


def test_no_pinned_key_fails_and_tells_the_offered_key(start_sshd, spool):
    server = start_sshd()
    result = import_(**server.options(spool, host_key=""))
    assert result.status == cds.FAILED
    assert "no host key is pinned" in result.error
    assert result.offered_host_key == server.host_key


def test_pinned_key_forms():
    line = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
    key_type, digest = pinned_key(f"example.org,10.0.0.1 {line} comment")
    assert key_type == "ssh-ed25519"
    assert digest.startswith("SHA256:") and len(digest) == 50
    assert pinned_key(digest) == (None, digest)
    for wrong in ("SHA256:short", "ssh-ed25519 !!!", "@cert-authority * " + line, "hello"):
        with pytest.raises(ValueError):
            pinned_key(wrong)


def test_importer_killed_mid_transfer_then_rerun(start_sshd, spool, cds_log):
    server = start_sshd()
    payloads = {"a.xml": b"<a/>", "big.bin": os.urandom(64 * 1024 * 1024)}
    for name, data in payloads.items():
        server.put(name, data)
    options = server.options(spool, parallel=1)
    script = f"from imports.cds import import_; import_(**{options!r})"
    importer = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    kill_when(importer, lambda: written(Path(spool) / "tmp" / ".big.bin.part"))
    assert b"read" in server.names()

    result = import_(**options)

    assert result.status == cds.SUCCESS
    assert spooled(spool) == payloads
    assert server.names() == []
    assert os.listdir(Path(spool) / "tmp") == []
    assert any(
        m.startswith("Removing a stale lock file of our own: read") for m in messages(cds_log)
    )


def test_the_server_killed_mid_transfer_keeps_the_file_then_a_rerun_takes_it(
    start_sshd, spool, cds_log
):
    server = start_sshd()
    big = os.urandom(256 * 1024 * 1024)
    server.put("big.bin", big)
    options = server.options(spool, parallel=1)
    result = import_with_fault(options, "big.bin", sessions_killed(server))

    assert result.status == cds.FAILED
    assert result.error == "The server closed the connection unexpectedly."
    assert "big.bin" in {name.decode() for name in server.names()}
    assert os.listdir(Path(spool) / "tmp") == []

    again = import_(**options)

    assert again.status == cds.SUCCESS, again.error
    assert spooled(spool) == {"big.bin": big}
    assert server.names() == []


def test_a_server_that_stops_answering_mid_download_is_given_up_in_time(start_sshd, spool):
    server = start_sshd()
    big = os.urandom(256 * 1024 * 1024)
    server.put("big.bin", big)
    options = server.options(spool, parallel=1, timeout=2)
    result = import_with_fault(options, "big.bin", sessions_frozen(server))

    assert result.status == cds.FAILED
    assert result.error == "The server did not answer in time (no data for the download)."
    assert server.names() == [b"big.bin"]  # the lock is removed through a new session
    assert os.listdir(Path(spool) / "tmp") == []

    again = import_(**options)

    assert again.status == cds.SUCCESS, again.error
    assert spooled(spool) == {"big.bin": big}
    assert server.names() == []


def test_every_request_after_the_server_died_reads_as_the_server_closing(start_sshd):
    server = start_sshd()
    server.put("a.xml")
    transport = SftpTransport(
        "127.0.0.1",
        server.port,
        server.user,
        "",
        timeout=10,
        host_key=server.host_key,
        key_file=str(server.key_file),
    )
    try:
        transport.cwd(str(server.dir))
        # The first request meets the loss (a broken pipe, or the connection lost while it
        # waits), the next one a session that is no longer open: several errors, one cause.
        with sessions_killed(server):
            for _ in range(2):
                with pytest.raises(OSError) as raised:
                    transport.size(b"a.xml")
                assert in_words(raised.value) == "The server closed the connection unexpectedly."
    finally:
        transport.close()


# Export


def outgoing(tmp_path, files: dict[str, bytes]) -> Path:
    store = tmp_path / "out"
    (store / "new").mkdir(parents=True)
    for name, data in files.items():
        (store / "new" / name).write_bytes(data)
    return store


def test_export_delivers_once_with_the_right_bytes(start_sshd, tmp_path, cds_log):
    server = start_sshd()
    files = {"article.xml": b"<article/>", "bild.jpg": os.urandom(300_000), "é.txt": b"utf-8"}
    store = outgoing(tmp_path, files)

    result = export_(**server.options(store))
    again = export_(**server.options(store))

    assert result.status == cds.SUCCESS, result.error
    assert {file.name for file in result.delivered} == set(files)
    assert {
        name.decode(): (server.dir / name.decode()).read_bytes() for name in server.names()
    } == (files)
    assert spooled(store, "cur") == files
    assert spooled(store, "new") == {}
    assert again.status == cds.NOTHING
    log = messages(cds_log)
    assert log[log.index("Uploading: article.xml") :][:3] == [
        "Uploading: article.xml",
        "File stored on server: article.xml",
        "Moved from 'new' to 'cur': article.xml",
    ]
    assert "Removing lock file: write" in log
    assert log[-1] == "Exiting with success."


def test_export_waits_for_the_partners_lock(start_sshd, tmp_path, cds_log):
    server = start_sshd()
    server.put("read", b"")
    store = outgoing(tmp_path, {"a.xml": b"a"})

    result = export_(**server.options(store))

    assert result.status == cds.LOCKED
    assert "Cannot access CDS SFTP server as 'read' lockfile exists." in messages(cds_log)
    assert server.names() == [b"read"]
    assert spooled(store, "new") == {"a.xml": b"a"}


def test_export_never_replaces_a_file_of_the_partner(start_sshd, tmp_path):
    server = start_sshd()
    server.put("a.xml", b"the partner's")
    store = outgoing(tmp_path, {"a.xml": b"ours", "b.xml": b"b"})

    result = export_(**server.options(store))

    assert result.status == cds.FAILED
    assert (server.dir / "a.xml").read_bytes() == b"the partner's"
    assert (server.dir / "b.xml").read_bytes() == b"b"
    assert spooled(store, "new") == {"a.xml": b"ours"}
    assert server.names() == [b"a.xml", b"b.xml"]


def test_export_to_a_server_that_refuses_the_rename(start_sshd, tmp_path):
    server = start_sshd(sftp_flags="-P rename,posix-rename")
    store = outgoing(tmp_path, {"a.xml": b"a"})

    result = export_(**server.options(store))

    assert result.status == cds.FAILED
    assert result.files[0].outcome == "failed"
    assert server.names() == []  # neither the temporary file nor the lock
    assert spooled(store, "new") == {"a.xml": b"a"}


def test_exporter_killed_mid_upload_then_rerun(start_sshd, tmp_path, cds_log):
    server = start_sshd()
    files = {"big.bin": os.urandom(64 * 1024 * 1024), "small.xml": b"<s/>"}
    store = outgoing(tmp_path, files)
    options = server.options(store)
    script = f"from imports.cds import export_; export_(**{options!r})"
    exporter = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    kill_when(exporter, lambda: written(server.dir / ".big.bin.part"))
    assert b"write" in server.names()

    result = export_(**options)

    assert result.status == cds.SUCCESS
    assert {name: (server.dir / name).read_bytes() for name in files} == files
    assert server.names() == [b"big.bin", b"small.xml"]
    assert spooled(store, "cur") == files
    log = messages(cds_log)
    assert any(m.startswith("Removing a stale lock file of our own: write") for m in log)
    assert "Removed an upload an earlier run left unfinished: big.bin" in log


def test_the_devserver_command_serves_a_folder_over_sftp(tmp_path, spool):
    root = tmp_path / "root"
    (root / "outbox").mkdir(parents=True)
    (root / "inbox").mkdir()
    (root / "outbox" / "a.xml").write_bytes(b"<a/>")
    command = ["manage.py", "cds_devserver", "--protocol", "sftp", "--root", str(root)]
    command += ["--port", "0", "--host-key", str(tmp_path / "host_key")]
    server = subprocess.Popen(
        [sys.executable, *command], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        port = int(server.stdout.readline().split("sftp://127.0.0.1:")[1].split("/")[0])
        host_key = server.stdout.readline().removeprefix("Host key: ").strip()
        options = {"protocol": "sftp", "host_key": host_key, "timeout": 10}
        imported = import_(str(spool), "127.0.0.1", port, "cds", "cds", "/outbox", **options)
        store = outgoing(tmp_path, {"b.xml": b"<b/>"})
        exported = export_(str(store), "127.0.0.1", port, "cds", "cds", "/inbox", **options)
    finally:
        server.terminate()
        server.wait()

    assert imported.status == cds.SUCCESS, imported.error
    assert spooled(spool) == {"a.xml": b"<a/>"}
    assert exported.status == cds.SUCCESS, exported.error
    assert (root / "inbox" / "b.xml").read_bytes() == b"<b/>"
    assert os.listdir(root / "outbox") == []


def test_the_devserver_refuses_what_it_cannot_serve_in_words(tmp_path):
    (tmp_path / "a-file").write_text("")
    (tmp_path / "bad_key").write_text("not a key")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])

        with pytest.raises(CommandError, match=r"Cannot listen on 127\.0\.0\.1:\d+: "):
            call_command("cds_devserver", "--root", str(tmp_path), "--port", port)

    with pytest.raises(CommandError, match="a-file is not a folder."):
        call_command("cds_devserver", "--root", str(tmp_path / "a-file"))
    with pytest.raises(CommandError, match="Cannot read the host key .*bad_key"):
        call_command(
            "cds_devserver",
            *("--root", str(tmp_path), "--protocol", "sftp"),
            *("--host-key", str(tmp_path / "bad_key")),
        )


def test_an_exchange_path_that_is_a_file_is_told(start_sshd, spool):
    server = start_sshd()
    server.put("a.xml")

    result = import_(**server.options(spool, path=str(server.dir / "a.xml")))

    assert result.status == cds.FAILED
    assert result.error == f"Not a directory: {server.dir / 'a.xml'}"
    assert server.names() == [b"a.xml"]


def test_entries_that_are_no_files_are_skipped(start_sshd, spool):
    server = start_sshd()
    server.put("a.xml", b"<a/>")
    os.mkfifo(server.dir / "pipe")

    result = import_(**server.options(spool))

    assert spooled(spool) == {"a.xml": b"<a/>"}
    assert [(f.name, f.outcome) for f in result.files if f.name == "pipe"] == [("pipe", "skipped")]
    assert server.names() == [b"pipe"]


def test_a_server_that_refuses_removals_keeps_its_files_and_says_so(start_sshd, spool):
    server = start_sshd(sftp_flags="-P remove")
    server.put("a.xml", b"<a/>")

    result = import_(**server.options(spool))

    assert result.status == cds.FAILED
    [kept] = result.files
    assert (kept.name, kept.outcome) == ("a.xml", "failed")
    assert kept.reason.startswith("could not be removed on the server (")
    assert spooled(spool) == {}
    assert os.listdir(Path(spool) / "tmp") == []
    assert server.names() == [b"a.xml", b"read"]
    assert "The lock file 'read' stays on the server" in result.error


def test_a_full_disk_under_an_sftp_download_loses_nothing(start_sshd, small_filesystem):
    server = start_sshd()
    server.put("big.bin", os.urandom(3 * 1024 * 1024))
    spool = small_filesystem("2m") / "spool"

    result = import_(**server.options(spool))

    assert result.status == cds.FAILED
    assert result.error == "The local spool could not be written: No space left on device."
    assert server.names() == [b"big.bin"]
    assert os.listdir(spool / "tmp") == []
