"""``name`` word lists: shipped assets/vocab by default; --vocab-dir with the Brysbaert table unchanged."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from insight_core.atlas.layout import VOCAB_DIR
from insight_core.errors import ConfigError
from precompute import name as name_stage
from precompute.options import NamingOptions


class FakeTextEncoder:
    """Stands in for ClipBackbone: random unit text embeddings, no model to load."""

    is_random = False

    def __init__(self, cfg: object) -> None:
        self.rng = np.random.default_rng(0)

    def encode_text(self, texts: Sequence[str], templates: Sequence[str]) -> np.ndarray:
        emb = self.rng.standard_normal((len(texts), 8))
        return emb / np.linalg.norm(emb, axis=1, keepdims=True)


@pytest.fixture
def fake_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(name_stage, "ClipBackbone", FakeTextEncoder)


@pytest.mark.usefixtures("fake_encoder")
def test_name_uses_the_shipped_word_lists_by_default(tmp_path: Path, caplog) -> None:
    shipped = Path(__file__).resolve().parents[2] / "assets" / "vocab"
    assert shipped == VOCAB_DIR
    job = name_stage.NameJob(
        atlas=tmp_path, naming=NamingOptions(max_words=40, templates_per_pos=1), progress=False
    )
    with caplog.at_level(logging.INFO):
        vocab = name_stage._vocabulary(job).vocab
    assert vocab.words[:3] == ("the", "of", "and")  # msae_clip_disect_20k.txt comes first
    assert vocab.n_words == 40
    assert str(VOCAB_DIR / "msae_laion_400_bigram.txt") in caplog.text
    assert caplog.text.count("vocabulary source brysbaert skipped") == 1
    with pytest.raises(ConfigError, match=r"--vocab-dir .*nowhere: not a directory"):
        name_stage._vocabulary(
            name_stage.NameJob(atlas=tmp_path, naming=NamingOptions(vocab_dir=tmp_path / "nowhere"))
        )


@pytest.mark.usefixtures("fake_encoder")
def test_vocab_dir_with_the_brysbaert_table_still_uses_it(shared_data: Path, tmp_path: Path, caplog) -> None:
    vocab_dir = shared_data / "vocab"
    if not (vocab_dir / "Concreteness_ratings_Brysbaert_et_al_BRM.txt").is_file():
        pytest.skip(f"no Brysbaert table in {vocab_dir}")
    job = name_stage.NameJob(
        atlas=tmp_path, naming=NamingOptions(vocab_dir=vocab_dir, max_words=10, templates_per_pos=1)
    )
    with caplog.at_level(logging.INFO):
        name_stage._vocabulary(job)
    assert "vocabulary source brysbaert (" in caplog.text
    assert "skipped" not in caplog.text
