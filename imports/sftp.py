"""The SFTP transport: the CDS protocol over SSH, with the server's host key pinned.

asyncssh speaks SSH here. It keeps many read requests in flight and negotiates AES-GCM, which
brings one large file within reach of OpenSSH's own client (bench/cds_pull.py); paramiko's
prefetch reached a third of it. fetch.py's transfer threads call the transport synchronously,
as they call ftplib, so each transport runs its connection on an event loop in a thread of its
own and waits for the answer.

The host key is checked during the key exchange, before any password or key is offered: a
server that shows a key other than the pinned one learns nothing, and the error tells the key
it offered, for staff to compare and pin (CdsSource.offered_host_key).

SFTP has no current directory and sends names as bytes: paths are built here from the exchange
directory and the server's own bytes, never decoded, so names that are not UTF-8 keep working.
"""

import asyncio
import base64
import binascii
import queue
import stat
import threading
from collections.abc import Coroutine, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, BinaryIO

import asyncssh

from .transports import (
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
# AES-GCM first: with the processor's AES instructions it is the cheapest to decrypt, and a
# large download is bound by the processor (bench/README.md). Servers without it get
# asyncssh's default order.
ENCRYPTION = "^aes128-gcm@openssh.com,aes256-gcm@openssh.com"
# Reads in flight for one download, each of the size the server allows (OpenSSH: 255 KiB).
READS_IN_FLIGHT = 128
# Blocks received and not yet taken by the sink: the memory one download may hold beyond its
# reads in flight.
BLOCKS_AHEAD = 16
WRITE_WINDOW = 8 * 1024 * 1024  # bytes handed to one pipelined write of an upload
_END = object()


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
                key = asyncssh.import_public_key(f"{key_type} {data}")
            except (asyncssh.KeyImportError, ValueError, TypeError):
                raise ValueError(f"The {key_type} key in it cannot be read.") from None
            return key_type, key.get_fingerprint("sha256")
    raise ValueError("This is neither a known_hosts line nor a SHA256 fingerprint.")


def fingerprint(key_line: str) -> str:
    """The SHA256 fingerprint of a pinned key (see pinned_key)."""
    return pinned_key(key_line)[1]


def private_key(path: str, passphrase: str) -> asyncssh.SSHKey:
    """The private key of `path`; PermanentError, naming neither key nor passphrase, when it
    cannot be used."""
    try:
        return asyncssh.read_private_key(path, passphrase or None)
    except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError, ValueError):
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


def _as_transport_error(exc: BaseException) -> BaseException:
    """asyncssh's errors as the FTP transports raise theirs: a refusal of the server as
    PermanentError, a lost session as ConnectionError; anything else as it is."""
    # A session that is no longer open was closed by the server: this transport never sends
    # after its own close. Which of these a killed server gives depends on timing.
    lost = asyncssh.SFTPConnectionLost | asyncssh.SFTPNoConnection | asyncssh.ConnectionLost
    if isinstance(exc, lost):
        return ConnectionResetError(exc.reason or "the SSH connection was lost")
    if isinstance(exc, asyncssh.SFTPError):
        return PermanentError(exc.reason or f"SFTP error {exc.code}")
    if isinstance(exc, asyncssh.PermissionDenied):
        return PermanentError(f"Login refused: {exc.reason}")
    if isinstance(exc, asyncssh.DisconnectError | asyncssh.ChannelOpenError):
        return ConnectionError(exc.reason or "the SSH connection was lost")
    return exc


