"""The Content Drehscheibe (CDS) protocol: pulling a partner's files from FTP into a spool.

One FTP directory per exchange. A writer holds a file named ``write`` while it uploads, a reader
a file named ``read`` while it downloads; whoever finds either backs off until the next run.

Nothing is lost on the way: a file is downloaded to a hidden partial name in ``tmp/``, synced to
disk and checked against the size the server lists; only then does it get its name in ``tmp/``
(with a journal of where it came from), is removed on the server and moved to ``new/``. A run
that dies anywhere is repaired by the next one: partial downloads are discarded, and complete ones
finish their journey without being downloaded twice.
"""

import functools
import logging
import os
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from io import BytesIO

from datacenter.processes import HOST, died_on_this_host

from .fetch import FileOutcome, SpoolError, fetch, finish_journeys, repair, spool_errors
from .spool import FileStore
from .transports import (
    CONNECTION_ERRORS,
    SERVER_ERRORS,
    PermanentError,
    RemoteEntry,
    TemporaryError,
    open_transport,
)

__all__ = ["FileOutcome", "PermanentError", "TemporaryError", "import_", "name_problem"]

log = logging.getLogger("imports.cds")

SUCCESS, NOTHING, LOCKED, FAILED = "success", "nothing", "locked", "failed"
READ_LOCK, WRITE_LOCK = "read", "write"
LOCK_NAMES = {READ_LOCK.encode(), WRITE_LOCK.encode()}
MAX_NAME_BYTES = 240  # leaves room for the hidden partial name of a download
# Lock records of the import_ calls running in this process: a long-lived worker outlives
# its runs, so its process id alone does not say that a run is still going.
_ACTIVE_LOCKS: set[str] = set()


@dataclass
class ImportResult:
    status: str = SUCCESS
    files: list[FileOutcome] = field(default_factory=list)
    error: str = ""
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


