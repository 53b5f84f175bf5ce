"""Where ``name`` gets vocabulary embeddings (file, cache, Hub, computed within the naming budget), and
the ``vocab-embed`` / ``vocab-push`` / ``vocab-pull`` jobs. Text encoders are fakes except in the
end-to-end build, which runs the real (random-init) text tower under a tiny budget."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow.parquet as pq
import pytest

from insight_core.concepts import vocab_hub
from insight_core.concepts.vocab_embeddings import VocabEmbeddings, load_vocab_embeddings
from insight_core.concepts.vocab_files import vocab_manifest
from insight_core.concepts.vocabulary import BRYSBAERT_FILE
from insight_core.planted import load_world, name_recovery
from precompute import name as name_stage
from precompute import vocab as vocab_stage
from precompute.__main__ import main
from precompute.options import NamingOptions
from tests.insight_core.concepts.test_vocab_hub import FakeRepo
from tests.precompute.test_concept_stages import WORLD

CONCRETE = {"dog": 4.9, "car": 4.8, "tree": 4.7, "apple": 5.0, "red": 3.9, "idea": 1.6, "truth": 1.9}


class FakeTextEncoder:
    """Stands in for ClipBackbone: deterministic unit text embeddings; counts the texts it encodes."""

    is_random = False
    encoded: ClassVar[list[str]] = []
    built: ClassVar[int] = 0

    def __init__(self, cfg: object) -> None:
        type(self).built += 1

    def encode_text(
        self, texts: Sequence[str], templates: Sequence[str], batch_size: int = 256
    ) -> np.ndarray:
        type(self).encoded.extend(texts)
        rows = [np.random.default_rng(sum(map(ord, t + templates[0]))).standard_normal(8) for t in texts]
        emb = np.array(rows)
        return emb / np.linalg.norm(emb, axis=1, keepdims=True)


class NoTextTower:
    """Fails the test if the text encoder is ever built."""

    def __init__(self, cfg: object) -> None:
        raise AssertionError("the text tower was loaded although a vocabulary file was given")


@pytest.fixture
def fake_encoder(monkeypatch: pytest.MonkeyPatch) -> type[FakeTextEncoder]:
    FakeTextEncoder.encoded, FakeTextEncoder.built = [], 0
    monkeypatch.setattr(name_stage, "ClipBackbone", FakeTextEncoder)
    monkeypatch.setattr(vocab_stage, "ClipBackbone", FakeTextEncoder)
    return FakeTextEncoder


@pytest.fixture
def user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "user-cache"
    monkeypatch.setenv("INSIGHT_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def vocab_dir(tmp_path: Path) -> Path:
    """The three word lists (frequency-ordered: function words first) and a small concreteness table."""
    d = tmp_path / "vocab"
    d.mkdir()
    (d / "msae_clip_disect_20k.txt").write_text("the\nof\nidea\ntruth\ndog\nrun\n")
    (d / "msae_laion_400_unigram.txt").write_text("and\ncar\nred\nblue\n")
    (d / "msae_laion_400_bigram.txt").write_text("tree\napple\nold town\n")
    rows = "".join(f"{w}\t0\t{c}\n" for w, c in CONCRETE.items())
    (d / BRYSBAERT_FILE).write_text(f"Word\tBigram\tConc.M\n{rows}")
    return d


def _fixed_rate(rate: float):
    def measure(words, encode_text, templates_by_pos):
        from insight_core.concepts.vocab_files import encode_batch

        return rate, encode_batch(words, encode_text, templates_by_pos)

    return measure


def test_over_budget_on_cpu_embeds_the_most_concrete_words_and_records_why(
    fake_encoder, user_cache: Path, vocab_dir: Path, tmp_path: Path, monkeypatch, caplog
) -> None:
    monkeypatch.setattr(vocab_stage, "measure_rate", _fixed_rate(1.0))  # 1 word/s: 4 fit in 4 s
    opts = NamingOptions(vocab_dir=vocab_dir, naming_budget=4.0, templates_per_pos=2)
    with caplog.at_level(logging.INFO):
        got = vocab_stage.resolve_vocabulary(
            opts, arch="ViT-B-16", pretrained="openai", atlas_cache=tmp_path / "atlas" / "cache", device="cpu"
        )
    assert got.vocab.words == ("apple", "dog", "car", "tree")  # by Brysbaert rating, not list order
    loud = [r for r in caplog.records if r.getMessage().startswith("NAMING BUDGET")]
    assert len(loud) == 1
    assert loud[0].levelno == logging.WARNING
    assert "13 vocabulary words" in loud[0].getMessage()
    subset = got.vocab.manifest["subset"]
    assert {k: subset[k] for k in ("policy", "n_words", "n_total")} == {
        "policy": "budget-concreteness",
        "n_words": 4,
        "n_total": 13,
    }
    assert "most concrete" in subset["reason"]
    assert got.info["origin"] == "computed"
    assert got.info["reason"] == subset["reason"]
    # the file went to the per-user cache with its manifest; a rerun takes it without the text tower
    cached = list((user_cache / "vocab").glob("ViT-B-16__openai__*.npz"))
    assert len(cached) == 1
    assert load_vocab_embeddings(cached[0]).manifest["subset"]["n_words"] == 4
    monkeypatch.setattr(vocab_stage, "ClipBackbone", NoTextTower)
    again = vocab_stage.resolve_vocabulary(
        opts,
        arch="ViT-B-16",
        pretrained="openai",
        atlas_cache=tmp_path / "atlas" / "cache",
        device="cpu",
        encoder=NoTextTower,
    )
    assert again.vocab.words == got.vocab.words


def test_explicit_choices_and_a_fitting_budget_use_no_subset(
    fake_encoder, user_cache: Path, vocab_dir: Path, tmp_path: Path, monkeypatch, caplog
) -> None:
    monkeypatch.setattr(vocab_stage, "measure_rate", _fixed_rate(1000.0))
    kw = {"arch": "ViT-B-16", "pretrained": "openai", "atlas_cache": tmp_path / "c", "device": "cpu"}
    with caplog.at_level(logging.WARNING):
        full = vocab_stage.resolve_vocabulary(NamingOptions(vocab_dir=vocab_dir, templates_per_pos=1), **kw)
    assert full.vocab.n_words == 13
    assert full.vocab.words[:4] == ("apple", "dog", "car", "tree")  # ranked order, all of it
    assert full.info["policy"] == "full"
    assert "NAMING BUDGET" not in caplog.text
    capped = vocab_stage.resolve_vocabulary(NamingOptions(vocab_dir=vocab_dir, max_words=3), **kw)
    assert capped.vocab.words == ("the", "of", "idea")  # --max-words: the union's first words, as before
    assert capped.info["policy"] == "max-words"


def test_random_init_embeddings_stay_in_the_atlas(
    fake_encoder, user_cache: Path, vocab_dir: Path, tmp_path: Path
) -> None:
    got = vocab_stage.resolve_vocabulary(
        NamingOptions(vocab_dir=vocab_dir, max_words=5),
        arch="ViT-B-16",
        pretrained="none",
        atlas_cache=tmp_path / "atlas" / "cache",
    )
    assert got.vocab.manifest["backbone"]["random_weights"] is True
    assert len(list((tmp_path / "atlas" / "cache").glob("vocab_emb_*.npz"))) == 1
    assert not (user_cache / "vocab").exists()
    again = vocab_stage.resolve_vocabulary(
        NamingOptions(vocab_dir=vocab_dir, max_words=5),
        arch="ViT-B-16",
        pretrained="none",
        atlas_cache=tmp_path / "atlas" / "cache",
        encoder=NoTextTower,  # a rerun takes the atlas's cache without building the text tower
    )
    assert again.vocab.words == got.vocab.words


def test_a_published_file_for_the_exact_backbone_is_fetched_and_verified(
    user_cache: Path, vocab_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    FakeTextEncoder.encoded = []
    opts = NamingOptions(vocab_dir=vocab_dir, max_words=6, templates_per_pos=1)
    words = vocab_stage.vocabulary_words(opts).words
    templates = vocab_stage.templates_for(opts)
    emb = np.stack([FakeTextEncoder(None).encode_text(words, t) for t in templates.values()])
    subset = {"policy": "max-words", "n_words": 6, "n_total": 6, "reason": "test"}
    man = vocab_manifest(
        arch="ViT-B-16", pretrained="openai", words=words, templates_by_pos=templates, subset=subset
    )
    path = VocabEmbeddings(words, emb, tuple(templates), man).save_npz(tmp_path / "pub.npz")
    hub = FakeRepo(tmp_path / "hub")
    monkeypatch.setattr(vocab_hub, "HfApi", lambda token=None: hub)
    monkeypatch.setattr(vocab_hub, "hf_hub_download", hub.download)
    assert main(["vocab-push", "--file", str(path), "--repo-id", "me/vocab"]) == 0
    got = vocab_stage.resolve_vocabulary(
        dataclass_replace(opts, vocab_repo="me/vocab"),
        arch="ViT-B-16",
        pretrained="openai",
        atlas_cache=tmp_path / "c",
        encoder=NoTextTower,
    )
    assert got.info["origin"] == "hub"
    assert got.vocab.words == words
    assert len(list((user_cache / "vocab").glob("*.npz"))) == 1  # verified copy in the cache
    # vocab-pull fetches the same file on its own
    out = tmp_path / "pulled.npz"
    args = [
        "vocab-pull",
        "--repo-id",
        "me/vocab",
        "--vocab-dir",
        str(vocab_dir),
        "--max-words",
        "6",
        "--templates-per-pos",
        "1",
        "--pretrained",
        "openai",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    assert load_vocab_embeddings(out).words == words


def dataclass_replace(opts: NamingOptions, **changes: object) -> NamingOptions:
    import dataclasses

    return dataclasses.replace(opts, **changes)  # type: ignore[arg-type]


def test_vocab_embed_writes_a_file_with_its_manifest(
    fake_encoder, user_cache: Path, vocab_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "vocab.npz"
    args = [
        "vocab-embed",
        "--out",
        str(out),
        "--vocab-dir",
        str(vocab_dir),
        "--arch",
        "ViT-B-16",
        "--pretrained",
        "openai",
        "--templates-per-pos",
        "2",
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert main(args) == 0
    vocab = load_vocab_embeddings(out)
    man = vocab.manifest
    assert vocab.n_words == 13  # the whole vocabulary: no budget for the explicit job
    assert man["subset"]["policy"] == "full"
    assert (man["backbone"]["arch"], man["backbone"]["pretrained"]) == ("ViT-B-16", "openai")
    assert [s["name"] for s in man["sources"]] == [
        "clip_dissect_20k",
        "brysbaert",
        "laion_unigram",
        "laion_bigram",
    ]
    assert all(len(s["sha256"]) == 64 for s in man["sources"])
    assert man["templates"]["noun"] == ["a photo of a {}.", "a photo of the {}."]


# --------------------------------------------------------------------------------------------------
# name with a vocabulary file: never the text tower; another backbone is refused


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("planted")
    assert main(["synth", "--out", str(out), "--n-images", "300", *WORLD.split()]) == 0
    return out


def _vocab_for(planted: Path, arch: str, tag: str, out: Path) -> Path:
    world_vocab = load_vocab_embeddings(planted / "world" / "vocab.npz")
    subset = {
        "policy": "full",
        "n_words": world_vocab.n_words,
        "n_total": world_vocab.n_words,
        "reason": "all",
    }
    man = vocab_manifest(
        arch=arch,
        pretrained=tag,
        words=world_vocab.words,
        templates_by_pos={p: ("{}",) for p in world_vocab.pos_names},
        subset=subset,
    )
    return VocabEmbeddings(world_vocab.words, world_vocab.emb_pwd, world_vocab.pos_names, man).save_npz(out)


def test_name_with_a_vocab_file_for_the_atlas_backbone_never_runs_the_text_tower(
    planted: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(name_stage, "ClipBackbone", NoTextTower)
    monkeypatch.setattr(vocab_stage, "ClipBackbone", NoTextTower)
    atlas = tmp_path / "atlas"
    shutil.copytree(planted / "oracle_atlas", atlas)
    vocab = _vocab_for(planted, "ViT-B-16", "openai", tmp_path / "vocab.npz")
    args = [
        "name",
        "--atlas",
        str(atlas),
        "--features",
        str(planted / "features"),
        "--vocab-embeddings",
        str(vocab),
        "--arch",
        "ViT-B-16",
        "--pretrained",
        "openai",
        "--no-progress",
    ]
    assert main(args) == 0
    table = pq.read_table(atlas / "concepts.parquet").to_pydict()
    world = load_world(planted / "world")
    ids = np.arange(world.n_atoms)
    assert name_recovery(dict(zip(table["id"], table["name"], strict=True)), ids, world).accuracy >= 0.9
    record = json.loads((atlas / "stages" / "name.json").read_text())
    assert record["info"]["vocabulary"]["origin"] == "file"


def test_a_vocab_file_for_another_backbone_or_tag_is_refused_naming_both(
    planted: Path, tmp_path: Path, monkeypatch, caplog
) -> None:
    monkeypatch.setattr(name_stage, "ClipBackbone", NoTextTower)
    atlas = tmp_path / "atlas"
    shutil.copytree(planted / "oracle_atlas", atlas)
    vocab = _vocab_for(planted, "ViT-B-16", "openai", tmp_path / "vocab.npz")
    base = [
        "name",
        "--atlas",
        str(atlas),
        "--features",
        str(planted / "features"),
        "--vocab-embeddings",
        str(vocab),
        "--no-progress",
    ]
    with caplog.at_level(logging.ERROR):
        assert main([*base, "--pretrained", "laion2b_s34b_b88k"]) == 2
    assert "ViT-B-16/openai" in caplog.text
    assert "ViT-B-16/laion2b_s34b_b88k" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main([*base, "--arch", "ViT-L-14", "--pretrained", "openai"]) == 2
    assert "ViT-L-14/openai" in caplog.text
    assert not (atlas / "concepts.parquet").exists() or "vocabulary" not in json.loads(
        (atlas / "stages" / "name.json").read_text()
    ).get("info", {})


# --------------------------------------------------------------------------------------------------
# acceptance: build with the default vocabulary on 16 real photos, a small budget, the app opens it


@pytest.mark.slow
def test_build_with_default_vocabulary_fits_the_budget_and_the_app_shows_why(
    imagenet_samples: list[Path], tmp_path: Path, caplog
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in imagenet_samples[:16]:
        shutil.copy(p, photos / p.name)
    atlas = tmp_path / "atlas"
    args = ["build", "--images", str(photos), "--atlas", str(atlas), "--pretrained", "none",
            "--dict-size", "256", "--steps", "30", "--naming-budget", "15", "--device", "cpu",
            "--no-progress"]  # fmt: skip
    with caplog.at_level(logging.INFO):
        assert main(args) == 0
    loud = [r.getMessage() for r in caplog.records if r.getMessage().startswith("NAMING BUDGET")]
    assert len(loud) == 1
    assert "45,501 vocabulary words" in loud[0]
    record = json.loads((atlas / "stages" / "name.json").read_text())["info"]["vocabulary"]
    assert record["policy"] == "budget-list-order"  # the shipped lists carry no concreteness ratings
    assert record["n_total"] == 45_501
    assert 4 <= record["n_words"] < 45_501
    names = set(pq.read_table(atlas / "concepts.parquet").column("name").to_pylist())
    assert not names & {"the", "of", "and", "a"}  # function words are ranked last
    from app.concepts import concept_html, concept_page
    from app.state import load_state

    state = load_state(atlas)
    assert state.atlas.manifest["configs"]["naming"]["vocabulary"] == record
    page = concept_page(state, 0)
    assert page["vocabulary_note"].startswith(f"names from a {record['n_words']:,}-word subset of the 45,501")
    assert "naming budget" in page["vocabulary_note"]
    assert "subset of the 45,501-word vocabulary" in concept_html(state, page)
