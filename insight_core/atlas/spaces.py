"""Hugging Face Spaces: the README front matter that makes a Space preload the atlas it serves.

A Space is configured by the YAML block at the top of its ``README.md``. Its ``preload_from_hub``
list names Hub repos downloaded into the Space's HF cache at *build* time, so the app starts without
fetching the atlas. Entries are ``"NAMESPACE/NAME"`` for a model repo and ``"datasets/NAMESPACE/NAME"``
for a dataset repo (atlases are dataset repos by default, see :mod:`insight_core.atlas.hub`),
optionally followed by a comma-separated file list and a commit. The app finds the preloaded copy
through ``resolve_atlas`` (``snapshot_download`` reuses the cache) when ``$INSIGHT_ATLAS`` names the
same repo (docs/spaces.md).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from insight_core.atlas.hub import DEFAULT_REPO_TYPE, REPO_TYPES, looks_like_repo_id
from insight_core.errors import ConfigError

PRELOAD_KEY = "preload_from_hub"
_FRONT_MATTER = re.compile(r"\A---[ \t]*\r?\n(.*?)^---[ \t]*$", re.S | re.M)


def _block(text: str, source: str) -> re.Match[str]:
    match = _FRONT_MATTER.match(text)
    if match is None:
        raise ConfigError(f"{source}: no YAML front matter ('---' lines) at the top")
    return match


def front_matter(text: str, source: str = "README.md") -> dict[str, Any]:
    """The Space configuration: the YAML mapping between the leading ``---`` lines of ``text``."""
    try:
        doc = yaml.safe_load(_block(text, source).group(1))
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: front matter is not valid YAML ({err})") from err
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: front matter must be a YAML mapping, got {type(doc).__name__}")
    return doc


def preload_entry(repo_id: str, repo_type: str = DEFAULT_REPO_TYPE) -> str:
    """The ``preload_from_hub`` item of an atlas repo (all its files, latest revision at build time)."""
    if not looks_like_repo_id(repo_id):
        raise ConfigError(f"{repo_id!r}: not a Hub repo id 'namespace/name'")
    if repo_type not in REPO_TYPES:
        raise ConfigError(f"repo_type: expected one of {REPO_TYPES}, got {repo_type!r}")
    return f"datasets/{repo_id}" if repo_type == "dataset" else repo_id


def preloaded_repos(config: dict[str, Any]) -> set[tuple[str, str]]:
    """``(repo_type, repo_id)`` of every ``preload_from_hub`` entry of a front matter."""
    entries = config.get(PRELOAD_KEY) or []
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise ConfigError(f"{PRELOAD_KEY} must be a list of strings, got {entries!r}")
    out = set()
    for entry in entries:
        repo = entry.split()[0] if entry.split() else ""
        if repo.startswith("datasets/"):
            out.add(("dataset", repo.removeprefix("datasets/")))
        elif repo.startswith("spaces/"):
            out.add(("space", repo.removeprefix("spaces/")))
        else:
            out.add(("model", repo.removeprefix("models/")))
    return out


def with_preload(text: str, entry: str, source: str = "README.md") -> str:
    """``text`` with ``entry`` in its front matter's ``preload_from_hub`` list (added if missing).

    Only the front matter lines change; comments and the rest of the file are kept. Idempotent.
    """
    config = front_matter(text, source)
    current = config.get(PRELOAD_KEY) or []
    if entry in current:
        return text
    block = _block(text, source)
    lines = block.group(1).splitlines(keepends=True)
    key = next((i for i, line in enumerate(lines) if re.match(rf"{PRELOAD_KEY}\s*:", line)), None)
    item = f"  - {entry}\n"
    if key is None:
        lines.append(f"{PRELOAD_KEY}:\n{item}")
    elif lines[key].split(":", 1)[1].strip() not in ("", "[]"):
        raise ConfigError(f"{source}: write {PRELOAD_KEY} as a block list ('- repo' lines) to add to it")
    else:
        lines[key] = f"{PRELOAD_KEY}:\n"
        end = key + 1
        while end < len(lines) and re.match(r"\s*(-\s|#|$)", lines[end]):
            end += 1
        while end > key + 1 and not lines[end - 1].strip():  # keep blank lines after the list
            end -= 1
        lines.insert(end, item)
    out = text[: block.start(1)] + "".join(lines) + text[block.end(1) :]
    if entry not in (front_matter(out, source).get(PRELOAD_KEY) or []):
        raise ConfigError(f"{source}: could not add {entry!r} to {PRELOAD_KEY}")
    return out


def preload_hint(text: str, location: str, repo_type: str = DEFAULT_REPO_TYPE) -> str | None:
    """A message when the atlas ``location`` is a Hub repo the front matter does not preload, else None."""
    if not looks_like_repo_id(location):
        return None
    try:
        repos = preloaded_repos(front_matter(text))
    except ConfigError as err:
        return f"README.md front matter unreadable ({err}); the atlas {location} is downloaded at startup"
    if (repo_type, location) in repos:
        return None
    return (
        f"the atlas {location} is downloaded when the app starts; add '{preload_entry(location, repo_type)}' "
        f"to {PRELOAD_KEY} in README.md (or run `insight space-readme --atlas-repo {location}`) to fetch it "
        "when the Space is built instead"
    )
