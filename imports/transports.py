"""One small client interface over the servers partners run: FTP, explicit FTPS and SFTP.

A transport is logged in once opened; the CDS protocol code calls only ``cwd``, ``list``,
``size``, ``retrieve``, ``store``, ``rename``, ``delete``, ``delete_many`` and ``close``. File
names are the server's bytes: a name is fetched and removed by exactly the bytes the server
listed, whatever they decode to. The server's refusals are raised as PermanentError (FTP's 5xx,
SFTP's error statuses) and TemporaryError (FTP's 4xx); a broken or timed-out connection as
OSError or EOFError.
"""

import codecs
import ftplib
import re
import ssl
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from io import BytesIO
from typing import BinaryIO, Protocol

CHUNK_SIZE = 256 * 1024
PROTOCOLS = ("ftp", "ftps", "sftp")
# ftplib speaks str on the control connection; Latin-1 maps every byte to one character and
# back, so the server's bytes pass through unchanged.
WIRE = "latin-1"
UNIX_LIST_LINE = re.compile(
    rb"^(?P<kind>[-dlcbps])\S{9}\S*\s+\d+\s+\S+\s+\S+\s+(?P<size>\d+)\s+"
    rb"\w{3}\s+\d{1,2}\s+[\d:]{4,5}\s(?P<name>.+)$"
)
CONNECTION_ERRORS = (OSError, EOFError)


class PermanentError(Exception):
    """A permanent (5xx) reply of the server."""


class TemporaryError(Exception):
    """A temporary (4xx) reply of the server."""


class UnlistableFolder(PermanentError):
    """The server does not list the folder, however it says so: many drop boxes let an
    account write into a folder and enter it, but not read it."""


def exists_by_size(transport, raw: bytes) -> bool:
    """Whether a file named `raw` is there, asked by name (its size), which works in folders
    that cannot be listed. The `exists` method of every transport."""
    try:
        transport.size(raw)
    except PermanentError:
        return False
    return True


SERVER_ERRORS = (PermanentError, TemporaryError, ftplib.Error)


class HostKeyError(Exception):
    """An SSH server showed a host key other than the pinned one, or none is pinned."""

    def __init__(self, offered: str, fingerprint: str, *, pinned: bool):
        self.offered = offered  # as in known_hosts: "ssh-ed25519 AAAA…"
        self.fingerprint = fingerprint
        key_type = offered.split()[0]
        if pinned:
            problem = (
                "is not the one pinned for this source: the server's key may have changed, "
                "or another machine answers in its place"
            )
        else:
            problem = "is unknown: no host key is pinned for this source"
        super().__init__(
            f"The server's host key {fingerprint} ({key_type}) {problem}. Nothing was sent. "
            "Compare the fingerprint with the one the partner gives you, then trust the key "
            "on the source's admin page."
        )


@dataclass
class RemoteEntry:
    raw: bytes  # the name exactly as the server sent it
    size: int | None
    modify: str | None = None  # YYYYMMDDHHMMSS in UTC, where the server tells
    kind: str = "file"  # file, dir, link or other

    @property
    def name(self) -> str:
        return decode_name(self.raw)


# Names for annotations inside the transports, whose list() hides the builtin there.
Listing = list[RemoteEntry]
Lines = list[bytes]
# read_into(view) fills the start of `view` with the next bytes of a file and returns their
# number, 0 at the end.
ReadInto = Callable[[memoryview], int]


class Sink(Protocol):
    """Where a download goes. The transport calls receive(read_into) once; the sink calls
    read_into until it returns 0, so that the bytes land in the sink's own buffer."""

    def receive(self, read_into: ReadInto) -> None: ...


def _latin1_fallback(error: UnicodeDecodeError) -> tuple[str, int]:
    return error.object[error.start : error.end].decode("latin-1"), error.end


codecs.register_error("cds-latin-1", _latin1_fallback)


def decode_name(raw: bytes) -> str:
    """A server's file name as text: UTF-8 where the bytes are UTF-8, else Windows-1252
    (with Latin-1 for the five bytes Windows-1252 leaves undefined)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="cds-latin-1")


class _server_errors:
    """Raise ftplib's error replies as PermanentError and TemporaryError."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, traceback):
        if isinstance(exc, ftplib.error_perm):
            raise PermanentError(str(exc)) from exc
        if isinstance(exc, ftplib.error_proto):  # a reply without a code
            raise TemporaryError(f"The server's answer is not FTP: {exc}") from exc
        if isinstance(exc, ftplib.error_temp | ftplib.error_reply):
            raise TemporaryError(str(exc)) from exc
        return False


