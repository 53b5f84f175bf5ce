"""Inter-process file locks (``filelock``: ``flock`` on POSIX, ``LockFileEx`` on Windows).

The OS releases such a lock when its holder exits, is killed or the machine reboots, so a lock
never goes stale: unlike a PID written to a file, which after a reboot or PID reuse names an
unrelated live process. The demo build holds one for its whole run (``AtlasLayout.demo_lock``); the
app asks :func:`is_locked` to know whether a build is running.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)


@contextlib.contextmanager
def holding(path: str | Path, what: str) -> Iterator[None]:
    """Hold the lock ``path`` (created with its folder) for the block; wait, saying so, while another
    process holds it. ``what`` names the locked work in that message."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning("another process is running %s (it holds %s); waiting for it to finish", what, path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def is_locked(path: str | Path) -> bool:
    """Whether another process (or another lock object of this one) holds the lock ``path`` now.

    Probes by acquiring and at once releasing it; a missing lock file means free (and is not created
    when its folder is missing).
    """
    path = Path(path)
    if not path.parent.is_dir():
        return False
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False
