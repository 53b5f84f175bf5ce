"""Caption metrics: corpus BLEU-4, METEOR, CIDEr (pycocoevalcap, the COCO caption evaluation code)
and the rate at which predictions reproduce a reference."""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Sequence
from typing import Any, Literal

from insight_core.errors import ConfigError

log = logging.getLogger(__name__)

_PUNCT = re.compile(r"[^\w\s']|_")


def normalize_caption(text: str) -> str:
    """Lower-case, punctuation removed, single spaces (close to the PTB tokenizer of the COCO toolkit)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def java_available() -> bool:
    return shutil.which("java") is not None


def score_captions(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    meteor: Literal["auto", "off"] = "auto",
) -> dict[str, Any]:
    """Corpus BLEU-4, CIDEr (pure Python) and METEOR (needs Java; else reported as unavailable).

    Captions are normalised with :func:`normalize_caption` (Java's PTB tokenizer is not required).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(predictions) != len(references) or not predictions:
        raise ConfigError(
            f"score_captions: need one prediction per reference list, got {len(predictions)} "
            f"and {len(references)}"
        )
    res = {i: [normalize_caption(p) or "empty"] for i, p in enumerate(predictions)}
    gts = {i: [normalize_caption(r) for r in refs] for i, refs in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    out: dict[str, Any] = {"bleu4": float(bleu[3]), "cider": float(cider), "n_images": len(predictions)}
    out["meteor"] = _meteor(gts, res) if meteor == "auto" else "off"
    return out


def _meteor(gts: dict[int, list[str]], res: dict[int, list[str]]) -> float | str:
    if not java_available():
        log.warning(
            "METEOR unavailable: it needs Java (apt-get install default-jre-headless); "
            "BLEU-4 and CIDEr are still computed"
        )
        return "unavailable (needs Java)"
    from pycocoevalcap.meteor.meteor import Meteor

    try:
        scorer = Meteor()
        score, _ = scorer.compute_score(gts, res)
    except (OSError, ValueError, BrokenPipeError) as err:
        log.warning("METEOR unavailable: the Java scorer failed (%s)", err)
        return f"unavailable ({type(err).__name__})"
    return float(score)


def reproduction_rate(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Fraction of predictions equal (after :func:`normalize_caption`) to one of their references."""
    hits = sum(
        normalize_caption(p) in {normalize_caption(r) for r in refs}
        for p, refs in zip(predictions, references, strict=False)
    )
    return hits / max(len(predictions), 1)
