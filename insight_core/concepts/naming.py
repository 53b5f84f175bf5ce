"""Hierarchy-aware concept naming (paper Sec. 3.4, App. B.4, Eq. B.9-B.13).

Three steps, each usable on its own:

1. **Vocabulary** -- :func:`build_vocabulary` unions word lists (CLIP-Dissect 20k common words,
   Brysbaert concreteness words/bigrams with ``Conc.M > 2.5``, LAION unigrams and bigrams;
   :func:`paper_vocab_sources`), normalised (stripped, lower-case, single spaces) and deduplicated
   in a deterministic order; every word remembers the source(s) it came from.
2. **Text embeddings** -- :func:`embed_vocabulary` fills each word into a noun, a verb and an
   adjective template set (ten templates each, :data:`TEMPLATES_BY_POS`) and keeps, per part of
   speech, the renormalised average of the normalised template embeddings: ``emb_pwd`` (n_pos, W, d).
   :func:`cached_vocab_embeddings` caches that on disk keyed by (backbone id, words, templates);
   :func:`load_vocab_embeddings` also reads bring-your-own ``.npz`` files (``words`` +
   ``embeddings`` (W, d), one embedding set for all parts of speech).
3. **Concept vectors and names** -- :func:`concept_vectors` builds the family-informed vector of
   Eq. B.9,

   ``v_i = b_dec + alpha * w_ii * W_dec[i] + sum_{a in parents(i)} D[i, a] * w_ia * W_dec[a]``

   (``w_ia`` = mean activation of concept ``a`` on the top-30 patches of concept ``i``; ``D`` the
   co-occurrence confidence of the family stage), and :func:`name_concepts` scores every word by the
   maximum over parts of speech of its cosine with the normalised concept vector (Eq. B.10-B.13) and
   names each concept by the argmax, keeping the top-k alternatives.

The co-occurrence matrix, the ``w`` values and the parent lists come from the stats/family stages;
this module takes them as plain arrays, mappings or callables and imports neither.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import numpy as np

from insight_core.errors import ConfigError, FeatureFileError
from insight_core.io import atomic_write

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


def normalize_word(text: str) -> str:
    """Vocabulary form of an entry: stripped, lower-case, internal whitespace collapsed to one space."""
    return " ".join(text.split()).lower()


# --------------------------------------------------------------------------------------------------
# Vocabulary files

SourceKind = Literal["list", "brysbaert"]
_SOURCE_KINDS = ("list", "brysbaert")


@dataclasses.dataclass(frozen=True, slots=True)
class VocabSource:
    """One word list of the vocabulary."""

    name: str
    """Short name recorded for every word this source provides (e.g. ``"brysbaert"``)."""
    path: str | Path
    """Path of the file."""
    kind: SourceKind = "list"
    """``"list"``: one entry per line (``#`` comments, blanks skipped); ``"brysbaert"``: the
    tab-separated Brysbaert et al. (2014) concreteness table (columns ``Word``, ``Conc.M``, ...)."""
    min_concreteness: float = 2.5
    """``"brysbaert"`` only: keep entries (words and bigrams) whose mean rating ``Conc.M`` is
    strictly greater than this (paper: 2.5)."""
    required: bool = True
    """False: a missing file is skipped with a WARNING instead of raising (the Brysbaert table,
    which is not shipped in ``assets/vocab``)."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(f"VocabSource.name must be a non-empty string, got {self.name!r}")
        if self.kind not in _SOURCE_KINDS:
            raise ConfigError(f"VocabSource.kind must be one of {_SOURCE_KINDS}, got {self.kind!r}")
        if not math.isfinite(float(self.min_concreteness)):
            raise ConfigError(f"VocabSource.min_concreteness must be finite, got {self.min_concreteness!r}")


def _read_text(path: str | Path, what: str) -> tuple[Path, str]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist or is not a file")
    try:
        return path, path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise FeatureFileError(f"{what} {str(path)!r} is not UTF-8 text: {e}") from e
    except OSError as e:
        raise FeatureFileError(f"cannot read {what} {str(path)!r}: {e}") from e


def load_word_list(path: str | Path) -> list[str]:
    """Entries of a plain word list: one per line, normalised (:func:`normalize_word`), deduplicated.

    Blank lines and lines starting with ``#`` are skipped; the order of first occurrence is kept.

    Raises
    ------
    ConfigError
        The file does not exist.
    FeatureFileError
        Not UTF-8, a tab-separated table (use ``kind="brysbaert"``), or no entries at all.
    """
    path, text = _read_text(path, "word list")
    out: dict[str, None] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if "\t" in line:
            raise FeatureFileError(
                f"word list {str(path)!r} line {lineno} holds a tab: expected one entry per line "
                "(a tab-separated table such as Brysbaert's needs kind='brysbaert')"
            )
        word = normalize_word(line)
        if word and not word.startswith("#"):
            out.setdefault(word)
    if not out:
        raise FeatureFileError(f"word list {str(path)!r} holds no entries")
    return list(out)


def load_brysbaert(
    path: str | Path, min_concreteness: float = 2.5, *, include_bigrams: bool = True
) -> list[str]:
    """Words (and bigrams) of the Brysbaert et al. (2014) table with ``Conc.M > min_concreteness``.

    The file is tab-separated with a header naming at least ``Word`` and ``Conc.M`` (``Bigram``, 0/1,
    is used when ``include_bigrams`` is False). Entries are normalised and deduplicated in file order.

    Raises
    ------
    ConfigError
        The file does not exist.
    FeatureFileError
        Missing columns, a short row or a non-numeric rating (the message names the file and line).
    """
    path, text = _read_text(path, "concreteness table")
    lines = text.splitlines()
    header_at = next((i for i, line in enumerate(lines) if line.strip()), None)
    if header_at is None:
        raise FeatureFileError(f"concreteness table {str(path)!r} is empty")
    header = [h.strip() for h in lines[header_at].split("\t")]
    missing = [c for c in ("Word", "Conc.M") if c not in header]
    if missing:
        raise FeatureFileError(
            f"concreteness table {str(path)!r}: header lacks column(s) {missing} (found {header}); "
            "expected the tab-separated Brysbaert et al. table with 'Word', 'Bigram', 'Conc.M', ..."
        )
    i_word, i_conc = header.index("Word"), header.index("Conc.M")
    i_bigram = header.index("Bigram") if "Bigram" in header else None
    need = max(i_word, i_conc, -1 if i_bigram is None else i_bigram) + 1
    out: dict[str, None] = {}
    for lineno, line in enumerate(lines[header_at + 1 :], start=header_at + 2):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) < need:
            raise FeatureFileError(
                f"concreteness table {str(path)!r} line {lineno}: {len(cols)} column(s), expected >= {need}"
            )
        try:
            conc = float(cols[i_conc])
        except ValueError as e:
            raise FeatureFileError(
                f"concreteness table {str(path)!r} line {lineno}: Conc.M {cols[i_conc].strip()!r} "
                "is not a number"
            ) from e
        if not include_bigrams and i_bigram is not None and cols[i_bigram].strip() not in ("", "0"):
            continue
        word = normalize_word(cols[i_word])
        if word and conc > min_concreteness:
            out.setdefault(word)
    return list(out)


