"""Fetching a CDS directory's files into the spool: several connections, durable batches.

The CDS protocol allows one lock holder, not one connection: under our ``read`` lock, each of
`parallel` logged-in connections takes files from one queue. A connection downloads its files
to hidden partial files in ``tmp/``, checking each against the size the server listed. Every
`BATCH_FILES` files or `BATCH_SECONDS` seconds, before a large file and at the end, it makes
its batch durable with one journal and one sync (spool.py), and only then removes the batch's
files on the server and moves them to ``new/``. The log lines of one file stay in their
order; those of files on different connections interleave. With one connection, files go one
at a time, as in the seed: each file is durable, removed and delivered before the next one is
downloaded, so that each file's three lines come before the next file's.

A file that fails alone (refused, cut short) stays on the server. A broken connection ends that
connection only; the others go on with the queue. A spool that cannot be written ends them all.
Downloads that are durable but not yet delivered when anything ends are finished by the next
run from their journal.
"""

import collections
import contextlib
import contextvars
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .partial import Blocks, PartialFile, SpoolError, spool_errors
from .spool import FileStore
from .transports import CONNECTION_ERRORS, SERVER_ERRORS, RemoteEntry

log = logging.getLogger("imports.cds")

BATCH_FILES = 100
BATCH_SECONDS = 0.25
# A file this large takes long enough to be worth its own sync; the batch before it is
# delivered first rather than wait for it.
LARGE_FILE = 1024 * 1024


class TransferError(Exception):
    """A download that did not arrive complete."""


TRANSFER_ERRORS = (*SERVER_ERRORS, TransferError)


@dataclass
class FileOutcome:
    name: str
    size: int | None
    outcome: str  # delivered, failed or skipped
    local_name: str = ""
    sha256: str = ""
    reason: str = ""


Report = Callable[[FileOutcome], None]


def fetch(
    candidates: list[RemoteEntry],
    transport,
    connect: Callable,
    store: FileStore,
    report: Report,
    *,
    parallel: int = 4,
) -> list[BaseException]:
    """Download, remove on the server and deliver to ``new/`` every file of `candidates`.

    `transport` (the connection that holds the lock) takes part; `connect()` opens the
    others. `report(outcome)` is called for every file, from the connections' threads.
    Returns the errors that ended a connection early.
    """
    jobs = collections.deque(candidates)
    names = _LocalNames(store)
    stop = threading.Event()
    errors: list[BaseException] = []
    batch_files = 1 if parallel == 1 else BATCH_FILES

    def work(own_transport, number: int) -> None:
        try:
            if own_transport is None:
                try:
                    own_transport = connect()
                except (*SERVER_ERRORS, *CONNECTION_ERRORS) as exc:
                    log.warning("Could not open transfer connection %s: %s", number, exc)
                    return
            _Connection(own_transport, jobs, store, names, report, stop, batch_files).run()
        except BaseException as exc:
            errors.append(exc)
            if isinstance(exc, SpoolError):
                stop.set()
        finally:
            if number and own_transport is not None:
                own_transport.close()

    threads = [
        threading.Thread(target=contextvars.copy_context().run, args=(work, None, number))
        for number in range(1, min(parallel, len(candidates)))
    ]
    for thread in threads:
        thread.start()
    work(transport, 0)
    for thread in threads:
        thread.join()
    return errors


class _LocalNames:
    """Chooses the names in the spool, so that two connections never pick the same one.

    The spool's names are read once: only this run adds to it while it holds the lock, and a
    name that appears anyway is caught when the file is moved to ``new/``.
    """

    def __init__(self, store: FileStore):
        self.store = store
        self.lock = threading.Lock()
        with spool_errors():
            self.taken = store.names()

    def reserve(self, name: str) -> str:
        with self.lock, spool_errors():
            local = self.store.free_name(name, self.taken)
            self.taken.add(local)
            return local


@dataclass
class _Download:
    remote: RemoteEntry
    outcome: FileOutcome

    def journal_entry(self) -> dict:
        return {
            "name": self.outcome.local_name,
            "remote": self.remote.name,
            "raw": self.remote.raw.hex(),
            "size": self.outcome.size,
            "modify": self.remote.modify,
            "sha256": self.outcome.sha256,
        }


