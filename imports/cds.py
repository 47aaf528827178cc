"""The Content Drehscheibe (CDS) protocol: pulling a partner's files from FTP into a spool.

One FTP directory per exchange. A writer holds a file named ``write`` while it uploads, a reader
a file named ``read`` while it downloads; whoever finds either backs off until the next run.

Nothing is lost on the way: a file is downloaded to a hidden partial name in ``tmp/``, synced to
disk and checked against the size the server lists; only then does it get its name in ``tmp/``
(with a journal of where it came from), is removed on the server and moved to ``new/``. A run
that dies anywhere is repaired by the next one: partial downloads are discarded, and complete ones
finish their journey without being downloaded twice.
"""

import ftplib
import hashlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from io import BytesIO

from .spool import FileStore

log = logging.getLogger("imports.cds")

SUCCESS, NOTHING, LOCKED, FAILED = "success", "nothing", "locked", "failed"
READ_LOCK, WRITE_LOCK = "read", "write"
LOCK_MARKER = "Written by the datacenter CDS import."
CHUNK_SIZE = 64 * 1024
PARTIAL = re.compile(r"^\.(?P<name>.+)\.part$")
JOURNAL = re.compile(r"^\.(?P<name>.+)\.journal$")
UNIX_LIST_LINE = re.compile(
    r"^(?P<kind>[-dlcbps])\S{9}\S*\s+\d+\s+\S+\s+\S+\s+(?P<size>\d+)\s+"
    r"\w{3}\s+\d{1,2}\s+[\d:]{4,5}\s(?P<name>.+)$"
)
CONNECTION_ERRORS = (OSError, EOFError)


class PermanentError(Exception):
    """A permanent (5xx) reply of the FTP server."""


class TemporaryError(Exception):
    """A temporary (4xx) reply of the FTP server."""


class TransferError(Exception):
    """A download that did not arrive complete."""


SERVER_ERRORS = (PermanentError, TemporaryError, ftplib.Error, TransferError)


@dataclass
class RemoteFile:
    name: str
    size: int | None
    modify: str | None = None
    kind: str = "file"  # file, dir, link or other


@dataclass
class FileOutcome:
    name: str
    size: int | None
    outcome: str  # delivered, failed or skipped
    local_name: str = ""
    sha256: str = ""
    reason: str = ""


@dataclass
class ImportResult:
    status: str = SUCCESS
    files: list[FileOutcome] = field(default_factory=list)
    error: str = ""

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
    timeout: float = 30,
    passive: bool = True,
    encoding: str = "utf-8",
    stable_after: float | None = None,
    stability_interval: float = 2,
    lock_lease: float = 3600,
    run_label: str = "",
    progress: Callable[[int, int], None] | None = None,
) -> ImportResult:
    """Import every new file of the CDS directory `path` into the spool at `store_dir`.

    `timeout` bounds every network operation, in seconds. `encoding` is the server's for file
    names (latin-1 for old servers). With `stable_after` (seconds), a file is taken only when
    its size did not change across two listings `stability_interval` seconds apart and it is at
    least that old, for partners that do not hold ``write`` while uploading. A ``read`` lock of
    our own older than `lock_lease` seconds, or left by a dead process of this host, is
    removed. `progress(done, total)` is called after each file.
    """
    log.info("Starting import.")
    store = FileStore(store_dir)
    store.prepare()
    log.info("Accessed filestore %s", store_dir)
    journeys = _repair_spool(store)
    log.info(
        "Connecting to CDS FTP server (host %s, port %s, user %s, dir %s)", host, port, user, path
    )
    result = ImportResult()

    def connect() -> ftplib.FTP:
        return _connect(host, port, user, password, timeout, passive, encoding)

    try:
        ftp = connect()
    except (*SERVER_ERRORS, *CONNECTION_ERRORS) as exc:
        log.error("Could not connect to CDS FTP server.")
        return _failed(result, exc)

    locked = False
    try:
        with _server_errors():
            ftp.cwd(path)
            lock = _lock_in_the_way(ftp, lock_lease)
            if lock:
                log.info("Cannot access CDS FTP server as '%s' lockfile exists.", lock)
                _close(ftp)
                log.warning("Exiting.")
                result.status = LOCKED
                return result
            log.info("Creating lock file: %s", READ_LOCK)
            ftp.storbinary(f"STOR {READ_LOCK}", BytesIO(_lock_text(run_label)))
            locked = True
            log.info("Lock file successfully created: %s", READ_LOCK)
            listing = _listing(ftp, with_links=True)
            _finish_journeys(ftp, store, journeys, listing, result)
            candidates = _importable(listing, result)
            if stable_after is not None and candidates:
                candidates = _stable(ftp, candidates, stable_after, stability_interval, result)
            if not candidates:
                log.info("No new files to import.")
            elif progress:
                progress(0, len(candidates))
            for done, remote in enumerate(candidates, start=1):
                _import_file(ftp, store, remote, result)
                if progress:
                    progress(done, len(candidates))
    except (*SERVER_ERRORS, *CONNECTION_ERRORS) as exc:
        log.error("Error accessing FTP server.")
        if locked:
            _remove_lock(ftp, connect, path)
            log.info("Disconnected from CDS FTP server")
        else:
            _close(ftp)
        return _failed(result, exc)

    _remove_lock(ftp, connect, path)
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


