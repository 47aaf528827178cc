"""Which process holds something, and whether it is still alive.

Claims and lock records name the host and process that made them, so that the next run on
the same host can tell at once that their owner died (SIGKILL, OOM, reboot) instead of waiting
out a lease. A process on another host cannot be asked; there the lease decides.
"""

import os
import socket

HOST = socket.gethostname()


def is_alive(pid: int | str | None) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, OverflowError, ProcessLookupError):
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def died_on_this_host(host: str | None, pid: int | str | None) -> bool:
    """Whether `pid` of `host` is known to be gone: only this host can tell."""
    return host == HOST and not is_alive(pid)
