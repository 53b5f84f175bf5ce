"""The app's download files (JSON/PNG exports, GraphML/GEXF): one bounded, content-addressed store.

A public Space serves downloads for as long as it runs, so nothing a click writes may stay forever:

- every download lives in ONE app-owned folder, ``ROOT/<hash of name and content>/<name>``: the
  same download asked for again reuses its file (100 identical clicks leave one file) and keeps its
  display name;
- each write sweeps the folder: entries older than :attr:`CacheConfig.max_age_s` go, then the oldest
  until at most :attr:`CacheConfig.max_files` entries and :attr:`CacheConfig.max_bytes` remain;
- the default ``ROOT`` lies inside Gradio's own cache folder (``$GRADIO_TEMP_DIR``, else
  ``TMP/gradio``), so Gradio serves the file where it is instead of copying it (a file elsewhere is
  copied into that cache under the hash of its content); Gradio's own cache (these files, uploads,
  images it saved) is swept by the Blocks' ``delete_cache`` (:meth:`CacheConfig.delete_cache`).

No Gradio import here: the Gradio folder is found the way Gradio finds it (``GRADIO_TEMP_DIR``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from insight_core.errors import ConfigError

log = logging.getLogger(__name__)

ENV_MAX_AGE = "INSIGHT_CACHE_MAX_AGE"
"""Environment variable overriding :attr:`CacheConfig.max_age_s` (seconds; CLI: ``--cache-max-age``)."""
EXPORTS_FOLDER = "insight-exports"
"""Name of the store's folder inside Gradio's cache folder."""
DEFAULT_MAX_AGE_S = 3600
"""Default :attr:`CacheConfig.max_age_s`: an hour, long enough to click a link shown on the page,
short enough for a busy Space."""
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def gradio_cache_dir() -> Path:
    """Where Gradio keeps the files it serves (what ``gradio.utils.get_upload_folder`` returns)."""
    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio").resolve()


@dataclasses.dataclass(frozen=True, slots=True)
class CacheConfig:
    """How long and how much the app keeps of the files it serves."""

    max_age_s: int = DEFAULT_MAX_AGE_S
    """Age (seconds since last handed out) after which a download, and a file in Gradio's cache, is
    deleted."""
    max_files: int = 512
    """Most download entries kept; the oldest go first beyond it."""
    max_bytes: int = 256 * 2**20
    """Most bytes of downloads kept (256 MiB); the oldest go first beyond it."""
    root: Path | None = None
    """The store's folder; None = ``GRADIO_CACHE/insight-exports`` (served without a copy)."""

    def __post_init__(self) -> None:
        for name in ("max_age_s", "max_files", "max_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"CacheConfig.{name} must be a positive integer, got {value!r}")

    @property
    def delete_cache(self) -> tuple[int, int]:
        """Gradio's ``Blocks(delete_cache=(frequency, age))``: files older than ``max_age_s`` go, checked
        every quarter of it (between one minute and one hour)."""
        return min(max(self.max_age_s // 4, 60), 3600), self.max_age_s

    @classmethod
    def from_env(cls, env: Mapping[str, str], max_age_s: int | None = None) -> CacheConfig:
        """The defaults, with ``max_age_s`` from the argument (CLI), else ``$INSIGHT_CACHE_MAX_AGE``."""
        if max_age_s is None and env.get(ENV_MAX_AGE):
            raw = env[ENV_MAX_AGE]
            try:
                max_age_s = int(raw)
            except ValueError:
                raise ConfigError(f"${ENV_MAX_AGE} must be a whole number of seconds, got {raw!r}") from None
        return cls() if max_age_s is None else cls(max_age_s=max_age_s)


def safe_name(name: str) -> str:
    """A display file name safe on any file system: the last path component, other characters than
    letters, digits, ``.``, ``_``, ``-`` replaced, no leading dot, at most 100 characters."""
    base = _UNSAFE.sub("_", name.replace("\\", "/").rsplit("/", 1)[-1]).lstrip(".")[-100:]
    return base or "download"


class ExportStore:
    """Download files, content-addressed in one folder, swept by age, count and size on each write.

    Thread-safe within the process (Gradio runs handlers in threads); another process sharing the
    folder only ever deletes entries that are too old or over the caps, as this one would.
    """

    def __init__(self, config: CacheConfig | None = None) -> None:
        self.config = config or CacheConfig()
        self.root = (self.config.root or gradio_cache_dir() / EXPORTS_FOLDER).resolve()
        self._lock = threading.Lock()

    def write(self, name: str, data: bytes) -> str:
        """Store ``data`` as a download named ``name`` (made :func:`safe_name`); returns its path.

        The same name and content give the same path (the file is touched, not rewritten)."""
        name = safe_name(name)
        digest = hashlib.sha256(name.encode() + b"\0" + data).hexdigest()[:32]
        path = self.root / digest / name
        with self._lock:
            if not self._touch(path):
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.parent / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
                tmp.write_bytes(data)
                os.replace(tmp, path)
            self._sweep(keep=path.parent)
        return str(path)

    def sweep(self) -> int:
        """Delete entries over the age, count or size limits now; returns how many were deleted."""
        with self._lock:
            return self._sweep(keep=None)

    def entries(self) -> list[Path]:
        """The entry folders (one per distinct download)."""
        try:
            return [p for p in self.root.iterdir() if p.is_dir() and not p.is_symlink()]
        except FileNotFoundError:
            return []

    @staticmethod
    def _touch(path: Path) -> bool:
        """Mark a reused download as fresh (the sweeps age by last use); False when it is not there."""
        try:
            os.utime(path)
            os.utime(path.parent)
        except FileNotFoundError:
            return False
        return True

    def _sweep(self, keep: Path | None) -> int:
        now = time.time()
        stats = []  # (last use, bytes, entry folder); os.scandir: one stat per file, no Path objects
        try:
            folders = [e for e in os.scandir(self.root) if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            folders = []
        for folder in folders:
            try:
                with os.scandir(folder.path) as files:
                    size = sum(f.stat().st_size for f in files if f.is_file(follow_symlinks=False))
                stats.append((folder.stat().st_mtime, size, Path(folder.path)))
            except FileNotFoundError:  # deleted meanwhile (another process, Gradio's sweep)
                continue
        stats.sort(key=lambda s: s[0], reverse=True)  # newest first
        deleted, n_kept, bytes_kept = 0, 0, 0
        for mtime, size, entry in stats:
            too_old = now - mtime > self.config.max_age_s
            over = n_kept + 1 > self.config.max_files or bytes_kept + size > self.config.max_bytes
            if entry != keep and (too_old or over):
                shutil.rmtree(entry, ignore_errors=True)
                deleted += 1
            else:
                n_kept, bytes_kept = n_kept + 1, bytes_kept + size
        if deleted:
            log.info("deleted %d old download(s) from %s", deleted, self.root)
        return deleted
