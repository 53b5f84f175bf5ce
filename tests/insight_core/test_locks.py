"""File locks: held while the block runs, seen by other processes, free again once the holder is gone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from insight_core.locks import holding, is_locked

HOLD = r"""
import sys, time
from insight_core.locks import holding
with holding(sys.argv[1], "a test"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_holding_is_seen_and_released(tmp_path: Path) -> None:
    lock = tmp_path / "work" / "build.lock"
    assert not is_locked(lock)
    assert not lock.parent.exists()  # probing creates nothing
    with holding(lock, "a test"):
        assert lock.parent.is_dir()
        assert is_locked(lock)
    assert not is_locked(lock)


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    lock = tmp_path / "build.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == b"held"
        assert is_locked(lock)
        holder.kill()
        holder.wait()
        assert not is_locked(lock)
    finally:
        holder.kill()
        holder.wait()
