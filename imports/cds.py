"""The Content Drehscheibe (CDS) protocol: pulling a partner's files from FTP into a spool.

One FTP directory per exchange. A writer holds a file named ``write`` while it uploads, a reader
a file named ``read`` while it downloads; whoever finds either backs off until the next run.

Nothing is lost on the way: a file is downloaded to a hidden partial name in ``tmp/``, synced to
disk and checked against the size the server lists; only then does it get its name in ``tmp/``
(with a journal of where it came from), is removed on the server and moved to ``new/``. A run
that dies anywhere is repaired by the next one: partial downloads are discarded, and complete ones
finish their journey without being downloaded twice.
"""

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from .fetch import FileOutcome, SpoolError, fetch, finish_journeys, repair, spool_errors
from .outgoing import ExportResult, export_, export_to
from .protocol import (
    FAILED,
    LOCK_NAMES,
    LOCKED,
    NOTHING,
    READ_LOCK,
    SUCCESS,
    WRITE_LOCK,
    RunResult,
    name_problem,
    run_under_lock,
)
from .spool import FileStore
from .transports import ConnectionSettings, PermanentError, RemoteEntry, TemporaryError

__all__ = [
    "FAILED",
    "LOCKED",
    "NOTHING",
    "SUCCESS",
    "WRITE_LOCK",
    "ConnectionSettings",
    "ExportResult",
    "FileOutcome",
    "ImportResult",
    "PermanentError",
    "RunResult",
    "TemporaryError",
    "export_",
    "export_to",
    "import_",
    "import_from",
    "name_problem",
]

log = logging.getLogger("imports.cds")


class ImportResult(RunResult):
    """What an import run did."""


def import_(
    store_dir: str, host: str, port: int, user: str, password: str, path: str, **options
) -> ImportResult:
    """Import every new file of the CDS directory `path` on the server at `host` into the
    spool at `store_dir`, as the seed calls it. `options` are ConnectionSettings' (protocol,
    ca_file, host_key, key_file, passphrase, timeout, passive) and import_from's."""
    connection, options = ConnectionSettings.among(host, port, user, password, options)
    return import_from(store_dir, connection, path, **options)


def import_from(
    store_dir: str,
    connection: ConnectionSettings,
    path: str,
    *,
    parallel: int = 1,
    stable_after: float | None = None,
    stability_interval: float = 2,
    lock_lease: float = 3600,
    claimed: bool = False,
    run_label: str = "",
    progress: Callable[[int, int], None] | None = None,
    on_file: Callable[[FileOutcome], None] | None = None,
) -> ImportResult:
    """Import every new file of the CDS directory `path` on the server of `connection` into
    the spool at `store_dir`.

    Up to `parallel` connections transfer files at once under the one lock (fetch.py); with
    one, as the seed calls it, a file at a time. With `stable_after` (seconds), a file is
    taken only when its size did not change across two listings `stability_interval`
    seconds apart and it is at least that old, for partners that do not hold ``write`` while
    uploading.

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
        return result.fail(exc)
    log.info("Accessed filestore %s", store_dir)

    def work(transport, reconnect) -> None:
        with spool_errors():
            journeys = repair(store)
        listing = transport.list()
        finish_journeys(transport, store, journeys, listing, result.add)
        candidates = _importable(listing, result)
        if stable_after is not None and candidates:
            candidates = _stable(transport, candidates, stable_after, stability_interval, result)
        if not candidates:
            log.info("No new files to import.")
            return
        if progress:
            progress(0, len(candidates))
        report = _reporter(result, len(candidates), progress)
        errors = fetch(candidates, transport, reconnect, store, report, parallel=parallel)
        if errors:
            raise errors[0]

    return run_under_lock(
        result,
        store,
        READ_LOCK,
        work,
        connection=connection,
        path=path,
        lock_lease=lock_lease,
        claimed=claimed,
        run_label=run_label,
        failed_files="could not be imported and stay on the server.",
    )


# Listing


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
