"""``space-readme``: make a Space preload the atlas it serves (``preload_from_hub`` in README.md).

Adds ``datasets/NAMESPACE/NAME`` (or ``NAMESPACE/NAME`` for a model repo) to the ``preload_from_hub``
list of the README front matter, so the Space downloads the atlas when it is built instead of when the
app starts; set the Space variable ``INSIGHT_ATLAS`` to the same repo id (docs/spaces.md). Only the
front matter changes; the file is rewritten atomically. Idempotent.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from insight_core.atlas.hub import DEFAULT_REPO_TYPE, RepoType
from insight_core.atlas.spaces import preload_entry, with_preload
from insight_core.errors import ConfigError
from insight_core.io import atomic_write

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class SpaceReadmeJob:
    """Add an atlas repo to preload_from_hub in a Space README's front matter."""

    atlas_repo: str
    """The atlas repo 'namespace/name' the Space serves (its INSIGHT_ATLAS)."""
    readme: Path = Path("README.md")
    """The Space's README.md (YAML front matter at the top)."""
    repo_type: RepoType = DEFAULT_REPO_TYPE
    """Hub repo type of the atlas (push creates dataset repos by default)."""


def run(job: SpaceReadmeJob) -> str:
    """Rewrite the README; returns the entry."""
    if not job.readme.is_file():
        raise ConfigError(f"{job.readme}: not found; pass --readme PATH of the Space's README.md")
    entry = preload_entry(job.atlas_repo, job.repo_type)
    text = job.readme.read_text(encoding="utf-8")
    new = with_preload(text, entry, source=str(job.readme))
    if new == text:
        log.info("%s already preloads %s", job.readme, entry)
    else:
        atomic_write(job.readme, lambda tmp: tmp.write_text(new, encoding="utf-8"))
        log.info("%s: preload_from_hub += %s; set the Space variable INSIGHT_ATLAS=%s", job.readme, entry,
                 job.atlas_repo)  # fmt: skip
    return entry