def import_(
    store_dir: str,
    host: str,
    port: int,
    user: str,
    password: str,
    path: str,
    *,
    protocol: str = "ftp",
    ca_file: str | None = None,
    timeout: float = 30,
    passive: bool = True,
    parallel: int = 4,
    stable_after: float | None = None,
    stability_interval: float = 2,
    lock_lease: float = 3600,
    claimed: bool = False,
    run_label: str = "",
    progress: Callable[[int, int], None] | None = None,
    on_file: Callable[[FileOutcome], None] | None = None,
) -> ImportResult:
    """Import every new file of the CDS directory `path` into the spool at `store_dir`.

    `protocol` is ``ftp`` or ``ftps`` (explicit TLS, verified against `ca_file` or the
    system's CAs). `timeout` bounds every network operation, in seconds. Up to `parallel`
    connections transfer files at once under the one lock (fetch.py). With `stable_after`
    (seconds), a file is taken only when its size did not change across two listings
    `stability_interval` seconds apart and it is at least that old, for partners that do not
    hold ``write`` while uploading.

    Whether a ``read`` lock on the server is our own is known from the spool's lock record
    only. Ours is stale when its process is gone (this host), older than `lock_lease` seconds
    (another host), or at once when the caller holds the source's claim (`claimed`), since
    then no other run of ours can be going. `progress(done, total)` is called after each
    file, `on_file(outcome)` as soon as a file is delivered, failed or skipped; both may be
    called from the threads of the transfer connections.
    """
    log.info("Starting import.")
    result = ImportResult(on_file=on_file)
    store = FileStore(store_dir)
    try:
        with spool_errors():
            store.prepare()
    except SpoolError as exc:
        log.error("Could not write to the spool: %s", exc)
        return _failed(result, exc)
    log.info("Accessed filestore %s", store_dir)
    log.info(
        "Connecting to CDS FTP server (host %s, port %s, user %s, dir %s)", host, port, user, path
    )
    server = f"{protocol}://{user}@{host}:{port}/{path.lstrip('/')}"

    connect = functools.partial(
        open_transport,
        protocol,
        host,
        port,
        user,
        password,
        timeout=timeout,
        passive=passive,
        ca_file=ca_file,
    )
    reconnect = connect_in(path, connect)

    try:
        transport = connect()
    except ssl.SSLCertVerificationError as exc:
        log.error(
            "The server's TLS certificate did not verify (%s); no password was sent.",
            exc.verify_message,
        )
        return _failed(result, exc)
    except (*SERVER_ERRORS, *CONNECTION_ERRORS) as exc:
        log.error("Could not connect to CDS FTP server.")
        return _failed(result, exc)

    token = uuid.uuid4().hex
    locked = False
    try:
        transport.cwd(path)
        lock = _lock_in_the_way(transport, store, server, lock_lease, claimed)
        if lock:
            log.info("Cannot access CDS FTP server as '%s' lockfile exists.", lock)
            transport.close()
            log.warning("Exiting.")
            result.status = LOCKED
            return result
        log.info("Creating lock file: %s", READ_LOCK)
        with spool_errors():
            store.write_lock_record(READ_LOCK, _lock_record(server, run_label, token))
        _ACTIVE_LOCKS.add(token)
        locked = True
        transport.store(READ_LOCK.encode(), BytesIO(_lock_text(run_label)))
        log.info("Lock file successfully created: %s", READ_LOCK)
        with spool_errors():
            journeys = repair(store)
        listing = transport.list()
        finish_journeys(transport, store, journeys, listing, result.add)
        candidates = _importable(listing, result)
        if stable_after is not None and candidates:
            candidates = _stable(transport, candidates, stable_after, stability_interval, result)
        if not candidates:
            log.info("No new files to import.")
        else:
            if progress:
                progress(0, len(candidates))
            errors = fetch(
                candidates,
                transport,
                reconnect,
                store,
                _reporter(result, len(candidates), progress),
                parallel=parallel,
            )
            if errors:
                raise errors[0]
    except (SpoolError, *SERVER_ERRORS, *CONNECTION_ERRORS) as exc:
        if isinstance(exc, SpoolError):
            log.error("Could not write to the spool: %s", exc)
        else:
            log.error("Error accessing FTP server.")
        transport.close()
        if locked:
            # A transfer may have been cut off half-way: the old connection cannot be trusted
            # to answer the next command, so the lock goes on a new one.
            _remove_lock(None, reconnect, store)
            log.info("Disconnected from CDS FTP server")
        return _failed(result, exc)
    finally:
        _ACTIVE_LOCKS.discard(token)

    _remove_lock(transport, reconnect, store)
    log.info("Disconnected from CDS FTP server")
    failed = [file for file in result.files if file.outcome == "failed"]
    if failed:
        result.status = FAILED
        result.error = f"{len(failed)} file(s) could not be imported and stay on the server."
        log.error("Exiting with errors: %s", result.error)
    else:
        result.status = SUCCESS if result.delivered else NOTHING
        log.info("Exiting with success.")
    return result


def _failed(result: ImportResult, exc: BaseException) -> ImportResult:
    log.error("Exiting with exception:", exc_info=exc)
    result.status = FAILED
    result.error = f"{type(exc).__name__}: {exc}"
    return result


# Locks


def _lock_text(run_label: str) -> bytes:
    return (
        f"This is a lock file of the datacenter CDS import.\nhost={HOST}\n"
        f"pid={os.getpid()}\nrun={run_label}\ntime={datetime.now(UTC).isoformat()}\n"
    ).encode()


def _lock_record(server: str, run_label: str, token: str) -> dict:
    return {
        "server": server,
        "host": HOST,
        "pid": os.getpid(),
        "run": run_label,
        "token": token,
        "time": datetime.now(UTC).isoformat(),
    }


def _lock_in_the_way(transport, store: FileStore, server: str, lease: float, claimed: bool):
    """The name of a lock that keeps us out, after removing a stale one of our own."""
    names = {entry.raw for entry in transport.list(with_links=False)}
    if WRITE_LOCK.encode() in names:
        return WRITE_LOCK
    record = store.lock_record(READ_LOCK)
    if record is not None and record.get("server", server) != server:
        record = None  # a lock we held on another server, before the source was changed
    if READ_LOCK.encode() in names:
        stale = record is not None and _stale_record(record, lease, claimed)
        if not stale:
            return READ_LOCK
        log.warning("Removing a stale lock file of our own: %s (%s)", READ_LOCK, stale)
        transport.delete(READ_LOCK.encode())
    if record is not None:
        with spool_errors():
            store.remove_lock_record(READ_LOCK)
    return None


