"""``push`` / ``pull``: share an atlas through the Hugging Face Hub (see docs/atlas.md).

``push`` validates the atlas (``Atlas.open`` with SHA-256 checks) before anything is uploaded, then
creates the repo if needed (a dataset repo by default) and uploads the atlas folder without hidden,
temporary and cache files. ``pull`` downloads a repo into a folder and validates it. Authentication
uses ``--token``, else ``HF_TOKEN`` / ``hf auth login`` (prefer those: a token on the command line
ends up in the shell history).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from insight_core.atlas.hub import DEFAULT_REPO_TYPE, RepoType, pull_atlas, push_atlas

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class PushJob:
    """Validate an atlas and upload it to a Hugging Face Hub repo."""

    atlas: Path
    """Atlas directory (with manifest.json) to upload."""
    repo_id: str
    """Target repo 'namespace/name' (created when missing)."""
    repo_type: RepoType = DEFAULT_REPO_TYPE
    """Hub repo type."""
    private: bool = False
    """Create the repo as private (an existing repo keeps its visibility)."""
    revision: str | None = None
    """Branch to push to (created when missing); default: the repo's main branch."""
    token: str | None = None
    """Hub token with write access; default: HF_TOKEN or the token saved by `hf auth login`."""
    commit_message: str | None = None
    """Commit message; default: schema version, concept count and backbone."""
    verify_hashes: bool = True
    """Re-hash every file against the manifest before uploading."""


@dataclasses.dataclass(frozen=True, slots=True)
class PullJob:
    """Download an atlas from a Hugging Face Hub repo into a folder and validate it."""

    repo_id: str
    """Source repo 'namespace/name'."""
    out: Path
    """Folder to download into (created; files of the repo are overwritten)."""
    repo_type: RepoType = DEFAULT_REPO_TYPE
    """Hub repo type."""
    revision: str | None = None
    """Branch, tag or commit; default: the main branch."""
    token: str | None = None
    """Hub token for private or gated repos; default: HF_TOKEN or `hf auth login`."""
    trust_atlas_weights: bool = False
    """Let the atlas name any backbone/LM weights (paths, Hub repos); default: only built-in tags and
    its own listed files (or ``$INSIGHT_TRUST_ATLAS_WEIGHTS=1``). See docs/atlas.md."""


def run_push(job: PushJob) -> str:
    """Push; returns the commit URL."""
    return push_atlas(
        job.atlas,
        job.repo_id,
        repo_type=job.repo_type,
        private=True if job.private else None,
        revision=job.revision,
        token=job.token,
        commit_message=job.commit_message,
        verify_hashes=job.verify_hashes,
    )


def run_pull(job: PullJob) -> Path:
    """Pull; returns the validated atlas folder."""
    trust = True if job.trust_atlas_weights else None  # None: the environment variable decides
    atlas = pull_atlas(job.repo_id, job.out, repo_type=job.repo_type, revision=job.revision, token=job.token,
                       trust_weights=trust)  # fmt: skip
    counts = atlas.manifest.get("counts", {})
    log.info(
        "pulled %s -> %s (%s concepts%s)",
        job.repo_id,
        atlas.root,
        counts.get("n_concepts", "?"),
        ", RANDOM-INIT BACKBONE: concepts carry no semantics" if atlas.random_weights else "",
    )
    return atlas.root
