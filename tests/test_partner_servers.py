"""The CDS import against the servers partners run: Debian's vsftpd, and FTPS.

vsftpd serves an anonymous drop box with its defaults (uploads stored 0600 and never sent
back), knows no MLSD (LIST only) and passes file names on as bytes.
"""

import ftplib
import os
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from pyftpdlib.handlers import TLS_FTPHandler

from imports import cds
from imports.cds import import_
from imports.transports import decode_name

from .conftest import import_with_fault, kill_when, sessions_frozen, written
from .servers import tls_options
from .test_cds import spooled

ROOT = Path(__file__).resolve().parent.parent


def test_names_are_utf8_else_windows_1252():
    assert decode_name("Ärger €.xml".encode()) == "Ärger €.xml"
    assert decode_name(b"\xc4rger \x80.xml") == "Ärger €.xml"
    assert decode_name(b"\x81\x8d\x8f\x90\x9d") == "\x81\x8d\x8f\x90\x9d"


def test_vsftpd_list_only_listing_with_folders_and_links(start_vsftpd, spool):
    server = start_vsftpd()
    server.put("a.xml", b"<a/>")
    server.put("b.xml", b"<b/>")
    (server.dir / "folder").mkdir()
    os.symlink("a.xml", server.dir / "link.xml")

    result = import_(**server.options(spool))

    assert result.status == cds.SUCCESS
    assert spooled(spool) == {"a.xml": b"<a/>", "b.xml": b"<b/>"}
    assert server.names() == [b"folder", b"link.xml"]
    log = server.log.read_text()
    assert '"MLSD"\n' in log and '"500 Unknown command."' in log  # vsftpd has no MLSD
    assert '"LIST"' in log


def test_vsftpd_latin1_name_beside_utf8_names(start_vsftpd, spool):
    server = start_vsftpd()
    server.put(b"caf\xe9.xml", b"latin-1")
    server.put("café-utf8.xml", b"utf-8")
    server.put("plain.xml", b"ascii")

    result = import_(**server.options(spool))

    assert result.status == cds.SUCCESS
    assert spooled(spool) == {
        "café.xml": b"latin-1",
        "café-utf8.xml": b"utf-8",
        "plain.xml": b"ascii",
    }
    assert server.names() == []


def retrieve_fails(server, name: str) -> str:
    ftp = ftplib.FTP()
    ftp.connect("127.0.0.1", server.port, timeout=5)
    ftp.login(server.user, server.password)
    try:
        ftp.retrbinary(f"RETR /outbox/{name}", lambda chunk: None)
    except ftplib.error_perm as exc:
        return str(exc)
    finally:
        ftp.close()
    return ""


def test_write_only_drop_box_importer_killed_mid_transfer_then_rerun(start_vsftpd, spool):
    server = start_vsftpd(anon_max_rate=32 * 1024)
    payloads = {"a.xml": b"<a/>", "b.bin": os.urandom(512 * 1024), "c.xml": b"<c/>"}
    for name, data in payloads.items():
        server.put(name, data)
    options = server.options(spool)
    script = f"from imports.cds import import_; import_(**{options!r})"
    importer = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    kill_when(importer, lambda: written(Path(spool) / "tmp" / ".b.bin.part"))
    assert {b"b.bin", b"read"} <= set(server.names())
    assert retrieve_fails(server, "read").startswith("550")  # our lock: never readable
    server.restart()  # the same drop box, without the throttle

    result = import_(**options)

    assert result.status == cds.SUCCESS
    assert spooled(spool) == payloads
    assert server.names() == []
    assert os.listdir(Path(spool) / "tmp") == []
    assert sorted(os.listdir(spool)) == ["cur", "new", "tmp"]


