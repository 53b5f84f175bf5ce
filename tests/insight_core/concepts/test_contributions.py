"""Decisions split over concepts (weight x pooled activation), shares, and the family breakdown (Fig. 4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from insight_core.concepts.contributions import family_breakdown, make_decision, probe_decision, top_classes
from insight_core.concepts.families import Families
from insight_core.concepts.pooling import PooledConcepts, pool_codes
from insight_core.errors import ConfigError
from insight_core.models.probe import ConceptProbe, ProbeConfig


def test_probe_decision_adds_up_to_the_logit() -> None:
    m = 10
    probe = ConceptProbe(ProbeConfig(n_concepts=m, n_classes=3, bias=True), ["a", "b", "c"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        probe.weight_cf.copy_(torch.randn(3, 2 * m, generator=g))
        probe.bias_c.copy_(torch.tensor([0.1, 0.2, 0.3]))
    z = torch.rand(1, 6, m, generator=g) * (torch.rand(1, 6, m, generator=g) < 0.4)
    pooled = PooledConcepts.from_dense(*pool_codes(z))
    logits = probe(pooled.batch(None))[0].detach()
    for c in range(3):
        d = probe_decision(probe, *pooled.row_concepts(0), c)
        assert d.label == "abc"[c]
        assert d.score == pytest.approx(float(logits[c]), abs=1e-5)
        assert d.contributions.sum() + d.bias == pytest.approx(float(logits[c]), abs=1e-5)
        assert np.all(np.diff(d.contributions) <= 0)  # largest first
        assert set(d.concepts.tolist()) <= set(pooled.row_concepts(0)[0].tolist())
    with pytest.raises(ConfigError, match="class index 3"):
        probe_decision(probe, *pooled.row_concepts(0), 3)


def test_shares_and_top_records() -> None:
    d = make_decision(
        1, "dog", np.array([4, 7, 2, 9]), np.array([1.0, 3.0, -2.0, 0.0]), np.array([1, 2, 3, 4.0])
    )
    assert d.concepts.tolist() == [7, 4, 2]  # zero contributions dropped, largest first
    np.testing.assert_allclose(d.shares, [0.75, 0.25, -0.5])
    assert d.score == pytest.approx(2.0)
    top = d.top(2, lambda i: f"c{i}")
    assert top == [
        {"id": 7, "name": "c7", "contribution": 3.0, "share": 0.75, "activation": 2.0},
        {"id": 4, "name": "c4", "contribution": 1.0, "share": 0.25, "activation": 1.0},
    ]


def test_top_classes_are_softmax_ranked() -> None:
    tops = top_classes(np.array([0.0, 2.0, 1.0]), ["a", "b", "c"], k=2)
    assert [t["label"] for t in tops] == ["b", "c"]
    probs = np.exp([0.0, 2.0, 1.0]) / np.exp([0.0, 2.0, 1.0]).sum()
    assert tops[0]["probability"] == pytest.approx(probs[1])
    sharp = top_classes(np.array([0.0, 0.02, 0.01]), ["a", "b", "c"], k=3, temperature=0.01)
    assert sharp[0]["probability"] == pytest.approx(probs[1])
    with pytest.raises(ConfigError, match="scores for 2 classes"):
        top_classes(np.zeros(3), ["a", "b"])


def test_family_breakdown_groups_evidence_under_the_strongest_head() -> None:
    # 0 -> 1 -> 2 ; 3 -> 2 (2 has two parents) ; 4 alone ; 5 -> 6 but 5 does not contribute
    fam = Families.from_arrays(8, np.array([0, 1, 3, 5]), np.array([1, 2, 2, 6]), np.full(4, 0.9, np.float32))
    contrib = {0: 2.0, 1: 1.0, 2: 1.0, 3: 3.0, 4: 2.0, 6: 1.0, 7: -4.0}
    d = make_decision(
        0, "x", np.array(list(contrib)), np.array(list(contrib.values())), np.ones(len(contrib))
    )
    out = family_breakdown(d, fam, lambda i: f"c{i}")
    total = 10.0  # positive evidence
    by_head = {f["id"]: f for f in out}
    assert set(by_head) == {0, 3, 4, 6}
    assert [c["id"] for c in by_head[0]["children"]] == [1]  # 2's heads are 0 (2.0) and 3 (3.0): 3 wins
    assert [c["id"] for c in by_head[3]["children"]] == [2]
    assert by_head[3]["share"] == pytest.approx(4.0 / total)
    assert by_head[3]["own_share"] == pytest.approx(0.3)
    assert by_head[3]["children"][0]["share_in_family"] == pytest.approx(0.25)
    assert by_head[6]["children"] == []  # its parent 5 gives no evidence: 6 heads its own family
    assert sum(f["share"] for f in out) == pytest.approx(1.0)
    assert [f["id"] for f in out] == [3, 0, 4, 6]  # largest share first, ties by id
    assert [f["id"] for f in family_breakdown(d, None)] == [3, 0, 4, 1, 2, 6]
    assert family_breakdown(d, fam, max_families=2)[1]["id"] == 0
    negative = make_decision(0, "x", np.array([1]), np.array([-1.0]), np.ones(1))
    assert family_breakdown(negative, fam) == []