class _Connection:
    """One connection's share of the queue, in batches."""

    def __init__(self, transport, jobs, store, names, report, stop, batch_files=BATCH_FILES):
        self.transport, self.jobs, self.store = transport, jobs, store
        self.names, self.report, self.stop = names, report, stop
        self.batch_files = batch_files
        self.batch: list[_Download] = []
        self.batch_started = 0.0
        self.blocks = Blocks()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                try:
                    remote = self.jobs.popleft()
                except IndexError:
                    break
                if remote.size is None or remote.size >= LARGE_FILE:
                    self.commit()
                self.download(remote)
                if self.batch and (
                    len(self.batch) >= self.batch_files
                    or time.monotonic() - self.batch_started >= BATCH_SECONDS
                    or not self.jobs
                ):
                    self.commit()
        finally:
            self.blocks.writer.shutdown()
            self.commit()

    def download(self, remote: RemoteEntry) -> None:
        name = remote.name
        log.info("Downloading: %s", name)
        local = self.names.reserve(name)
        if local != name:
            log.warning(
                "A file named %s is in the spool already; the new one is stored as %s.",
                name,
                local,
            )
        outcome = FileOutcome(name, remote.size, "failed", local_name=local)
        try:
            outcome.sha256, outcome.size = _download(
                self.transport, self.store, remote, local, self.blocks
            )
        except (*TRANSFER_ERRORS, *CONNECTION_ERRORS, SpoolError) as exc:
            outcome.reason = str(exc) or type(exc).__name__
            self.report(outcome)
            if isinstance(exc, SpoolError):
                log.error("Could not store %s; it stays on the server.", name)
                raise
            log.error("Could not download %s (%s); it stays on the server.", name, outcome.reason)
            if isinstance(exc, CONNECTION_ERRORS):
                raise  # this connection cannot be trusted any more
            return
        if not self.batch:
            self.batch_started = time.monotonic()
        self.batch.append(_Download(remote, outcome))

    def commit(self) -> None:
        """Make the batch durable, then remove its files on the server and deliver them."""
        batch, self.batch = self.batch, []
        if not batch:
            return
        with spool_errors():
            journal = self.store.write_journal([download.journal_entry() for download in batch])
        replies = self.transport.delete_many([download.remote.raw for download in batch])
        for number, download in enumerate(batch):
            name, outcome = download.remote.name, download.outcome
            try:
                refused = next(replies)
            except CONNECTION_ERRORS:
                for waiting in batch[number:]:
                    waiting.outcome.reason = "downloaded; the next run delivers it"
                    self.report(waiting.outcome)
                raise  # the journal stays: the next run finishes these
            if refused:
                outcome.reason = f"could not be removed on the server ({refused}); it stays there"
                log.error("Could not remove %s on the server (%s).", name, refused)
                _discard(self.store, outcome.local_name)
                self.report(outcome)
                continue
            log.info("File removed on server: %s", name)
            with spool_errors():
                outcome.local_name = _deliver(self.store, outcome.local_name)
            outcome.outcome = "delivered"
            self.report(outcome)
        with spool_errors():
            self.store.finish_journal(journal)


def _download(
    transport, store: FileStore, remote: RemoteEntry, local: str, blocks: Blocks
) -> tuple[str, int]:
    """Fetch `remote` into its partial file through `blocks`; return its SHA-256 and size.
    The file is complete but not yet durable: its batch makes it so."""
    path = store.partial_path(local)
    try:
        sink = PartialFile(path, blocks, direct=(remote.size or 0) >= LARGE_FILE)
        try:
            transport.retrieve(remote.raw, sink)
            received = sink.finish()
        finally:
            with contextlib.suppress(OSError):  # finish() above reported any failure
                sink.close()
        expected = remote.size if remote.size is not None else transport.size(remote.raw)
        if expected is not None and received != expected:
            raise TransferError(f"received {received} of {expected} bytes")
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return sink.digest.hexdigest(), received


def _discard(store: FileStore, local: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(store.partial_path(local))


def _deliver(store: FileStore, local: str) -> str:
    """Move the partial file `local` to ``new/``; return its name there, which differs
    when a file of that name arrived in ``new/`` meanwhile."""
    final = store.deliver_partial(local)
    log.info("Moved from 'tmp' to 'new': %s", final)
    return final


def repair(store: FileStore) -> list[tuple[str, dict]]:
    """Clean up after runs that died: discard partial downloads no journal vouches for,
    deliver complete files of other writers, and return the journal entries whose delivery
    is due, as (journal path, entry)."""
    discarded, complete, journeys = store.leftovers()
    for name in discarded:
        log.warning("Discarded a partial download of an earlier run: %s", name)
    for name in complete:
        log.info("Moved from 'tmp' to 'new': %s", store.deliver(name))
    return journeys


def finish_journeys(transport, store: FileStore, journeys, listing, report: Report) -> None:
    """Finish the deliveries of runs that died after a batch was durable: the file on the
    server is removed when it is still the one we downloaded, then ours goes to ``new/``."""
    by_raw = {remote.raw: remote for remote in listing}
    for _, entry in journeys:
        raw = bytes.fromhex(entry["raw"])
        remote = by_raw.get(raw)
        if (
            remote is not None
            and remote.size == entry["size"]
            and (remote.modify is None or entry["modify"] in (None, remote.modify))
        ):
            transport.delete(raw)
            log.info("File removed on server: %s", remote.name)
            listing.remove(remote)
        with spool_errors():
            local = _deliver(store, entry["name"])
        report(
            FileOutcome(
                entry["remote"],
                entry["size"],
                "delivered",
                local_name=local,
                sha256=entry["sha256"],
                reason="completed the delivery of an earlier run",
            )
        )
    with spool_errors():
        for journal in sorted({journal for journal, _ in journeys}):
            store.finish_journal(journal)
