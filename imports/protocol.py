"""What the two directions of the CDS protocol share: results, connecting, and the lock files.

One directory per exchange on the partner's server. A writer holds a file named ``write``
while it uploads, a reader a file named ``read`` while it downloads; whoever finds either
backs off until the next run. The import (cds.py) holds ``read``, the export (outgoing.py)
``write``.

Whether a lock on the server is our own is known from a record in the local spool alone (host,
process, run, time), never by reading the lock back: many drop boxes let an account write and
delete a file but not read it. Our lock whose run is gone is removed with a log line; anybody
else's is respected.
"""

import functools
import logging
import os
import socket
import ssl
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from io import BytesIO

from datacenter.processes import HOST, died_on_this_host

from .fetch import FileOutcome, SpoolError, spool_errors
from .spool import FileStore
from .transports import (
    CONNECTION_ERRORS,
    SERVER_ERRORS,
    ConnectionSettings,
    HostKeyError,
    PermanentError,
    UnlistableFolder,
    open_transport,
)

log = logging.getLogger("imports.cds")

SUCCESS, NOTHING, LOCKED, FAILED = "success", "nothing", "locked", "failed"
READ_LOCK, WRITE_LOCK = "read", "write"
LOCK_NAMES = {READ_LOCK.encode(), WRITE_LOCK.encode()}
MAX_NAME_BYTES = 240  # leaves room for the hidden partial name of a transfer
# Lock records of the runs going on in this process: a long-lived worker outlives its runs,
# so its process id alone does not say that a run is still going.
ACTIVE_LOCKS: set[str] = set()


@dataclass
class RunResult:
    status: str = SUCCESS
    files: list[FileOutcome] = field(default_factory=list)
    error: str = ""
    # The SSH host key the server offered when it was not the pinned one, known_hosts style.
    offered_host_key: str = ""
    on_file: Callable[[FileOutcome], None] | None = field(default=None, repr=False)

    def add(self, file: FileOutcome) -> None:
        """Record what became of one file, and tell the caller at once."""
        self.files.append(file)
        if self.on_file:
            self.on_file(file)

    @property
    def delivered(self) -> list[FileOutcome]:
        return [file for file in self.files if file.outcome == "delivered"]

    @property
    def bytes(self) -> int:
        return sum(file.size or 0 for file in self.delivered)

    def fail(self, exc: BaseException) -> "RunResult":
        log.error("Exiting with exception:", exc_info=exc)
        self.status = FAILED
        self.error = in_words(exc)
        return self

    def lock_left(self, lock: str, reason: str) -> "RunResult":
        """A run whose lock `lock` stays on the server fails: it locks the partner out."""
        self.status = FAILED
        left = (
            f"The lock file '{lock}' stays on the server ({reason}): the partner cannot "
            "exchange files until it is removed; the next run tries again."
        )
        self.error = f"{self.error} {left}" if self.error else left
        return self

    def finish(self, failed_files: str) -> "RunResult":
        """The status at the end of a run that got through: failed when a file failed, with
        the error "N file(s) `failed_files`", or when its lock stayed (lock_left)."""
        failed = [file for file in self.files if file.outcome == "failed"]
        if failed:
            self.status = FAILED
            self.error = f"{len(failed)} file(s) {failed_files} {self.error}".strip()
        elif self.status != FAILED:
            self.status = SUCCESS if self.delivered else NOTHING
            log.info("Exiting with success.")
            return self
        log.error("Exiting with errors: %s", self.error)
        return self


def run_under_lock(
    result: RunResult,
    store: FileStore,
    own: str,
    work: Callable,
    *,
    connection: ConnectionSettings,
    path: str,
    lock_lease: float,
    claimed: bool,
    run_label: str,
    failed_files: str,
) -> RunResult:
    """Connect to the server of `connection`, take the lock `own` in the directory `path` and
    do `work(transport, reconnect)` under it; then remove the lock, whatever failed, and
    return `result`.

    `work` raises SpoolError, a server error or a connection error to end the run failed;
    `reconnect()` opens another connection in `path`. When the lock cannot be taken the run
    ends `locked`. `failed_files` ends the error of a run in which files failed.
    """
    kind = connection.kind
    log.info(
        "Connecting to CDS %s server (host %s, port %s, user %s, dir %s)",
        kind,
        connection.host,
        connection.port,
        connection.user,
        path,
    )
    server = (
        f"{connection.protocol}://{connection.user}@{connection.host}:{connection.port}/"
        f"{path.lstrip('/')}"
    )
    open_connection = functools.partial(open_transport, connection)
    reconnect = connect_in(path, open_connection)
    transport = connect(result, open_connection, kind)
    if transport is None:
        return result

    token = uuid.uuid4().hex
    locked = False  # whether our lock may be on the server
    try:
        transport.cwd(path)
        lock = lock_in_the_way(transport, store, server, lock_lease, claimed, own)
        if lock:
            log.info("Cannot access CDS %s server as '%s' lockfile exists.", kind, lock)
            transport.close()
            log.warning("Exiting.")
            result.status = LOCKED
            return result
        locked = True
        try:
            create_lock(transport, store, own, server, run_label, token)
        except LockRefused:
            locked = False
            raise
        work(transport, reconnect)
    except (SpoolError, *SERVER_ERRORS, *CONNECTION_ERRORS) as exc:
        if isinstance(exc, SpoolError):
            log.error("Could not write to the spool: %s", exc)
        else:
            log.error("Error accessing %s server.", kind)
        transport.close()
        left = None
        if locked:
            # A transfer may have been cut off half-way: the old connection cannot be trusted
            # to answer the next command, so the lock goes on a new one.
            left = remove_lock(None, reconnect, store, own)
            log.info("Disconnected from CDS %s server", kind)
        result.fail(exc)
        return result.lock_left(own, left) if left else result
    finally:
        ACTIVE_LOCKS.discard(token)

    left = remove_lock(transport, reconnect, store, own)
    log.info("Disconnected from CDS %s server", kind)
    if left:
        result.lock_left(own, left)
    return result.finish(failed_files)