class _ReusingFTP_TLS(ftplib.FTP_TLS):
    """FTP_TLS whose data connections resume the control connection's TLS session, as
    vsftpd (``require_ssl_reuse``) and others require."""

    def ntransfercmd(self, cmd, rest=None):
        conn, size = ftplib.FTP.ntransfercmd(self, cmd, rest)
        if self._prot_p:
            conn = self.context.wrap_socket(
                conn, server_hostname=self.host, session=self.sock.session
            )
        return conn, size


def tls_context(ca_file: str | None = None) -> ssl.SSLContext:
    """Verifying context: the certificate must chain to `ca_file` (default: the system's CAs)
    and name the host."""
    return ssl.create_default_context(cafile=ca_file or None)


class FtpTransport:
    """An FTP or explicit FTPS (AUTH TLS, PROT P) session in one directory."""

    def __init__(
        self,
        host: str,
        port: int,
        user: str,
        password: str,
        *,
        timeout: float = 30,
        passive: bool = True,
        tls: bool = False,
        ca_file: str | None = None,
    ):
        if tls:
            self.ftp = _ReusingFTP_TLS(context=tls_context(ca_file), timeout=timeout)
        else:
            self.ftp = ftplib.FTP(timeout=timeout)
        self.ftp.encoding = WIRE
        try:
            with _server_errors():
                self.ftp.connect(host, int(port))
                if tls:
                    self.ftp.auth()  # the certificate is verified before the password is sent
                self.ftp.login(user, password)
                if tls:
                    self.ftp.prot_p()
                self.ftp.voidcmd("TYPE I")
        except BaseException:
            self.ftp.close()
            raise
        self.ftp.set_pasv(passive)
        self.mlsd = True

    def cwd(self, path: str) -> None:
        with _server_errors():
            self.ftp.cwd(path)

    def list(self, with_links: bool = True) -> Listing:
        """The entries of the directory: MLSD where the server has it, LIST otherwise.

        Many MLSD servers describe a symbolic link as the file it points to; with
        `with_links`, a LIST tells which entries are links.
        """
        if self.mlsd:
            try:
                entries = [_mlsd_entry(line) for line in self._lines("MLSD") if line]
            except PermanentError:
                self.mlsd = False
        if not self.mlsd:
            return self._list()
        if with_links:
            links = {entry.raw for entry in self._list() if entry.kind == "link"}
            for entry in entries:
                if entry.raw in links:
                    entry.kind = "link"
        return entries

    def _list(self) -> Listing:
        entries = []
        for line in self._lines("LIST"):
            match = UNIX_LIST_LINE.match(line)
            if not match:
                continue
            kind = {b"-": "file", b"d": "dir", b"l": "link"}.get(match["kind"], "other")
            name = match["name"].split(b" -> ", 1)[0] if kind == "link" else match["name"]
            entries.append(RemoteEntry(name, int(match["size"]), None, kind))
        return entries

    def _lines(self, command: str) -> Lines:
        """The lines a listing command sends. The session stays in binary mode (TYPE I is
        set once), which saves a TYPE command per transfer; lines end in CRLF either way.
        Raises UnlistableFolder when the server could not read the folder: vsftpd then
        answers "226 Transfer done (but failed to open directory)" with an empty listing."""
        sink = BytesIO()

        def receive(read_into: ReadInto) -> None:
            buffer = memoryview(bytearray(CHUNK_SIZE))
            while received := read_into(buffer):
                sink.write(buffer[:received])

        try:
            reply = self._transfer(command, receive)
        except PermanentError as exc:
            if str(exc).startswith("550"):
                raise UnlistableFolder(str(exc)) from exc
            raise
        if "failed to open directory" in reply.lower():
            raise UnlistableFolder(reply)
        return sink.getvalue().splitlines()

    def _transfer(self, command: str, receive: Callable[[ReadInto], None]) -> str:
        """Carry out the transfer `command`; return the server's final reply."""
        with _server_errors():
            with self.ftp.transfercmd(command) as connection:
                receive(connection.recv_into)
                if isinstance(connection, ssl.SSLSocket):
                    connection.unwrap()
            return self.ftp.voidresp()

    def size(self, raw: bytes) -> int | None:
        with _server_errors():
            return self.ftp.size(raw.decode(WIRE))

    exists = exists_by_size

    def retrieve(self, raw: bytes, sink: Sink) -> None:
        """Hand the file `raw` to `sink` (see Sink)."""
        self._transfer(f"RETR {raw.decode(WIRE)}", sink.receive)

    def store(self, raw: bytes, source: BinaryIO) -> None:
        with _server_errors():
            self.ftp.storbinary(f"STOR {raw.decode(WIRE)}", source, blocksize=CHUNK_SIZE)

    def rename(self, old: bytes, new: bytes) -> None:
        with _server_errors():
            self.ftp.rename(old.decode(WIRE), new.decode(WIRE))

    def delete(self, raw: bytes) -> None:
        with _server_errors():
            self.ftp.delete(raw.decode(WIRE))

    def delete_many(self, raws: Sequence[bytes]) -> Iterator[Exception | None]:
        """Remove the files `raws`, yielding for each None or the server's refusal.

        The commands go out together and the replies are read in order (pipelining, which
        servers read as one command after the other): a round trip for all, not for each.
        """
        if any(b"\r" in raw or b"\n" in raw for raw in raws):
            raise ValueError("A file name with a line break cannot be sent.")
        self.ftp.sock.sendall(b"".join(b"DELE " + raw + b"\r\n" for raw in raws))
        for _ in raws:
            try:
                with _server_errors():
                    self.ftp.voidresp()
            except (PermanentError, TemporaryError) as refused:
                yield refused
            else:
                yield None

    def close(self) -> None:
        """Say goodbye; just drop the connection when that fails."""
        try:
            self.ftp.quit()
        except (*SERVER_ERRORS, *CONNECTION_ERRORS):
            self.ftp.close()


