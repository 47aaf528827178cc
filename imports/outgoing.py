"""The export direction of the CDS protocol: our files into the partner's directory.

Files to send wait in the ``new/`` folder of an outgoing spool (tmp/new/cur, Maildir style: a
program writes into ``tmp/`` and moves the complete file to ``new/``). A run takes the
``write`` lock when neither ``read`` nor ``write`` is on the server, and sends the files one
after the other on one connection: each is uploaded under a hidden temporary name, its size
checked on the server, renamed to its name (never over a file that is there), and moved
locally to ``cur/``.

Nothing is half-written where the partner looks, and nothing is sent twice: before the upload
and before the rename, the spool records which file is on its way and how far it got. A run
that dies anywhere leaves that record, and the next run finishes from it: it removes a
temporary file left on the server, and a file renamed on the server but still in ``new/``
goes to ``cur/`` instead of being sent again. A file that fails alone stays in ``new/`` for the
next run.
"""

import contextlib
import hashlib
import logging
import os
from collections.abc import Callable

from .fetch import FileOutcome, SpoolError, TransferError, spool_errors
from .protocol import (
    NOTHING,
    WRITE_LOCK,
    RunResult,
    name_problem,
    run_under_lock,
)
from .spool import FileStore
from .transports import (
    CONNECTION_ERRORS,
    SERVER_ERRORS,
    ConnectionSettings,
    PermanentError,
    UnlistableFolder,
)

log = logging.getLogger("imports.cds")

UPLOAD_RECORD = "upload"
TAKEN = "a file of this name is on the server, and it is never replaced"
UPLOADING, RENAMING = "uploading", "renaming"


class ExportResult(RunResult):
    """What an export run did."""


class NameTaken(Exception):
    """The name of a file to send is taken on the server."""


def export_(
    store_dir: str, host: str, port: int, user: str, password: str, path: str, **options
) -> ExportResult:
    """Send every file of the outgoing spool's ``new/`` at `store_dir` to the CDS directory
    `path` on the server at `host`, as import_ is called; `options` are ConnectionSettings'
    and export_to's."""
    connection, options = ConnectionSettings.among(host, port, user, password, options)
    return export_to(store_dir, connection, path, **options)


def export_to(
    store_dir: str,
    connection: ConnectionSettings,
    path: str,
    *,
    lock_lease: float = 3600,
    claimed: bool = False,
    run_label: str = "",
    progress: Callable[[int, int], None] | None = None,
    on_file: Callable[[FileOutcome], None] | None = None,
) -> ExportResult:
    """Send every file of the outgoing spool's ``new/`` at `store_dir` to the CDS directory
    `path` on the server of `connection`, and move each one sent to ``cur/``.

    The lock handling (`lock_lease`, `claimed`) is import_from's, for the ``write`` lock.
    Without files to send (and nothing of an earlier run to finish), the server is not
    contacted. `progress(done, total)` is called after each file, `on_file(outcome)` as soon
    as a file is sent, failed or skipped.
    """
    log.info("Starting export.")
    result = ExportResult(on_file=on_file)
    store = FileStore(store_dir)
    try:
        with spool_errors():
            store.prepare()
            waiting = _exportable(store, result)
            unfinished = (
                store.record(UPLOAD_RECORD) is not None
                or store.lock_record(WRITE_LOCK) is not None
            )
    except SpoolError as exc:
        log.error("Could not read the outgoing spool: %s", exc)
        return result.fail(exc)
    log.info("Accessed filestore %s", store_dir)
    if not waiting and not unfinished:
        log.info("No new files to export.")
        log.info("Exiting with success.")
        result.status = NOTHING
        return result

    def work(transport, reconnect) -> None:
        finished = _finish_upload(transport, store, result)
        to_send = [name for name in waiting if name != finished]
        if not to_send:
            log.info("No new files to export.")
            return
        try:
            on_server = {entry.raw for entry in transport.list(with_links=False)}
        except UnlistableFolder as exc:
            log.info("The folder cannot be listed (%s); each name is asked for alone.", exc)
            on_server = set()
        for done, name in enumerate(to_send, 1):
            _upload(transport, store, name, on_server, result)
            if progress:
                progress(done, len(to_send))

    return run_under_lock(
        result,
        store,
        WRITE_LOCK,
        work,
        connection=connection,
        path=path,
        lock_lease=lock_lease,
        claimed=claimed,
        run_label=run_label,
        failed_files="could not be exported and stay in new/.",
    )


def _exportable(store: FileStore, result: ExportResult) -> list[str]:
    """The names in ``new/`` to send, in order; names no server could take are logged and
    recorded as skipped."""
    names = []
    for path in store.list("new"):
        name = os.path.basename(path)
        reason = name_problem(name)
        if reason:
            log.info("Skipping %r: %s.", name, reason)
            result.add(FileOutcome(name, None, "skipped", reason=reason))
            continue
        names.append(name)
    return names


