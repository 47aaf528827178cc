"""The SFTP transport: the CDS protocol over SSH, with the server's host key pinned.

paramiko speaks SSH here: it is synchronous like ftplib, so the transfer threads of fetch.py
use an SFTP connection exactly as an FTP one. The host key is checked right after the key
exchange, before any password or key is offered: a server that shows a key other than the
pinned one learns nothing, and the error tells the fingerprint it offered, for staff to compare
and pin (CdsSource.offered_host_key).

SFTP has no current directory and sends names as bytes: paths are built here from the exchange
directory and the server's own bytes, which paramiko's listing would decode (and fail on names
that are not UTF-8).
"""

import base64
import binascii
import socket
import stat
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import BinaryIO

import paramiko
from paramiko.sftp import CMD_CLOSE, CMD_HANDLE, CMD_NAME, CMD_OPENDIR, CMD_READDIR

from .transports import (
    CHUNK_SIZE,
    HostKeyError,
    PermanentError,
    RemoteEntry,
    Sink,
    UnlistableFolder,
    exists_by_size,
)

# Host key algorithms to negotiate for a pinned key of each type: the server must show the
# pinned key, not another of its keys.
ALGORITHMS = {"ssh-rsa": ["rsa-sha2-512", "rsa-sha2-256"]}


def pinned_key(text: str) -> tuple[str | None, str]:
    """The key type (None for a bare fingerprint) and SHA256 fingerprint of a pinned host
    key: a known_hosts line (with or without host names) or ``SHA256:…``. ValueError when it
    is neither."""
    text = text.strip()
    if text.startswith("SHA256:"):
        digest = text.removeprefix("SHA256:")
        try:
            valid = len(base64.b64decode(digest + "=" * (-len(digest) % 4))) == 32
        except binascii.Error:
            valid = False
        if not valid:
            raise ValueError("This is not a SHA256 fingerprint of a key.")
        return None, text
    fields = text.split()
    if fields and fields[0].startswith("@"):
        raise ValueError("Markers such as @cert-authority or @revoked are not supported.")
    for key_type, data in zip(fields, fields[1:], strict=False):
        if key_type.startswith(("ssh-", "ecdsa-", "sk-")):
            try:
                key = paramiko.PKey.from_type_string(key_type, base64.b64decode(data))
            except (binascii.Error, paramiko.SSHException, ValueError, TypeError):
                raise ValueError(f"The {key_type} key in it cannot be read.") from None
            return key_type, key.fingerprint
    raise ValueError("This is neither a known_hosts line nor a SHA256 fingerprint.")


def fingerprint(key_line: str) -> str:
    """The SHA256 fingerprint of a pinned key (see pinned_key)."""
    return pinned_key(key_line)[1]


