"""Text embeddings of the naming vocabulary (paper App. B.4).

:func:`embed_vocabulary` fills each word into a noun, a verb and an adjective template set (ten
templates each, :data:`TEMPLATES_BY_POS`) and keeps, per part of speech, the renormalised average of
the normalised template embeddings: ``emb_pwd`` (n_pos, W, d). :func:`cached_vocab_embeddings`
caches that on disk keyed by (backbone id, words, templates); :func:`load_vocab_embeddings` also
reads bring-your-own ``.npz`` files (``words`` + ``embeddings`` (W, d), one embedding set for all
parts of speech).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from insight_core.concepts._util import as_numpy, chunks, sq_norms
from insight_core.errors import ConfigError, FeatureFileError
from insight_core.io import write_npz

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Templates (paper App. B.4 style: ten per part of speech, one "{}" slot each)

NOUN_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a cropped photo of the {}.",
    "a good photo of a {}.",
    "a bright photo of a {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "an image of a {}.",
    "a picture of the {}.",
)
"""Noun templates ("a photo of a {}.")."""

VERB_TEMPLATES: tuple[str, ...] = (
    "a photo of someone {}.",
    "a photo of something {}.",
    "a photo of a person {}.",
    "a photo of people {}.",
    "a photo of an animal {}.",
    "a close-up photo of someone {}.",
    "an image of someone {}.",
    "a picture of something {}.",
    "a photo of a man {}.",
    "a photo of a woman {}.",
)
"""Verb templates ("a photo of someone {}.")."""

ADJECTIVE_TEMPLATES: tuple[str, ...] = (
    "something that is {}.",
    "a photo of something {}.",
    "a photo of something that is {}.",
    "a photo of a {} object.",
    "a close-up photo of something {}.",
    "an image of something {}.",
    "a picture of something that looks {}.",
    "a {} thing.",
    "a photo of a {} surface.",
    "this is {}.",
)
"""Adjective templates ("something that is {}.")."""

TEMPLATES_BY_POS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {"noun": NOUN_TEMPLATES, "verb": VERB_TEMPLATES, "adjective": ADJECTIVE_TEMPLATES}
)
"""The paper's three template sets by part of speech (order = the ``pos`` axis of embeddings)."""

SINGLE_POS = "any"
"""Part-of-speech name of a single embedding set used for all parts of speech (bring-your-own)."""

VOCAB_CACHE_VERSION = 1
"""Bumped when the cached embedding recipe changes (invalidates old cache files)."""


# --------------------------------------------------------------------------------------------------
# Text embeddings

EncodeText = Callable[[Sequence[str], Sequence[str]], Any]
"""``encode_text(texts, templates) -> (T, d)`` unit-norm template-averaged embeddings (numpy or torch),
e.g. :meth:`insight_core.models.backbone.ClipBackbone.encode_text`."""


def _unit_rows(emb: np.ndarray, where: str, err: type[Exception]) -> np.ndarray:
    """float32 unit rows of ``emb`` (copies only when some row is off by more than 1e-4)."""
    emb = np.asarray(emb, dtype=np.float32)
    sq = sq_norms(emb)
    if not np.isfinite(sq).all():
        raise err(f"{where}: embeddings hold NaN/inf values")
    if (sq <= 1e-24).any():
        bad = np.argwhere(sq <= 1e-24)[0].tolist()
        raise err(f"{where}: embedding row {bad} has zero norm (cannot be normalised)")
    if np.abs(sq - 1.0).max() > 2e-4:
        emb = (emb / np.sqrt(sq)[..., None]).astype(np.float32)
    return emb


