"""Vocabulary embeddings as an artefact: computed once per backbone, checked, cached, resumable.

Text embeddings of the naming vocabulary depend only on the text encoder (open_clip arch +
pretrained tag), the words and the templates, not on the atlas. A file written here carries a
**manifest** (:func:`vocab_manifest`: backbone, tag, hashes of the words and templates, the subset
policy) inside the ``.npz`` (key ``manifest``, one JSON string), so ``name`` can refuse a file made
for another backbone (:func:`check_vocab_backbone`) and find a previous result in the per-user cache
(:func:`user_vocab_cache`, keyed by arch, tag, words hash and templates hash). Random-init text
encoders (tag ``none``) are never cached there: their embeddings mean nothing and differ per run.

:func:`embed_resumable` embeds word chunk by word chunk (every part of speech per chunk) and saves a
partial file every ``checkpoint_s`` seconds, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from insight_core.atlas.layout import user_cache_dir
from insight_core.concepts._util import as_numpy, chunks
from insight_core.concepts.vocab_embeddings import (
    EncodeText,
    VocabEmbeddings,
    _unit_rows,
    load_vocab_embeddings,
)
from insight_core.errors import ConfigError, FeatureFileError, VocabularyMismatchError
from insight_core.io import write_npz
from insight_core.models.image_batches import is_random_init
from insight_core.schema import JsonModel, validate

logger = logging.getLogger(__name__)

VOCAB_FORMAT = "insight-vocab-embeddings"
"""``manifest["format"]`` of a vocabulary-embedding file."""
VOCAB_FORMAT_VERSION = 1
"""Bumped when the recipe changes (old files then count as made by another recipe)."""
TEXT_PATH = "open_clip encode_text; per template L2-normalised, averaged, renormalised; per part of speech"
"""How the text tower is used (recorded: a file made another way must not pass as ours)."""


class VocabBackbone(JsonModel):
    """The text encoder a vocabulary file was made with."""

    arch: str
    pretrained: str
    """Tag, or ``NAME-HASH`` of a local weights file."""
    random_weights: bool = False
    weights_sha256: str | None = None
    """Hash of a local weights file given as ``pretrained`` (None for a named tag)."""
    text_path: str | None = None
    """How the text tower was used (:data:`TEXT_PATH`)."""


class VocabSubset(JsonModel):
    """Which part of the vocabulary was embedded and why (``vocab_budget.VocabPlan.record``)."""

    policy: str | None = None
    """``full``, ``max-words``, ``budget-concreteness`` or ``budget-list-order``."""
    n_words: int | None = None
    n_total: int | None = None
    reason: str | None = None
    budget_s: float | None = None
    """The naming budget the subset was chosen under (None: no budget)."""


class VocabManifest(JsonModel):
    """The ``manifest`` of a vocabulary-embedding file (:func:`vocab_manifest`; also the Hub sidecar's)."""

    format: Literal["insight-vocab-embeddings"]
    version: Literal[1]
    backbone: VocabBackbone
    n_words: int
    words_sha256: str
    """:func:`words_sha256` of the words in the file."""
    pos_names: list[str]
    templates: dict[str, list[str]]
    """Part of speech -> its templates (``"a photo of a {}"``)."""
    templates_sha256: str
    subset: VocabSubset = Field(default_factory=VocabSubset)
    sources: list[dict[str, Any]] = Field(default_factory=list)
    """The word lists (``name``, ``file``, ``sha256``) the vocabulary was built from."""
    created: str | None = None


def parse_manifest(vocab: VocabEmbeddings, where: str) -> VocabManifest | None:
    """``vocab``'s manifest checked against :class:`VocabManifest` (None when the file has none).

    Raises
    ------
    VocabularyMismatchError
        Another format or recipe version (recompute the file), or a field that does not fit.
    """
    man = vocab.manifest
    if man is None:
        return None
    if (man.get("format"), man.get("version")) != (VOCAB_FORMAT, VOCAB_FORMAT_VERSION):
        raise VocabularyMismatchError(
            f"{where}: manifest format {man.get('format')!r} v{man.get('version')!r} is not "
            f"{VOCAB_FORMAT!r} v{VOCAB_FORMAT_VERSION}; recompute it with `insight vocab-embed`"
        )
    return validate(VocabManifest, man, f"{where}: manifest", VocabularyMismatchError)


def words_sha256(words: Sequence[str]) -> str:
    """sha256 of the words in order (JSON list)."""
    return hashlib.sha256(json.dumps(list(words), ensure_ascii=False).encode("utf-8")).hexdigest()


def templates_sha256(templates_by_pos: Mapping[str, Sequence[str]]) -> str:
    """sha256 of the template sets in part-of-speech order."""
    doc = [[pos, list(ts)] for pos, ts in templates_by_pos.items()]
    return hashlib.sha256(json.dumps(doc, ensure_ascii=False).encode("utf-8")).hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def vocab_manifest(
    *,
    arch: str,
    pretrained: str,
    words: Sequence[str],
    templates_by_pos: Mapping[str, Sequence[str]],
    subset: Mapping[str, Any],
    sources: Sequence[Mapping[str, Any]] = (),
    weights_sha256: str | None = None,
) -> dict[str, Any]:
    """The manifest of a vocabulary-embedding file.

    Parameters
    ----------
    subset
        ``{"policy", "n_words", "n_total", "reason"}``: which part of the vocabulary was embedded
        and why (``policy``: ``full``, ``max-words``, ``budget-concreteness``, ``budget-list-order``).
    sources
        The word lists (``name``, ``file``, ``sha256``) the vocabulary was built from.
    weights_sha256
        Hash of a local weights file given as ``pretrained`` (None for a named tag).
    """
    return {
        "format": VOCAB_FORMAT,
        "version": VOCAB_FORMAT_VERSION,
        "backbone": {
            "arch": str(arch),
            "pretrained": str(pretrained),
            "random_weights": is_random_init(str(pretrained)),
            "weights_sha256": weights_sha256,
            "text_path": TEXT_PATH,
        },
        "n_words": len(words),
        "words_sha256": words_sha256(words),
        "pos_names": list(templates_by_pos),
        "templates": {pos: list(ts) for pos, ts in templates_by_pos.items()},
        "templates_sha256": templates_sha256(templates_by_pos),
        "subset": dict(subset),
        "sources": [dict(s) for s in sources],
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def check_vocab_backbone(vocab: VocabEmbeddings, arch: str, pretrained: str, where: str) -> None:
    """Refuse embeddings made by another text encoder than the atlas's ``arch`` / ``pretrained``.

    A file without a manifest (bring-your-own ``words`` + ``embeddings``) cannot be checked: it is
    accepted with a WARNING. A manifest that is not ours, or whose words / part-of-speech axis
    disagree with the arrays, is refused too.

    Raises
    ------
    VocabularyMismatchError
        Naming both backbones (file and atlas) and the file.
    """
    man = parse_manifest(vocab, where)
    if man is None:
        logger.warning(
            "%s has no manifest: cannot check that it was made by %s/%s (the atlas's text encoder); "
            "using it as given", where, arch, pretrained,
        )  # fmt: skip
        return
    theirs = (man.backbone.arch, man.backbone.pretrained)
    if theirs != (arch, pretrained):
        raise VocabularyMismatchError(
            f"{where} was made with text encoder {theirs[0]}/{theirs[1]}, but the atlas's backbone is "
            f"{arch}/{pretrained}: names would be matched in another embedding space. Use a file made "
            f"for {arch}/{pretrained} (`insight vocab-embed --arch {arch} --pretrained {pretrained}`)"
        )
    if man.words_sha256 != words_sha256(vocab.words) or man.pos_names != list(vocab.pos_names):
        raise VocabularyMismatchError(f"{where}: its manifest does not describe its words / parts of speech")


def cache_key(arch: str, pretrained: str, words: Sequence[str], templates_by_pos: Mapping) -> str:
    """File stem of the cached embeddings of (arch, tag, words, templates)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{arch}__{pretrained}")[:80]
    return f"{safe}__{words_sha256(words)[:16]}__{templates_sha256(templates_by_pos)[:16]}"


def user_vocab_cache(cache_dir: str | Path | None = None) -> Path:
    """The per-user vocabulary cache folder: ``cache_dir`` or ``user_cache_dir()/vocab``."""
    return Path(cache_dir) if cache_dir is not None else user_cache_dir() / "vocab"


def cached_path(
    arch: str, pretrained: str, words: Sequence[str], templates_by_pos: Mapping, cache_dir: str | Path | None
) -> Path | None:
    """Where the per-user cache keeps these embeddings; None for a random-init encoder (never shared)."""
    if is_random_init(pretrained):
        return None
    return VocabStore(user_vocab_cache(cache_dir)).path(arch, pretrained, words, templates_by_pos)


@dataclasses.dataclass(frozen=True, slots=True)
class VocabStore:
    """A folder of cached vocabulary files named by :func:`cache_key`: the per-user cache, or an atlas's
    own ``cache/`` (prefix ``vocab_emb_``) for random-init encoders, whose embeddings are not shared."""

    folder: Path
    """Where the files are."""
    prefix: str = ""
    """File name prefix before the key."""

    def path(self, arch: str, pretrained: str, words: Sequence[str], templates_by_pos: Mapping) -> Path:
        return self.folder / f"{self.prefix}{cache_key(arch, pretrained, words, templates_by_pos)}.npz"

    def find_budget_subset(
        self, arch: str, pretrained: str, words: Sequence[str], templates_by_pos: Mapping, budget_s: float
    ) -> tuple[Path, int] | None:
        """The largest cached prefix of the ranked ``words`` chosen earlier under the same naming budget
        (path, n_words), so a rerun reuses it without loading the text encoder to time a batch again."""
        stem = cache_key(arch, pretrained, words, templates_by_pos)
        head, tail = stem.rsplit("__", 2)[0], stem.rsplit("__", 1)[1]  # arch__tag, templates hash
        best: tuple[Path, int] | None = None
        for path in self.folder.glob(f"{self.prefix}{head}__*__{tail}.npz"):
            man = peek_manifest(path)
            sub = man.subset if man is not None else VocabSubset()
            if man is None or sub.n_words is None or (sub.budget_s, sub.n_total) != (budget_s, len(words)):
                continue
            n = sub.n_words
            if man.words_sha256 != words_sha256(words[:n]):
                continue
            if best is None or n > best[1]:
                best = (path, n)
        return best


def read_cached(
    path: Path | None, arch: str, pretrained: str, words: Sequence[str]
) -> VocabEmbeddings | None:
    """The cached file at ``path`` when it holds exactly ``words`` for ``arch``/``pretrained``."""
    if path is None or not path.is_file():
        return None
    try:
        hit = load_vocab_embeddings(path)
        check_vocab_backbone(hit, arch, pretrained, f"vocabulary cache {path}")
    except (FeatureFileError, VocabularyMismatchError) as e:
        logger.warning("ignoring vocabulary cache file (%s)", e)
        return None
    if hit.words != tuple(words) or hit.manifest is None:
        return None
    logger.info("vocabulary embeddings: cache hit %s", path)
    return hit


def peek_manifest(path: Path) -> VocabManifest | None:
    """The manifest of a vocabulary file without reading its embeddings (None when it has none or
    one that does not fit)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return VocabManifest.model_validate(json.loads(str(z["manifest"][0])))
    except (OSError, ValueError, KeyError, EOFError, IndexError):  # ValidationError is a ValueError
        return None


# --------------------------------------------------------------------------------------------------
# Resumable embedding


def _partial_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.partial.npz")


def _read_partial(path: Path, key: str, n_pos: int) -> np.ndarray | None:
    """The embeddings (n_pos, n_done, d) of an interrupted run with the same ``key``, else None."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"][0]) != key:
                return None
            emb = np.asarray(z["embeddings"], dtype=np.float32)
    except (OSError, ValueError, KeyError, EOFError) as e:
        logger.warning("ignoring unreadable partial vocabulary file %s (%s)", path, e)
        return None
    return emb if emb.ndim == 3 and emb.shape[0] == n_pos else None


def embed_resumable(
    words: Sequence[str],
    encode_text: EncodeText,
    templates_by_pos: Mapping[str, Sequence[str]],
    *,
    out: str | Path,
    key: str,
    batch_words: int = 64,
    done_pwd: np.ndarray | None = None,
    checkpoint_s: float = 60.0,
    progress: bool = False,
) -> np.ndarray:
    """Embed ``words`` with every template set, resuming an interrupted run for the same ``out``.

    Parameters
    ----------
    out
        The final file; the partial state lives beside it (``.NAME.partial.npz``, removed at the end).
    key
        Identifies the job (backbone, words, templates): a partial file with another key is ignored.
    done_pwd
        Embeddings of the first words already computed (e.g. the timed batch), (n_pos, n0, d).
    checkpoint_s
        Seconds between partial saves (each rewrites the done part).

    Returns
    -------
    np.ndarray
        ``emb_pwd`` (n_pos, W, d) float32 unit rows.
    """
    from insight_core.progress import tqdm

    if batch_words < 1:
        raise ConfigError(f"batch_words must be >= 1, got {batch_words}")
    out = Path(out)
    partial = _partial_path(out)
    n_pos = len(templates_by_pos)
    resumed = _read_partial(partial, key, n_pos)
    parts: list[np.ndarray] = []
    if resumed is not None and (done_pwd is None or resumed.shape[1] >= done_pwd.shape[1]):
        logger.info("resuming vocabulary embeddings: %d of %d words done (%s)", resumed.shape[1], len(words),
                    partial)  # fmt: skip
        parts.append(resumed)
    elif done_pwd is not None:
        parts.append(np.asarray(done_pwd, dtype=np.float32))
    n_done = sum(p.shape[1] for p in parts)
    bar = tqdm(total=len(words), initial=n_done, desc="vocabulary", unit="word", disable=not progress,
               dynamic_ncols=True)  # fmt: skip
    last_save = time.monotonic()
    for sl in chunks(len(words) - n_done, batch_words):
        batch = list(words[n_done + sl.start : n_done + sl.stop])
        parts.append(encode_batch(batch, encode_text, templates_by_pos))
        bar.update(len(batch))
        if time.monotonic() - last_save >= checkpoint_s:
            _save_partial(partial, key, parts)
            last_save = time.monotonic()
    bar.close()
    emb = np.concatenate(parts, axis=1) if parts else np.zeros((n_pos, 0, 1), np.float32)
    partial.unlink(missing_ok=True)
    return emb


def encode_batch(
    words: Sequence[str], encode_text: EncodeText, templates_by_pos: Mapping[str, Sequence[str]]
) -> np.ndarray:
    """(n_pos, len(words), d) unit embeddings of a few words, every part of speech."""
    per_pos = []
    for pos, templates in templates_by_pos.items():
        emb = as_numpy(encode_text(list(words), list(templates))).astype(np.float32, copy=False)
        if emb.ndim != 2 or emb.shape[0] != len(words):
            raise ConfigError(f"encode_text returned shape {emb.shape} for {len(words)} {pos} texts")
        per_pos.append(_unit_rows(emb, f"encode_text output for {pos} words", ConfigError))
    return np.stack(per_pos)


def _save_partial(path: Path, key: str, parts: list[np.ndarray]) -> None:
    emb = np.concatenate(parts, axis=1)
    write_npz(path, key=np.array([key], dtype=str), embeddings=emb)
    parts[:] = [emb]
    logger.info("vocabulary embeddings: %d words saved to %s (resumable)", emb.shape[1], path)
