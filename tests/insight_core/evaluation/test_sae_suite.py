"""The SAE quality suite's metrics against plain reference implementations written here (loops)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from insight_core.errors import ConfigError
from insight_core.evaluation import sae_suite as suite
from insight_core.models.sae import MatryoshkaSAE, SAEConfig


def _sae(d: int = 6, m: int = 10, seed: int = 0) -> MatryoshkaSAE:
    sae = MatryoshkaSAE(SAEConfig(d_in=d, dict_size=m, k=2, group_fractions=(1.0,)), seed=seed)
    with torch.no_grad():
        sae.b_dec_d.copy_(torch.linspace(-0.2, 0.3, d))
        sae.threshold.fill_(0.3)
    return sae


def _ref_morans(x_hw: np.ndarray) -> float:
    """Moran's I with explicit 8-neighbour loops."""
    g = x_hw.shape[0]
    xc = x_hw.astype(np.float64) - x_hw.astype(np.float64).mean()
    num, s = 0.0, 0
    for r in range(g):
        for c in range(g):
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    rr, cc = r + dr, c + dc
                    if (dr or dc) and 0 <= rr < g and 0 <= cc < g:
                        num += xc[r, c] * xc[rr, cc]
                        s += 1
    return float(g * g / s * num / (xc**2).sum())


def test_one_pass_matches_plain_loops() -> None:
    rng = np.random.default_rng(0)
    x_bpd = rng.normal(size=(7, 9, 6)).astype(np.float32)  # 7 images of a 3x3 grid
    text_cd = rng.normal(size=(4, 6)).astype(np.float32)
    sae = _sae()
    cfg = suite.SuiteConfig(min_active_patches=2, max_active_fraction=0.8, min_images_per_latent=2)
    batches = [torch.from_numpy(x_bpd[:3]), torch.from_numpy(x_bpd[3:])]  # two batches
    r = suite.run_pass(
        suite.SaeCodec(sae), batches, text_cd=torch.from_numpy(text_cd), keep_max_codes=True, cfg=cfg
    )
    x = x_bpd.reshape(-1, 6).astype(np.float64)
    with torch.no_grad():
        z = sae.encode(torch.from_numpy(x_bpd.reshape(-1, 6)), use_threshold=True).double().numpy()
        xh = sae.decode(torch.from_numpy(z).float()).double().numpy()
    assert r.fve == pytest.approx(1 - ((x - xh) ** 2).sum() / ((x - x.mean(0)) ** 2).sum(), rel=1e-5)
    assert r.fvu == pytest.approx(np.var(x - xh) / np.var(x), rel=1e-5)
    cos = [a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(x, xh, strict=True)]
    assert r.cosine == pytest.approx(np.mean(cos), rel=1e-5)
    assert r.l0 == pytest.approx((z > 0).sum(1).mean())
    assert r.dead_fraction == pytest.approx(1 - (z > 0).any(0).mean())
    t = text_cd / np.linalg.norm(text_cd, axis=1, keepdims=True)
    for i in range(7):
        rows = slice(9 * i, 9 * i + 9)
        ref_o = [np.mean([p @ tc / np.linalg.norm(p) for p in x[rows]]) for tc in t]
        ref_r = [np.mean([p @ tc / np.linalg.norm(p) for p in xh[rows]]) for tc in t]
        np.testing.assert_allclose(r.zs_orig_ic[i], ref_o, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r.zs_recon_ic[i], ref_r, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r.max_codes_im[i], z[rows].max(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r.mean_recon_id[i], xh[rows].mean(0), rtol=1e-5, atol=1e-6)
    # Moran's I: per latent over its valid images, then over latents with >= 2 valid images
    per_latent, pairs = [], 0
    for j in range(10):
        vals = []
        for i in range(7):
            a = z[9 * i : 9 * i + 9, j]
            n_act = int((a != 0).sum())
            if 2 <= n_act <= 0.8 * 9 and ((a - a.mean()) ** 2).sum() > 1e-12:
                vals.append(_ref_morans(a.reshape(3, 3)))
        pairs += len(vals)
        if len(vals) >= 2:
            per_latent.append(np.mean(vals))
    assert r.morans_pairs == pairs
    assert r.morans_latents == len(per_latent) >= 2  # the check has something to check
    assert r.morans_i == pytest.approx(np.mean(per_latent), rel=1e-6)


def test_morans_i_tells_a_blob_from_a_checkerboard() -> None:
    blob = np.zeros((1, 36, 2), dtype=np.float32)
    blob[0, [0, 1, 6, 7], 0] = 1.0  # a 2x2 block in the corner of a 6x6 grid
    blob[0, [i for i in range(36) if (i // 6) % 2 == 0], 1] = 1.0  # every other row: stripes
    s, c = suite._morans_batch(torch.from_numpy(blob), suite.queen_weights(6), suite.SuiteConfig())
    assert c.tolist() == [1, 1]
    assert s[0] > 0.3
    assert s[1] < 0.0
    assert float(s[0]) == pytest.approx(_ref_morans(blob[0, :, 0].reshape(6, 6)))
    assert float(s[1]) == pytest.approx(_ref_morans(blob[0, :, 1].reshape(6, 6)))


def test_pca_codec_is_the_top_components_projection() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 5)) @ np.diag([5, 3, 1, 0.5, 0.1]) + 2.0
    pca = suite.fit_pca(torch.from_numpy(x).float(), 2)
    xc = x - x.mean(0)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    ref = x.mean(0) + xc @ vt[:2].T @ vt[:2]
    got = pca.decode(pca.encode(torch.from_numpy(x).float())).double().numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4)
    full = suite.fit_pca(torch.from_numpy(x).float(), 99)  # clipped to d: lossless
    np.testing.assert_allclose(full.decode(full.encode(torch.from_numpy(x).float())).numpy(), x, atol=1e-4)


def test_split_is_stratified_and_deterministic() -> None:
    y = np.array([0] * 10 + [1] * 5 + [2])
    tr, te = suite.split_indices(y, 0.2, seed=3)
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(16))
    assert np.bincount(y[te], minlength=3).tolist() == [2, 1, 0]  # a lone image stays in training
    _, te2 = suite.split_indices(y, 0.2, seed=3)
    assert te.tolist() == te2.tolist()