def temporary_name(raw: bytes) -> bytes:
    """The hidden name a file is uploaded under, which partners skip as CDS asks."""
    return b"." + raw + b".part"


class _HashingReader:
    """The source of an upload: reads the local file, hashing."""

    def __init__(self, handle):
        self.handle = handle
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        with spool_errors():
            chunk = self.handle.read(size)
        self.digest.update(chunk)
        return chunk


def _upload(transport, store: FileStore, name: str, on_server: set[bytes], result) -> None:
    """Send ``new/NAME`` and move it to ``cur/``. A refusal of the server fails this file
    alone (it stays in ``new/``); a broken connection or spool ends the run."""
    log.info("Uploading: %s", name)
    raw = name.encode()
    temp = temporary_name(raw)
    with spool_errors():
        local = store.path_of("new", name)
        size = os.path.getsize(local)
    outcome = FileOutcome(name, size, "failed", local_name=name)
    if raw in on_server:
        outcome.reason = TAKEN
        log.error("Could not upload %s: %s; it stays in new/.", name, outcome.reason)
        result.add(outcome)
        return
    record = {"name": name, "raw": raw.hex(), "temp": temp.hex(), "size": size}
    with spool_errors():
        store.write_record(UPLOAD_RECORD, {**record, "phase": UPLOADING})
    try:
        with _open_local(local) as handle:
            reader = _HashingReader(handle)
            transport.store(temp, reader)
        on_the_server = transport.size(temp)
        if on_the_server != size:
            raise TransferError(f"the server has {on_the_server} of {size} bytes")
        # A file of the partner's is never replaced, also in a folder that cannot be listed
        # (FTP's rename would replace it): the name is proved free under our lock first.
        if transport.exists(raw):
            raise NameTaken(TAKEN)
        with spool_errors():
            store.write_record(UPLOAD_RECORD, {**record, "phase": RENAMING})
        transport.rename(temp, raw)
    except (*SERVER_ERRORS, TransferError, NameTaken) as exc:
        outcome.reason = str(exc) or type(exc).__name__
        log.error("Could not upload %s (%s); it stays in new/.", name, outcome.reason)
        # Absent, or the connection is gone: the next upload of the file starts anew.
        with contextlib.suppress(*SERVER_ERRORS, *CONNECTION_ERRORS):
            transport.delete(temp)
        with spool_errors():
            store.remove_record(UPLOAD_RECORD)
        result.add(outcome)
        return
    log.info("File stored on server: %s", name)
    on_server.add(raw)
    outcome.outcome, outcome.sha256 = "delivered", reader.digest.hexdigest()
    _archive(store, name)
    result.add(outcome)


def _open_local(path: str):
    with spool_errors():
        return open(path, "rb")


def _archive(store: FileStore, name: str) -> None:
    with spool_errors():
        final = store.archive(name)
        store.remove_record(UPLOAD_RECORD)
    if final == name:
        log.info("Moved from 'new' to 'cur': %s", name)
    else:
        log.info("Moved from 'new' to 'cur': %s (as %s)", name, final)


def _finish_upload(transport, store: FileStore, result: ExportResult) -> str | None:
    """Finish what a run that died left of its upload: a temporary file on the server is
    removed (the file is sent again); a file renamed on the server goes to ``cur/``, and
    its name is returned."""
    with spool_errors():
        record = store.record(UPLOAD_RECORD)
    if record is None:
        return None
    name, delivered = record.get("name", ""), None
    if not {"name", "raw", "temp", "size", "phase"} <= record.keys():
        log.warning("Dropped an unreadable record of an earlier upload.")
    elif _removed(transport, bytes.fromhex(record["temp"])):
        log.warning("Removed an upload an earlier run left unfinished: %s", name)
    elif (
        record["phase"] == RENAMING
        and _size(transport, bytes.fromhex(record["raw"])) == record["size"]
    ):
        log.info("Completed the export of an earlier run: %s", name)
        if os.path.exists(store.path_of("new", name)):
            _archive(store, name)
        delivered = name
        result.add(
            FileOutcome(
                name,
                record["size"],
                "delivered",
                local_name=name,
                reason="completed the export of an earlier run",
            )
        )
    with spool_errors():
        store.remove_record(UPLOAD_RECORD)
    return delivered


def _removed(transport, raw: bytes) -> bool:
    """Remove `raw` on the server; whether it was there."""
    try:
        transport.delete(raw)
    except PermanentError:
        return False
    return True


def _size(transport, raw: bytes) -> int | None:
    try:
        return transport.size(raw)
    except PermanentError:
        return None