class _sftp_errors:
    """Raise the server's refusals as PermanentError and a dropped session as
    ConnectionError, as the FTP transports do."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, traceback):
        if isinstance(exc, paramiko.SSHException):
            raise ConnectionError(str(exc) or "the SSH connection was lost") from exc
        # paramiko raises an SFTP status as a bare OSError (ENOENT, EACCES or none);
        # socket errors come as their subclasses (TimeoutError, ConnectionResetError, …).
        if type(exc) in (OSError, FileNotFoundError, PermissionError):
            raise PermanentError(exc.strerror or str(exc)) from exc
        return False


class SftpTransport:
    """An SFTP session over SSH, the host key checked against `host_key` before login."""

    def __init__(
        self,
        host: str,
        port: int,
        user: str,
        password: str,
        *,
        timeout: float = 30,
        host_key: str = "",
        key_file: str = "",
        passphrase: str = "",
    ):
        key = private_key(key_file, passphrase) if key_file else None
        key_type, pinned = pinned_key(host_key) if host_key else (None, "")
        sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.ssh = paramiko.Transport(sock)
        try:
            self.ssh.banner_timeout = self.ssh.handshake_timeout = timeout
            self.ssh.auth_timeout = timeout
            if key_type:
                self.ssh.get_security_options().key_types = ALGORITHMS.get(key_type, [key_type])
            with _sftp_errors():
                self.ssh.start_client(timeout=timeout)
                offered = self.ssh.get_remote_server_key()
                if offered.fingerprint != pinned:
                    raise HostKeyError(
                        f"{offered.get_name()} {offered.get_base64()}",
                        offered.fingerprint,
                        pinned=bool(pinned),
                    )
                self._login(user, password, key)
                self.sftp = paramiko.SFTPClient.from_transport(self.ssh)
            self.sftp.get_channel().settimeout(timeout)
        except BaseException:
            self.ssh.close()
            raise
        self.dir = b"."

    def _login(self, user: str, password: str, key: paramiko.PKey | None) -> None:
        try:
            if key is not None:
                remaining = self.ssh.auth_publickey(user, key)
                if remaining and password:  # the server wants the password too
                    self.ssh.auth_password(user, password)
            else:
                self.ssh.auth_password(user, password)
        except paramiko.AuthenticationException as exc:
            raise PermanentError(f"Login refused: {exc}") from exc

    def path(self, raw: bytes) -> bytes:
        return self.dir.rstrip(b"/") + b"/" + raw

    def cwd(self, path: str) -> None:
        with _sftp_errors():
            attributes = self.sftp.stat(path.encode())
        if not stat.S_ISDIR(attributes.st_mode or 0):
            raise PermanentError(f"Not a directory: {path}")
        self.dir = path.encode()

    def list(self, with_links: bool = True) -> list[RemoteEntry]:
        """The entries of the directory, as the server describes them (without following
        links). `with_links` is there for the FTP transport's sake."""
        try:
            with _sftp_errors():
                kind, message = self.sftp._request(CMD_OPENDIR, self.dir)
        except PermanentError as exc:
            raise UnlistableFolder(f"The server did not open the folder: {exc}") from exc
        with _sftp_errors():
            if kind != CMD_HANDLE:
                raise UnlistableFolder("The server did not open the folder.")
            handle = message.get_binary()
            entries = []
            try:
                while True:
                    try:
                        kind, message = self.sftp._request(CMD_READDIR, handle)
                    except EOFError:  # the end of the listing
                        break
                    if kind != CMD_NAME:
                        raise PermanentError("The server sent no directory entries.")
                    for _ in range(message.get_int()):
                        raw, longname = message.get_string(), message.get_string()
                        attributes = paramiko.SFTPAttributes._from_msg(message, raw, longname)
                        if raw not in {b".", b".."}:
                            entries.append(_entry(raw, attributes))
            finally:
                self.sftp._request(CMD_CLOSE, handle)
        return entries

    def size(self, raw: bytes) -> int | None:
        with _sftp_errors():
            return self.sftp.stat(self.path(raw)).st_size

    exists = exists_by_size

    def retrieve(self, raw: bytes, sink: Sink) -> None:
        with _sftp_errors(), self.sftp.open(self.path(raw), "rb") as remote:
            remote.prefetch()
            sink.receive(remote.readinto)

    def store(self, raw: bytes, source: BinaryIO) -> None:
        with _sftp_errors(), self.sftp.open(self.path(raw), "wb") as remote:
            remote.set_pipelined(True)
            while chunk := source.read(CHUNK_SIZE):
                remote.write(chunk)

    def rename(self, old: bytes, new: bytes) -> None:
        """Give `old` the name `new`. SFTP's rename (unlike POSIX rename) fails when `new`
        exists, so a file on the server is never replaced."""
        with _sftp_errors():
            self.sftp.rename(self.path(old), self.path(new))

    def delete(self, raw: bytes) -> None:
        with _sftp_errors():
            self.sftp.remove(self.path(raw))

    def delete_many(self, raws: Sequence[bytes]) -> Iterator[Exception | None]:
        for raw in raws:
            try:
                self.delete(raw)
            except PermanentError as refused:
                yield refused
            else:
                yield None

    def close(self) -> None:
        self.ssh.close()


def private_key(path: str, passphrase: str) -> paramiko.PKey:
    """The private key of `path`; PermanentError, naming neither key nor passphrase, when it
    cannot be used."""
    try:
        return paramiko.PKey.from_path(path, passphrase.encode() if passphrase else None)
    except (paramiko.SSHException, ValueError, TypeError):
        # cryptography raises TypeError for a protected key opened without a passphrase.
        if passphrase:
            problem = "the passphrase is wrong, or it is not a private key this site can read"
        else:
            problem = (
                "it is protected by a passphrase (enter it on the source), or it is not a "
                "private key this site can read"
            )
    except OSError as exc:
        problem = exc.strerror or str(exc)
    raise PermanentError(f"The private key file {path} cannot be used: {problem}.")


def _entry(raw: bytes, attributes: paramiko.SFTPAttributes) -> RemoteEntry:
    mode = attributes.st_mode or 0
    if stat.S_ISREG(mode):
        kind = "file"
    elif stat.S_ISDIR(mode):
        kind = "dir"
    elif stat.S_ISLNK(mode):
        kind = "link"
    else:
        kind = "other"
    modify = None
    if attributes.st_mtime is not None:
        modify = datetime.fromtimestamp(attributes.st_mtime, UTC).strftime("%Y%m%d%H%M%S")
    return RemoteEntry(raw, attributes.st_size, modify, kind)
