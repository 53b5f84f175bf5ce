"""The one place evaluations (and the app's segmentation) turn patch features into SAE codes.

The paper's inference rule: a concept is present on a patch when its *thresholded* code is > 0.
By default that is the SAE's learned global threshold (batch-independent codes). The
``thresholded`` variant of the paper (Tab. 3, "INSIGHT (thresholded)") uses per-concept
thresholds; it is requested with ``thresholded=True`` and needs an SAE that recorded them
(``MatryoshkaSAE.has_concept_thresholds``). Keeping the choice here means every evaluation switches
together.
"""

from __future__ import annotations

import logging

import torch

from insight_core.errors import CheckpointError
from insight_core.models.msae import MSAE
from insight_core.models.sae import MatryoshkaSAE

log = logging.getLogger(__name__)
_warned: set[int] = set()


def code_rule(sae: MatryoshkaSAE, thresholded: bool = False) -> str:
    """How :func:`encode_codes` encodes with this SAE: ``"concept-threshold"``, ``"global-threshold"``,
    ``"topk"`` (an MSAE: per-input TopK at its inference level) or ``"batchtopk"`` (an SAE without a
    learned threshold: codes then depend on the batch)."""
    if thresholded:
        if not sae.has_concept_thresholds:
            raise CheckpointError(
                "--thresholded needs per-concept thresholds, which this SAE did not record "
                "(retrain it with train-sae, or evaluate with the global threshold)"
            )
        return "concept-threshold"
    if isinstance(sae, MSAE):
        return "topk"
    return "global-threshold" if sae.has_threshold else "batchtopk"


def encode_codes(sae: MatryoshkaSAE, x_nd: torch.Tensor, thresholded: bool = False) -> torch.Tensor:
    """Non-negative SAE codes (n, m) of patch features (n, d) by the rule of :func:`code_rule`."""
    rule = code_rule(sae, thresholded)
    if rule == "concept-threshold":
        return sae.encode(x_nd, threshold="concept")
    if rule == "topk":
        return sae.encode(x_nd)
    if rule == "batchtopk" and id(sae) not in _warned:
        _warned.add(id(sae))
        log.warning("the SAE has no learned threshold: using BatchTopK codes (they depend on the batch)")
    return sae.encode(x_nd, use_threshold=rule == "global-threshold")
