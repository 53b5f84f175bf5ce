"""Concept-naming vocabulary (paper App. B.4): word lists, read, normalised and unioned.

:func:`build_vocabulary` unions word lists (CLIP-Dissect 20k common words, Brysbaert concreteness
words/bigrams with ``Conc.M > 2.5``, LAION unigrams and bigrams; :func:`paper_vocab_sources`),
normalised (stripped, lower-case, single spaces) and deduplicated in a deterministic order; every
word remembers the source(s) it came from. Their text embeddings are made by
:mod:`insight_core.concepts.vocab_embeddings`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

from insight_core.errors import ConfigError, FeatureFileError

logger = logging.getLogger(__name__)


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


def _brysbaert_rows(path: str | Path) -> Iterator[tuple[str, float, bool]]:
    """(normalised word, Conc.M, is a bigram) per row of the Brysbaert et al. (2014) table."""
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
        bigram = i_bigram is not None and cols[i_bigram].strip() not in ("", "0")
        word = normalize_word(cols[i_word])
        if word:
            yield word, conc, bigram


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
    out: dict[str, None] = {}
    for word, conc, bigram in _brysbaert_rows(path):
        if conc > min_concreteness and (include_bigrams or not bigram):
            out.setdefault(word)
    return list(out)


def concreteness_ratings(path: str | Path) -> dict[str, float]:
    """Mean concreteness rating (``Conc.M``, 1 = abstract .. 5 = concrete) of every entry of the
    Brysbaert et al. (2014) table, by normalised word (the first row of a duplicate wins)."""
    out: dict[str, float] = {}
    for word, conc, _ in _brysbaert_rows(path):
        out.setdefault(word, conc)
    return out


FUNCTION_WORDS: frozenset[str] = frozenset(
    """a an the and or but nor so yet if then than that this these those there here of to in on at by
    for with from into onto upon about above below over under after before between through during
    without within along across against among around behind beyond near off out up down as is are was
    were be been being am do does did done have has had having will would shall should can could may
    might must not no yes i me my mine we us our ours you your yours he him his she her hers it its they
    them their theirs who whom whose which what when where why how all any both each few more most
    other some such only own same too very just also again once ever never always often s t don now
    one two three four five six seven eight nine ten first second new get got make made like via per
    le la de des du et en un une el los las il di del""".split()  # noqa: SIM905 (a word list, not code)
)
"""Common English (and a few Romance) function words: never useful concept names, ranked last when no
concreteness ratings are available (the shipped word lists are frequency-ordered, "the", "of", ...)."""


def rank_by_concreteness(words: Sequence[str], ratings: dict[str, float] | None) -> list[int]:
    """Indices of ``words``, the most concrete first (a stable order: ties keep the vocabulary order).

    With ``ratings`` (:func:`concreteness_ratings`): rated words by descending rating, then unrated
    words in vocabulary order. Without: the vocabulary order with :data:`FUNCTION_WORDS` and one-letter
    entries moved to the end (the best that frequency-ordered lists allow).
    """

    def key(i: int) -> tuple[int, float]:
        w = words[i]
        if ratings is not None and w in ratings:
            return (0, -ratings[w])
        junk = w in FUNCTION_WORDS or len(w) < 2
        return (2 if junk else 1, 0.0)

    return sorted(range(len(words)), key=key)


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