def load_source(source: VocabSource) -> list[str]:
    """Entries of one :class:`VocabSource`."""
    if source.kind == "brysbaert":
        return load_brysbaert(source.path, source.min_concreteness)
    return load_word_list(source.path)


BRYSBAERT_FILE = "Concreteness_ratings_Brysbaert_et_al_BRM.txt"
"""File name of the Brysbaert et al. (2014) concreteness table in a vocabulary folder."""


def paper_vocab_sources(vocab_dir: str | Path, min_concreteness: float = 2.5) -> list[VocabSource]:
    """The paper's word lists as found in ``vocab_dir`` (Muraki multi-word expressions are not included).

    CLIP-Dissect 20k common words, Brysbaert words + bigrams with ``Conc.M > min_concreteness``,
    LAION-400M unigrams and bigrams (MSAE file names). The Brysbaert table is optional (its licence
    is unclear, so ``assets/vocab`` does not ship it): when absent it is skipped with a WARNING.
    """
    d = Path(vocab_dir)
    return [
        VocabSource("clip_dissect_20k", d / "msae_clip_disect_20k.txt"),
        VocabSource(
            "brysbaert",
            d / BRYSBAERT_FILE,
            "brysbaert",
            min_concreteness,
            required=False,
        ),
        VocabSource("laion_unigram", d / "msae_laion_400_unigram.txt"),
        VocabSource("laion_bigram", d / "msae_laion_400_bigram.txt"),
    ]


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """Deduplicated words in a deterministic order and the source(s) each came from."""

    words: tuple[str, ...]
    """Normalised entries: sources in the given order, each in file order, first occurrence kept."""
    sources: tuple[tuple[str, ...], ...]
    """Per word, the names of the sources that list it (in source order)."""
    source_names: tuple[str, ...]
    """Names of all sources, in order."""

    def __post_init__(self) -> None:
        if len(self.words) != len(self.sources):
            raise ConfigError(f"Vocabulary: {len(self.words)} words but {len(self.sources)} source entries")

    def __len__(self) -> int:
        return len(self.words)

    def source_counts(self) -> dict[str, int]:
        """Number of (kept) words each source provides (a word in two sources counts for both)."""
        counts = dict.fromkeys(self.source_names, 0)
        for srcs in self.sources:
            for s in srcs:
                counts[s] += 1
        return counts