def _stale_record(record: dict, lease: float, claimed: bool) -> str | None:
    """Why our recorded lock is stale, or None while the run that wrote it may still go."""
    owner = (
        f"written by host {record.get('host')}, process {record.get('pid')}, "
        f"run {record.get('run')}"
    )
    if claimed:
        return f"{owner}, whose claim on the source has ended"
    if record.get("host") == HOST and record.get("pid") == os.getpid():
        if record.get("token") not in _ACTIVE_LOCKS:
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


def _remove_lock(transport, reconnect: Callable, store: FileStore) -> None:
    """Remove our ``read`` lock; on a new connection when `transport` is None or broken."""
    log.info("Removing lock file: %s", READ_LOCK)
    try:
        if transport is None:
            raise ConnectionError("no usable connection")
        transport.delete(READ_LOCK.encode())
    except (*SERVER_ERRORS, *CONNECTION_ERRORS):
        if transport is not None:
            transport.close()
        try:
            transport = None
            transport = reconnect()
            # The broken connection may have removed it.
            if READ_LOCK.encode() in {entry.raw for entry in transport.list(with_links=False)}:
                transport.delete(READ_LOCK.encode())
        except (*SERVER_ERRORS, *CONNECTION_ERRORS):
            if transport is not None:
                transport.close()
            log.exception("Could not remove lock file: %s", READ_LOCK)
            return  # the record stays, so that the next run knows the lock is ours
    try:
        store.remove_lock_record(READ_LOCK)
    except OSError:
        log.exception("Could not remove the lock record in the spool.")
    log.info("Lock file successfully removed: %s", READ_LOCK)
    transport.close()


# Listing


def name_problem(name: str) -> str | None:
    """Why a file name from the server cannot be used, or None."""
    if not name or name in {".", ".."}:
        return "not a file name"
    if "/" in name or "\\" in name:
        return "the name contains a path separator"
    if any(ord(char) < 32 or ord(char) == 127 for char in name):
        return "the name contains control characters"
    if name.startswith("."):
        return "hidden file"
    if len(name.encode()) > MAX_NAME_BYTES:
        return f"the name is longer than {MAX_NAME_BYTES} bytes"
    return None


def _importable(listing: list[RemoteEntry], result: ImportResult) -> list[RemoteEntry]:
    """The regular files to import, by name; every other entry is logged and skipped."""
    candidates = []
    for remote in sorted(listing, key=lambda entry: entry.name):
        if remote.raw in LOCK_NAMES or remote.raw in {b".", b".."}:
            continue
        reason = name_problem(remote.name)
        if not reason and remote.kind != "file":
            reason = {"dir": "a folder", "link": "a symbolic link"}.get(remote.kind, "not a file")
        if reason:
            log.info("Skipping %r: %s.", remote.name, reason)
            result.add(FileOutcome(remote.name, remote.size, "skipped", reason=reason))
            continue
        candidates.append(remote)
    return candidates


def _stable(transport, candidates, stable_after, interval, result) -> list[RemoteEntry]:
    """The candidates whose size stayed the same over `interval` and that are old enough."""
    time.sleep(interval)
    again = {remote.raw: remote for remote in transport.list(with_links=False)}
    now = datetime.now(UTC)
    stable = []
    for remote in candidates:
        later = again.get(remote.raw)
        reason = None
        if later is None or later.size != remote.size:
            reason = "still being written (its size changed)"
        elif remote.modify and _age(remote.modify, now) < stable_after:
            reason = f"younger than {stable_after:g} s"
        if reason:
            log.info("Skipping %r for now: %s.", remote.name, reason)
            result.add(FileOutcome(remote.name, remote.size, "skipped", reason=reason))
        else:
            stable.append(remote)
    return stable


def _age(modify: str, now: datetime) -> float:
    try:
        changed = datetime.strptime(modify[:14], "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        return float("inf")
    return (now - changed).total_seconds()


def connect_in(path: str, connect: Callable) -> Callable:
    """`connect`, then change to the exchange directory."""

    def connect_to_path():
        transport = connect()
        try:
            transport.cwd(path)
        except BaseException:
            transport.close()
            raise
        return transport

    return connect_to_path


def _reporter(result: ImportResult, total: int, progress) -> Callable[[FileOutcome], None]:
    """What the transfer connections call for each file: one at a time into the result."""
    lock = threading.Lock()
    done = 0

    def report(outcome: FileOutcome) -> None:
        nonlocal done
        with lock:
            result.add(outcome)
            done += 1
            if progress:
                progress(done, total)

    return report
