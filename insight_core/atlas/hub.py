"""Sharing atlases on the Hugging Face Hub: push, pull, and "local folder or repo id" resolution.

An atlas repo is a plain copy of the atlas directory (``manifest.json`` at its root), by default a
*dataset* repo. Pushing validates the atlas first (sizes and SHA-256 against its manifest), so a
stale or corrupt atlas is never published, and leaves out what is not part of it: hidden files
(interrupted-run state, ``.cache/``), atomic-write temp files and the vocabulary-embedding
``cache/``. Pulling and :func:`resolve_atlas` validate what they downloaded.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Literal, get_args

from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.utils import (
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    filter_repo_objects,
)

from insight_core.atlas.layout import UPLOAD_IGNORE
from insight_core.atlas.manifest import Atlas, AtlasError
from insight_core.atlas.trust import check_atlas_refs
from insight_core.errors import ConfigError, InsightError

log = logging.getLogger(__name__)

RepoType = Literal["dataset", "model"]
REPO_TYPES: tuple[str, ...] = get_args(RepoType)
DEFAULT_REPO_TYPE: RepoType = "dataset"
"""Patterns (fnmatch on paths relative to the atlas, ``*`` also matches ``/``) that are never pushed."""

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


class HubError(InsightError):
    """The Hub could not be reached, or a repo / revision is missing or not accessible."""


def _check_repo_type(repo_type: str) -> None:
    if repo_type not in REPO_TYPES:
        raise ConfigError(f"repo_type: expected one of {REPO_TYPES}, got {repo_type!r}")


def looks_like_repo_id(text: str) -> bool:
    """``namespace/name`` with the Hub's characters (a bare relative path like ``atlas`` is not one)."""
    return bool(_REPO_ID.match(text)) and ".." not in text and "--" not in text


def upload_files(root: str | Path) -> list[str]:
    """Relative (posix) paths of the files :func:`push_atlas` uploads from ``root``, sorted."""
    root = Path(root)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return list(filter_repo_objects(files, ignore_patterns=UPLOAD_IGNORE))


def _hub_error(err: Exception, repo_id: str, repo_type: str, revision: str | None) -> HubError:
    """One clear line for the ways a Hub call fails (order matters: subclasses first)."""
    where = f"{repo_type} repo {repo_id!r}" + (f" (revision {revision!r})" if revision else "")
    if isinstance(err, RevisionNotFoundError):
        return HubError(f"{where}: revision not found on the Hub")
    if isinstance(err, RepositoryNotFoundError):
        return HubError(
            f"{where}: not found on the Hub, or private/gated without access "
            "(log in with `hf auth login` or pass a token; check --repo-type)"
        )
    if isinstance(err, LocalEntryNotFoundError):
        return HubError(
            f"{where}: the Hub could not be reached (offline?) and no cached copy exists; "
            "connect, or pull it once and pass the local folder"
        )
    if isinstance(err, HFValidationError):
        return HubError(f"{repo_id!r}: not a valid Hub repo id, expected 'namespace/name' ({err})")
    return HubError(f"{where}: Hub request failed ({type(err).__name__}: {err})")


def push_atlas(
    root: str | Path,
    repo_id: str,
    *,
    repo_type: str = DEFAULT_REPO_TYPE,
    private: bool | None = None,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    verify_hashes: bool = True,
    api: HfApi | None = None,
) -> str:
    """Validate the atlas at ``root``, then upload it to ``repo_id`` (created if missing).

    Parameters
    ----------
    private
        Visibility of a *new* repo (None: the Hub's default); an existing repo keeps its own.
    revision
        Branch to commit to (created from the default branch if missing); None: the default branch.
    verify_hashes
        Re-hash every file against the manifest before uploading (catches silent corruption).
    api
        An ``HfApi`` (tests pass a fake); default ``HfApi(token=token)``.

    Returns
    -------
    str
        The commit URL reported by the Hub.
    """
    _check_repo_type(repo_type)
    atlas = Atlas.open(root, verify="all" if verify_hashes else "sizes")  # AtlasError: nothing is uploaded
    files = upload_files(atlas.root)
    api = api or HfApi(token=token)
    counts = atlas.manifest.get("counts", {})
    message = commit_message or (
        f"INSIGHT atlas (schema {atlas.manifest['schema_version']}, "
        f"{counts.get('n_concepts', '?')} concepts, backbone {atlas.backbone.get('arch', '?')})"
    )
    log.info("pushing %d files of %s to %s repo %s", len(files), atlas.root, repo_type, repo_id)
    try:
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True, token=token)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True, token=token)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(atlas.root),
            repo_type=repo_type,
            revision=revision,
            ignore_patterns=list(UPLOAD_IGNORE),
            commit_message=message,
            token=token,
        )
    except (HfHubHTTPError, HFValidationError, OSError) as err:
        raise _hub_error(err, repo_id, repo_type, revision) from err
    url = str(getattr(info, "commit_url", info))
    log.info("pushed %s -> %s", atlas.root, url)
    return url


