"""Atomic writes: all-or-nothing, no temp files left, normal file permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from insight_core.io import atomic_write, flush_to_disk, write_json


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "doc.json"
    write_json(target, {"a": 1})
    write_json(target, {"a": 2})
    assert target.read_text().strip().endswith("}")
    assert '"a": 2' in target.read_text()
    assert [p.name for p in target.parent.iterdir()] == ["doc.json"]


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "doc.json"
    write_json(target, {"a": 1})

    def boom(tmp: Path) -> None:
        tmp.write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, boom)
    assert '"a": 1' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["doc.json"]


def test_files_get_umask_permissions_not_mkstemp_0600(tmp_path: Path) -> None:
    """An atlas written by one user must be readable by the server user (e.g. a Space)."""
    mask = os.umask(0)
    os.umask(mask)
    path = write_json(tmp_path / "doc.json", {})
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_atomic_write_fsyncs_the_file_before_the_rename_and_the_folder_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without both, a power cut can leave the new name pointing at an empty or partial file."""
    events: list[tuple[str, object]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        kind = "dir" if stat.S_ISDIR(st.st_mode) else "file"
        events.append((kind, st.st_ino if kind == "dir" else st.st_size))
        real_fsync(fd)

    def replace(src: str | Path, dst: str | Path) -> None:
        events.append(("replace", Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = write_json(tmp_path / "sub" / "doc.json", {"a": 1})
    size = target.stat().st_size
    assert events == [("file", size), ("replace", "doc.json"), ("dir", target.parent.stat().st_ino)]
    events.clear()
    atomic_write(tmp_path / "scratch.txt", lambda tmp: tmp.write_text("x"), durable=False)
    assert events == [("replace", "scratch.txt")]


def test_flush_to_disk_syncs_files_written_without_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thumbnails skip the per-file fsync; one flush makes them durable before their index is written."""
    paths = [
        atomic_write(tmp_path / f"{i}.webp", lambda t: t.write_bytes(b"x"), durable=False) for i in range(3)
    ]
    synced: list[str] = []
    if hasattr(os, "sync"):
        monkeypatch.setattr(os, "sync", lambda: synced.append("all"))
        flush_to_disk(paths)
        assert synced == ["all"]
    monkeypatch.delattr(os, "sync", raising=False)  # no os.sync (Windows): every file, then the folder
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(str(os.fstat(fd).st_ino)), real_fsync(fd))[1])
    synced.clear()
    flush_to_disk(paths)
    inodes = [str(p.stat().st_ino) for p in paths]
    assert synced[:3] == inodes
    if hasattr(os, "O_DIRECTORY"):
        assert synced[3:] == [str(tmp_path.stat().st_ino)]
