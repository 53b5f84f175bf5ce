"""Tests for CLIP-DINOiser guided pooling (insight_core.models.dinoiser)."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from insight_core.errors import CheckpointError, ConfigError, FeatureFileError
from insight_core.models.dinoiser import (
    AffinityHead,
    Dinoiser,
    DinoiserConfig,
    DinoTeacher,
    affinities,
    fit_dinoiser,
    guided_pool,
    teacher_targets,
    train_affinity_head,
)

SMALL = DinoiserConfig(in_dim=32, head_dim=8)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny convs: thread start-up dominates and oversubscribed CI cores make it much slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
# Training on a synthetic ground truth
# ---------------------------------------------------------------------------------------------

D_SYN, N_CONCEPTS = 64, 6


def _segment_world(n: int, seed: int, noise: float = 3.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n feature maps with 3-4 Voronoi segments each; returns feats, segment ids, noise-free means.

    Every segment gets one of 6 shared concept directions (norm 1) on top of a shared offset (norm 2,
    like CLIP's common component) plus isotropic noise of norm ``noise``, so raw cosines are poor.
    """
    g = torch.Generator().manual_seed(1234)  # the concept bank is shared by all splits
    bank = F.normalize(torch.randn(N_CONCEPTS, D_SYN, generator=g), dim=-1)
    offset = 2.0 * F.normalize(torch.randn(D_SYN, generator=g), dim=-1)
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(14.0), torch.arange(14.0), indexing="ij")
    grid_hw2 = torch.stack([ys, xs], -1)
    feats, segs, means = [], [], []
    for _ in range(n):
        k = int(torch.randint(3, 5, (1,), generator=g))
        centres = torch.rand(k, 2, generator=g) * 14
        seg_hw = ((grid_hw2[:, :, None] - centres) ** 2).sum(-1).argmin(-1)
        mean_hwd = offset + bank[torch.randperm(N_CONCEPTS, generator=g)[:k]][seg_hw]
        feats.append(mean_hwd + noise / D_SYN**0.5 * torch.randn(14, 14, D_SYN, generator=g))
        segs.append(seg_hw)
        means.append(mean_hwd)
    return torch.stack(feats), torch.stack(segs), torch.stack(means)


def _same_segment(seg_bhw: torch.Tensor) -> torch.Tensor:
    s = seg_bhw.flatten(1)
    return s[:, :, None] == s[:, None, :]


def _auc(a_bnn: torch.Tensor, same_bnn: torch.Tensor) -> float:
    """Probability that a random within-segment pair outranks a random across-segment pair."""
    off_diag = ~torch.eye(a_bnn.shape[1], dtype=torch.bool)
    pos, neg = a_bnn[same_bnn & off_diag], a_bnn[~same_bnn]
    ranks = torch.cat([pos, neg]).argsort().argsort().double() + 1
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def test_fit_dinoiser_recovers_synthetic_segments(one_thread: None) -> None:
    feats, segs, _ = _segment_world(32, seed=0)
    teacher = F.one_hot(segs, 8).float()  # cosine 1 within a segment, 0 across -> exact targets
    assert torch.equal(teacher_targets(teacher, (14, 14), 0.2), _same_segment(segs))
    cfg = DinoiserConfig(in_dim=D_SYN, head_dim=16, lr=3e-3, batch_size=8)
    dinoiser, history = fit_dinoiser(feats, teacher, cfg, epochs=40, progress=False)  # 160 steps
    assert len(history) == 40
    assert dinoiser.trained
    assert dinoiser.mode == "head"
    assert history[-1] < 0.5 * history[0]  # (a) loss drops substantially

    test_feats, test_segs, test_means = _segment_world(8, seed=1)  # held-out images
    same = _same_segment(test_segs)
    with torch.no_grad():
        auc_raw = _auc(affinities(test_feats), same)
        auc_head = _auc(affinities(test_feats, dinoiser.head), same)
        assert auc_head > max(0.9, auc_raw + 0.15)  # (b) affinities separate segments better

        def err(x: torch.Tensor) -> float:
            return float(((x - test_means) ** 2).sum(-1).mean())

        err_none, err_head = err(test_feats), err(dinoiser(test_feats))
        err_raw = err(Dinoiser(cfg, "raw")(test_feats))
    assert err_head < 0.1 * err_none  # (c) pooled features are close to the segment means
    assert err_head < err_raw  # ... closer than with raw CLIP affinities (which leak across segments)