def _present_sources(sources: Sequence[VocabSource]) -> list[VocabSource]:
    """Drop optional sources whose file is missing (one WARNING each); required ones fail later."""
    present = []
    for src in sources:
        if not src.required and not Path(src.path).is_file():
            logger.warning(
                "vocabulary source %s skipped: %s not found (optional; see assets/vocab/PROVENANCE.md)",
                src.name,
                src.path,
            )
            continue
        present.append(src)
    if not present:
        raise ConfigError(f"no vocabulary source found: {[str(s.path) for s in sources]} are all missing")
    return present


def build_vocabulary(sources: Sequence[VocabSource], max_words: int | None = None) -> Vocabulary:
    """Union of the entries of ``sources``, deduplicated, in a deterministic order.

    Parameters
    ----------
    sources
        Word lists, in priority order (their order decides the word order).
    max_words
        Keep only the first ``max_words`` words of the union (None = all).
    """
    sources = list(sources)
    if not sources:
        raise ConfigError("build_vocabulary needs at least one VocabSource")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ConfigError(f"VocabSource names must be unique, got {names}")
    if max_words is not None and (not isinstance(max_words, int) or max_words < 1):
        raise ConfigError(f"max_words must be None or a positive int, got {max_words!r}")
    sources = _present_sources(sources)
    names = [s.name for s in sources]
    origin: dict[str, list[str]] = {}
    for src in sources:
        entries = load_source(src)
        logger.info("vocabulary source %s (%s): %d entries", src.name, src.path, len(entries))
        for word in entries:
            origin.setdefault(word, []).append(src.name)
    items = list(origin.items())
    if max_words is not None:
        items = items[:max_words]
    logger.info("vocabulary: %d words from %d sources", len(items), len(sources))
    return Vocabulary(
        words=tuple(w for w, _ in items),
        sources=tuple(tuple(s) for _, s in items),
        source_names=tuple(names),
    )


# --------------------------------------------------------------------------------------------------
# Text embeddings

EncodeText = Callable[[Sequence[str], Sequence[str]], Any]
"""``encode_text(texts, templates) -> (T, d)`` unit-norm template-averaged embeddings (numpy or torch),
e.g. :meth:`insight_core.models.backbone.ClipBackbone.encode_text`."""


