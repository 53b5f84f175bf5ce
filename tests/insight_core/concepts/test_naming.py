"""Tests of concept naming: vocabulary files, templates, text embeddings, Eq. B.9 vectors, naming."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from insight_core.concepts.naming import (
    ADJECTIVE_TEMPLATES,
    NOUN_TEMPLATES,
    SINGLE_POS,
    TEMPLATES_BY_POS,
    VERB_TEMPLATES,
    NamingConfig,
    VocabEmbeddings,
    VocabSource,
    build_vocabulary,
    cached_vocab_embeddings,
    concept_vectors,
    embed_vocabulary,
    load_brysbaert,
    load_vocab_embeddings,
    load_word_list,
    name_concepts,
    paper_vocab_sources,
    parents_from_edges,
    vocab_cache_key,
)
from insight_core.errors import ConfigError, FeatureFileError
from insight_core.models.backbone import BackboneConfig, ClipBackbone
from insight_core.planted.world import (
    PlantedWorld,
    WorldConfig,
    make_world,
    name_recovery,
    oracle_codes,
    sample_images,
    save_world,
)

D_FAKE = 16


def fake_encode_text(texts: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """Deterministic stand-in for ``ClipBackbone.encode_text``: hashed prompts, averaged, renormalised."""
    out = np.zeros((len(texts), D_FAKE))
    for i, text in enumerate(texts):
        for t in templates:
            seed = int.from_bytes(hashlib.sha256(t.format(text).encode()).digest()[:8], "little")
            v = np.random.default_rng(seed).standard_normal(D_FAKE)
            out[i] += v / np.linalg.norm(v)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


class CountingEncoder:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, texts: Sequence[str], templates: Sequence[str]) -> np.ndarray:
        self.calls += 1
        return fake_encode_text(texts, templates)


def _write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8", newline="")
    return path


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------------------------
# Templates


def test_template_sets_have_ten_templates_with_one_slot() -> None:
    assert list(TEMPLATES_BY_POS) == ["noun", "verb", "adjective"]
    assert TEMPLATES_BY_POS["noun"] is NOUN_TEMPLATES
    for templates in (NOUN_TEMPLATES, VERB_TEMPLATES, ADJECTIVE_TEMPLATES):
        assert len(templates) == 10
        assert len(set(templates)) == 10
        for t in templates:
            assert t.count("{}") == 1
            assert "{" not in t.replace("{}", "")
            assert "}" not in t.replace("{}", "")
            assert "dog" in t.format("dog")
    assert "a photo of a {}." in NOUN_TEMPLATES
    assert "a photo of someone {}." in VERB_TEMPLATES
    assert "something that is {}." in ADJECTIVE_TEMPLATES


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
    with caplog.at_level("WARNING", logger="insight_core.concepts.naming"):
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


# ----------------------------------------------------------------------------------------------
# Text embeddings


def test_embed_vocabulary_with_fake_encoder() -> None:
    words = ["dog", "red car", "running", "shiny", "tree"]
    emb = embed_vocabulary(words, fake_encode_text, TEMPLATES_BY_POS, batch_size=2)
    assert emb.words == tuple(words)
    assert emb.pos_names == ("noun", "verb", "adjective")
    assert emb.emb_pwd.shape == (3, 5, D_FAKE)
    assert emb.emb_pwd.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb.emb_pwd, axis=-1), 1.0, atol=1e-5)
    for p, templates in enumerate(TEMPLATES_BY_POS.values()):
        np.testing.assert_allclose(emb.emb_pwd[p], fake_encode_text(words, templates), atol=1e-6)
    same = embed_vocabulary(words, fake_encode_text, TEMPLATES_BY_POS, batch_size=100)
    np.testing.assert_array_equal(same.emb_pwd, emb.emb_pwd)
    assert not np.allclose(emb.emb_pwd[0], emb.emb_pwd[1])  # different templates, different vectors


def test_embed_vocabulary_rejects_bad_input() -> None:
    with pytest.raises(ConfigError, match="duplicate"):
        embed_vocabulary(["dog", "dog"], fake_encode_text)
    with pytest.raises(ConfigError, match="exactly one"):
        embed_vocabulary(["dog"], fake_encode_text, {"noun": ["a photo of a dog"]})
    with pytest.raises(ConfigError, match="exactly one"):
        embed_vocabulary(["dog"], fake_encode_text, {"noun": ["{} and {}"]})
    with pytest.raises(ConfigError, match="batch_size"):
        embed_vocabulary(["dog"], fake_encode_text, batch_size=0)
    with pytest.raises(ConfigError, match="encode_text returned shape"):
        embed_vocabulary(["dog", "cat"], lambda texts, templates: np.ones((1, 4)))
    with pytest.raises(ConfigError, match="NaN"):
        embed_vocabulary(["dog"], lambda texts, templates: np.full((1, 4), np.nan))


@pytest.fixture(scope="module")
def backbone() -> ClipBackbone:
    torch.manual_seed(0)
    return ClipBackbone(BackboneConfig(arch="ViT-B-16", pretrained="none", device="cpu"))


def test_embed_vocabulary_with_random_clip(backbone: ClipBackbone) -> None:
    words = ["dog", "red car", "running", "shiny", "hubcap"]
    # two templates per part of speech: a ViT-B/16 text tower is slow on 2 CPU cores
    templates = {pos: ts[:2] for pos, ts in TEMPLATES_BY_POS.items()}
    emb = embed_vocabulary(words, backbone.encode_text, templates, batch_size=3)
    assert emb.pos_names == ("noun", "verb", "adjective")
    assert emb.emb_pwd.shape == (3, 5, 512)
    assert emb.emb_pwd.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb.emb_pwd, axis=-1), 1.0, atol=1e-5)
    direct = backbone.encode_text(words[:2], ADJECTIVE_TEMPLATES[:2]).numpy()
    np.testing.assert_allclose(emb.emb_pwd[2, :2], direct, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# npz formats and cache


def _small_vocab_emb() -> VocabEmbeddings:
    return embed_vocabulary(["dog", "cat", "red car", "öl"], fake_encode_text)


def test_npz_round_trip_own_format(tmp_path: Path) -> None:
    emb = _small_vocab_emb()
    path = emb.save_npz(tmp_path / "sub" / "vocab_emb.npz")
    assert path.is_file()
    assert not list(path.parent.glob("*.tmp"))
    back = load_vocab_embeddings(path)
    assert back.words == emb.words
    assert back.pos_names == emb.pos_names
    np.testing.assert_array_equal(back.emb_pwd, emb.emb_pwd)


def test_npz_bring_your_own_format(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    raw = rng.standard_normal((3, 8)) * 5  # not normalised, float64
    path = tmp_path / "byo.npz"
    np.savez(path, words=np.array(["dog", "cat", "car"]), embeddings=raw)
    emb = load_vocab_embeddings(path)
    assert emb.pos_names == (SINGLE_POS,)
    assert emb.emb_pwd.shape == (1, 3, 8)
    assert emb.emb_pwd.dtype == np.float32
    np.testing.assert_allclose(emb.emb_pwd[0], _unit(raw), atol=1e-6)
    np.savez(path, words=np.array([b"dog", b"cat", b"car"]), embeddings=raw.astype(np.float16))
    assert load_vocab_embeddings(path).words == ("dog", "cat", "car")


def test_planted_world_vocab_npz_loads(tmp_path: Path) -> None:
    world = make_world(WorldConfig(d=32, n_objects=3, n_attributes=2, n_backgrounds=2, n_distractors=10))
    save_world(world, tmp_path)
    emb = load_vocab_embeddings(tmp_path / "vocab.npz")
    assert emb.words == tuple(world.vocab_words)
    np.testing.assert_allclose(emb.emb_pwd[0], world.vocab_emb_wd, atol=1e-6)


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"words": np.array(["a", "b"])}, "lacks.*embeddings"),
        ({"words": np.array(["a", "b"]), "embeddings": np.ones((3, 4))}, "does not match 2 words"),
        ({"words": np.array(["a", "b"]), "embeddings": np.ones((2, 2, 2, 2))}, r"\(W, d\) or"),
        ({"words": np.array(["a", "b"]), "embeddings": np.ones((2, 4), dtype=np.int32)}, "floating"),
        ({"words": np.array(["a", "b"]), "embeddings": np.array([[1.0, np.nan], [1, 0]])}, "NaN"),
        ({"words": np.array(["a", "b"]), "embeddings": np.array([[1.0, 0], [0, 0]])}, "zero norm"),
        ({"words": np.array(["a", "a"]), "embeddings": np.eye(2)}, "duplicate"),
        ({"words": np.array(["a", " "]), "embeddings": np.eye(2)}, "non-empty"),
        ({"words": np.array([["a", "b"]]), "embeddings": np.eye(2)}, "1-D numpy str"),
        ({"words": np.array(["a", "b"], dtype=object), "embeddings": np.eye(2)}, "cannot read arrays"),
        (
            {"words": np.array(["a", "b"]), "embeddings": np.ones((2, 2, 3)), "pos_names": np.array(["n"])},
            "does not match",
        ),
    ],
)
def test_bad_npz_raises_naming_the_file(tmp_path: Path, arrays: dict, match: str) -> None:
    path = tmp_path / "bad_vocab.npz"
    with path.open("wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(FeatureFileError, match=rf"bad_vocab\.npz.*{match}"):
        load_vocab_embeddings(path)


def test_unreadable_npz_raises_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(FeatureFileError, match=r"absent\.npz.*does not exist"):
        load_vocab_embeddings(tmp_path / "absent.npz")
    junk = _write(tmp_path / "junk.npz", b"definitely not a zip archive")
    with pytest.raises(FeatureFileError, match=r"junk\.npz"):
        load_vocab_embeddings(junk)
    npy = tmp_path / "single.npz"
    with npy.open("wb") as f:
        np.save(f, np.eye(2))
    with pytest.raises(FeatureFileError, match=r"single\.npz.*single \.npy"):
        load_vocab_embeddings(npy)


def test_cache_hit_does_not_encode_again(tmp_path: Path) -> None:
    words = ["dog", "cat", "red car"]
    enc = CountingEncoder()
    first = cached_vocab_embeddings(tmp_path, words, "ViT-B-16/none", enc, batch_size=2)
    n_calls = enc.calls
    assert n_calls == 3 * 2  # 3 parts of speech x 2 batches
    files = list(tmp_path.glob("vocab_emb_*.npz"))
    assert len(files) == 1
    key = vocab_cache_key(words, "ViT-B-16/none", TEMPLATES_BY_POS)
    assert key[:24] in files[0].name

    again = cached_vocab_embeddings(tmp_path, words, "ViT-B-16/none", enc, batch_size=2)
    assert enc.calls == n_calls
    np.testing.assert_array_equal(again.emb_pwd, first.emb_pwd)

    cached_vocab_embeddings(tmp_path, words, "ViT-B-16/openai", enc)  # other backbone: new key
    assert enc.calls == n_calls + 3
    cached_vocab_embeddings(tmp_path, [*words, "tree"], "ViT-B-16/none", enc)  # other words
    assert enc.calls == n_calls + 6
    cached_vocab_embeddings(tmp_path, words, "ViT-B-16/none", enc, {"noun": ["a {}."]})  # templates
    assert enc.calls == n_calls + 7
    assert len(list(tmp_path.glob("vocab_emb_*.npz"))) == 4

    files[0].write_bytes(b"corrupt")  # an unreadable cache file is recomputed and rewritten
    fixed = cached_vocab_embeddings(tmp_path, words, "ViT-B-16/none", enc)
    assert enc.calls == n_calls + 10
    np.testing.assert_allclose(fixed.emb_pwd, first.emb_pwd, atol=1e-6)
    assert load_vocab_embeddings(files[0]).words == tuple(words)


# ----------------------------------------------------------------------------------------------
# Concept vectors (Eq. B.9)


def _naive_concept_vectors(W, b, parents, D, w, alpha, use_parents=True):
    V = np.zeros_like(W, dtype=np.float64)
    for i in range(W.shape[0]):
        V[i] = b + alpha * w[i, i] * W[i]
        if use_parents:
            for a in parents[i]:
                V[i] += D[i, a] * w[i, a] * W[a]
    return V


@pytest.fixture(scope="module")
def random_family() -> dict:
    rng = np.random.default_rng(0)
    m, d = 23, 8
    parents = [
        sorted(rng.choice(i, size=min(i, int(rng.integers(0, 4))), replace=False).tolist()) for i in range(m)
    ]
    return {
        "W": _unit(rng.standard_normal((m, d))).astype(np.float32),
        "b": rng.standard_normal(d).astype(np.float32),
        "parents": parents,
        "D": rng.uniform(0.75, 1.0, size=(m, m)),
        "w": rng.uniform(0.0, 2.0, size=(m, m)),
    }


def test_concept_vectors_match_naive_loop(random_family: dict) -> None:
    f = random_family
    W, b, parents, D, w = f["W"], f["b"], f["parents"], f["D"], f["w"]
    assert sum(map(len, parents)) > 10
    expected = _naive_concept_vectors(W, b, parents, D, w, 1.33)
    for pair_chunk in (1, 3, 1 << 16):
        V = concept_vectors(W, b, parents, D, lambda i, a: w[i, a], 1.33, pair_chunk=pair_chunk)
        assert V.shape == W.shape
        assert V.dtype == np.float32
        np.testing.assert_allclose(V, expected, rtol=1e-5, atol=1e-5)
    # D as a callable, w as an array, torch inputs, parents as a mapping
    as_map = {i: p for i, p in enumerate(parents) if p}
    V = concept_vectors(torch.from_numpy(W), torch.from_numpy(b), as_map, lambda i, a: D[i, a], w, 1.33)
    np.testing.assert_allclose(V, expected, rtol=1e-5, atol=1e-5)
    bare = concept_vectors(W, b, parents, D, w, alpha=0.5, use_parents=False)
    np.testing.assert_allclose(bare, _naive_concept_vectors(W, b, parents, D, w, 0.5, False), atol=1e-5)


def test_concept_vectors_rejects_bad_input(random_family: dict) -> None:
    f = random_family
    W, b, D, w = f["W"], f["b"], f["D"], f["w"]
    m = W.shape[0]
    no_parents: list[list[int]] = [[] for _ in range(m)]
    with pytest.raises(ConfigError, match="own parent"):
        concept_vectors(W, b, [[0], *no_parents[1:]], D, w)
    with pytest.raises(ConfigError, match="outside"):
        concept_vectors(W, b, [[m], *no_parents[1:]], D, w)
    with pytest.raises(ConfigError, match="one parent list per concept"):
        concept_vectors(W, b, no_parents[:-1], D, w)
    with pytest.raises(ConfigError, match="b_dec_d"):
        concept_vectors(W, b[:-1], no_parents, D, w)
    with pytest.raises(ConfigError, match=r"w_lookup must be an \(m, m\)"):
        concept_vectors(W, b, no_parents, D, w[:-1])
    with pytest.raises(ConfigError, match="w_lookup returned shape"):
        concept_vectors(W, b, no_parents, D, lambda i, a: np.ones(3))
    with pytest.raises(ConfigError, match="D_mm_or_lookup returned NaN"):
        concept_vectors(W, b, [[], [0], *no_parents[2:]], lambda i, a: np.full(i.shape, np.nan), w)


def test_parents_from_edges() -> None:
    parents = parents_from_edges(np.array([0, 0, 1, 0, 1]), np.array([1, 2, 2, 2, 3]), 5)
    assert parents == [[], [0], [0, 1], [1], []]
    assert parents_from_edges(np.array([], dtype=np.int64), np.array([], dtype=np.int64), 2) == [[], []]
    with pytest.raises(ConfigError, match="indices"):
        parents_from_edges([0], [5], 5)


# ----------------------------------------------------------------------------------------------
# Naming (Eq. B.10-B.13)


def test_name_concepts_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    m, n_words, d, n_pos = 37, 53, 16, 3
    vocab = VocabEmbeddings(
        tuple(f"w{j}" for j in range(n_words)),
        _unit(rng.standard_normal((n_pos, n_words, d))).astype(np.float32),
        ("noun", "verb", "adjective"),
    )
    V = rng.standard_normal((m, d)).astype(np.float32) * rng.uniform(0.1, 5, size=(m, 1)).astype(np.float32)
    cos_pmw = np.einsum("md,pwd->pmw", _unit(V.astype(np.float64)), vocab.emb_pwd.astype(np.float64))
    score = cos_pmw.max(axis=0)
    best_pos = cos_pmw.argmax(axis=0)
    order = np.argsort(-score, axis=1, kind="stable")[:, :5]

    for batch, word_batch in ((8, 10), (1024, 16384), (1, 1)):
        res = name_concepts(V, vocab, top_k=5, batch=batch, word_batch=word_batch)
        np.testing.assert_array_equal(res.top_index, order)
        np.testing.assert_allclose(res.top_score, np.take_along_axis(score, order, 1), atol=1e-5)
        np.testing.assert_array_equal(res.top_pos, np.take_along_axis(best_pos, order, 1))
    assert res.best_word == [f"w{j}" for j in order[:, 0]]
    np.testing.assert_array_equal(res.best_index, order[:, 0])
    assert res.best_pos == [vocab.pos_names[p] for p in best_pos[np.arange(m), order[:, 0]]]
    assert res.top_words[3] == [f"w{j}" for j in order[3]]
    assert res.names()[0] == res.best_word[0]

    records = res.to_records(concept_ids=range(100, 100 + m))
    assert len(records) == m
    r = records[2]
    assert set(r) == {"id", "name", "name_score", "name_pos", "top_names", "top_scores", "top_pos"}
    assert r["id"] == 102
    assert r["name"] == res.best_word[2] == r["top_names"][0]
    assert isinstance(r["name_score"], float)
    assert len(r["top_scores"]) == 5
    assert r["top_scores"] == sorted(r["top_scores"], reverse=True)

    few = name_concepts(V, vocab, top_k=500)  # k is capped at the vocabulary size
    assert few.top_index.shape == (m, n_words)
    zero = name_concepts(np.zeros((2, d), np.float32), vocab, top_k=3)
    np.testing.assert_array_equal(zero.top_score, 0.0)
    np.testing.assert_array_equal(zero.top_index, [[0, 1, 2], [0, 1, 2]])  # ties: lowest index first
    with pytest.raises(ConfigError, match="V_md must be"):
        name_concepts(V[:, :3], vocab)
    with pytest.raises(ConfigError, match="top_k"):
        name_concepts(V, vocab, top_k=0)


def test_naming_config_validates() -> None:
    assert NamingConfig().alpha == 1.33
    assert NamingConfig().top_k == 5
    with pytest.raises(ConfigError, match="alpha"):
        NamingConfig(alpha=float("nan"))
    with pytest.raises(ConfigError, match="top_k"):
        NamingConfig(top_k=0)
    with pytest.raises(ConfigError, match="max_words"):
        NamingConfig(max_words=-1)


# ----------------------------------------------------------------------------------------------
# Planted world: the family context recovers names that the bare concept cannot


def _top_patch_weights(codes_nm: np.ndarray, n_top: int = 30) -> np.ndarray:
    """w[i, a] = mean activation of concept a on the top-``n_top`` patches of concept i."""
    top = np.argpartition(-codes_nm, n_top - 1, axis=0)[:n_top]  # (n_top, m)
    return codes_nm[top].mean(axis=0)  # (n_top, m, m) -> (m, m)


@pytest.fixture(scope="module")
def planted() -> PlantedWorld:
    return make_world()


def test_planted_world_family_context_recovers_names(planted: PlantedWorld) -> None:
    world = planted
    m = world.n_atoms
    codes = oracle_codes(world, sample_images(world, 200, seed=0)).reshape(-1, m)
    w = _top_patch_weights(codes)
    parents = [world.ancestors(a) for a in range(m)]  # the DAG keeps transitive edges
    D = np.zeros((m, m))
    child = np.repeat(np.arange(m), [len(p) for p in parents])
    D[child, np.concatenate([p for p in parents if p])] = 1.0
    vocab = VocabEmbeddings(tuple(world.vocab_words), world.vocab_emb_wd[None], (SINGLE_POS,))

    figures = {}
    for use_parents in (True, False):
        V = concept_vectors(
            world.atoms_ad, world.offset_d, parents, D, lambda i, a: w[i, a], use_parents=use_parents
        )
        res = name_concepts(V, vocab, top_k=5, batch=128)
        rec = name_recovery(res.names(), np.arange(m), world)
        figures[use_parents] = rec
    ctx, bare = figures[True], figures[False]
    msg = (
        f"with parents: {ctx.accuracy:.3f} {ctx.per_kind} decoys {ctx.decoy_fraction:.3f}; "
        f"without: {bare.accuracy:.3f} {bare.per_kind} decoys {bare.decoy_fraction:.3f}"
    )
    assert ctx.n_matched == m, msg
    assert ctx.accuracy >= 0.9, msg
    assert bare.accuracy <= 0.75, msg
    assert ctx.accuracy - bare.accuracy >= 0.25, msg
    assert ctx.per_kind["part"] >= 0.9, msg
    assert ctx.per_kind["subpart"] >= 0.85, msg
    assert ctx.decoy_fraction < 0.05 < bare.decoy_fraction, msg