def test_rank_latents_matches_a_loop() -> None:
    rng = np.random.default_rng(2)
    codes = rng.random((30, 6))
    y = rng.integers(0, 3, 30)
    order = suite.rank_latents(codes, y, 3)
    for c in range(3):
        diff = [codes[y == c, j].mean() - codes[y != c, j].mean() for j in range(6)]
        assert order[c].tolist() == np.argsort(-np.asarray(diff), kind="stable").tolist()


def _detector_codes(
    n_per: int = 20, n_classes: int = 4, m: int = 30, seed: int = 0
) -> tuple[np.ndarray, ...]:
    """Latent c fires (noisily) on class c; the other latents are noise."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_classes), n_per)
    codes = rng.random((y.size, m)) * 0.5
    codes[np.arange(y.size), y] += 1.0
    return codes, y


def test_sparse_probing_finds_the_detector_latents() -> None:
    codes, y = _detector_codes()
    out = suite.sparse_probing(codes, y, 4, suite.SuiteConfig(probe_ks=(1, 5)))
    assert out["1"]["top1_accuracy"] == 1.0
    assert out["1"]["binary_accuracy"] == 1.0
    shuffled = suite.sparse_probing(codes[:, 10:], y, 4, suite.SuiteConfig(probe_ks=(1, 5)))  # no detectors
    assert shuffled["1"]["top1_accuracy"] < 0.6


def test_downstream_preservation_is_one_for_a_copy_and_low_for_noise() -> None:
    codes, y = _detector_codes(m=8)
    cfg = suite.SuiteConfig()
    same = suite.downstream_preservation(codes, codes, y, 4, cfg)
    assert same["downstream_preservation"] == 1.0
    noise = np.random.default_rng(5).random(codes.shape)
    low = suite.downstream_preservation(codes, noise, y, 4, cfg)
    assert low["downstream_accuracy_original"] == 1.0
    assert low["downstream_preservation"] < 0.6


def test_zero_shot_figures_and_bad_inputs() -> None:
    assert suite.zero_shot_accuracy(np.array([[0.1, 0.9], [0.8, 0.2]]), np.array([1, 1])) == 0.5
    with pytest.raises(ConfigError, match="class embeddings"):
        suite.class_count_check(["a", "b"], torch.zeros(3, 4), 4)
    with pytest.raises(ConfigError, match="probe_ks"):
        suite.SuiteConfig(probe_ks=(0,))
    with pytest.raises(ConfigError, match="no patches"):
        suite.run_pass(suite.SaeCodec(_sae()), [])


# ----------------------------------------------------------------------------------- monosemanticity
def _ref_mono_latent(col: np.ndarray, emb: np.ndarray, top_k: int, lost: int = -1) -> float | None:
    """One latent's score with explicit loops over image pairs (image ``lost``: weight 0)."""
    order = sorted(range(len(col)), key=lambda i: (-col[i], i))[:top_k]
    lo, hi = col.min(), col.max()
    w = [0.0 if i == lost else (col[i] - lo) / (hi - lo if hi > lo else 1.0) for i in order]
    num = den = 0.0
    for a in range(len(order)):
        for b in range(a + 1, len(order)):
            ea, eb = emb[order[a]], emb[order[b]]
            cos = ea @ eb / np.linalg.norm(ea) / np.linalg.norm(eb)
            num += w[a] * w[b] * cos
            den += w[a] * w[b]
    return num / den if den > 0 else None


