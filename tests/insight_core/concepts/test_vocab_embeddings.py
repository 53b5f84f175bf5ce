"""Vocabulary text embeddings: templates, embedding with a fake and a random CLIP encoder, npz formats,
the on-disk cache."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from insight_core.concepts.vocab_embeddings import (
    ADJECTIVE_TEMPLATES,
    NOUN_TEMPLATES,
    SINGLE_POS,
    TEMPLATES_BY_POS,
    VERB_TEMPLATES,
    VocabEmbeddings,
    cached_vocab_embeddings,
    embed_vocabulary,
    load_vocab_embeddings,
    vocab_cache_key,
)
from insight_core.errors import ConfigError, FeatureFileError
from insight_core.models.backbone import BackboneConfig, ClipBackbone
from insight_core.planted import WorldConfig, make_world, save_world
from tests.insight_core.concepts.test_vocabulary import _write

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
