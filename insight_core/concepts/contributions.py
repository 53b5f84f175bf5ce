"""Explaining a class score through concepts (paper Sec. 4.2, Fig. 4, Figs. C8-C9).

A probe's logit for class ``y`` is a sum over concepts (plus a bias, none by default):
``contribution[i] = W[y, i] c_max[i] + W[y, m + i] c_mean[i]`` (weight x pooled activation). A
zero-shot score splits the same way (:mod:`insight_core.concepts.zeroshot`). From the per-concept
contributions of one image and class this module builds:

- :class:`Decision`: the concepts ranked by contribution, each with its *share* = contribution /
  (sum of the positive contributions), so the evidence for the class adds up to 100 % and a
  concept speaking against it has a negative share;
- :func:`family_breakdown`: the decision grouped by concept families (Fig. 4): every positively
  contributing concept joins the family of its strongest contributing ancestor in the family DAG
  (or leads its own); a family's share is the sum of its members' shares, and each active
  child's share within the family is its part of that sum.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from insight_core.concepts.families import Families
from insight_core.errors import ConfigError
from insight_core.models.probe import ConceptProbe


@dataclasses.dataclass(frozen=True, eq=False)
class Decision:
    """One class's score of one image, split over concepts (ranked by contribution, descending)."""

    class_index: int
    label: str
    score: float
    """The logit (probe) or the score (zero-shot)."""
    bias: float
    """The part of the score no concept explains (probe bias; SAE decoder bias for zero-shot)."""
    concepts: np.ndarray
    """Concept ids of the nonzero contributions, largest contribution first."""
    contributions: np.ndarray
    """Their contributions; ``contributions.sum() + bias == score``."""
    activations: np.ndarray
    """Their pooled activation (max over patches)."""

    @property
    def positive_total(self) -> float:
        return float(self.contributions[self.contributions > 0].sum())

    @property
    def shares(self) -> np.ndarray:
        """contribution / (sum of positive contributions); sums to 1 over the positive ones."""
        total = self.positive_total
        return self.contributions / total if total > 0 else np.zeros_like(self.contributions)

    def top(self, k: int, name: Callable[[int], str] | None = None) -> list[dict[str, Any]]:
        """The ``k`` largest contributions as JSON-ready records (id, name, contribution, share)."""
        shares = self.shares
        out = []
        for cid, contrib, share, act in zip(
            self.concepts[:k], self.contributions[:k], shares[:k], self.activations[:k], strict=True
        ):
            rec: dict[str, Any] = {"id": int(cid)}
            if name is not None:
                rec["name"] = name(int(cid))
            rec.update(contribution=float(contrib), share=float(share), activation=float(act))
            out.append(rec)
        return out


def make_decision(
    class_index: int,
    label: str,
    concepts: np.ndarray,
    contributions: np.ndarray,
    activations: np.ndarray,
    bias: float = 0.0,
) -> Decision:
    """A :class:`Decision` from unordered per-concept contributions (zeros are dropped)."""
    concepts, contributions, activations = (np.asarray(a) for a in (concepts, contributions, activations))
    keep = contributions != 0
    order = np.lexsort((concepts[keep], -contributions[keep]))  # contribution desc, then id asc
    contrib = contributions[keep][order].astype(np.float64)
    return Decision(
        class_index=int(class_index),
        label=str(label),
        score=float(contrib.sum() + bias),
        bias=float(bias),
        concepts=concepts[keep][order].astype(np.int64),
        contributions=contrib,
        activations=activations[keep][order].astype(np.float64),
    )


