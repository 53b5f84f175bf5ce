"""Caption metrics: BLEU-4 / CIDEr / METEOR scoring, normalisation, reproduction rate."""

from __future__ import annotations

import pytest

from insight_core.errors import ConfigError
from insight_core.evaluation import captions as cap
from insight_core.evaluation.captions import normalize_caption, reproduction_rate, score_captions
from tests.insight_core.models.test_captioner import CAPTIONS


def test_score_captions(monkeypatch: pytest.MonkeyPatch) -> None:
    refs = [[c, c.upper()] for c in CAPTIONS]
    perfect = score_captions(CAPTIONS, refs, meteor="off")
    assert perfect["bleu4"] > 0.99
    assert perfect["cider"] > 5
    assert perfect["meteor"] == "off"
    wrong = score_captions(CAPTIONS[1:] + CAPTIONS[:1], refs, meteor="off")
    assert wrong["bleu4"] < 0.3
    assert wrong["cider"] < perfect["cider"] / 5
    monkeypatch.setattr(cap.shutil, "which", lambda name: None)
    assert score_captions(CAPTIONS, refs)["meteor"] == "unavailable (needs Java)"
    with pytest.raises(ConfigError, match="one prediction per reference"):
        score_captions(CAPTIONS, refs[:2])


def test_normalize_and_reproduction() -> None:
    assert normalize_caption("  A Dog, running!  ") == "a dog running"
    assert reproduction_rate(["a dog running", "x"], [["A dog running."], ["y"]]) == 0.5