def connect(result: RunResult, open_connection: Callable, kind: str = "FTP"):
    """`open_connection()`, or None with the reason logged and `result` failed."""
    try:
        return open_connection()
    except ssl.SSLCertVerificationError as exc:
        log.error(
            "The server's TLS certificate did not verify (%s); no password was sent.",
            exc.verify_message,
        )
        result.fail(exc)
    except HostKeyError as exc:
        log.error("%s", exc)
        result.offered_host_key = exc.offered
        result.fail(exc)
    except (*SERVER_ERRORS, *CONNECTION_ERRORS) as exc:
        log.error("Could not connect to CDS %s server: %s", kind, in_words(exc))
        result.fail(exc)
    return None


def in_words(exc: BaseException) -> str:
    """Why a run failed, in one sentence for staff, with the server's own answer."""
    text = str(exc).strip()
    if isinstance(exc, SpoolError):
        return f"The local spool could not be written: {text}."
    if isinstance(exc, LockRefused):
        return f"The server refused our lock file: {text}"
    if isinstance(exc, UnlistableFolder):
        return (
            "The exchange folder cannot be listed, so its files cannot be found (the server "
            f"said: {text})."
        )
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"The server's TLS certificate did not verify ({text}); no password was sent."
    if isinstance(exc, HostKeyError):
        return text
    if isinstance(exc, SERVER_ERRORS):
        if text.startswith("530"):
            return f"The server refused the login: {text}"
        if text.startswith("4"):
            return f"The server cannot do it for now: {text}"
        return f"The server refused: {text}" if text[:1].isdigit() else text
    if isinstance(exc, TimeoutError):
        # The socket's and TLS's own words ("timed out", "The read operation timed out")
        # would only repeat the sentence.
        detail = "" if not text or text.endswith("timed out") else f" ({text})"
        return f"The server did not answer in time{detail}."
    if isinstance(exc, ConnectionRefusedError):
        return "The server refused the connection: nothing answers at that host and port."
    if isinstance(exc, socket.gaierror):
        return f"The server's name could not be looked up ({text})."
    if isinstance(exc, EOFError | ConnectionResetError | BrokenPipeError):
        return "The server closed the connection unexpectedly."
    if isinstance(exc, OSError):
        return f"The connection failed: {text or type(exc).__name__}."
    return f"{type(exc).__name__}: {text}"


def connect_in(path: str, open_connection: Callable) -> Callable:
    """`open_connection`, then change to the exchange directory."""

    def connect_to_path():
        transport = open_connection()
        try:
            transport.cwd(path)
        except BaseException:
            transport.close()
            raise
        return transport

    return connect_to_path


def lock_text(lock: str, run_label: str) -> bytes:
    direction = "import" if lock == READ_LOCK else "export"
    return (
        f"This is a lock file of the datacenter CDS {direction}.\nhost={HOST}\n"
        f"pid={os.getpid()}\nrun={run_label}\ntime={datetime.now(UTC).isoformat()}\n"
    ).encode()


def lock_record(server: str, run_label: str, token: str) -> dict:
    return {
        "server": server,
        "host": HOST,
        "pid": os.getpid(),
        "run": run_label,
        "token": token,
        "time": datetime.now(UTC).isoformat(),
    }


def lock_in_the_way(
    transport, store: FileStore, server: str, lease: float, claimed: bool, own: str
) -> str | None:
    """The name of a lock that keeps us from taking the lock `own`, after removing a stale
    one of our own. The other direction's lock is always respected."""
    other = WRITE_LOCK if own == READ_LOCK else READ_LOCK
    try:
        names = {entry.raw for entry in transport.list(with_links=False)}
    except UnlistableFolder as exc:
        log.info("The folder cannot be listed (%s); the lock files are asked for by name.", exc)
        names = {lock.encode() for lock in (own, other) if transport.exists(lock.encode())}
    if other.encode() in names:
        return other
    record = store.lock_record(own)
    if record is not None and record.get("server", server) != server:
        record = None  # a lock we held on another server, before the source was changed
    if own.encode() in names:
        stale = record is not None and stale_record(record, lease, claimed)
        if not stale:
            return own
        log.warning("Removing a stale lock file of our own: %s (%s)", own, stale)
        transport.delete(own.encode())
    if record is not None:
        with spool_errors():
            store.remove_lock_record(own)
    return None


