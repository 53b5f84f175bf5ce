"""Tests for CLIP-DINOiser guided pooling (insight_core.models.dinoiser)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from insight_core.errors import CheckpointError, ConfigError, FeatureFileError
from insight_core.models.dinoiser import AffinityHead, Dinoiser, DinoiserConfig, affinities, guided_pool

SMALL = DinoiserConfig(in_dim=32, head_dim=8)


def _feats(b: int = 2, h: int = 14, w: int = 14, d: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, h, w, d, generator=torch.Generator().manual_seed(seed))


def _trained(cfg: DinoiserConfig = SMALL) -> Dinoiser:
    torch.manual_seed(0)
    return Dinoiser(cfg, mode="head", trained=True)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def test_config_paper_defaults() -> None:
    cfg = DinoiserConfig()
    assert (cfg.in_dim, cfg.head_dim, cfg.kernel_size) == (512, 64, 3)
    assert (cfg.gamma, cfg.lr, cfg.batch_size, cfg.epochs) == (0.2, 5e-5, 16, 100)
    assert cfg.teacher == "vit_base_patch14_dinov2.lvd142m"
    assert DinoiserConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize(
    ("field", "value"),
    [("in_dim", 0), ("kernel_size", 2), ("gamma", 1.0), ("lr", 0.0), ("logit_scale", -1.0), ("teacher", "")],
)
def test_config_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        DinoiserConfig(**{field: value})


# ---------------------------------------------------------------------------------------------
# Head, affinities, pooling
# ---------------------------------------------------------------------------------------------


def test_head_shapes_and_unit_norm() -> None:
    emb = AffinityHead(SMALL)(_feats())
    assert emb.shape == (2, 14, 14, 8)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2, 14, 14))
    assert AffinityHead().conv.weight.shape == (64, 512, 3, 3)


def test_head_rejects_wrong_feature_dim() -> None:
    with pytest.raises(FeatureFileError, match="feats_bhwd"):
        AffinityHead(SMALL)(_feats(d=16))


@pytest.mark.parametrize("use_head", [False, True])
def test_affinities_symmetric_with_unit_diagonal(use_head: bool) -> None:
    head = AffinityHead(SMALL) if use_head else None
    a = affinities(_feats(), head)
    assert a.shape == (2, 196, 196)
    torch.testing.assert_close(a, a.transpose(1, 2))
    torch.testing.assert_close(torch.diagonal(a, dim1=1, dim2=2), torch.ones(2, 196))
    assert a.abs().max() <= 1 + 1e-5


def test_guided_pool_equals_naive_loop_of_eq1() -> None:
    feats = _feats(b=2, h=3, w=2, d=5)
    a = affinities(feats)
    pooled = guided_pool(feats, a)
    flat = feats.reshape(2, 6, 5)
    expected = torch.zeros_like(flat)
    for b in range(2):
        for p in range(6):
            num, den = torch.zeros(5), 0.0
            for q in range(6):
                w = max(float(a[b, p, q]), 0.0)  # negatives clamped
                num += w * flat[b, q]
                den += w
            expected[b, p] = num / den
    torch.testing.assert_close(pooled, expected.reshape(2, 3, 2, 5))


def test_negative_affinities_are_ignored() -> None:
    v = torch.tensor([1.0, 2.0, -0.5])
    feats = torch.stack([v, -v, 2 * v]).reshape(1, 1, 3, 3)  # patch 1 is anti-correlated
    a = affinities(feats)
    assert a[0, 0, 1] < -0.99
    pooled = guided_pool(feats, a)
    torch.testing.assert_close(pooled[0, 0, 0], 1.5 * v)  # mean of v and 2v, -v left out
    torch.testing.assert_close(pooled[0, 0, 1], -v)  # only itself


def test_guided_pool_rejects_mismatched_affinity() -> None:
    with pytest.raises(FeatureFileError, match="affinity_bnn"):
        guided_pool(_feats(), torch.ones(2, 10, 10))


def test_none_mode_is_identity() -> None:
    feats = _feats()
    assert torch.equal(Dinoiser(SMALL, mode="none")(feats), feats)


def test_raw_mode_runs_without_training(caplog: pytest.LogCaptureFixture) -> None:
    feats = _feats()
    with caplog.at_level(logging.WARNING):
        out = Dinoiser(SMALL, mode="raw")(feats)
    assert not caplog.records  # raw affinities are not random weights
    assert out.shape == feats.shape
    assert out.dtype == feats.dtype
    assert not torch.allclose(out, feats)
    assert (out - out.mean((1, 2), keepdim=True)).var() < (feats - feats.mean((1, 2), keepdim=True)).var()


def test_untrained_head_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        Dinoiser(SMALL, mode="head")
    assert "UNTRAINED" in caplog.text


def test_bad_mode_rejected() -> None:
    with pytest.raises(ConfigError, match="mode"):
        Dinoiser(SMALL, mode="dino")  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["none", "raw", "head"])
def test_pooling_preserves_constant_map(mode: str) -> None:
    feats = torch.randn(32).expand(2, 14, 14, 32).contiguous()
    out = Dinoiser(SMALL, mode=mode, trained=True)(feats)  # type: ignore[arg-type]
    torch.testing.assert_close(out, feats)


def test_half_precision_round_trips_dtype() -> None:
    feats = _feats().half()
    out = _trained()(feats)
    assert out.dtype == torch.float16
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path: Path) -> None:
    dinoiser = _trained(dataclasses.replace(SMALL, logit_scale=7.0))
    path = tmp_path / "sub" / "dinoiser.safetensors"
    dinoiser.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["dinoiser.safetensors"]  # no temp leftovers
    loaded = Dinoiser.load(path)
    assert loaded.cfg == dinoiser.cfg
    assert loaded.mode == "head"
    assert loaded.trained
    feats = _feats()
    with torch.no_grad():
        assert torch.equal(loaded(feats), dinoiser(feats))


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointError, match=r"nope\.safetensors"):
        Dinoiser.load(path)


def test_load_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    _trained().save(path)
    path.write_bytes(path.read_bytes()[:50])  # truncated
    with pytest.raises(CheckpointError, match=r"bad\.safetensors"):
        Dinoiser.load(path)
    path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match=r"bad\.safetensors"):
        Dinoiser.load(path)


def _write(path: Path, tensors: dict[str, torch.Tensor], config: dict[str, object]) -> None:
    meta = {"format": "insight-dinoiser/1", "config": json.dumps(config), "mode": "head", "trained": "true"}
    save_file(tensors, str(path), metadata=meta)


def test_load_shape_mismatch_and_bad_metadata(tmp_path: Path) -> None:
    path = tmp_path / "mismatch.safetensors"
    state = AffinityHead(SMALL).state_dict()
    _write(path, state, dataclasses.asdict(dataclasses.replace(SMALL, head_dim=4)))
    with pytest.raises(CheckpointError, match=r"mismatch\.safetensors.*conv\.weight"):
        Dinoiser.load(path)
    _write(path, state, {**dataclasses.asdict(SMALL), "bogus": 1})
    with pytest.raises(CheckpointError, match=r"mismatch\.safetensors"):
        Dinoiser.load(path)
    save_file(state, str(path))  # no metadata at all
    with pytest.raises(CheckpointError, match=r"mismatch\.safetensors"):
        Dinoiser.load(path)