def test_monosemanticity_matches_plain_loops() -> None:
    rng = np.random.default_rng(3)
    codes = np.maximum(rng.normal(size=(40, 12)) - 0.8, 0.0)  # sparse, non-negative
    codes[:, 3] = 0.0  # dead
    codes[:, 4] = 0.0
    codes[7, 4] = 1.0  # fires on one image only: no weighted pair, not scored
    emb = rng.normal(size=(40, 5))
    asked: list[np.ndarray] = []

    def embed(idx: np.ndarray) -> np.ndarray:
        asked.append(idx.copy())
        return emb[idx] * 3.0  # unnormalised: the function normalises

    res = suite.monosemanticity(codes, embed, top_k=6, max_features=100)
    ref = {j: _ref_mono_latent(codes[:, j], emb, 6) for j in range(12) if codes[:, j].max() > 0}
    scored = {j: s for j, s in ref.items() if s is not None}
    assert res.latents_s.tolist() == sorted(scored)
    np.testing.assert_allclose(res.scores_s, [scored[j] for j in sorted(scored)], rtol=1e-10)
    assert res.value == pytest.approx(np.mean(list(scored.values())))
    assert res.n_alive == 11
    # the evaluator is asked once, only for images with a positive weight in some top list
    assert len(asked) == 1
    weighted = {i for j in ref for i in np.argsort(-codes[:, j], kind="stable")[:6] if codes[i, j] > 0}
    assert set(asked[0].tolist()) == weighted


def test_monosemanticity_subsamples_with_the_seed_and_drops_failed_images() -> None:
    rng = np.random.default_rng(4)
    codes = rng.random((30, 50))
    emb = rng.normal(size=(30, 4))
    a = suite.monosemanticity(codes, emb, top_k=4, max_features=10, seed=1)
    b = suite.monosemanticity(codes, emb, top_k=4, max_features=10, seed=1)
    c = suite.monosemanticity(codes, emb, top_k=4, max_features=10, seed=2)
    assert a.latents_s.size == 10
    assert a.latents_s.tolist() == b.latents_s.tolist()
    assert a.latents_s.tolist() != c.latents_s.tolist()
    # an image the evaluator cannot embed (NaN row) keeps its top-k slot with weight 0
    top = int(np.argmax(codes[:, 0]))
    broken = emb.copy()
    broken[top] = np.nan
    one = suite.monosemanticity(codes[:, :1], broken, top_k=4)
    assert one.n_failed == 1
    assert one.value == pytest.approx(_ref_mono_latent(codes[:, 0], emb, 4, lost=top))
    assert one.value != pytest.approx(_ref_mono_latent(codes[:, 0], emb, 4))
    with pytest.raises(ConfigError, match=r"embeddings must be \(30, e\)"):
        suite.monosemanticity(codes, emb[:5])
    with pytest.raises(ConfigError, match="top_k"):
        suite.monosemanticity(codes, emb, top_k=1)


def test_monosemanticity_known_answer_on_a_planted_world() -> None:
    """Evaluator = the planted object class (one-hot): the oracle's object latents score 1 exactly, an
    untrained SAE of the same size clearly less."""
    from insight_core.planted import WorldConfig, make_world, sample_images
    from insight_core.planted.metrics import oracle_codes, oracle_sae

    world = make_world(WorldConfig(d=48, grid=6, n_objects=4, n_attributes=4, n_backgrounds=2,
                                   n_distractors=5, objects_per_image=(1, 1)))  # fmt: skip
    sample = sample_images(world, 80, seed=2)
    codes = oracle_codes(world, sample)
    objects = world.atoms_of_kind("object")
    onehot = (codes[:, :, objects].max(1) > 0).astype(np.float64)
    assert (onehot.sum(1) == 1).all()  # one object per image: its class
    x = torch.from_numpy(sample.feats_npd).float()
    oracle = suite.run_pass(suite.SaeCodec(oracle_sae(world)), [x], keep_max_codes=True)
    res = suite.monosemanticity(oracle.max_codes_im, onehot, top_k=8)
    obj_scores = res.scores_s[np.isin(res.latents_s, objects)]
    assert obj_scores.size == objects.size
    np.testing.assert_allclose(obj_scores, 1.0, atol=1e-9)
    rand_sae = MatryoshkaSAE(oracle_sae(world).cfg, seed=7)
    rand = suite.run_pass(suite.SaeCodec(rand_sae), [x], keep_max_codes=True)
    rand_res = suite.monosemanticity(rand.max_codes_im, onehot, top_k=8)
    assert rand_res.value is not None
    assert rand_res.n_alive > 10
    assert rand_res.value < 0.75  # clearly below the object latents' 1 (chance for 4 classes: ~0.25)