@pytest.mark.parametrize("protocol", ["ftp", "ftps"])
def test_a_server_that_stops_answering_mid_download_is_given_up_in_time(
    start_vsftpd, certificate, spool, protocol
):
    tls = tls_options(certificate) if protocol == "ftps" else {}
    server = start_vsftpd(anon_max_rate=1024 * 1024, **tls)
    big = os.urandom(8 * 1024 * 1024)
    server.put("big.bin", big)
    options = server.options(spool, protocol=protocol, ca_file=str(certificate[0]), timeout=2)
    result = import_with_fault(options, "big.bin", sessions_frozen(server))

    assert result.status == cds.FAILED
    assert result.error == "The server did not answer in time."
    assert server.names() == [b"big.bin"]  # the lock is removed through a new session
    assert os.listdir(Path(spool) / "tmp") == []
    server.restart(**tls)  # without the throttle

    again = import_(**options)

    assert again.status == cds.SUCCESS, again.error
    assert spooled(spool) == {"big.bin": big}
    assert server.names() == []


def test_vsftpd_ftps_with_session_reuse_required(start_vsftpd, certificate, spool):
    server = start_vsftpd(**tls_options(certificate))  # require_ssl_reuse=YES by default
    server.put("a.xml", b"<a/>")
    server.put(b"\xe9t\xe9.xml", b"summer")

    result = import_(**server.options(spool, protocol="ftps", ca_file=str(certificate[0])))

    assert result.status == cds.SUCCESS
    assert spooled(spool) == {"a.xml": b"<a/>", "été.xml": b"summer"}
    assert server.names() == []
    # What a client without session reuse gets from this server.
    plain = ftplib.FTP_TLS(context=ssl.create_default_context(cafile=certificate[0]))
    plain.connect("127.0.0.1", server.port, timeout=5)
    plain.login(server.user, server.password)
    plain.prot_p()
    with pytest.raises(ftplib.error_perm, match="522 SSL connection failed: session reuse"):
        plain.nlst()
    plain.close()


def test_vsftpd_certificate_that_does_not_verify(start_vsftpd, certificate, spool, tmp_path):
    server = start_vsftpd(**tls_options(certificate))
    server.put("a.xml", b"<a/>")

    untrusted = import_(**server.options(spool, protocol="ftps"))  # the system's CAs only

    assert untrusted.status == cds.FAILED
    assert "CERTIFICATE_VERIFY_FAILED" in untrusted.error
    assert server.names() == [b"a.xml"]
    log = server.log.read_text()
    assert "AUTH TLS" in log
    assert server.password not in log
    assert '"PASS' not in log and '"USER' not in log


def start_tls_server(start_ftp_server, cert, key):
    """pyftpdlib with TLS required, recording the commands it receives."""
    commands = []

    class RecordingHandler(TLS_FTPHandler):
        certfile, keyfile = str(cert), str(key)
        tls_control_required = tls_data_required = True

        def pre_process_command(self, line, cmd, arg):
            commands.append(cmd)
            return super().pre_process_command(line, cmd, arg)

    server = start_ftp_server(handler_class=RecordingHandler)
    server.commands = commands
    return server


def test_ftps_against_pyftpdlib(start_ftp_server, certificate, spool):
    server = start_tls_server(start_ftp_server, *certificate)
    server.put("a.xml", b"<a/>")

    result = import_(**server.options(spool), protocol="ftps", ca_file=str(certificate[0]))

    assert result.status == cds.SUCCESS
    assert spooled(spool) == {"a.xml": b"<a/>"}
    assert server.commands[:3] == ["AUTH", "USER", "PASS"]
    assert "PROT" in server.commands


@pytest.mark.parametrize("case", ["another CA", "another host name"])
def test_ftps_refuses_a_certificate_before_the_password(
    start_ftp_server, certificate, spool, tmp_path, case
):
    from .servers import make_certificate

    if case == "another CA":
        cert, key = certificate
        ca_file, _ = make_certificate(tmp_path, "partner.example.org")
    else:  # the certificate is trusted, but it names localhost, not 127.0.0.1
        cert, key = ca_file, _ = make_certificate(tmp_path, "localhost")
    server = start_tls_server(start_ftp_server, cert, key)
    server.put("a.xml", b"<a/>")

    result = import_(**server.options(spool), protocol="ftps", ca_file=str(ca_file))

    assert result.status == cds.FAILED
    assert "CERTIFICATE_VERIFY_FAILED" in result.error
    assert server.commands == ["AUTH"]
    assert server.names() == ["a.xml"]
