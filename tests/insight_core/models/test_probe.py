"""The concept probe: logits = W [max ; mean] + b, contributions that add up, safetensors I/O."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from insight_core.concepts.pooling import pooled_vector
from insight_core.errors import CheckpointError, ConfigError
from insight_core.models.probe import ConceptProbe, ProbeConfig


def _probe(pooling: str = "both", bias: bool = False, seed: int = 0) -> ConceptProbe:
    probe = ConceptProbe(ProbeConfig(n_concepts=6, n_classes=3, pooling=pooling, bias=bias), ["a", "b", "c"])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        probe.weight_cf.copy_(torch.randn(probe.weight_cf.shape, generator=g))
        if bias:
            probe.bias_c.copy_(torch.tensor([0.5, -1.0, 2.0]))
    return probe


@pytest.mark.parametrize(
    ("pooling", "bias"), [("both", False), ("both", True), ("max", False), ("mean", True)]
)
def test_contributions_add_up_to_the_logit(pooling: str, bias: bool) -> None:
    probe = _probe(pooling, bias)
    g = torch.Generator().manual_seed(1)
    mx = torch.rand(4, 6, generator=g)
    mn = mx * 0.3
    logits = probe(pooled_vector(mx, mn, pooling))
    cls = torch.tensor([0, 2, 1, 1])
    contrib = probe.contributions(mx, mn, cls)
    torch.testing.assert_close(contrib.sum(1) + probe.bias_c[cls], logits[torch.arange(4), cls])
    assert probe.cfg.n_features == (12 if pooling == "both" else 6)
    assert set(probe.concept_weights()) == ({"max", "mean"} if pooling == "both" else {pooling})


def test_save_load_round_trip(tmp_path: Path) -> None:
    probe = _probe("both", bias=True)
    probe.save(tmp_path / "p.safetensors", {"note": "x"})
    back = ConceptProbe.load(tmp_path / "p.safetensors")
    assert back.classes == ["a", "b", "c"]
    assert back.cfg == probe.cfg
    x = torch.rand(2, 12)
    torch.testing.assert_close(back(x), probe(x).detach())


def test_load_rejects_foreign_and_inconsistent_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        ConceptProbe.load(tmp_path / "none.safetensors")
    save_file({"weight_cf": torch.zeros(3, 12)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="not a concept probe"):
        ConceptProbe.load(tmp_path / "foreign.safetensors")
    probe = _probe()
    probe.save(tmp_path / "p.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "p.safetensors"), framework="pt") as f:
        meta = f.metadata()
    save_file({"weight_cf": torch.zeros(3, 7)}, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=r"weight_cf has shape \(3, 7\), expected \(3, 12\)"):
        ConceptProbe.load(tmp_path / "bad.safetensors")


def test_config_and_input_checks() -> None:
    with pytest.raises(ConfigError, match="n_classes must be >= 2"):
        ProbeConfig(n_concepts=4, n_classes=1)
    with pytest.raises(ConfigError, match="pooling"):
        ProbeConfig(n_concepts=4, n_classes=2, pooling="sum")
    with pytest.raises(ConfigError, match="unique"):
        ConceptProbe(ProbeConfig(n_concepts=4, n_classes=2), ["x", "x"])
    with pytest.raises(ConfigError, match="12 features"):
        _probe()(torch.zeros(1, 6))


def test_active_concepts_are_relative_to_each_class() -> None:
    probe = ConceptProbe(ProbeConfig(n_concepts=4, n_classes=2), ["x", "y"])
    with torch.no_grad():
        probe.weight_cf[0, 1] = 2.0  # concept 1 (max column)
        probe.weight_cf[0, 4 + 3] = -0.5  # concept 3 (mean column), negative evidence counts too
        probe.weight_cf[0, 2] = 0.001  # below 1 % of the class's largest weight
        probe.weight_cf[1, 4 + 0] = 0.01
    active = probe.active_concepts()
    assert active.tolist() == [[False, True, False, True], [True, False, False, False]]


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({"classes": "[1, 2, 3]"}, r"p\.safetensors: metadata: classes\.0: Input should be a valid string"),
        ({"classes": "[torn"}, r"p\.safetensors: metadata: classes: Invalid JSON"),
        ({"config": '{"n_concepts": "6", "n_classes": 3}'}, r"metadata config: n_concepts: Input should be"),
        ({"config": '{"n_concepts": 6, "n_classes": 3, "pooling": "sum"}'}, r"metadata config: .*pooling"),
        ({"classes": '["a", "b"]'}, r"malformed probe metadata \(2 class names for n_classes=3\)"),
    ],
)  # fmt: skip
def test_malformed_metadata_names_the_file_and_field(tmp_path: Path, meta: dict, message: str) -> None:
    _probe().save(tmp_path / "p.safetensors", meta)  # extra metadata overrides the written keys
    with pytest.raises(CheckpointError, match=message):
        ConceptProbe.load(tmp_path / "p.safetensors")
