"""Naming vocabulary: word lists and the Brysbaert table (tiny files and the real lists), the union."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from insight_core.concepts.vocabulary import (
    VocabSource,
    build_vocabulary,
    concreteness_ratings,
    load_brysbaert,
    load_word_list,
    paper_vocab_sources,
    rank_by_concreteness,
)
from insight_core.errors import ConfigError, FeatureFileError


def _write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8", newline="")
    return path


# ----------------------------------------------------------------------------------------------
# Vocabulary files (tiny tmp files)


def test_load_word_list_normalises_skips_and_dedupes(tmp_path: Path) -> None:
    path = _write(tmp_path / "w.txt", "\ufeffDog\n dog \n\n# a comment\nred   Car\r\nCat\nred car\n#\n")
    assert load_word_list(path) == ["dog", "red car", "cat"]


def test_load_word_list_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(ConfigError, match=r"nope\.txt.*does not exist"):
        load_word_list(missing)
    with pytest.raises(FeatureFileError, match=r"empty\.txt.*no entries"):
        load_word_list(_write(tmp_path / "empty.txt", "\n# only a comment\n  \n"))
    with pytest.raises(FeatureFileError, match=r"table\.txt.*line 1.*tab"):
        load_word_list(_write(tmp_path / "table.txt", "Word\tConc.M\ndog\t4.5\n"))
    with pytest.raises(FeatureFileError, match=r"latin1\.txt.*UTF-8"):
        load_word_list(_write(tmp_path / "latin1.txt", "caf\xe9\n".encode("latin-1")))


BRYS = (
    "Word\tBigram\tConc.M\tConc.SD\r\n"
    "roadsweeper\t0\t4.85\t0.37\r\n"
    "Idea\t0\t1.61\t1.0\r\n"
    "borderline\t0\t2.5\t1.0\r\n"
    "barely\t0\t2.51\t1.0\r\n"
    "baseball bat\t1\t5\t0\r\n"
    "roadsweeper\t0\t4.9\t0.1\r\n"
    "\r\n"
)


def test_load_brysbaert_filters_concreteness_and_keeps_bigrams(tmp_path: Path) -> None:
    path = _write(tmp_path / "brys.txt", BRYS)
    assert load_brysbaert(path) == ["roadsweeper", "barely", "baseball bat"]  # strictly > 2.5
    assert load_brysbaert(path, include_bigrams=False) == ["roadsweeper", "barely"]
    # the first row of "roadsweeper" (4.85) is filtered out, its duplicate (4.9) is kept in its place
    assert load_brysbaert(path, min_concreteness=4.86) == ["baseball bat", "roadsweeper"]
    assert load_brysbaert(path, min_concreteness=0.0)[:2] == ["roadsweeper", "idea"]


def test_load_brysbaert_errors_name_the_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"gone\.txt"):
        load_brysbaert(tmp_path / "gone.txt")
    with pytest.raises(FeatureFileError, match=r"nocol\.txt.*Conc\.M"):
        load_brysbaert(_write(tmp_path / "nocol.txt", "Word\tBigram\ndog\t0\n"))
    with pytest.raises(FeatureFileError, match=r"badnum\.txt.*line 3.*'high'"):
        load_brysbaert(_write(tmp_path / "badnum.txt", "Word\tConc.M\ndog\t4.1\ncat\thigh\n"))
    with pytest.raises(FeatureFileError, match=r"short\.txt.*line 2"):
        load_brysbaert(_write(tmp_path / "short.txt", "Word\tBigram\tConc.M\ndog\t0\n"))
    with pytest.raises(FeatureFileError, match=r"blank\.txt.*empty"):
        load_brysbaert(_write(tmp_path / "blank.txt", "\n\n"))


def test_build_vocabulary_union_order_sources_and_cap(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.txt", "dog\ncat\nred car\n")
    b = _write(tmp_path / "b.tsv", "Word\tBigram\tConc.M\nCat\t0\t4.9\nbird\t0\t4.0\nthought\t0\t1.2\n")
    sources = [VocabSource("common", a), VocabSource("concrete", b, "brysbaert")]
    vocab = build_vocabulary(sources)
    assert vocab.words == ("dog", "cat", "red car", "bird")
    assert vocab.sources == (("common",), ("common", "concrete"), ("common",), ("concrete",))
    assert vocab.source_names == ("common", "concrete")
    assert vocab.source_counts() == {"common": 3, "concrete": 2}
    assert len(vocab) == 4
    assert build_vocabulary(sources[::-1]).words == ("cat", "bird", "dog", "red car")
    assert build_vocabulary(sources, max_words=2).words == ("dog", "cat")
    assert build_vocabulary(sources) == vocab  # deterministic
    with pytest.raises(ConfigError, match="unique"):
        build_vocabulary([VocabSource("x", a), VocabSource("x", b, "brysbaert")])
    with pytest.raises(ConfigError, match="max_words"):
        build_vocabulary(sources, max_words=0)
    with pytest.raises(ConfigError, match="at least one"):
        build_vocabulary([])
    with pytest.raises(ConfigError, match=r"VocabSource\.kind"):
        VocabSource("x", a, "csv")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"missing\.txt"):
        build_vocabulary([VocabSource("common", a), VocabSource("gone", tmp_path / "missing.txt")])


# ----------------------------------------------------------------------------------------------
# Vocabulary files (the real lists)


@pytest.fixture(scope="module")
def vocab_dir(shared_data: Path) -> Path:
    folder = shared_data / "vocab"
    missing = [s.path for s in paper_vocab_sources(folder) if not Path(s.path).is_file()]
    if missing:
        pytest.skip(f"vocabulary files missing: {missing}")
    return folder


def test_real_word_lists_have_plausible_sizes(vocab_dir: Path) -> None:
    brys = load_brysbaert(vocab_dir / "Concreteness_ratings_Brysbaert_et_al_BRM.txt")
    assert 20_000 < len(brys) < 30_000  # 24k of the 40k entries are rated > 2.5
    assert "baseball bat" in brys
    assert "roadsweeper" in brys
    assert len(brys) == len(set(brys))
    dissect = load_word_list(vocab_dir / "msae_clip_disect_20k.txt")
    assert 19_000 < len(dissect) <= 20_000
    bigrams = load_word_list(vocab_dir / "msae_laion_400_bigram.txt")
    assert 14_000 < len(bigrams) <= 15_000
    assert sum(" " in w for w in bigrams) > 5000  # the MSAE file: 5001 bigrams, then unigrams
    assert bigrams[0] == "bath shower"

    vocab = build_vocabulary(paper_vocab_sources(vocab_dir))
    counts = vocab.source_counts()
    assert counts["brysbaert"] == len(brys)
    assert counts["clip_dissect_20k"] == len(dissect)
    assert 50_000 < len(vocab) < 100_000  # ~60k: the lists overlap heavily
    assert len(set(vocab.words)) == len(vocab)
    assert all(w == w.strip().lower() and w and not w.startswith("#") for w in vocab.words)
    car = vocab.words.index("car")
    assert {"clip_dissect_20k", "brysbaert"} <= set(vocab.sources[car])


def test_shipped_word_lists_without_brysbaert_warn_once(tmp_path: Path, caplog) -> None:
    shipped = Path(__file__).resolve().parents[3] / "assets" / "vocab"
    with caplog.at_level("WARNING", logger="insight_core.concepts.vocabulary"):
        vocab = build_vocabulary(paper_vocab_sources(shipped))
    skipped = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 1
    assert "brysbaert" in skipped[0].getMessage()
    assert "Concreteness_ratings_Brysbaert_et_al_BRM.txt" in skipped[0].getMessage()
    assert vocab.source_names == ("clip_dissect_20k", "laion_unigram", "laion_bigram")
    assert vocab.source_counts() == {
        "clip_dissect_20k": 20_000,
        "laion_unigram": 37_441,
        "laion_bigram": 15_000,
    }
    assert len(vocab) == 45_501
    partial = tmp_path / "partial"  # any other missing list is still an error
    partial.mkdir()
    shutil.copy(shipped / "msae_clip_disect_20k.txt", partial)
    with pytest.raises(ConfigError, match=r"msae_laion_400_unigram\.txt.*does not exist"):
        build_vocabulary(paper_vocab_sources(partial))
    with pytest.raises(ConfigError, match="no vocabulary source found"):
        build_vocabulary([VocabSource("only", tmp_path / "absent.txt", required=False)])


def test_concreteness_ranking_puts_rated_concrete_words_first(tmp_path: Path) -> None:
    table = tmp_path / "conc.txt"
    table.write_text("Word\tBigram\tConc.M\nIdea\t0\t1.6\ndog\t0\t4.9\nbaseball bat\t1\t5.0\nred\t0\t3.2\n")
    ratings = concreteness_ratings(table)
    assert ratings == {"idea": 1.6, "dog": 4.9, "baseball bat": 5.0, "red": 3.2}
    words = ["the", "idea", "run", "dog", "red", "baseball bat", "of"]
    order = rank_by_concreteness(words, ratings)
    assert [words[i] for i in order] == ["baseball bat", "dog", "red", "idea", "run", "the", "of"]
    # without ratings: list order, function words and one-letter entries last
    order = rank_by_concreteness(["the", "dog", "a", "x", "idea", "of"], None)
    assert order == [1, 4, 0, 2, 3, 5]
