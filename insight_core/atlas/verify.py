"""Checking atlas files against their manifest hashes, with a per-user cache so reopening is instant.

An atlas from the Hub is someone else's files: :meth:`insight_core.atlas.Atlas.open` hashes every
file the explorer reads and compares the SHA-256 with the manifest before anything parses it.
Hashing a large atlas takes seconds, so results are remembered in a small JSON file per atlas folder
under the user cache (:func:`insight_core.atlas.layout.verification_cache`). An entry is keyed by the
file's resolved path and its identity on disk: size, modification *and* status-change time (ns),
inode and device. Any write to the file changes at least the status-change time (which user tools
cannot set back), so a changed file is always hashed again; the stored hash is then compared with
what the manifest expects, so a cache entry never vouches for a hash the manifest does not name.
The cache is an optimisation only: unreadable, torn or foreign cache files are ignored, and it is
written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from insight_core.io import write_json

log = logging.getLogger(__name__)

CACHE_FORMAT = "insight-verification-cache"
CACHE_VERSION = 1


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _identity(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


class VerificationCache:
    """SHA-256 of files by identity (see the module docstring); ``path=None`` disables caching."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._entries: dict[str, list[Any]] = {}
        self._used: set[str] = set()
        self._dirty = False
        self.hits = 0
        self.misses = 0
        if path is not None:
            self._entries = self._load(path)

    @staticmethod
    def _load(path: Path) -> dict[str, list[Any]]:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        ok = isinstance(doc, dict) and (doc.get("format"), doc.get("version")) == (
            CACHE_FORMAT,
            CACHE_VERSION,
        )
        if not ok:
            return {}
        files = doc.get("files")
        return files if isinstance(files, dict) else {}

    def sha256(self, path: Path) -> str:
        """The file's SHA-256: from the cache when its identity is unchanged, else hashed (and cached)."""
        real = path.resolve()  # Hub snapshots are symlinks into the blob store: key the blob
        key = str(real)
        st = real.stat()
        ident = _identity(st)
        self._used.add(key)
        entry = self._entries.get(key)
        if (
            isinstance(entry, list)
            and len(entry) == len(ident) + 1
            and entry[:-1] == ident
            and isinstance(entry[-1], str)
        ):
            self.hits += 1
            return entry[-1]
        self.misses += 1
        digest = sha256_file(real)
        if _identity(real.stat()) == ident:  # not changed while we read it
            self._entries[key] = [*ident, digest]
            self._dirty = True
        return digest

    def save(self) -> None:
        """Write the entries used since loading (others are dropped), atomically; never raises."""
        if self.path is None:
            return
        stale = set(self._entries) - self._used
        if not self._dirty and not stale:
            return
        keep = {k: v for k, v in self._entries.items() if k in self._used}
        try:
            write_json(self.path, {"format": CACHE_FORMAT, "version": CACHE_VERSION, "files": keep})
        except OSError as err:  # a read-only home or full disk must not stop the app
            log.debug("verification cache %s not written: %s", self.path, err)
