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

SMALL = DinoiserConfig.output_head(in_dim=32, head_dim=8)
"""A small head on the dense features themselves (the ``"output"`` kind)."""
RELEASED = DinoiserConfig(in_dim=24, head_dim=8)
"""A small released head: it reads 24-d intermediate tokens."""


def _feats(b: int = 2, h: int = 14, w: int = 14, d: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, h, w, d, generator=torch.Generator().manual_seed(seed))


def _trained(cfg: DinoiserConfig = SMALL) -> Dinoiser:
    torch.manual_seed(0)
    return Dinoiser(cfg, mode="head", trained=True)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def test_config_release_defaults() -> None:
    cfg = DinoiserConfig()
    assert (cfg.head, cfg.in_dim, cfg.head_dim, cfg.kernel_size) == ("released", 768, 256, 3)
    assert cfg.feats_block == -3
    assert (cfg.gamma, cfg.pool_cut, cfg.lr, cfg.lr_drop_step, cfg.batch_size, cfg.epochs) == (
        0.2, 0.2, 5e-5, 5000, 16, 100
    )  # fmt: skip
    assert (cfg.teacher, cfg.teacher_features, cfg.loss) == ("vit_base_patch16_224.dino", "value", "released")
    assert DinoiserConfig.from_json(cfg.to_json()) == cfg
    out = DinoiserConfig.output_head()
    assert (out.head, out.in_dim, out.head_dim, out.pool_cut, out.loss) == ("output", 512, 64, 0.0, "scaled")
    assert AffinityHead().conv.weight.shape == (256, 768, 3, 3)


def test_config_of_format_1_files_is_the_output_head() -> None:
    old = {"in_dim": 512, "head_dim": 64, "kernel_size": 3, "gamma": 0.2, "lr": 5e-5, "batch_size": 16,
           "epochs": 100, "logit_scale": 10.0, "teacher": "vit_base_patch14_dinov2.lvd142m",
           "teacher_pretrained": True, "seed": 0}  # fmt: skip
    cfg = DinoiserConfig.from_json(json.dumps(old), legacy=True)
    assert cfg == DinoiserConfig.output_head(lr_drop_step=None)


