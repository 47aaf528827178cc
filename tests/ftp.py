"""A real FTP server (pyftpdlib) on 127.0.0.1 for tests, with hooks for faults."""

import errno
import logging
import os
import threading

from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.filesystems import AbstractedFS
from pyftpdlib.handlers import FTPHandler, ThrottledDTPHandler
from pyftpdlib.servers import FTPServer

logging.getLogger("pyftpdlib").setLevel(logging.WARNING)

USER, PASSWORD, DIRECTORY = "partner", "secret", "outbox"


# Large enough that a file stays in transfer for seconds at SLOW_RATE, and that its partial
# file has data early: large files are written in blocks of 1 MiB (imports.partial.DIRECT_BLOCK).
SLOW_RATE = 512 * 1024
LARGE_PAYLOAD = 8 * 1024 * 1024


def slow_dtp() -> type[ThrottledDTPHandler]:
    """A data channel that sends SLOW_RATE bytes a second until its `write_limit` is set to 0."""
    return type("SlowDTP", (ThrottledDTPHandler,), {"read_limit": 0, "write_limit": SLOW_RATE})


class ServerThread:
    """pyftpdlib serving `root` on a free port of 127.0.0.1 in a background thread."""

    def __init__(self, root, handler_class=FTPHandler, perm="elradfmwMT", **handler_attributes):
        self.root = root
        self.dir = root / DIRECTORY
        self.dir.mkdir(parents=True, exist_ok=True)
        authorizer = DummyAuthorizer()
        authorizer.add_user(USER, PASSWORD, str(root), perm=perm)
        handler = type(
            "TestHandler", (handler_class,), {"authorizer": authorizer, **handler_attributes}
        )
        self.server = FTPServer(("127.0.0.1", 0), handler)
        self.host, self.port = self.server.address[:2]
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        # The server is closed in its own thread: closed from another, its poll could be
        # looking at descriptors that are gone.
        while not self.stopping.is_set():
            self.server.ioloop.loop(timeout=0.05, blocking=False)
        self.server.close_all()

    def stop(self):
        self.stopping.set()
        self.thread.join(timeout=5)

    def options(self, store_dir) -> dict:
        """The arguments of imports.cds.import_ for this server."""
        return {
            "store_dir": str(store_dir),
            "host": self.host,
            "port": self.port,
            "user": USER,
            "password": PASSWORD,
            "path": DIRECTORY,
        }

    def put(self, name: str, data: bytes = b"data") -> None:
        (self.dir / name).write_bytes(data)

    def names(self) -> list[str]:
        return sorted(path.name for path in self.dir.iterdir())


class FaultyFS(AbstractedFS):
    """A filesystem that refuses to send some files, cuts others short, and sends half of
    others as if that were all.

    `refused`, `cut_short`, `halved` and `kept` (never deleted) are sets of file names, set on
    a subclass by the test.
    """

    refused: frozenset = frozenset()
    cut_short: frozenset = frozenset()
    halved: frozenset = frozenset()
    kept: frozenset = frozenset()  # refused to delete

    def open(self, filename, mode):
        name = os.path.basename(filename)
        if "r" in mode and name in self.refused:
            raise PermissionError(errno.EACCES, "Refused by the test", filename)
        handle = super().open(filename, mode)
        if "r" in mode and name in self.cut_short:
            return CutShortFile(handle)
        if "r" in mode and name in self.halved:
            return HalvedFile(handle)
        return handle

    def remove(self, path):
        if os.path.basename(path) in self.kept:
            raise PermissionError(errno.EACCES, "Refused by the test", path)
        super().remove(path)


class CutShortFile:
    """Reads 1,000 bytes, then fails like a connection that breaks."""

    def __init__(self, handle):
        self.handle = handle
        self.name = handle.name
        self.closed = False

    def read(self, size=-1):
        if self.handle.tell() >= 1000:
            raise ConnectionResetError(errno.ECONNRESET, "Connection dropped by the test")
        return self.handle.read(min(size, 1000) if size > 0 else 1000)

    def close(self):
        self.closed = True
        self.handle.close()


class GrowingHandler(FTPHandler):
    """Appends to the file `growing` (a Path, set on a subclass by the test) as each listing
    begins: a partner writing it all the while we look."""

    growing = None

    def ftp_MLSD(self, path):
        with open(self.growing, "ab") as handle:
            handle.write(b" and more")
        return super().ftp_MLSD(path)


class HalvedFile:
    """Reads the first half of the file, then ends as if that were the whole file: the
    server then reports the transfer complete."""

    def __init__(self, handle):
        self.handle = handle
        self.name = handle.name
        self.closed = False
        self.half = os.fstat(handle.fileno()).st_size // 2

    def read(self, size=-1):
        left = self.half - self.handle.tell()
        return self.handle.read(min(size, left) if size > 0 else left) if left > 0 else b""

    def close(self):
        self.closed = True
        self.handle.close()


class DroppingHandler(FTPHandler):
    """Closes the connection, once, instead of deleting the file `dropped_at`: a connection
    that breaks while a batch is removed on the server."""

    dropped_at = ""
    has_dropped = False

    def ftp_DELE(self, path):
        if os.path.basename(path) == self.dropped_at and not type(self).has_dropped:
            type(self).has_dropped = True
            self.close()
            return None
        return super().ftp_DELE(path)
