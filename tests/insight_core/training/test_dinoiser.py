"""Tests for training the CLIP-DINOiser head (insight_core.training.dinoiser): fitting on a synthetic
ground truth, batch sources, and the DINO teacher."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from insight_core.errors import ConfigError, FeatureFileError, ImageLoadError
from insight_core.models.dinoiser import AffinityHead, Dinoiser, DinoiserConfig, affinities
from insight_core.training.dinoiser import DinoTeacher, fit_dinoiser, teacher_targets, train_affinity_head
from tests.insight_core.models.test_dinoiser import SMALL, _feats


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny convs: thread start-up dominates and oversubscribed CI cores make it much slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    cfg = DinoiserConfig.output_head(in_dim=D_SYN, head_dim=16, lr=3e-3, batch_size=8)
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


def test_released_head_and_loss_learn_segments_from_other_tokens(one_thread: None) -> None:
    """The released head reads *other* tokens (here: the noise-free segment means through a fixed
    random map, standing in for block -3) and pools the dense features; trained with the release's
    loss (BCE on cosines clamped at 0) it separates segments and pools them to their means."""
    feats, segs, means = _segment_world(32, seed=0)
    proj = torch.randn(D_SYN, 24, generator=torch.Generator().manual_seed(5))
    inter = means @ proj + 0.3 * torch.randn(*means.shape[:3], 24, generator=torch.Generator().manual_seed(6))
    cfg = DinoiserConfig(in_dim=24, head_dim=16, lr=3e-3, batch_size=8)
    assert (cfg.head, cfg.loss) == ("released", "released")
    teacher = F.one_hot(segs, 8).float()
    dinoiser, history = fit_dinoiser(inter, teacher, cfg, epochs=30, progress=False)
    assert history[-1] < history[0]
    with torch.no_grad():
        a = affinities(inter, dinoiser.head)
        assert _auc(a, _same_segment(segs)) > 0.95
        pooled = dinoiser(feats, inter)
    err_none = float(((feats - means) ** 2).sum(-1).mean())
    err_head = float(((pooled - means) ** 2).sum(-1).mean())
    assert err_head < 0.2 * err_none


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
    assert teacher.features == "value"  # the release: last-block value vectors
    feats = teacher.patch_features(pixels)
    assert feats.shape == (2, 14, 14, 192)  # CLS token dropped
    assert teacher_targets(feats).shape == (2, 196, 196)
    # independently: the value third of the last block's qkv projection, heads concatenated
    with torch.no_grad():
        x = teacher.model.patch_embed(pixels)
        x = teacher.model._pos_embed(x)
        x = teacher.model.norm_pre(x)
        x = teacher.model.blocks[0](x)
        qkv = teacher.model.blocks[1].attn.qkv(teacher.model.blocks[1].norm1(x))
        v = qkv[..., 2 * 192 :][:, 1:].reshape(2, 14, 14, 192)
    torch.testing.assert_close(feats, v)
    tokens = DinoTeacher("vit_tiny_patch16_224", pretrained=False, model_kwargs=FAST, features="tokens")
    tokens.model.load_state_dict(teacher.model.state_dict())
    assert not torch.allclose(tokens.patch_features(pixels), feats)


def test_dino_teacher_dinov2_registers_and_resize() -> None:
    teacher = DinoTeacher(
        "vit_small_patch14_reg4_dinov2", pretrained=False, model_kwargs=FAST, features="tokens"
    )
    assert teacher.model.num_prefix_tokens == 5  # 1 CLS + 4 registers are dropped
    feats = teacher.patch_features(teacher.preprocess(_images()))
    assert feats.shape == (2, 16, 16, 384)  # 224 px / 14 px patches
    targets = teacher_targets(feats, (14, 14), 0.2)
    assert targets.shape == (2, 196, 196)
    assert targets.dtype == torch.bool


def test_dino_teacher_unknown_name() -> None:
    with pytest.raises(ConfigError, match="not_a_model"):
        DinoTeacher.from_config(dataclasses.replace(SMALL, teacher="not_a_model", teacher_pretrained=False))


def test_dino_teacher_refuses_a_lazy_eps_before_decoding(tmp_path, fake_gs) -> None:
    from tests import hostile

    (tmp_path / "x.eps").write_bytes(hostile.eps())
    teacher = DinoTeacher("vit_tiny_patch16_224", pretrained=False, model_kwargs=FAST)
    with Image.open(tmp_path / "x.eps") as lazy, pytest.raises(ImageLoadError, match=r"images\[1\]: EPS"):
        teacher.preprocess([_images()[0], lazy])
    assert fake_gs.started() == []