class _PinnedHost(asyncssh.SSHClient):
    """Accepts the server's host key only when its fingerprint is the pinned one, and keeps
    the key it was shown."""

    def __init__(self, pinned: str):
        self.pinned = pinned
        self.offered: asyncssh.SSHKey | None = None

    def validate_host_public_key(self, host, addr, port, key) -> bool:
        self.offered = key
        return key.get_fingerprint("sha256") == self.pinned


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
        self.timeout = timeout
        self.dir = b"."
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(_unless_abandoned_read)
        self.thread = threading.Thread(target=self.loop.run_forever, name="sftp", daemon=True)
        self.thread.start()
        self.ssh = None
        try:
            self.ssh, self.sftp = self._run(
                self._connect(host, int(port), user, password, key, key_type, pinned)
            )
        except BaseException:
            self.close()
            raise

    async def _connect(self, host, port, user, password, key, key_type, pinned):
        client = _PinnedHost(pinned)
        try:
            ssh, _ = await asyncssh.create_connection(
                lambda: client,
                host,
                port,
                username=user,
                password=password or None,
                client_keys=[key] if key else None,
                known_hosts=([], [], []),  # no file: every key goes to _PinnedHost
                server_host_key_algs=ALGORITHMS.get(key_type, [key_type]) if key_type else (),
                encryption_algs=ENCRYPTION,
                config=None,
                agent_path=None,
                pkcs11_provider=None,
                gss_auth=False,
                gss_kex=False,
                connect_timeout=self.timeout,
                login_timeout=self.timeout,
            )
        except asyncssh.HostKeyNotVerifiable:
            if client.offered is None:
                raise
            offered = client.offered
            raise HostKeyError(
                f"{offered.get_algorithm()} {base64.b64encode(offered.public_data).decode()}",
                offered.get_fingerprint("sha256"),
                pinned=bool(pinned),
            ) from None
        try:
            return ssh, await ssh.start_sftp_client()
        except BaseException:
            ssh.abort()
            raise

    def _run(self, coroutine: Coroutine) -> Any:
        """Run `coroutine` on the connection's loop and return its result; give up after
        `timeout` seconds."""
        future = asyncio.run_coroutine_threadsafe(
            asyncio.wait_for(coroutine, self.timeout), self.loop
        )
        try:
            return future.result()
        except BaseException as exc:
            future.cancel()
            error = _as_transport_error(exc)
            if error is exc:
                raise
            raise error from exc

    def path(self, raw: bytes) -> bytes:
        return self.dir.rstrip(b"/") + b"/" + raw

    def cwd(self, path: str) -> None:
        attributes = self._run(self.sftp.stat(path.encode()))
        if not stat.S_ISDIR(attributes.permissions or 0):
            raise PermanentError(f"Not a directory: {path}")
        self.dir = path.encode()

    def list(self, with_links: bool = True) -> list[RemoteEntry]:
        """The entries of the directory, as the server describes them (without following
        links). `with_links` is there for the FTP transport's sake."""

        async def entries():
            return [
                _entry(name.filename, name.attrs)
                async for name in self.sftp.scandir(self.dir)
                if name.filename not in {b".", b".."}
            ]

        try:
            return self._run(entries())
        except PermanentError as exc:
            raise UnlistableFolder(f"The server did not list the folder: {exc}") from exc

    def size(self, raw: bytes) -> int | None:
        return self._run(self.sftp.stat(self.path(raw))).size

    exists = exists_by_size

    def retrieve(self, raw: bytes, sink: Sink) -> None:
        """Download `raw` into `sink`: the loop keeps READS_IN_FLIGHT reads going and hands
        the blocks over in order, while this thread writes them."""
        blocks: queue.SimpleQueue = queue.SimpleQueue()
        room = asyncio.Semaphore(BLOCKS_AHEAD)
        download = asyncio.run_coroutine_threadsafe(
            self._download(self.path(raw), blocks, room), self.loop
        )
        download.add_done_callback(lambda done: blocks.put(_END))
        pending = memoryview(b"")

        def read_into(view: memoryview) -> int:
            nonlocal pending
            if not pending:
                try:
                    block = blocks.get(timeout=self.timeout)
                except queue.Empty:
                    raise TimeoutError("no data for the download") from None
                if block is _END:
                    blocks.put(_END)  # for a sink that asks again
                    error = download.exception()
                    if error is not None:
                        raise _as_transport_error(error) from error
                    return 0
                pending = memoryview(block)
                self.loop.call_soon_threadsafe(room.release)
            count = min(len(view), len(pending))
            view[:count] = pending[:count]
            pending = pending[count:]
            return count

        try:
            sink.receive(read_into)
        finally:
            download.cancel()

    async def _download(self, path: bytes, blocks: queue.SimpleQueue, room) -> None:
        async with await self.sftp.open(path, "rb", max_requests=READS_IN_FLIGHT) as remote:
            size = (await remote.stat()).size or 0
            arrived: dict[int, bytes] = {}  # blocks that came before an earlier one
            offset = 0
            async for at, data in await remote.read_parallel(size, 0):
                arrived[at] = data
                while offset in arrived:
                    data = arrived.pop(offset)
                    await room.acquire()
                    blocks.put(data)
                    offset += len(data)
            # What the file holds beyond the size it had when opened.
            while data := await remote.read(remote.read_len, offset):
                await room.acquire()
                blocks.put(data)
                offset += len(data)

    def store(self, raw: bytes, source: BinaryIO) -> None:
        remote = self._run(self.sftp.open(self.path(raw), "wb", max_requests=READS_IN_FLIGHT))
        try:
            while window := source.read(WRITE_WINDOW):
                self._run(remote.write(window))
        finally:
            self._run(remote.close())

    def rename(self, old: bytes, new: bytes) -> None:
        """Give `old` the name `new`. SFTP's rename (unlike POSIX rename) fails when `new`
        exists, so a file on the server is never replaced."""
        self._run(self.sftp.rename(self.path(old), self.path(new)))

    def delete(self, raw: bytes) -> None:
        self._run(self.sftp.remove(self.path(raw)))

    def delete_many(self, raws: Sequence[bytes]) -> Iterator[Exception | None]:
        for raw in raws:
            try:
                self.delete(raw)
            except PermanentError as refused:
                yield refused
            else:
                yield None

    def close(self) -> None:
        if self.loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._shut_down(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()

    async def _shut_down(self) -> None:
        """Say goodbye to the server (a dead one gets a few seconds) and end what still
        runs on the loop, such as a download given up."""
        if self.ssh is not None:
            self.ssh.close()
            try:
                await asyncio.wait_for(self.ssh.wait_closed(), min(self.timeout, 5))
            except TimeoutError:
                self.ssh.abort()
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)


def _unless_abandoned_read(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """The loop's handler of errors nobody awaited: a download given up (a full spool, say)
    leaves read-ahead requests behind, whose answers (end of file, a closed handle) are of no
    interest; anything else is reported as asyncio does."""
    if not isinstance(context.get("exception"), asyncssh.SFTPError):
        loop.default_exception_handler(context)


def _entry(raw: bytes, attributes: asyncssh.SFTPAttrs) -> RemoteEntry:
    mode = attributes.permissions or 0
    if stat.S_ISREG(mode):
        kind = "file"
    elif stat.S_ISDIR(mode):
        kind = "dir"
    elif stat.S_ISLNK(mode):
        kind = "link"
    else:
        kind = "other"
    modify = None
    if attributes.mtime is not None:
        modify = datetime.fromtimestamp(attributes.mtime, UTC).strftime("%Y%m%d%H%M%S")
    return RemoteEntry(raw, attributes.size, modify, kind)