class _server_errors:
    """Raise the server's error replies as PermanentError and TemporaryError."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, traceback):
        if isinstance(exc, ftplib.error_perm):
            raise PermanentError(str(exc)) from exc
        if isinstance(exc, ftplib.error_temp):
            raise TemporaryError(str(exc)) from exc
        return False


def _connect(host, port, user, password, timeout, passive, encoding) -> ftplib.FTP:
    ftp = ftplib.FTP(timeout=timeout, encoding=encoding)
    try:
        with _server_errors():
            ftp.connect(host, int(port))
            ftp.login(user, password)
    except BaseException:
        ftp.close()
        raise
    ftp.set_pasv(passive)
    return ftp


def _close(ftp: ftplib.FTP) -> None:
    try:
        ftp.quit()
    except (*SERVER_ERRORS, *CONNECTION_ERRORS):
        ftp.close()


# Locks


def _lock_text(run_label: str) -> bytes:
    return (
        f"This is a lock file.\n{LOCK_MARKER}\nhost={socket.gethostname()}\n"
        f"pid={os.getpid()}\nrun={run_label}\ntime={datetime.now(UTC).isoformat()}\n"
    ).encode()


def _lock_in_the_way(ftp: ftplib.FTP, lease: float) -> str | None:
    """The name of a lock that keeps us out, after removing a stale one of our own."""
    names = {remote.name for remote in _listing(ftp, with_links=False)}
    if WRITE_LOCK in names:
        return WRITE_LOCK
    if READ_LOCK in names:
        stale = _stale_own_lock(ftp, lease)
        if not stale:
            return READ_LOCK
        log.warning("Removing a stale lock file of our own: %s (%s)", READ_LOCK, stale)
        ftp.delete(READ_LOCK)
    return None


def _stale_own_lock(ftp: ftplib.FTP, lease: float) -> str | None:
    """Why the ``read`` lock is ours and stale, or None when it must be respected."""
    chunks = []
    ftp.retrbinary(f"RETR {READ_LOCK}", chunks.append)
    text = b"".join(chunks)[:4096].decode("utf-8", "replace")
    if LOCK_MARKER not in text:
        return None
    fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    description = (
        f"host {fields.get('host')}, process {fields.get('pid')}, run {fields.get('run')}"
    )
    if fields.get("host") == socket.gethostname() and not _process_alive(fields.get("pid")):
        return f"written by {description}, which is no longer running"
    try:
        age = (datetime.now(UTC) - datetime.fromisoformat(fields["time"])).total_seconds()
    except (KeyError, ValueError):
        return None
    if age > lease:
        return f"written by {description} {age:.0f} s ago, longer than the lease"
    return None


def _process_alive(pid: str | None) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _remove_lock(ftp: ftplib.FTP, connect: Callable[[], ftplib.FTP], path: str) -> None:
    """Remove our ``read`` lock, on a new connection if the old one is broken."""
    log.info("Removing lock file: %s", READ_LOCK)
    try:
        ftp.delete(READ_LOCK)
    except (*SERVER_ERRORS, *CONNECTION_ERRORS):
        ftp.close()
        try:
            ftp = connect()
            ftp.cwd(path)
            if READ_LOCK in ftp.nlst():  # the broken connection may have removed it
                ftp.delete(READ_LOCK)
        except (*SERVER_ERRORS, *CONNECTION_ERRORS):
            ftp.close()
            log.exception("Could not remove lock file: %s", READ_LOCK)
            return
    log.info("Lock file successfully removed: %s", READ_LOCK)
    _close(ftp)


# Listing


def _listing(ftp: ftplib.FTP, with_links: bool) -> list[RemoteFile]:
    """The entries of the current directory: MLSD where the server has it, LIST otherwise.

    Many MLSD servers describe a symbolic link as the file it points to; with `with_links`, a
    LIST tells which entries are links.
    """
    try:
        with _server_errors():
            facts = list(ftp.mlsd(facts=["type", "size", "modify"]))
    except PermanentError:
        return _list(ftp)
    entries = [
        RemoteFile(
            name,
            int(fact["size"]) if fact.get("size", "").isdigit() else None,
            fact.get("modify"),
            _mlsd_kind(fact.get("type", "")),
        )
        for name, fact in facts
    ]
    if with_links:
        links = {entry.name for entry in _list(ftp) if entry.kind == "link"}
        for entry in entries:
            if entry.name in links:
                entry.kind = "link"
    return entries


def _mlsd_kind(fact: str) -> str:
    fact = fact.lower()
    if fact.startswith("os.unix=slink"):
        return "link"
    return {"file": "file", "dir": "dir", "cdir": "dir", "pdir": "dir"}.get(fact, "other")


def _list(ftp: ftplib.FTP) -> list[RemoteFile]:
    lines = []
    with _server_errors():
        ftp.retrlines("LIST", lines.append)
    entries = []
    for line in lines:
        match = UNIX_LIST_LINE.match(line)
        if not match:
            continue
        kind = {"-": "file", "d": "dir", "l": "link"}.get(match["kind"], "other")
        name = match["name"].split(" -> ", 1)[0] if kind == "link" else match["name"]
        entries.append(RemoteFile(name, int(match["size"]), None, kind))
    return entries


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
    return None


def _importable(listing: list[RemoteFile], result: ImportResult) -> list[RemoteFile]:
    """The regular files to import, by name; every other entry is logged and skipped."""
    candidates = []
    for remote in sorted(listing, key=lambda entry: entry.name):
        if remote.name in {READ_LOCK, WRITE_LOCK, ".", ".."}:
            continue
        reason = name_problem(remote.name)
        if not reason and remote.kind != "file":
            reason = {"dir": "a folder", "link": "a symbolic link"}.get(remote.kind, "not a file")
        if reason:
            log.info("Skipping %r: %s.", remote.name, reason)
            result.files.append(FileOutcome(remote.name, remote.size, "skipped", reason=reason))
            continue
        candidates.append(remote)
    return candidates


def _stable(ftp, candidates, stable_after, interval, result) -> list[RemoteFile]:
    """The candidates whose size stayed the same over `interval` and that are old enough."""
    time.sleep(interval)
    again = {remote.name: remote for remote in _listing(ftp, with_links=False)}
    now = datetime.now(UTC)
    stable = []
    for remote in candidates:
        later = again.get(remote.name)
        reason = None
        if later is None or later.size != remote.size:
            reason = "still being written (its size changed)"
        elif remote.modify and _age(remote.modify, now) < stable_after:
            reason = f"younger than {stable_after:g} s"
        if reason:
            log.info("Skipping %r for now: %s.", remote.name, reason)
            result.files.append(FileOutcome(remote.name, remote.size, "skipped", reason=reason))
        else:
            stable.append(remote)
    return stable


def _age(modify: str, now: datetime) -> float:
    try:
        changed = datetime.strptime(modify[:14], "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        return float("inf")
    return (now - changed).total_seconds()


# Moving files


def _import_file(ftp: ftplib.FTP, store: FileStore, remote: RemoteFile, result: ImportResult):
    """Download one file, remove it on the server and move it to ``new/``.

    A failure of this file alone (refused, cut short) leaves it on the server and no file in
    the spool; a lost connection ends the run.
    """
    name = remote.name
    log.info("Downloading: %s", name)
    local = store.free_name(name)
    if local != name:
        log.warning(
            "A file named %s is in the spool already; the new one is stored as %s.", name, local
        )
    outcome = FileOutcome(name, remote.size, "failed", local_name=local)
    result.files.append(outcome)
    try:
        outcome.sha256, outcome.size = _download(ftp, store, remote, local)
    except (*SERVER_ERRORS, *CONNECTION_ERRORS) as exc:
        outcome.reason = _reason(exc)
        log.error("Could not download %s (%s); it stays on the server.", name, outcome.reason)
        if isinstance(exc, CONNECTION_ERRORS):
            raise  # the control connection cannot be trusted any more
        return
    with _server_errors():
        ftp.delete(name)
    log.info("File removed on server: %s", name)
    _deliver(store, local)
    outcome.outcome = "delivered"


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _download(ftp, store: FileStore, remote: RemoteFile, local: str) -> tuple[str, int]:
    """Fetch `remote` into ``tmp/LOCAL`` with its journal; return its SHA-256 and size."""
    tmp = store.folder("tmp")
    partial = os.path.join(tmp, f".{local}.part")
    digest = hashlib.sha256()
    try:
        with open(partial, "wb") as handle:

            def write(chunk: bytes) -> None:
                handle.write(chunk)
                digest.update(chunk)

            with _server_errors():
                ftp.retrbinary(f"RETR {remote.name}", write, blocksize=CHUNK_SIZE)
            handle.flush()
            os.fsync(handle.fileno())
            received = handle.tell()
        expected = remote.size
        if expected is None:
            with _server_errors():
                expected = ftp.size(remote.name)
        if expected is not None and received != expected:
            raise TransferError(f"received {received} of {expected} bytes")
        journal = {"remote": remote.name, "size": received, "modify": remote.modify}
        with open(os.path.join(tmp, f".{local}.journal"), "w") as handle:
            json.dump(journal, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(partial, os.path.join(tmp, local))
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return digest.hexdigest(), received


def _deliver(store: FileStore, local: str) -> None:
    """Move a complete file from ``tmp/`` to ``new/`` and drop its journal."""
    final = store.free_name(local) if os.path.lexists(store.path_of("new", local)) else local
    if final != local:
        os.rename(store.path_of("tmp", local), store.path_of("tmp", final))
    store.move(final, "tmp", "new")
    journal = os.path.join(store.folder("tmp"), f".{local}.journal")
    if os.path.exists(journal):
        os.unlink(journal)
    log.info("Moved from 'tmp' to 'new': %s", final)


def _repair_spool(store: FileStore) -> list[tuple[str, dict]]:
    """Clean up after a run that died: discard partial downloads, deliver complete files
    without a journal, and return the complete ones whose journey on the server may need
    finishing, as (local name, journal)."""
    tmp = store.folder("tmp")
    journeys = []
    for name in sorted(os.listdir(tmp)):
        path = os.path.join(tmp, name)
        if match := PARTIAL.match(name):
            os.unlink(path)
            log.warning("Discarded a partial download of an earlier run: %s", match["name"])
        elif match := JOURNAL.match(name):
            if not os.path.exists(os.path.join(tmp, match["name"])):
                os.unlink(path)
        elif not name.startswith("."):
            journal = os.path.join(tmp, f".{name}.journal")
            if os.path.exists(journal):
                with open(journal) as handle:
                    journeys.append((name, json.load(handle)))
            else:
                _deliver(store, name)
    return journeys


def _finish_journeys(ftp, store, journeys, listing, result) -> None:
    """Finish deliveries of an earlier run that died before it removed the file on the
    server; the remote file is removed only when it is still the one we downloaded."""
    remote_by_name = {remote.name: remote for remote in listing}
    for local, journal in journeys:
        remote = remote_by_name.get(journal["remote"])
        if (
            remote is not None
            and remote.size == journal["size"]
            and (remote.modify is None or journal["modify"] in (None, remote.modify))
        ):
            with _server_errors():
                ftp.delete(remote.name)
            log.info("File removed on server: %s", remote.name)
            listing.remove(remote)
        _deliver(store, local)
        result.files.append(
            FileOutcome(
                journal["remote"],
                journal["size"],
                "delivered",
                local_name=local,
                reason="completed the delivery of an earlier run",
            )
        )