def _check_template_sets(templates_by_pos: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    if not isinstance(templates_by_pos, Mapping) or not templates_by_pos:
        raise ConfigError("templates_by_pos must map at least one part-of-speech name to templates")
    out = {}
    for pos, templates in templates_by_pos.items():
        if not isinstance(pos, str) or not pos:
            raise ConfigError(f"templates_by_pos keys must be non-empty strings, got {pos!r}")
        if isinstance(templates, str) or not templates:
            raise ConfigError(f"templates_by_pos[{pos!r}] must be a non-empty sequence of templates")
        for t in templates:
            if not isinstance(t, str) or t.count("{}") != 1 or set("{}") & set(t.replace("{}", "")):
                raise ConfigError(
                    f"templates_by_pos[{pos!r}]: template {t!r} must contain exactly one '{{}}'"
                )
        out[pos] = list(templates)
    return out


def _check_words(words: Sequence[str], name: str) -> list[str]:
    if isinstance(words, str):
        raise ConfigError(f"{name} must be a sequence of strings, got a single str")
    words = list(words)
    if not words:
        raise ConfigError(f"{name} is empty")
    bad = next((w for w in words if not isinstance(w, str) or not w.strip()), None)
    if bad is not None:
        raise ConfigError(f"{name} must hold non-empty strings, got {bad!r}")
    if len(set(words)) != len(words):
        dups = [w for w, c in _counts(words).items() if c > 1][:5]
        raise ConfigError(f"{name} holds duplicate entries, e.g. {dups}")
    return words


def _counts(items: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


@dataclasses.dataclass(frozen=True)
class VocabEmbeddings:
    """Text embeddings of a vocabulary, one unit vector per (part of speech, word)."""

    words: tuple[str, ...]
    """The words (unique), W of them."""
    emb_pwd: np.ndarray
    """float32 (n_pos, W, d), unit rows."""
    pos_names: tuple[str, ...]
    """Name of each part-of-speech slice (``("noun", "verb", "adjective")``, or ``("any",)``)."""
    manifest: Mapping[str, Any] | None = None
    """What made the embeddings (backbone, tag, word and template hashes, subset choice;
    :mod:`insight_core.concepts.vocab_files`), or None for a bring-your-own file without one."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "words", tuple(_check_words(self.words, "VocabEmbeddings.words")))
        object.__setattr__(self, "pos_names", tuple(self.pos_names))
        emb = as_numpy(self.emb_pwd)
        if emb.ndim != 3 or emb.shape[0] != len(self.pos_names) or emb.shape[1] != len(self.words):
            raise ConfigError(
                f"VocabEmbeddings.emb_pwd must be (n_pos={len(self.pos_names)}, W={len(self.words)}, d), "
                f"got {emb.shape}"
            )
        if len(set(self.pos_names)) != len(self.pos_names) or not all(self.pos_names):
            raise ConfigError(f"VocabEmbeddings.pos_names must be unique non-empty, got {self.pos_names}")
        object.__setattr__(self, "emb_pwd", _unit_rows(emb, "VocabEmbeddings.emb_pwd", ConfigError))

    @property
    def n_words(self) -> int:
        """Number of words W."""
        return len(self.words)

    @property
    def n_pos(self) -> int:
        """Number of part-of-speech slices."""
        return len(self.pos_names)

    @property
    def dim(self) -> int:
        """Embedding dimension d."""
        return int(self.emb_pwd.shape[2])

    def save_npz(self, path: str | Path) -> Path:
        """Atomically write ``words`` (W,), ``embeddings`` (n_pos, W, d) float32, ``pos_names`` (n_pos,)."""
        arrays = {
            "words": np.array(self.words, dtype=str),
            "embeddings": np.ascontiguousarray(self.emb_pwd, dtype=np.float32),
            "pos_names": np.array(self.pos_names, dtype=str),
        }
        if self.manifest is not None:  # JSON in a one-element str array: no pickle needed to read it
            arrays["manifest"] = np.array([json.dumps(dict(self.manifest))], dtype=str)
        return write_npz(path, **arrays)


def load_vocab_embeddings(path: str | Path) -> VocabEmbeddings:
    """Read vocabulary embeddings from an ``.npz`` (never unpickles).

    Accepted layouts:

    - bring-your-own: ``words`` (W,) strings and ``embeddings`` (W, d) -- one embedding set used for
      all parts of speech (``pos_names = ("any",)``);
    - ours (:meth:`VocabEmbeddings.save_npz`): ``embeddings`` (n_pos, W, d) and ``pos_names`` (n_pos,),
      and ``manifest`` (one JSON string: what made them) when written by ``vocab-embed`` or ``name``.

    Floating dtypes are cast to float32 and rows are unit-normalised.

    Raises
    ------
    FeatureFileError
        Missing file, not an npz, missing keys, wrong shapes/dtypes, duplicate or empty words,
        NaN/inf or zero rows; the message names the file.
    """
    path = Path(path)
    where = f"vocabulary embeddings {str(path)!r}"
    if not path.is_file():
        raise FeatureFileError(f"{where} does not exist")
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise FeatureFileError(f"{where} is not a readable .npz archive: {e}") from e
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise FeatureFileError(
            f"{where} is a single .npy array; expected an .npz with 'words' and 'embeddings'"
        )
    try:
        with z:
            missing = [k for k in ("words", "embeddings") if k not in z.files]
            if missing:
                raise FeatureFileError(
                    f"{where} lacks {missing} (has {sorted(z.files)}); expected 'words' (W,) strings and "
                    "'embeddings' (W, d) or (n_pos, W, d) [+ 'pos_names']"
                )
            words_arr, emb = z["words"], z["embeddings"]
            pos_arr = z["pos_names"] if "pos_names" in z.files else None
            manifest_arr = z["manifest"] if "manifest" in z.files else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # e.g. object arrays need pickle
        raise FeatureFileError(f"{where}: cannot read arrays ({e}); strings must be numpy str arrays") from e
    words = _str_array(words_arr, f"{where} 'words'")
    if not np.issubdtype(emb.dtype, np.floating):
        raise FeatureFileError(f"{where}: 'embeddings' must be floating point, got {emb.dtype}")
    pos_names: tuple[str, ...]
    if emb.ndim == 2:
        pos_names = (SINGLE_POS,)
        if pos_arr is not None and len(_str_array(pos_arr, f"{where} 'pos_names'")) == 1:
            pos_names = tuple(_str_array(pos_arr, f"{where} 'pos_names'"))
        emb = emb[None]
    elif emb.ndim == 3:
        if pos_arr is None:
            pos_names = tuple(f"pos{p}" for p in range(emb.shape[0]))
            logger.warning("%s has a pos axis but no 'pos_names'; using %s", where, pos_names)
        else:
            pos_names = tuple(_str_array(pos_arr, f"{where} 'pos_names'"))
    else:
        raise FeatureFileError(f"{where}: 'embeddings' must be (W, d) or (n_pos, W, d), got {emb.shape}")
    if emb.shape[1] != len(words) or emb.shape[0] != len(pos_names) or emb.shape[2] < 1:
        raise FeatureFileError(
            f"{where}: 'embeddings' {emb.shape} does not match {len(words)} words and "
            f"{len(pos_names)} part(s) of speech {pos_names}"
        )
    try:
        _check_words(words, f"{where} 'words'")
    except ConfigError as e:
        raise FeatureFileError(str(e)) from e
    if len(set(pos_names)) != len(pos_names) or not all(pos_names):
        raise FeatureFileError(f"{where}: 'pos_names' must be unique non-empty strings, got {pos_names}")
    emb = _unit_rows(emb, where, FeatureFileError)
    manifest = None if manifest_arr is None else _manifest(manifest_arr, where)
    return VocabEmbeddings(tuple(words), emb, pos_names, manifest)


def _manifest(arr: np.ndarray, where: str) -> dict[str, Any]:
    text = _str_array(arr, f"{where} 'manifest'")
    try:
        doc = json.loads(text[0]) if len(text) == 1 else None
    except json.JSONDecodeError as e:
        raise FeatureFileError(f"{where}: 'manifest' is not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise FeatureFileError(f"{where}: 'manifest' must be one JSON object string")
    return doc


def _str_array(arr: np.ndarray, where: str) -> list[str]:
    if arr.ndim != 1 or arr.dtype.kind not in "US":
        raise FeatureFileError(f"{where} must be a 1-D numpy str array, got {arr.dtype} {arr.shape}")
    if arr.dtype.kind == "S":
        try:
            return [b.decode("utf-8") for b in arr.tolist()]
        except UnicodeDecodeError as e:
            raise FeatureFileError(f"{where}: bytes are not UTF-8: {e}") from e
    return [str(s) for s in arr.tolist()]


def embed_vocabulary(
    words: Sequence[str],
    encode_text: EncodeText,
    templates_by_pos: Mapping[str, Sequence[str]] = TEMPLATES_BY_POS,
    batch_size: int = 256,
    progress: bool = False,
) -> VocabEmbeddings:
    """Embed every word with every template set.

    Parameters
    ----------
    words
        Unique words (e.g. :attr:`Vocabulary.words`).
    encode_text
        ``encode_text(texts, templates) -> (len(texts), d)``: per text, the renormalised average of
        the normalised embeddings of its filled templates (e.g. ``ClipBackbone.encode_text``).
    templates_by_pos
        Part-of-speech name -> templates with one ``{}`` each; its order is the ``pos`` axis.
    batch_size
        Words per ``encode_text`` call (each call encodes ``batch_size * n_templates`` prompts).
    progress
        Show a progress bar (words x parts of speech).

    Returns
    -------
    VocabEmbeddings
        ``emb_pwd`` (n_pos, W, d) float32 unit rows.
    """
    from insight_core.progress import tqdm

    words = _check_words(words, "words")
    sets = _check_template_sets(templates_by_pos)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    per_pos = []
    dim: int | None = None
    bar = tqdm(total=len(words) * len(sets), desc="vocabulary", unit="word", disable=not progress,
               dynamic_ncols=True)  # fmt: skip
    for pos, templates in sets.items():
        logger.info("embedding %d words with %d %s templates", len(words), len(templates), pos)
        parts = []
        for sl in chunks(len(words), batch_size):
            out = as_numpy(encode_text(words[sl], templates)).astype(np.float32, copy=False)
            n = sl.stop - sl.start
            if out.ndim != 2 or out.shape[0] != n or (dim is not None and out.shape[1] != dim):
                raise ConfigError(
                    f"encode_text returned shape {out.shape} for {n} texts; expected ({n}, "
                    f"{dim if dim is not None else 'd'})"
                )
            dim = out.shape[1]
            parts.append(_unit_rows(out, f"encode_text output for {pos} words {sl.start}..", ConfigError))
            bar.update(n)
        per_pos.append(np.concatenate(parts))
    bar.close()
    return VocabEmbeddings(tuple(words), np.stack(per_pos), tuple(sets))


def vocab_cache_key(
    words: Sequence[str], backbone_id: str, templates_by_pos: Mapping[str, Sequence[str]] = TEMPLATES_BY_POS
) -> str:
    """sha256 hex digest of (cache version, backbone id, templates by part of speech, words)."""
    doc = {
        "version": VOCAB_CACHE_VERSION,
        "backbone": str(backbone_id),
        "templates": [[pos, list(ts)] for pos, ts in templates_by_pos.items()],
        "words": list(words),
    }
    return hashlib.sha256(json.dumps(doc, ensure_ascii=False).encode("utf-8")).hexdigest()


def cached_vocab_embeddings(
    cache_dir: str | Path,
    words: Sequence[str],
    backbone_id: str,
    encode_text: EncodeText,
    templates_by_pos: Mapping[str, Sequence[str]] = TEMPLATES_BY_POS,
    batch_size: int = 256,
    progress: bool = False,
) -> VocabEmbeddings:
    """:func:`embed_vocabulary`, cached in ``cache_dir/vocab_emb_<hash>.npz``.

    The key hashes ``backbone_id`` (pass something that pins the weights, e.g.
    ``"ViT-B-16/openai"``), the words and the templates; a hit is returned without calling
    ``encode_text``. An unreadable or mismatching cache file is recomputed and overwritten.
    """
    if not isinstance(backbone_id, str) or not backbone_id:
        raise ConfigError(f"backbone_id must be a non-empty string, got {backbone_id!r}")
    words = _check_words(words, "words")
    sets = _check_template_sets(templates_by_pos)
    key = vocab_cache_key(words, backbone_id, sets)
    path = Path(cache_dir) / f"vocab_emb_{key[:24]}.npz"
    if path.is_file():
        try:
            hit = load_vocab_embeddings(path)
        except FeatureFileError as e:
            logger.warning("ignoring unreadable vocabulary cache (%s); recomputing", e)
        else:
            if hit.words == tuple(words) and hit.pos_names == tuple(sets):
                logger.info("vocabulary embeddings: cache hit %s", path)
                return hit
            logger.warning("vocabulary cache %s does not match the request; recomputing", path)
    emb = embed_vocabulary(words, encode_text, sets, batch_size, progress=progress)
    emb.save_npz(path)
    logger.info("vocabulary embeddings cached in %s", path)
    return emb