def stale_record(record: dict, lease: float, claimed: bool) -> str | None:
    """Why our recorded lock is stale, or None while the run that wrote it may still go."""
    owner = (
        f"written by host {record.get('host')}, process {record.get('pid')}, "
        f"run {record.get('run')}"
    )
    if claimed:
        return f"{owner}, whose claim on the source has ended"
    if record.get("host") == HOST and record.get("pid") == os.getpid():
        if record.get("token") not in ACTIVE_LOCKS:
            return f"{owner}, which has ended"
        return None
    if died_on_this_host(record.get("host"), record.get("pid")):
        return f"{owner}, which is no longer running"
    try:
        age = (datetime.now(UTC) - datetime.fromisoformat(record["time"])).total_seconds()
    except (KeyError, TypeError, ValueError):
        return f"{owner}, a record that tells no time"
    if age > lease:
        return f"{owner} {age:.0f} s ago, longer than the lease"
    return None


class LockRefused(PermanentError):
    """The server refused our lock file: no lock of ours is there."""


def create_lock(
    transport, store: FileStore, lock: str, server: str, run_label: str, token: str
) -> None:
    """Take the lock `lock` on the server, recorded in the spool first: a run killed between
    the two leaves a record of a lock that may be there, never a lock nobody knows is ours.
    Raises LockRefused when the server refused it (then neither lock nor record is there),
    or a broken connection's error (then it may be there)."""
    log.info("Creating lock file: %s", lock)
    with spool_errors():
        store.write_lock_record(lock, lock_record(server, run_label, token))
    ACTIVE_LOCKS.add(token)
    try:
        transport.store(lock.encode(), BytesIO(lock_text(lock, run_label)))
    except SERVER_ERRORS as exc:
        log.error("The server refused to create the lock file %s: %s", lock, exc)
        with spool_errors():
            store.remove_lock_record(lock)
        raise LockRefused(exc) from exc
    log.info("Lock file successfully created: %s", lock)


def remove_lock(transport, reconnect: Callable, store: FileStore, lock: str) -> str | None:
    """Remove our lock `lock`, on a new connection when `transport` is None or broken.
    Returns None once the server confirmed it, else why the lock may stay on the server
    (the spool's record of it stays too, so that the next run knows it is ours)."""
    log.info("Removing lock file: %s", lock)
    left = None
    try:
        if transport is None:
            raise ConnectionError("no usable connection")
        transport.delete(lock.encode())
    except SERVER_ERRORS as exc:
        left = f"the server refused to remove it: {exc}"
    except CONNECTION_ERRORS:
        transport = _close(transport)
        left = _remove_anew(reconnect, lock)
    _close(transport)
    if left:
        log.error("Could not remove lock file %s: %s", lock, left)
        return left
    try:
        store.remove_lock_record(lock)
    except OSError:
        log.exception("Could not remove the lock record in the spool.")
    log.info("Lock file successfully removed: %s", lock)
    return None


def _remove_anew(reconnect: Callable, lock: str) -> str | None:
    """Remove `lock` on a new connection, after a broken one may or may not have removed
    it; None once the server confirmed that it is gone, else why it may stay."""
    transport = None
    try:
        transport = reconnect()
        try:
            transport.delete(lock.encode())
        except SERVER_ERRORS as exc:
            # Refused, or removed already by the broken connection: only a listing tells.
            try:
                listed = {entry.raw for entry in transport.list(with_links=False)}
            except UnlistableFolder:
                return f"the server refused to remove it ({exc}) and cannot list the folder"
            if lock.encode() in listed:
                return f"the server refused to remove it: {exc}"
        return None
    except (*SERVER_ERRORS, *CONNECTION_ERRORS) as exc:
        return f"no new connection removed it: {type(exc).__name__}: {exc}"
    finally:
        _close(transport)


def _close(transport) -> None:
    if transport is not None:
        transport.close()


def name_problem(name: str) -> str | None:
    """Why a file name (from the server, or to be sent there) cannot be used, or None."""
    if not name or name in {".", ".."}:
        return "not a file name"
    if "/" in name or "\\" in name:
        return "the name contains a path separator"
    if any(ord(char) < 32 or ord(char) == 127 for char in name):
        return "the name contains control characters"
    if name.startswith("."):
        return "hidden file"
    if name in (READ_LOCK, WRITE_LOCK):
        return "it is the name of a CDS lock file, which would lock the exchange"
    if len(name.encode()) > MAX_NAME_BYTES:
        return f"the name is longer than {MAX_NAME_BYTES} bytes"
    return None