def _mlsd_entry(line: bytes) -> RemoteEntry:
    """An entry of an MLSD listing: ``fact=value;fact=value; name``."""
    facts_text, _, name = line.partition(b" ")
    facts = {}
    for fact in facts_text.decode(WIRE).split(";"):
        key, _, value = fact.partition("=")
        facts[key.lower()] = value
    size = facts.get("size", "")
    return RemoteEntry(
        name,
        int(size) if size.isdigit() else None,
        facts.get("modify"),
        _mlsd_kind(facts.get("type", "")),
    )


def _mlsd_kind(fact: str) -> str:
    fact = fact.lower()
    if fact.startswith("os.unix=slink"):
        return "link"
    return {"file": "file", "dir": "dir", "cdir": "dir", "pdir": "dir"}.get(fact, "other")


@dataclass(frozen=True)
class ConnectionSettings:
    """How to reach a partner's server and log in: one value, built by CdsSource.connection()
    or from import_'s and export_'s arguments.

    `protocol` is ``ftp``, ``ftps`` (explicit TLS, verified against `ca_file` or the
    system's CAs) or ``sftp`` (the server's key pinned as `host_key`; login with the private
    key `key_file`, opened with `passphrase`, and/or the password). `timeout` bounds every
    network operation, in seconds; `passive` applies to FTP(S).
    """

    host: str
    port: int
    user: str
    password: str = field(default="", repr=False)
    protocol: str = "ftp"  # ftp, ftps or sftp
    ca_file: str | None = None
    host_key: str = ""
    key_file: str = ""
    passphrase: str = field(default="", repr=False)
    timeout: float = 30
    passive: bool = True

    @classmethod
    def among(
        cls, host: str, port: int, user: str, password: str, options: dict
    ) -> tuple["ConnectionSettings", dict]:
        """The settings for `host` given among keyword `options` (import_'s, export_'s), and
        the other options."""
        names = {setting.name for setting in fields(cls)}
        given = {name: value for name, value in options.items() if name in names}
        others = {name: value for name, value in options.items() if name not in names}
        return cls(host, port, user, password, **given), others

    @property
    def kind(self) -> str:
        """What the log calls the server: the seed's words name an FTP server."""
        return "SFTP" if self.protocol == "sftp" else "FTP"


def open_transport(settings: ConnectionSettings):
    """A transport logged in to the server of `settings`."""
    if settings.protocol == "sftp":
        from .sftp import SftpTransport  # sftp.py builds on this module

        return SftpTransport(
            settings.host,
            settings.port,
            settings.user,
            settings.password,
            timeout=settings.timeout,
            host_key=settings.host_key,
            key_file=settings.key_file,
            passphrase=settings.passphrase,
        )
    if settings.protocol not in PROTOCOLS:
        raise ValueError(
            f"Unknown protocol {settings.protocol!r}; use one of {', '.join(PROTOCOLS)}."
        )
    return FtpTransport(
        settings.host,
        settings.port,
        settings.user,
        settings.password,
        tls=settings.protocol == "ftps",
        timeout=settings.timeout,
        passive=settings.passive,
        ca_file=settings.ca_file,
    )