def test_train_affinity_head_accepts_list_and_callable(one_thread: None) -> None:
    cfg = dataclasses.replace(SMALL, lr=1e-2)
    batch = (_feats(d=32), torch.rand(2, 196, 196) > 0.5)
    head = AffinityHead(cfg)
    assert len(train_affinity_head(head, [batch, batch], cfg, epochs=3, progress=False)) == 3
    calls = []

    def make() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        calls.append(1)
        return iter([batch])

    assert len(train_affinity_head(head, make, cfg, epochs=2, progress=True)) == 2
    assert len(calls) == 2  # re-iterated per epoch
    assert not head.training


def test_train_affinity_head_rejects_bad_batches() -> None:
    cfg = SMALL
    batch = (_feats(d=32), torch.rand(2, 196, 196) > 0.5)
    with pytest.raises(ConfigError, match="batches"):
        train_affinity_head(AffinityHead(cfg), iter([batch]), cfg, epochs=2, progress=False)
    with pytest.raises(ConfigError, match="batches"):
        train_affinity_head(AffinityHead(cfg), [], cfg, epochs=1, progress=False)
    with pytest.raises(FeatureFileError, match="targets_bnn"):
        train_affinity_head(AffinityHead(cfg), [(batch[0], batch[1][:, :5])], cfg, epochs=1, progress=False)


def test_fit_dinoiser_rejects_mismatched_counts() -> None:
    with pytest.raises(FeatureFileError, match="teacher_feats_nhwc"):
        fit_dinoiser(_feats(b=3), _feats(b=2, d=8), SMALL, epochs=1, progress=False)


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


# ---------------------------------------------------------------------------------------------
# Teacher
# ---------------------------------------------------------------------------------------------


FAST = {"depth": 2}  # the real architectures, only shallower: init + forward stay fast


def _images() -> list[Image.Image]:
    return [Image.new("RGB", (50, 40), (200, 30, 30)), Image.new("L", (64, 80), 90)]


def test_teacher_targets_resize_matches_native_grid() -> None:
    teacher = _feats(b=2, h=14, w=14, d=16)
    up = teacher.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)  # a 28x28 teacher grid
    targets = teacher_targets(teacher, (14, 14), 0.2)
    assert targets.dtype == torch.bool
    assert targets.shape == (2, 196, 196)
    assert torch.diagonal(targets, dim1=1, dim2=2).all()
    assert torch.equal(teacher_targets(up, (14, 14), 0.2), targets)


def test_dino_teacher_vit_tiny(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        teacher = DinoTeacher("vit_tiny_patch16_224", pretrained=False, model_kwargs=FAST)
    assert "RANDOM" in caplog.text
    assert not teacher.train().training
    assert not any(p.requires_grad for p in teacher.parameters())
    pixels = teacher.preprocess(_images())
    assert pixels.shape == (2, 3, 224, 224)
    feats = teacher.patch_features(pixels)
    assert feats.shape == (2, 14, 14, 192)  # CLS token dropped
    assert teacher_targets(feats).shape == (2, 196, 196)


def test_dino_teacher_dinov2_registers_and_resize() -> None:
    teacher = DinoTeacher("vit_small_patch14_reg4_dinov2", pretrained=False, model_kwargs=FAST)
    assert teacher.model.num_prefix_tokens == 5  # 1 CLS + 4 registers are dropped
    feats = teacher.patch_features(teacher.preprocess(_images()))
    assert feats.shape == (2, 16, 16, 384)  # 224 px / 14 px patches
    targets = teacher_targets(feats, (14, 14), 0.2)
    assert targets.shape == (2, 196, 196)
    assert targets.dtype == torch.bool


def test_dino_teacher_unknown_name() -> None:
    with pytest.raises(ConfigError, match="not_a_model"):
        DinoTeacher.from_config(dataclasses.replace(SMALL, teacher="not_a_model", teacher_pretrained=False))
