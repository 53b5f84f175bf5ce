"""Vocabulary-embedding files: manifest inside the npz, backbone checks, cache keys, resumable embedding."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from insight_core.concepts.vocab_embeddings import VocabEmbeddings, load_vocab_embeddings
from insight_core.concepts.vocab_files import (
    _partial_path,
    cached_path,
    check_vocab_backbone,
    embed_resumable,
    peek_manifest,
    read_cached,
    vocab_manifest,
)
from insight_core.errors import FeatureFileError, VocabularyMismatchError

TEMPLATES = {"noun": ("a photo of a {}.", "a {}."), "adjective": ("something {}.",)}
WORDS = ("dog", "cat", "red", "tree", "car")


def encoder(dim: int = 6) -> tuple[list[list[str]], object]:
    """A deterministic fake text encoder (embedding depends on the text and templates only)."""
    seen: list[list[str]] = []

    def encode(texts: Sequence[str], templates: Sequence[str]) -> np.ndarray:
        seen.append(list(texts))
        rows = []
        for t in texts:
            seed = sum(map(ord, t + "".join(templates)))
            rows.append(np.random.default_rng(seed).standard_normal(dim))
        emb = np.array(rows)
        return emb / np.linalg.norm(emb, axis=1, keepdims=True)

    return seen, encode


def make_vocab(arch: str = "ViT-B-16", tag: str = "openai", words: Sequence[str] = WORDS) -> VocabEmbeddings:
    _, encode = encoder()
    emb = np.stack([np.asarray(encode(list(words), list(t))) for t in TEMPLATES.values()]).astype(np.float32)
    subset = {"policy": "full", "n_words": len(words), "n_total": len(words), "reason": "all"}
    man = vocab_manifest(arch=arch, pretrained=tag, words=words, templates_by_pos=TEMPLATES, subset=subset)
    return VocabEmbeddings(tuple(words), emb, tuple(TEMPLATES), man)


def test_manifest_round_trips_inside_the_npz_without_pickle(tmp_path: Path) -> None:
    path = make_vocab().save_npz(tmp_path / "v.npz")
    with np.load(path, allow_pickle=False) as z:
        assert z["manifest"].dtype.kind == "U"
    got = load_vocab_embeddings(path)
    assert got.manifest is not None
    assert got.manifest["backbone"]["arch"] == "ViT-B-16"
    assert got.manifest["backbone"]["pretrained"] == "openai"
    assert got.manifest["templates"] == {k: list(v) for k, v in TEMPLATES.items()}
    assert got.manifest["subset"]["policy"] == "full"
    assert len(got.manifest["words_sha256"]) == 64
    check_vocab_backbone(got, "ViT-B-16", "openai", "v.npz")  # no error


def test_bring_your_own_npz_without_manifest_is_still_accepted(tmp_path: Path, caplog) -> None:
    path = tmp_path / "own.npz"
    np.savez(path, words=np.array(["a", "b"]), embeddings=np.eye(2, 4, dtype=np.float32))
    got = load_vocab_embeddings(path)
    assert got.manifest is None
    assert got.pos_names == ("any",)
    check_vocab_backbone(got, "ViT-B-16", "openai", "own.npz")
    assert "no manifest" in caplog.text


def test_a_file_for_another_backbone_or_tag_is_refused_naming_both(tmp_path: Path) -> None:
    vocab = load_vocab_embeddings(make_vocab("ViT-B-16", "openai").save_npz(tmp_path / "v.npz"))
    with pytest.raises(VocabularyMismatchError) as err:
        check_vocab_backbone(vocab, "ViT-B-16", "laion2b_s34b_b88k", "v.npz")
    assert "ViT-B-16/openai" in str(err.value)
    assert "ViT-B-16/laion2b_s34b_b88k" in str(err.value)
    with pytest.raises(VocabularyMismatchError, match="ViT-L-14/openai"):
        check_vocab_backbone(vocab, "ViT-L-14", "openai", "v.npz")


def test_a_manifest_that_does_not_describe_the_words_is_refused(tmp_path: Path) -> None:
    good = make_vocab()
    forged = VocabEmbeddings(("x", *WORDS[1:]), good.emb_pwd, good.pos_names, good.manifest)
    with pytest.raises(VocabularyMismatchError, match="does not describe"):
        check_vocab_backbone(forged, "ViT-B-16", "openai", "f.npz")
    np.savez(tmp_path / "bad.npz", words=np.array(["a"]), embeddings=np.ones((1, 3), np.float32),
             manifest=np.array(["[1, 2]"]))  # fmt: skip
    with pytest.raises(FeatureFileError, match="one JSON object"):
        load_vocab_embeddings(tmp_path / "bad.npz")


def test_cache_is_keyed_by_backbone_words_and_templates_and_skips_random_init(tmp_path: Path) -> None:
    key = cached_path("ViT-B-16", "openai", WORDS, TEMPLATES, tmp_path)
    assert key is not None
    assert key.parent == tmp_path
    assert key != cached_path("ViT-B-16", "laion2b", WORDS, TEMPLATES, tmp_path)
    assert key != cached_path("ViT-B-16", "openai", WORDS[:4], TEMPLATES, tmp_path)
    assert key != cached_path("ViT-B-16", "openai", WORDS, {"noun": ("{}",)}, tmp_path)
    assert cached_path("ViT-B-16", "none", WORDS, TEMPLATES, tmp_path) is None
    assert read_cached(key, "ViT-B-16", "openai", WORDS) is None  # nothing there yet
    make_vocab().save_npz(key)
    assert read_cached(key, "ViT-B-16", "openai", WORDS) is not None
    assert read_cached(key, "ViT-B-16", "openai", WORDS[:4]) is None  # other words: a miss
    key.write_bytes(b"junk")
    assert read_cached(key, "ViT-B-16", "openai", WORDS) is None  # unreadable: recompute


def test_embedding_resumes_after_an_interruption(tmp_path: Path) -> None:
    out = tmp_path / "v.npz"
    seen, encode = encoder()
    full = embed_resumable(WORDS, encode, TEMPLATES, out=out, key="k", batch_words=2)
    assert full.shape == (2, 5, 6)
    assert not _partial_path(out).exists()

    class Interrupted(Exception):
        pass

    calls = {"n": 0}

    def flaky(texts: Sequence[str], templates: Sequence[str]) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] > 4:  # two word batches (x two parts of speech) done, then the "kill"
            raise Interrupted
        return encode(texts, templates)

    with pytest.raises(Interrupted):
        embed_resumable(WORDS, flaky, TEMPLATES, out=out, key="k", batch_words=2, checkpoint_s=0)
    assert _partial_path(out).is_file()
    seen.clear()
    again = embed_resumable(WORDS, encode, TEMPLATES, out=out, key="k", batch_words=2)
    assert seen == [["car"], ["car"]]  # only the last batch, for each part of speech
    np.testing.assert_allclose(again, full, atol=1e-6)
    # a partial file of another job is not used
    calls["n"] = 0
    with pytest.raises(Interrupted):
        embed_resumable(WORDS, flaky, TEMPLATES, out=out, key="k", batch_words=2, checkpoint_s=0)
    seen.clear()
    embed_resumable(WORDS, encode, TEMPLATES, out=out, key="other", batch_words=2)
    assert len(seen) == 6


def test_the_timed_batch_is_not_embedded_twice(tmp_path: Path) -> None:
    seen, encode = encoder()
    done = np.stack([np.asarray(encode(list(WORDS[:2]), list(t))) for t in TEMPLATES.values()])
    seen.clear()
    emb = embed_resumable(WORDS, encode, TEMPLATES, out=tmp_path / "v.npz", key="k", done_pwd=done)
    assert seen == [list(WORDS[2:])] * 2
    assert emb.shape == (2, 5, 6)


def test_a_manifest_field_that_does_not_fit_is_refused_naming_it(tmp_path: Path) -> None:
    good = make_vocab()
    man = {**good.manifest, "backbone": {**good.manifest["backbone"], "arch": 16}}
    forged = VocabEmbeddings(good.words, good.emb_pwd, good.pos_names, man)
    with pytest.raises(VocabularyMismatchError, match=r"f\.npz: manifest: backbone\.arch: Input should be"):
        check_vocab_backbone(forged, "ViT-B-16", "openai", "f.npz")
    old = VocabEmbeddings(good.words, good.emb_pwd, good.pos_names, {**good.manifest, "version": 0})
    with pytest.raises(VocabularyMismatchError, match=r"v0 is not 'insight-vocab-embeddings' v1; recompute"):
        check_vocab_backbone(old, "ViT-B-16", "openai", "f.npz")
    budget = {**good.manifest, "subset": {"n_words": "5"}}  # unreadable as a budget subset: skipped, no error
    path = VocabEmbeddings(good.words, good.emb_pwd, good.pos_names, budget).save_npz(tmp_path / "b.npz")
    assert peek_manifest(path) is None
    assert peek_manifest(make_vocab().save_npz(tmp_path / "ok.npz")).subset.n_words == len(WORDS)