def _np(x: Any) -> np.ndarray:
    """numpy view of a numpy array or a (CPU/GPU) torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _sq_norms(x: np.ndarray) -> np.ndarray:
    return np.einsum("...d,...d->...", x, x, dtype=np.float64)


def _unit_rows(emb: np.ndarray, where: str, err: type[Exception]) -> np.ndarray:
    """float32 unit rows of ``emb`` (copies only when some row is off by more than 1e-4)."""
    emb = np.asarray(emb, dtype=np.float32)
    sq = _sq_norms(emb)
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

    def __post_init__(self) -> None:
        object.__setattr__(self, "words", tuple(_check_words(self.words, "VocabEmbeddings.words")))
        object.__setattr__(self, "pos_names", tuple(self.pos_names))
        emb = _np(self.emb_pwd)
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

        def write(tmp: Path) -> None:
            with tmp.open("wb") as f:  # a file object: np.savez would append ".npz" to a bare path
                np.savez(f, **arrays)

        return atomic_write(path, write)


def load_vocab_embeddings(path: str | Path) -> VocabEmbeddings:
    """Read vocabulary embeddings from an ``.npz`` (never unpickles).

    Accepted layouts:

    - bring-your-own: ``words`` (W,) strings and ``embeddings`` (W, d) -- one embedding set used for
      all parts of speech (``pos_names = ("any",)``);
    - ours (:meth:`VocabEmbeddings.save_npz`): ``embeddings`` (n_pos, W, d) and ``pos_names`` (n_pos,).

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
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # e.g. object arrays need pickle
        raise FeatureFileError(f"{where}: cannot read arrays ({e}); strings must be numpy str arrays") from e
    words = _str_array(words_arr, f"{where} 'words'")
    if not np.issubdtype(emb.dtype, np.floating):
        raise FeatureFileError(f"{where}: 'embeddings' must be floating point, got {emb.dtype}")
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
    return VocabEmbeddings(tuple(words), emb, pos_names)


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
    batch_size: int = 1024,
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

    Returns
    -------
    VocabEmbeddings
        ``emb_pwd`` (n_pos, W, d) float32 unit rows.
    """
    words = _check_words(words, "words")
    sets = _check_template_sets(templates_by_pos)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    per_pos = []
    dim: int | None = None
    for pos, templates in sets.items():
        logger.info("embedding %d words with %d %s templates", len(words), len(templates), pos)
        parts = []
        for sl in _chunks(len(words), batch_size):
            out = _np(encode_text(words[sl], templates)).astype(np.float32, copy=False)
            n = sl.stop - sl.start
            if out.ndim != 2 or out.shape[0] != n or (dim is not None and out.shape[1] != dim):
                raise ConfigError(
                    f"encode_text returned shape {out.shape} for {n} texts; expected ({n}, "
                    f"{dim if dim is not None else 'd'})"
                )
            dim = out.shape[1]
            parts.append(_unit_rows(out, f"encode_text output for {pos} words {sl.start}..", ConfigError))
        per_pos.append(np.concatenate(parts))
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
    batch_size: int = 1024,
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
    emb = embed_vocabulary(words, encode_text, sets, batch_size)
    emb.save_npz(path)
    logger.info("vocabulary embeddings cached in %s", path)
    return emb


# --------------------------------------------------------------------------------------------------
# Concept vectors (Eq. B.9)

PairLookup = Callable[[np.ndarray, np.ndarray], Any]
"""``lookup(i_idx, a_idx) -> values`` of shape ``i_idx.shape`` (vectorised over index arrays)."""


def parents_from_edges(parent_idx: Any, child_idx: Any, m: int) -> list[list[int]]:
    """Parent lists (length ``m``) from ``(parent, child)`` edge arrays (e.g. ``edges.parquet``).

    Each list is sorted and deduplicated.
    """
    p, c = _np(parent_idx).astype(np.int64).ravel(), _np(child_idx).astype(np.int64).ravel()
    if p.shape != c.shape:
        raise ConfigError(f"parent_idx {p.shape} and child_idx {c.shape} must have the same length")
    if p.size and (min(p.min(), c.min()) < 0 or max(p.max(), c.max()) >= m):
        raise ConfigError(f"edge indices must lie in [0, m={m})")
    pairs = np.unique(np.stack([c, p], axis=1), axis=0) if p.size else np.zeros((0, 2), np.int64)
    out: list[list[int]] = [[] for _ in range(m)]
    starts = np.searchsorted(pairs[:, 0], np.arange(m + 1))
    for i in np.flatnonzero(np.diff(starts)).tolist():
        out[i] = pairs[starts[i] : starts[i + 1], 1].tolist()
    return out


def _flatten_parents(
    parents: Sequence[Sequence[int]] | Mapping[int, Sequence[int]], m: int
) -> tuple[np.ndarray, np.ndarray]:
    """(child, parent) index arrays, grouped by child in ascending order."""
    if isinstance(parents, Mapping):
        bad = [k for k in parents if not 0 <= int(k) < m]
        if bad:
            raise ConfigError(f"parents has keys outside [0, m={m}): {bad[:5]}")
        lists: list[Sequence[int]] = [()] * m
        for k, v in parents.items():
            lists[int(k)] = v
    else:
        lists = list(parents)
        if len(lists) != m:
            raise ConfigError(f"parents must hold one parent list per concept (m={m}), got {len(lists)}")
    lens = np.fromiter((len(p) for p in lists), dtype=np.int64, count=m)
    par = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64, count=int(lens.sum()))
    child = np.repeat(np.arange(m, dtype=np.int64), lens)
    if par.size and (par.min() < 0 or par.max() >= m):
        raise ConfigError(f"parents holds indices outside [0, m={m})")
    if (par == child).any():
        i = int(child[np.argmax(par == child)])
        raise ConfigError(f"parents[{i}] lists concept {i} as its own parent")
    return child, par


def _lookup(src: Any, i_idx: np.ndarray, a_idx: np.ndarray, m: int, name: str) -> np.ndarray:
    if callable(src):
        out = _np(src(i_idx, a_idx))
    else:
        arr = _np(src)
        if arr.shape != (m, m):
            raise ConfigError(f"{name} must be an (m, m) = ({m}, {m}) array or a callable, got {arr.shape}")
        out = arr[i_idx, a_idx]
    out = np.asarray(out, dtype=np.float64)
    if out.shape != i_idx.shape:
        raise ConfigError(f"{name} returned shape {out.shape} for {i_idx.shape} index pairs")
    if not np.isfinite(out).all():
        raise ConfigError(f"{name} returned NaN/inf values")
    return out


def concept_vectors(
    W_dec_md: Any,
    b_dec_d: Any,
    parents: Sequence[Sequence[int]] | Mapping[int, Sequence[int]],
    D_mm_or_lookup: Any,
    w_lookup: Any,
    alpha: float = 1.33,
    *,
    use_parents: bool = True,
    pair_chunk: int = 1 << 16,
) -> np.ndarray:
    """Family-informed concept vectors (Eq. B.9), float32 (m, d).

    ``v_i = b_dec + alpha * w_ii * W_dec[i] + sum_{a in parents(i)} D[i, a] * w_ia * W_dec[a]``

    The decoder bias ``b_dec`` is included, as in the paper: ``v_i`` is then the reconstruction of a
    typical patch where ``i`` and its ancestors fire, i.e. a point of the image-embedding manifold
    (it shifts every vector by the data mean; naming normalises ``v_i`` afterwards).

    Parameters
    ----------
    W_dec_md, b_dec_d
        SAE decoder rows (m, d) and bias (d,) (numpy or torch).
    parents
        ``parents[i]``: parent concept indices of ``i`` (all ancestors kept by the family DAG,
        transitive edges included), as a length-m sequence or a mapping ``{i: [a, ...]}``.
    D_mm_or_lookup
        Co-occurrence confidence ``D[i, a]``: an (m, m) array or a callable ``(i_idx, a_idx) -> values``.
    w_lookup
        ``w_ia`` = mean activation of concept ``a`` on the top-30 patches of concept ``i``: an (m, m)
        array or a callable ``(i_idx, a_idx) -> values``; called once with ``i_idx = a_idx = arange(m)``
        for ``w_ii`` and with the flattened (child, parent) pairs.
    alpha
        Weight of the concept's own direction (paper: 1.33).
    use_parents
        False: the no-context variant ``b_dec + alpha * w_ii * W_dec[i]`` (parents, D unused).
    pair_chunk
        Approximate number of (child, parent) pairs handled at once (bounds memory).
    """
    W = _np(W_dec_md).astype(np.float64)
    if W.ndim != 2:
        raise ConfigError(f"W_dec_md must be (m, d), got shape {W.shape}")
    m, d = W.shape
    b = _np(b_dec_d).astype(np.float64)
    if b.shape != (d,):
        raise ConfigError(f"b_dec_d must have shape ({d},), got {b.shape}")
    if not (np.isfinite(W).all() and np.isfinite(b).all()):
        raise ConfigError("W_dec_md / b_dec_d hold NaN/inf values")
    if not math.isfinite(alpha):
        raise ConfigError(f"alpha must be finite, got {alpha}")
    diag = np.arange(m, dtype=np.int64)
    w_self = _lookup(w_lookup, diag, diag, m, "w_lookup")
    n_dead = int(np.count_nonzero(w_self == 0))
    if n_dead:
        logger.warning(
            "%d of %d concepts have w_ii = 0 (never active on their top patches): their vector is "
            "b_dec (+ parents) and their name carries no information about them",
            n_dead,
            m,
        )
    V = b[None, :] + (alpha * w_self)[:, None] * W
    if use_parents:
        child, par = _flatten_parents(parents, m)
        if child.size:
            coef = _lookup(D_mm_or_lookup, child, par, m, "D_mm_or_lookup") * _lookup(
                w_lookup, child, par, m, "w_lookup"
            )
            starts = np.flatnonzero(np.r_[True, child[1:] != child[:-1]])  # child is sorted
            _accumulate(V, W, child, par, coef, starts, pair_chunk)
    return V.astype(np.float32)


def _accumulate(
    V: np.ndarray,
    W: np.ndarray,
    child: np.ndarray,
    par: np.ndarray,
    coef: np.ndarray,
    starts: np.ndarray,
    pair_chunk: int,
) -> None:
    """``V[child] += coef * W[par]`` summed per child, in blocks of whole children (~pair_chunk pairs)."""
    n = child.size
    g = 0
    while g < len(starts):
        lo = int(starts[g])
        # last group whose start is <= lo + pair_chunk (always at least one group)
        g_end = max(g + 1, int(np.searchsorted(starts, lo + pair_chunk, side="right")))
        hi = int(starts[g_end]) if g_end < len(starts) else n
        contrib = coef[lo:hi, None] * W[par[lo:hi]]
        V[child[starts[g:g_end]]] += np.add.reduceat(contrib, starts[g:g_end] - lo, axis=0)
        g = g_end


# --------------------------------------------------------------------------------------------------
# Naming (Eq. B.10-B.13)


@dataclasses.dataclass(frozen=True)
class NamingResult:
    """Names of m concepts: the top-k words per concept, best first (column 0 is the name)."""

    words: tuple[str, ...]
    """Vocabulary words (indices in ``top_index`` refer to these)."""
    pos_names: tuple[str, ...]
    """Part-of-speech names (``top_pos`` indexes these)."""
    top_index: np.ndarray
    """int64 (m, k) word indices by decreasing score (ties: lower word index first)."""
    top_score: np.ndarray
    """float32 (m, k) scores: max over parts of speech of cos(v_i, word)."""
    top_pos: np.ndarray
    """int64 (m, k) part of speech reaching the max (ties: the first in ``pos_names``)."""

    @property
    def n_concepts(self) -> int:
        """Number of named concepts m."""
        return int(self.top_index.shape[0])

    @property
    def best_index(self) -> np.ndarray:
        """(m,) word index of each concept's name."""
        return self.top_index[:, 0]

    @property
    def best_score(self) -> np.ndarray:
        """(m,) score of each concept's name."""
        return self.top_score[:, 0]

    @property
    def best_word(self) -> list[str]:
        """Each concept's name."""
        return [self.words[i] for i in self.best_index.tolist()]

    @property
    def best_pos(self) -> list[str]:
        """Part of speech under which each name scored best."""
        return [self.pos_names[p] for p in self.top_pos[:, 0].tolist()]

    @property
    def top_words(self) -> list[list[str]]:
        """Top-k words per concept, best first."""
        return [[self.words[i] for i in row] for row in self.top_index.tolist()]

    @property
    def top_pos_names(self) -> list[list[str]]:
        """Top-k parts of speech per concept."""
        return [[self.pos_names[p] for p in row] for row in self.top_pos.tolist()]

    def names(self) -> dict[int, str]:
        """``{concept id: name}`` (the form :func:`insight_core.planted.world.name_recovery` takes)."""
        return dict(enumerate(self.best_word))

    def to_records(self, concept_ids: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """One plain dict per concept (for ``concepts.parquet``).

        Keys: ``id``, ``name``, ``name_score``, ``name_pos``, ``top_names``, ``top_scores``,
        ``top_pos`` (lists of length k, best first, so ``top_names[0] == name``).
        """
        ids = list(range(self.n_concepts)) if concept_ids is None else [int(i) for i in concept_ids]
        if len(ids) != self.n_concepts:
            raise ConfigError(f"concept_ids has {len(ids)} entries for {self.n_concepts} concepts")
        words, pos, scores = self.top_words, self.top_pos_names, self.top_score.tolist()
        return [
            {
                "id": cid,
                "name": words[r][0],
                "name_score": float(scores[r][0]),
                "name_pos": pos[r][0],
                "top_names": words[r],
                "top_scores": [float(s) for s in scores[r]],
                "top_pos": pos[r],
            }
            for r, cid in enumerate(ids)
        ]


def name_concepts(
    V_md: Any, vocab: VocabEmbeddings, top_k: int = 5, batch: int = 1024, *, word_batch: int = 8192
) -> NamingResult:
    """Name concepts by the best-scoring vocabulary word (Eq. B.10-B.13).

    ``score(i, w) = max_pos cos(v_i / |v_i|, e_pos(w))``; the name is the argmax over words, and the
    top ``top_k`` words are kept as alternatives. Computed in blocks of ``batch`` concepts x
    ``word_batch`` words (peak memory ~ 22 bytes * batch * word_batch, ~190 MB by default), so the
    full m x W x n_pos score tensor never exists. A zero concept vector scores 0 with every word.
    """
    V = _np(V_md).astype(np.float32)
    if V.ndim != 2 or V.shape[1] != vocab.dim:
        raise ConfigError(f"V_md must be (m, d={vocab.dim}), got shape {V.shape}")
    if not np.isfinite(V).all():
        raise ConfigError("V_md holds NaN/inf values")
    for name, val in (("top_k", top_k), ("batch", batch), ("word_batch", word_batch)):
        if not isinstance(val, int) or val < 1:
            raise ConfigError(f"{name} must be a positive int, got {val!r}")
    m, W = V.shape[0], vocab.n_words
    k = min(top_k, W)
    norms = np.sqrt(_sq_norms(V)).astype(np.float32)
    Vn = V / np.maximum(norms, 1e-12)[:, None]
    E = vocab.emb_pwd
    top_index = np.zeros((m, k), dtype=np.int64)
    top_score = np.zeros((m, k), dtype=np.float32)
    top_pos = np.zeros((m, k), dtype=np.int64)
    for cs in _chunks(m, batch):
        q = Vn[cs]
        cand_i, cand_s, cand_p = [], [], []
        for ws in _chunks(W, word_batch):
            s = q @ E[0, ws].T
            pos = np.zeros(s.shape, dtype=np.int8)
            for p in range(1, vocab.n_pos):
                sp = q @ E[p, ws].T
                better = sp > s
                np.copyto(s, sp, where=better)
                pos[better] = p
            kk = min(k, s.shape[1])
            if kk < s.shape[1]:
                part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
            else:
                part = np.broadcast_to(np.arange(kk), s.shape)
            cand_i.append(part + ws.start)
            cand_s.append(np.take_along_axis(s, part, axis=1))
            cand_p.append(np.take_along_axis(pos, part, axis=1))
        ci, cs_, cp = np.concatenate(cand_i, 1), np.concatenate(cand_s, 1), np.concatenate(cand_p, 1)
        order = np.lexsort((ci, -cs_), axis=1)[:, :k]  # by score desc, then word index asc
        top_index[cs] = np.take_along_axis(ci, order, axis=1)
        top_score[cs] = np.take_along_axis(cs_, order, axis=1)
        top_pos[cs] = np.take_along_axis(cp, order, axis=1)
    logger.info("named %d concepts against %d words x %d part(s) of speech", m, W, vocab.n_pos)
    return NamingResult(vocab.words, vocab.pos_names, top_index, top_score, top_pos)


# --------------------------------------------------------------------------------------------------
# Config of the naming stage


@dataclasses.dataclass(frozen=True, slots=True)
class NamingConfig:
    """Parameters of the naming stage (paper defaults)."""

    alpha: float = 1.33
    """Weight of a concept's own decoder direction in its concept vector (Eq. B.9)."""
    use_parents: bool = True
    """Add the parents' directions (family context); False = the no-context variant."""
    top_k: int = 5
    """Alternative names kept per concept (the name included)."""
    min_concreteness: float = 2.5
    """Brysbaert entries are kept when their mean concreteness rating exceeds this."""
    max_words: int | None = None
    """Cap on the vocabulary size (None = the whole union)."""
    text_batch_size: int = 1024
    """Words per text-encoder call."""
    concept_batch: int = 1024
    """Concepts scored at once."""

    def __post_init__(self) -> None:
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ConfigError(f"NamingConfig.alpha must be a positive number, got {self.alpha!r}")
        for name in ("top_k", "text_batch_size", "concept_batch"):
            val = getattr(self, name)
            if not isinstance(val, int) or val < 1:
                raise ConfigError(f"NamingConfig.{name} must be a positive int, got {val!r}")
        if self.max_words is not None and (not isinstance(self.max_words, int) or self.max_words < 1):
            raise ConfigError(
                f"NamingConfig.max_words must be None or a positive int, got {self.max_words!r}"
            )
        if not math.isfinite(self.min_concreteness):
            raise ConfigError(f"NamingConfig.min_concreteness must be finite, got {self.min_concreteness!r}")