@pytest.mark.parametrize(
    ("field", "value"),
    [("in_dim", 0), ("kernel_size", 2), ("gamma", 1.0), ("lr", 0.0), ("logit_scale", -1.0), ("teacher", ""),
     ("head", "final"), ("loss", "mse"), ("teacher_features", "keys"), ("lr_drop_step", 0)],
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
    assert AffinityHead(DinoiserConfig.output_head()).conv.weight.shape == (64, 512, 3, 3)


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
            expected[b, p] = num / (den + 1e-6)
    torch.testing.assert_close(pooled, expected.reshape(2, 3, 2, 5))


def test_guided_pool_cut_zeroes_weak_affinities() -> None:
    feats = _feats(b=1, h=2, w=2, d=3)
    a = torch.tensor(
        [[[1.0, 0.1, 0.5, -0.3], [0.1, 1.0, 0.19, 0.2], [0.5, 0.19, 1.0, 0.0], [-0.3, 0.2, 0.0, 1.0]]]
    )
    flat = feats.reshape(4, 3)
    pooled = guided_pool(feats, a, cut=0.2).reshape(4, 3)
    torch.testing.assert_close(pooled[0], (flat[0] + 0.5 * flat[2]) / (1.5 + 1e-6))  # 0.1 and -0.3 dropped
    torch.testing.assert_close(pooled[1], (flat[1] + 0.2 * flat[3]) / (1.2 + 1e-6))  # 0.2 kept, 0.19 dropped
    uncut = guided_pool(feats, a, cut=0.0).reshape(4, 3)
    torch.testing.assert_close(uncut[0], (flat[0] + 0.1 * flat[1] + 0.5 * flat[2]) / (1.6 + 1e-6))


def test_released_head_reads_intermediate_tokens_and_cuts_at_gamma() -> None:
    torch.manual_seed(0)
    dino = Dinoiser(RELEASED, mode="head", trained=True)
    assert dino.intermediate_block == -3
    assert dino.describe() == {"pool": "head", "head": "released"}
    feats, inter = _feats(d=32), _feats(d=24, seed=1)
    with torch.no_grad():
        out = dino(feats, inter)
        a = affinities(inter, dino.head)
        torch.testing.assert_close(out, guided_pool(feats, a, cut=0.2))
        assert ((a > 0) & (a < 0.2)).float().mean() > 0.05  # the cut matters here
        assert not torch.allclose(out, guided_pool(feats, a, cut=0.0), atol=1e-4)
        # pool() = forward on a backbone's DenseFeatures
        from insight_core.models.backbone import DenseFeatures

        torch.testing.assert_close(dino.pool(DenseFeatures(feats, torch.zeros(2, 32), inter)), out)
    with pytest.raises(ConfigError, match="intermediate tokens of block -3"):
        dino(feats)
    with pytest.raises(FeatureFileError, match="feats_bhwd"):
        dino(feats, _feats(d=16))
    assert Dinoiser(SMALL, mode="head", trained=True).intermediate_block is None
    assert Dinoiser(RELEASED, mode="raw").intermediate_block is None


def test_check_backbone_names_the_mismatch() -> None:
    dino = Dinoiser(RELEASED, mode="head", trained=True)
    dino.check_backbone(width=24, embed_dim=32, n_blocks=12)
    with pytest.raises(ConfigError, match=r"768-d|24-d"):
        dino.check_backbone(width=768, embed_dim=512, n_blocks=12)
    with pytest.raises(ConfigError, match="intermediate block"):
        dino.check_backbone(width=24, embed_dim=32, n_blocks=2)
    with pytest.raises(ConfigError, match="32-d dense features"):
        Dinoiser(SMALL, mode="head", trained=True).check_backbone(width=768, embed_dim=512, n_blocks=12)
    Dinoiser(SMALL, mode="raw").check_backbone(width=1, embed_dim=1, n_blocks=1)  # no head: anything goes


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
    released = _trained(RELEASED)
    released.save(path)
    loaded = Dinoiser.load(path)
    assert loaded.cfg == RELEASED
    inter = _feats(d=24)
    with torch.no_grad():
        assert torch.equal(loaded(feats, inter), released(feats, inter))


def test_format_1_head_files_still_load(tmp_path: Path) -> None:
    """Heads written before the released head existed (format 1) load as the output head."""
    old_cfg = {k: v for k, v in dataclasses.asdict(SMALL).items()
               if k not in ("head", "feats_block", "lr_drop_step", "loss", "teacher_features")}  # fmt: skip
    head = AffinityHead(SMALL)
    path = tmp_path / "old.safetensors"
    _write(path, head.state_dict(), old_cfg)
    loaded = Dinoiser.load(path)
    assert (loaded.cfg.head, loaded.cfg.in_dim, loaded.cfg.pool_cut) == ("output", 32, 0.0)
    assert loaded.intermediate_block is None
    feats = _feats()
    with torch.no_grad():
        expected = guided_pool(feats, affinities(feats, head), cut=0.0)
        torch.testing.assert_close(loaded(feats), expected)


def _clip_dinoiser_state(in_dim: int = 24, out_dim: int = 8, k: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "obj_proj.weight": torch.randn(out_dim, in_dim, k, k, generator=g) * 0.1,
        "obj_proj.bias": torch.randn(out_dim, generator=g) * 0.1,
        "bkg_decoder.weight": torch.randn(1, in_dim, 1, 1, generator=g),
        "bkg_decoder.bias": torch.zeros(1),
    }


def test_import_clip_dinoiser_last_pt(tmp_path: Path) -> None:
    state = _clip_dinoiser_state()
    path = tmp_path / "last.pt"
    torch.save({"epoch": 99, "model_state_dict": state}, path)
    dino = Dinoiser.load(path)
    assert (dino.cfg.head, dino.cfg.in_dim, dino.cfg.head_dim) == ("released", 24, 8)
    assert dino.cfg.kernel_size == 3
    assert (dino.cfg.feats_block, dino.cfg.gamma, dino.mode, dino.trained) == (-3, 0.2, "head", True)
    assert torch.equal(dino.head.conv.weight, state["obj_proj.weight"])
    assert torch.equal(dino.head.conv.bias, state["obj_proj.bias"])
    # it survives a round trip through the project's own format
    dino.save(tmp_path / "head.safetensors")
    again = Dinoiser.load(tmp_path / "head.safetensors")
    feats, inter = _feats(d=32), _feats(d=24, seed=3)
    with torch.no_grad():
        assert torch.equal(again(feats, inter), dino(feats, inter))


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ({"epoch": 1}, r"missing 'model_state_dict' \(found \['epoch'\]\)"),
        ({"model_state_dict": {"bkg_decoder.bias": torch.zeros(1)}},
         r"lacks \['obj_proj.weight', 'obj_proj.bias'\]"),
        ({"model_state_dict": {"obj_proj.weight": torch.zeros(8, 24), "obj_proj.bias": torch.zeros(8)}},
         r"obj_proj.weight must be \(out, in, k, k\)"),
        ([1, 2, 3], r"missing 'model_state_dict' \(found list\)"),
    ],
)  # fmt: skip
def test_import_rejects_other_layouts_in_one_line(tmp_path: Path, content: object, match: str) -> None:
    path = tmp_path / "other.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=match) as err:
        Dinoiser.load(path)
    assert "\n" not in str(err.value)
    assert "other.pt" in str(err.value)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"other\.pt: neither a \.safetensors head"):
        Dinoiser.load(path)


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


def _write(path: Path, tensors: dict[str, torch.Tensor], config: dict[str, object], fmt: str = "1") -> None:
    meta = {"format": f"insight-dinoiser/{fmt}", "config": json.dumps(config), "mode": "head"}
    meta["trained"] = "true"
    save_file(tensors, str(path), metadata=meta)


def test_load_shape_mismatch_and_bad_metadata(tmp_path: Path) -> None:
    path = tmp_path / "mismatch.safetensors"
    state = AffinityHead(SMALL).state_dict()
    _write(path, state, dataclasses.asdict(dataclasses.replace(SMALL, head_dim=4)), fmt="2")
    with pytest.raises(CheckpointError, match=r"mismatch\.safetensors.*conv\.weight"):
        Dinoiser.load(path)
    _write(path, state, {**dataclasses.asdict(SMALL), "bogus": 1}, fmt="2")
    with pytest.raises(CheckpointError, match=r"mismatch\.safetensors"):
        Dinoiser.load(path)
    save_file(state, str(path))  # no metadata at all
    with pytest.raises(CheckpointError, match=r"mismatch\.safetensors"):
        Dinoiser.load(path)
