"""Published vocabulary embeddings on the Hugging Face Hub: push, and fetch (hash-verified).

A repo holds, per (text encoder, words, templates), ``vocab/<key>.npz`` (the file written by
``vocab-embed``) and ``vocab/<key>.json`` (its manifest, SHA-256 and size); ``<key>`` is
:func:`~insight_core.concepts.vocab_files.cache_key` (arch, pretrained tag, words hash, templates
hash), so ``name`` can ask for exactly the file its atlas needs. Fetching reads the small sidecar
first, refuses another backbone, downloads the ``.npz``, checks its SHA-256 and its own manifest, and
copies it into the per-user cache. Only repos the user names (``--vocab-repo``) or
:data:`DEFAULT_VOCAB_REPO` are asked; random-init (tag ``none``) files are never pushed or fetched.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import RemoteEntryNotFoundError
from huggingface_hub.utils import HfHubHTTPError, HFValidationError

from insight_core.atlas.hub import DEFAULT_REPO_TYPE, _check_repo_type, _hub_error
from insight_core.concepts.vocab_embeddings import VocabEmbeddings, load_vocab_embeddings
from insight_core.concepts.vocab_files import (
    VocabManifest,
    cache_key,
    check_vocab_backbone,
    file_sha256,
    parse_manifest,
    user_vocab_cache,
)
from insight_core.errors import ConfigError, FeatureFileError, VocabularyMismatchError
from insight_core.models.image_batches import is_random_init
from insight_core.schema import JsonModel, validate

log = logging.getLogger(__name__)

DEFAULT_VOCAB_REPO: str | None = None
"""The project's documented repo of published vocabulary embeddings. None: the project has not
published one yet, so only a repo named with ``--vocab-repo`` is asked (docs/naming.md)."""

Download = Callable[..., str]
"""``hf_hub_download``-like: ``(repo_id, filename, *, repo_type, revision, token) -> local path``."""


def hub_paths(key: str) -> tuple[str, str]:
    """The ``.npz`` and sidecar ``.json`` paths of ``key`` inside a repo."""
    return f"vocab/{key}.npz", f"vocab/{key}.json"


def push_vocab(
    path: str | Path,
    repo_id: str,
    *,
    repo_type: str = DEFAULT_REPO_TYPE,
    revision: str | None = None,
    token: str | None = None,
    api: HfApi | None = None,
) -> str:
    """Upload a vocabulary file written by ``vocab-embed`` (manifest required) and its sidecar.

    Returns the path of the ``.npz`` inside the repo.
    """
    _check_repo_type(repo_type)
    path = Path(path)
    vocab = load_vocab_embeddings(path)
    where = f"vocabulary embeddings {str(path)!r}"
    man = parse_manifest(vocab, where)
    if man is None:
        raise ConfigError(
            f"{where} has no manifest; only files written by `insight vocab-embed` are published"
        )
    bb = man.backbone
    check_vocab_backbone(vocab, bb.arch, bb.pretrained, where)  # self-consistency
    if bb.random_weights or is_random_init(bb.pretrained):
        raise ConfigError(f"{where} was made by a random-init text encoder: it is meaningless, not published")
    if man.subset.n_words != man.subset.n_total:
        log.warning("%s holds a subset of its vocabulary (%s)", where, man.subset.reason)
    if set(man.templates) != set(vocab.pos_names):
        raise ConfigError(f"{where}: its manifest's templates do not match its parts of speech")
    templates = {pos: man.templates[pos] for pos in vocab.pos_names}  # in part-of-speech order
    key = cache_key(bb.arch, bb.pretrained, vocab.words, templates)
    npz_name, json_name = hub_paths(key)
    sidecar = {"manifest": vocab.manifest, "sha256": file_sha256(path), "size": path.stat().st_size,
               "file": npz_name}  # fmt: skip
    api = api or HfApi(token=token)
    message = f"vocabulary embeddings {bb.arch}/{bb.pretrained} ({vocab.n_words:,} words)"
    try:
        api.create_repo(repo_id, repo_type=repo_type, exist_ok=True, token=token)
        for data, dest in ((str(path), npz_name), (json.dumps(sidecar, indent=1).encode(), json_name)):
            api.upload_file(path_or_fileobj=data, path_in_repo=dest, repo_id=repo_id, repo_type=repo_type,
                            revision=revision, token=token, commit_message=message)  # fmt: skip
    except (HfHubHTTPError, HFValidationError, OSError) as err:
        raise _hub_error(err, repo_id, repo_type, revision) from err
    log.info("pushed %s -> %s:%s", path, repo_id, npz_name)
    return npz_name


def fetch_vocab(
    repo_id: str,
    arch: str,
    pretrained: str,
    words: Sequence[str],
    templates_by_pos: Mapping[str, Sequence[str]],
    *,
    cache_dir: str | Path | None = None,
    repo_type: str = DEFAULT_REPO_TYPE,
    revision: str | None = None,
    token: str | None = None,
    download: Download | None = None,
) -> tuple[VocabEmbeddings, Path] | None:
    """The published embeddings of exactly ``words`` for ``arch``/``pretrained``, or None when the repo
    has none. The verified file is copied into the per-user cache (returned with the embeddings).

    Raises
    ------
    VocabularyMismatchError
        The published file is for another backbone, or its hash or manifest does not match.
    HubError
        The repo cannot be reached (offline, missing, private).
    """
    _check_repo_type(repo_type)
    if is_random_init(pretrained):
        return None
    key = cache_key(arch, pretrained, words, templates_by_pos)
    npz_name, json_name = hub_paths(key)
    get = download or hf_hub_download
    where = f"{repo_type} repo {repo_id!r} file {npz_name!r}"
    try:
        sidecar = _read_sidecar(get(repo_id, json_name, repo_type=repo_type, revision=revision, token=token),
                                where)  # fmt: skip
        bb = sidecar.manifest.backbone
        if (bb.arch, bb.pretrained) != (arch, pretrained):
            raise VocabularyMismatchError(
                f"{where} is for text encoder {bb.arch}/{bb.pretrained}, not the atlas's {arch}/{pretrained}"
            )
        local = Path(get(repo_id, npz_name, repo_type=repo_type, revision=revision, token=token))
    except RemoteEntryNotFoundError:
        log.info("%s: not published", where)
        return None
    except (HfHubHTTPError, HFValidationError, OSError) as err:
        raise _hub_error(err, repo_id, repo_type, revision) from err
    if file_sha256(local) != sidecar.sha256:
        raise VocabularyMismatchError(
            f"{where}: SHA-256 differs from its sidecar {json_name!r} (corrupt or altered)"
        )
    vocab = load_vocab_embeddings(local)
    check_vocab_backbone(vocab, arch, pretrained, where)
    if vocab.words != tuple(words) or list(vocab.pos_names) != list(templates_by_pos):
        raise VocabularyMismatchError(f"{where}: holds other words or parts of speech than its name says")
    dest = user_vocab_cache(cache_dir) / f"{key}.npz"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(local, dest)
    log.info("vocabulary embeddings from %s (SHA-256 verified) -> %s", where, dest)
    return vocab, dest


class VocabSidecar(JsonModel):
    """``vocab/<key>.json`` beside a published vocabulary file (:func:`push_vocab`)."""

    manifest: VocabManifest
    """The file's own manifest."""
    sha256: str
    """SHA-256 of the ``.npz``; a download that differs is refused."""
    size: int | None = None
    file: str | None = None
    """Path of the ``.npz`` inside the repo."""


def _read_sidecar(path: str, where: str) -> VocabSidecar:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FeatureFileError(f"{where}: sidecar is not readable JSON: {e}") from e
    return validate(VocabSidecar, doc, f"{where}: sidecar", FeatureFileError)