def download_atlas(
    repo_id: str,
    *,
    local_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    repo_type: str = DEFAULT_REPO_TYPE,
    revision: str | None = None,
    token: str | None = None,
) -> Path:
    """``snapshot_download`` of an atlas repo; failures raise :class:`HubError` naming the repo."""
    _check_repo_type(repo_type)
    try:
        path = snapshot_download(
            repo_id,
            repo_type=repo_type,
            revision=revision,
            local_dir=None if local_dir is None else str(local_dir),
            cache_dir=None if cache_dir is None else str(cache_dir),
            token=token,
        )
    except (HfHubHTTPError, HFValidationError, OSError) as err:  # LocalEntryNotFoundError is an OSError
        raise _hub_error(err, repo_id, repo_type, revision) from err
    return Path(path)


def _open_downloaded(path: Path, repo_id: str, trust_weights: bool | None) -> Atlas:
    """Open a downloaded atlas and check the weights it names (``insight_core.atlas.trust``)."""
    try:
        atlas = Atlas.open(path)
        check_atlas_refs(atlas, trust=trust_weights)
    except AtlasError as err:
        raise AtlasError(f"Hub repo {repo_id!r} (downloaded to {path}) is not a valid atlas: {err}") from err
    return atlas


def pull_atlas(
    repo_id: str,
    out: str | Path,
    *,
    repo_type: str = DEFAULT_REPO_TYPE,
    revision: str | None = None,
    token: str | None = None,
    trust_weights: bool | None = None,
) -> Atlas:
    """Download ``repo_id`` into the folder ``out`` and open (validate) it, weights it names included
    (``trust_weights``: let it name any; None: ``$INSIGHT_TRUST_ATLAS_WEIGHTS``)."""
    path = download_atlas(repo_id, local_dir=out, repo_type=repo_type, revision=revision, token=token)
    return _open_downloaded(path, repo_id, trust_weights)


def resolve_atlas(
    path_or_repo_id: str | Path,
    cache_dir: str | Path | None = None,
    *,
    repo_type: str = DEFAULT_REPO_TYPE,
    revision: str | None = None,
    token: str | None = None,
    trust_weights: bool | None = None,
) -> Path:
    """Local folder of an atlas given a directory or a Hub repo id (downloaded into the HF cache).

    An existing directory is returned as is (the caller opens it with ``Atlas.open``); anything else
    that looks like ``namespace/name`` is downloaded (or taken from the cache when offline) and
    validated, the weights it names included (``trust_weights``: see :func:`pull_atlas`).

    Raises
    ------
    AtlasError
        Neither a directory nor a repo id, or the downloaded snapshot is not a valid atlas.
    HubError
        The repo or revision does not exist or is not accessible, or the Hub is unreachable and
        nothing is cached.
    """
    text = str(path_or_repo_id)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise AtlasError(f"{text}: is a file; expected an atlas directory or a Hub repo id 'namespace/name'")
    if not looks_like_repo_id(text):
        raise AtlasError(f"atlas not found: {text} is not a directory (nor a Hub repo id 'namespace/name')")
    log.info("%s is not a local directory: fetching the %s repo from the Hub", text, repo_type)
    try:
        local = download_atlas(text, cache_dir=cache_dir, repo_type=repo_type, revision=revision, token=token)
    except HubError as err:
        raise HubError(f"{text} is not a local directory, and the Hub lookup failed: {err}") from err
    return _open_downloaded(local, text, trust_weights).root