def probe_decision(
    probe: ConceptProbe, concepts: np.ndarray, max_vals: np.ndarray, mean_vals: np.ndarray, class_index: int
) -> Decision:
    """Explain class ``class_index`` of one image given its active concepts and their pooled values
    (``PooledConcepts.row_concepts``): contribution = weight x pooled activation (module docstring)."""
    if not 0 <= int(class_index) < probe.cfg.n_classes:
        raise ConfigError(f"class index {class_index} out of range (probe has {probe.cfg.n_classes} classes)")
    ids = torch.as_tensor(np.asarray(concepts, dtype=np.int64))
    contrib = torch.zeros(len(ids), dtype=torch.float64)
    pooled = {"max": np.asarray(max_vals), "mean": np.asarray(mean_vals)}
    for kind, w_cm in probe.concept_weights().items():
        w = w_cm[int(class_index)].double().cpu()[ids] if len(ids) else torch.zeros(0, dtype=torch.float64)
        contrib += w * torch.as_tensor(pooled[kind], dtype=torch.float64)
    bias = float(probe.bias_c.detach()[int(class_index)])
    return make_decision(class_index, probe.classes[int(class_index)], np.asarray(ids), contrib.numpy(),
                         np.asarray(max_vals), bias)  # fmt: skip


def top_classes(scores_c: np.ndarray | torch.Tensor, classes: Sequence[str], k: int = 5,
                temperature: float = 1.0) -> list[dict[str, Any]]:  # fmt: skip
    """The ``k`` best classes with softmax(scores / temperature) probabilities, best first."""
    scores = torch.as_tensor(np.asarray(scores_c, dtype=np.float64))
    if scores.ndim != 1 or len(scores) != len(classes):
        raise ConfigError(f"{tuple(scores.shape)} scores for {len(classes)} classes")
    probs = torch.softmax(scores / temperature, dim=0)
    order = torch.argsort(-scores, stable=True)[: max(int(k), 1)]
    return [
        {
            "index": int(i),
            "label": str(classes[int(i)]),
            "probability": float(probs[i]),
            "score": float(scores[i]),
        }
        for i in order
    ]


def family_breakdown(
    decision: Decision,
    families: Families | None,
    name: Callable[[int], str] | None = None,
    max_families: int = 8,
) -> list[dict[str, Any]]:
    """The positive evidence of a decision grouped by concept families (paper Fig. 4).

    Returns up to ``max_families`` families, largest share first: ``{"id", "name", "share",
    "own_share", "children": [{"id", "name", "share", "share_in_family"}]}``; ``share`` is of all
    positive contributions, ``share_in_family`` of the family's total. Without a family DAG every
    concept is its own family.
    """
    pos = decision.contributions > 0
    ids = decision.concepts[pos]
    contrib = dict(zip(ids.tolist(), decision.contributions[pos].tolist(), strict=True))
    total = sum(contrib.values())
    if total <= 0:
        return []
    ancestors = {
        cid: [] if families is None else [int(a) for a in families.ancestors(cid) if int(a) in contrib]
        for cid in contrib
    }  # contributing ancestors only
    leader: dict[int, int] = {}
    for cid, anc in ancestors.items():
        # the strongest contributing ancestor that heads a family (has no contributing ancestor itself)
        heads = [a for a in anc if not ancestors[a]]
        leader[cid] = min(heads, key=lambda a: (-contrib[a], a)) if heads else cid
    groups: dict[int, list[int]] = {}
    for cid in ids.tolist():
        groups.setdefault(leader[cid], []).append(cid)
    out = []
    for head, members in groups.items():
        fam_total = sum(contrib[c] for c in members)
        kids = sorted((c for c in members if c != head), key=lambda c: (-contrib[c], c))
        rec: dict[str, Any] = {"id": head}
        if name is not None:
            rec["name"] = name(head)
        rec.update(share=fam_total / total, own_share=contrib[head] / total, children=[])
        for c in kids:
            child: dict[str, Any] = {"id": c}
            if name is not None:
                child["name"] = name(c)
            child.update(share=contrib[c] / total, share_in_family=contrib[c] / fam_total)
            rec["children"].append(child)
        out.append(rec)
    out.sort(key=lambda r: (-r["share"], r["id"]))
    return out[:max_families]
