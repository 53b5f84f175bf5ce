"""Tests of the streaming concept statistics against a naive dense computation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import insight_core.concepts.stats as stats_mod
from insight_core.atlas import AtlasLayout
from insight_core.concepts.exemplars import quantile_bins, range_bands, range_sample_images, sample_key
from insight_core.concepts.stats import (
    ConceptStats,
    StatsAccumulator,
    StatsConfig,
    compute_stats,
)
from insight_core.errors import CheckpointError, ConfigError
from insight_core.io import write_safetensors
from insight_core.models.sae import MatryoshkaSAE, SAEConfig

M, N_IMAGES, P = 24, 40, 6
# histogram edges chosen so that no activation of _random_codes (0.1 ... 0.5) lies on an edge
# and no co-occurrence floor, so that D matches the naive dense D everywhere (the floor: test_cooccurrence.py)
CFG = StatsConfig(
    top_n=7, top_w=3, hist_bins=12, hist_min=0.03, hist_max=1.0, band_bins=3, band_samples=2, cooc_floor=0.0
)


def _random_codes(seed: int = 0, n_images: int = N_IMAGES, m: int = M, density: float = 0.2):
    """Sparse codes with ties (values on a 0.1 grid), dead concepts and varying actives per patch."""
    rng = np.random.default_rng(seed)
    b = n_images * P
    dens = rng.uniform(0.3, 1.7, size=(b, 1)) * density  # some patches much busier than others
    codes = np.where(rng.random((b, m)) < dens, rng.integers(1, 6, (b, m)) / 10, 0.0).astype(np.float32)
    codes[:, [3, 17]] = 0.0  # never active
    codes[: b // 2, 5] = 0.0  # active only in the second half
    image_ids = np.repeat(rng.permutation(1000)[:n_images] + 7, P).astype(np.int64)
    patch_ids = np.tile(np.arange(P), n_images).astype(np.int64)
    return codes, image_ids, patch_ids


def _naive(codes: np.ndarray, image_ids: np.ndarray, patch_ids: np.ndarray, cfg: StatsConfig) -> dict:
    c = codes.astype(np.float64)
    act = c > cfg.min_activation
    a = np.where(act, c, 0.0)
    m = c.shape[1]
    s = a.sum(0)
    d = (a.T @ act) / np.where(s > 0, s, 1.0)[:, None]
    freq = act.sum(0)
    out = {
        "freq_patches": freq,
        "freq_images": np.array([len(set(image_ids[act[:, j]].tolist())) for j in range(m)]),
        "mean": np.where(freq > 0, s / np.maximum(freq, 1), 0.0),
        "max": np.where(freq > 0, a.max(0), 0.0),
        "D": d,
        "ex": [],
        "w": np.zeros((m, m)),
    }
    for j in range(m):
        rows = sorted(
            np.flatnonzero(act[:, j]).tolist(), key=lambda i: (-c[i, j], image_ids[i], patch_ids[i])
        )
        top = rows[: cfg.top_n]
        out["ex"].append([(float(codes[i, j]), int(image_ids[i]), int(patch_ids[i])) for i in top])
        top_w = top[: cfg.top_w]
        if top_w:
            out["w"][j] = a[top_w].mean(0)
    # histograms on the log-spaced edges, then the smallest-key patches of every band
    edges = cfg.edges()
    bins = np.clip(np.digitize(c, edges) - 1, 0, cfg.hist_bins - 1)
    out["hist"] = np.stack([np.bincount(bins[act[:, j], j], minlength=cfg.hist_bins) for j in range(m)])
    keys = sample_key(torch.from_numpy(image_ids), torch.from_numpy(patch_ids)).numpy()
    out["bands"] = {}
    for j in range(m):
        for band in range(cfg.n_bands):
            rows = np.flatnonzero(act[:, j] & (bins[:, j] // cfg.band_bins == band))
            rows = sorted(rows.tolist(), key=lambda i: (keys[i], image_ids[i], patch_ids[i]))
            out["bands"][j, band] = [(float(codes[i, j]), int(image_ids[i]), int(patch_ids[i]))
                                     for i in rows[: cfg.band_samples]]  # fmt: skip
    return out


def _accumulate(
    codes, image_ids, patch_ids, images_per_batch: int, cfg: StatsConfig = CFG, device: str = "cpu"
) -> StatsAccumulator:
    acc = StatsAccumulator(codes.shape[1], cfg, device=device)
    step = images_per_batch * P
    for s in range(0, len(codes), step):
        acc.update(torch.from_numpy(codes[s : s + step]), image_ids[s : s + step], patch_ids[s : s + step])
    return acc


def _assert_same(a: ConceptStats, b: ConceptStats, d_atol: float = 0.0) -> None:
    for f in dataclasses.fields(ConceptStats):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            if f.name == "ex_code_cols_mwk" or f.name == "ex_code_vals_mwk":
                k = min(x.shape[-1], y.shape[-1])  # padding width may differ; extra columns are pads
                assert torch.equal(x[..., :k], y[..., :k]), f.name
                for t, pad in ((x, -1 if f.name.endswith("cols_mwk") else 0), (y, None)):
                    if pad is not None:
                        assert (t[..., k:] == pad).all()
            elif f.name == "mean_act_m":
                torch.testing.assert_close(x, y, atol=max(d_atol, 1e-6), rtol=0)
            else:
                assert torch.equal(x.nan_to_num(-7.0), y.nan_to_num(-7.0)), f.name
        elif f.name == "cooc":
            assert x.floor == y.floor
            torch.testing.assert_close(x.to_dense(), y.to_dense(), atol=max(d_atol, 1e-6), rtol=0)
        else:
            assert x == y, f.name


# --------------------------------------------------------------------------------------------------
# Correctness


def test_matches_naive_dense_computation() -> None:
    codes, image_ids, patch_ids = _random_codes()
    ref = _naive(codes, image_ids, patch_ids, CFG)
    st_ = _accumulate(codes, image_ids, patch_ids, images_per_batch=5).finalize()

    assert st_.n_patches == len(codes)
    assert st_.n_images == N_IMAGES
    np.testing.assert_array_equal(st_.freq_patches_m.numpy(), ref["freq_patches"])
    np.testing.assert_array_equal(st_.freq_images_m.numpy(), ref["freq_images"])
    np.testing.assert_allclose(st_.mean_act_m.numpy(), ref["mean"], atol=1e-6)
    np.testing.assert_allclose(st_.max_act_m.numpy(), ref["max"], atol=0)
    np.testing.assert_allclose(st_.D_mm.numpy(), ref["D"], atol=1e-6)
    assert st_.D_mm.dtype == torch.float32
    assert st_.D_mm.shape == (M, M)
    for j in range(M):
        n = len(ref["ex"][j])
        got = list(
            zip(
                st_.ex_act_mn[j, :n].tolist(),
                st_.ex_image_mn[j, :n].tolist(),
                st_.ex_patch_mn[j, :n].tolist(),
                strict=True,
            )
        )
        assert [(round(a, 6), i, p) for a, i, p in got] == [
            (round(a, 6), i, p) for a, i, p in ref["ex"][j]
        ], j
        assert torch.isnan(st_.ex_act_mn[j, n:]).all()
        assert (st_.ex_image_mn[j, n:] == -1).all()
        assert (st_.ex_patch_mn[j, n:] == -1).all()
    assert int(st_.n_exemplars_m[3]) == 0
    assert torch.isnan(st_.ex_act_mn[3]).all()
    # w(i, a) for every pair, vectorised and scalar
    ii, aa = np.meshgrid(np.arange(M), np.arange(M), indexing="ij")
    np.testing.assert_allclose(st_.w_pairs(ii, aa).numpy(), ref["w"], atol=1e-6)
    assert st_.w(0, 1) == pytest.approx(ref["w"][0, 1], abs=1e-6)
    assert st_.w(3, 0) == 0.0  # never-active concept
    # activation histograms and the samples of every band
    np.testing.assert_array_equal(st_.hist_mb.numpy(), ref["hist"])
    np.testing.assert_array_equal(st_.hist_mb.sum(1).numpy(), ref["freq_patches"])
    assert st_.band_act_msr.shape == (M, CFG.n_bands, CFG.band_samples)
    for (j, band), want in ref["bands"].items():
        n = len(want)
        got = zip(st_.band_act_msr[j, band, :n].tolist(), st_.band_image_msr[j, band, :n].tolist(),
                  st_.band_patch_msr[j, band, :n].tolist(), strict=True)  # fmt: skip
        assert [(round(a, 6), i, p) for a, i, p in got] == [(round(a, 6), i, p) for a, i, p in want]
        assert (st_.band_image_msr[j, band, n:] == -1).all()
        assert torch.isnan(st_.band_act_msr[j, band, n:]).all()
    assert sum(len(v) for v in ref["bands"].values()) > 2 * M  # several bands per concept were sampled


def test_quantile_bins() -> None:
    hist = np.array([[0, 2, 2, 0, 6], [0, 0, 0, 0, 0], [5, 0, 0, 0, 0], [1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(quantile_bins(hist, 0.5), [4, -1, 0, 1])
    np.testing.assert_array_equal(quantile_bins(hist, 0.1), [1, -1, 0, 0])
    np.testing.assert_array_equal(quantile_bins(hist, 1.0), [4, -1, 0, 3])


def test_ties_are_broken_by_image_then_patch() -> None:
    codes = np.zeros((4 * P, 3), dtype=np.float32)
    codes[:, 0] = 1.0  # every patch ties
    image_ids = np.repeat([40, 10, 30, 20], P)
    patch_ids = np.tile(np.arange(P)[::-1], 4)
    acc = StatsAccumulator(3, StatsConfig(top_n=8, top_w=2))
    for s in range(0, len(codes), 2 * P):
        acc.update(torch.from_numpy(codes[s : s + 2 * P]), image_ids[s : s + 2 * P], patch_ids[s : s + 2 * P])
    st_ = acc.finalize()
    assert st_.ex_image_mn[0].tolist() == [10] * P + [20] * 2
    assert st_.ex_patch_mn[0].tolist() == [*range(P), 0, 1]


def test_min_activation_threshold() -> None:
    codes, image_ids, patch_ids = _random_codes(seed=4)
    cfg = StatsConfig(top_n=5, top_w=2, min_activation=0.25, cooc_floor=0.0)
    ref = _naive(codes, image_ids, patch_ids, cfg)
    st_ = _accumulate(codes, image_ids, patch_ids, 7, cfg).finalize()
    np.testing.assert_array_equal(st_.freq_patches_m.numpy(), ref["freq_patches"])
    np.testing.assert_allclose(st_.D_mm.numpy(), ref["D"], atol=1e-6)
    ii, aa = np.meshgrid(np.arange(M), np.arange(M), indexing="ij")
    np.testing.assert_allclose(st_.w_pairs(ii, aa).numpy(), ref["w"], atol=1e-6)


@pytest.mark.parametrize("images_per_batch", [1, 3, 7])
def test_streaming_equals_one_batch(images_per_batch: int) -> None:
    codes, image_ids, patch_ids = _random_codes(seed=1)
    whole = _accumulate(codes, image_ids, patch_ids, N_IMAGES).finalize()
    streamed = _accumulate(codes, image_ids, patch_ids, images_per_batch).finalize()
    _assert_same(whole, streamed)


def test_codes_of_earlier_exemplars_survive_k_growth() -> None:
    """Early batches have few actives per patch, later ones many: stored codes are padded, not lost."""
    codes, image_ids, patch_ids = _random_codes(seed=2, density=0.08)
    busy, _, _ = _random_codes(seed=3, density=0.5)
    half = len(codes) // 2
    codes[half:] = busy[half:] * 0.5  # busy patches with small values: early exemplars stay on top
    ref = _naive(codes, image_ids, patch_ids, CFG)
    acc = _accumulate(codes, image_ids, patch_ids, 4)
    st_ = acc.finalize()
    assert st_.ex_code_cols_mwk.shape[-1] > 1
    ii, aa = np.meshgrid(np.arange(M), np.arange(M), indexing="ij")
    np.testing.assert_allclose(st_.w_pairs(ii, aa).numpy(), ref["w"], atol=1e-6)


def test_chunked_pair_accumulation(monkeypatch: pytest.MonkeyPatch) -> None:
    codes, image_ids, patch_ids = _random_codes(seed=5)
    whole = _accumulate(codes, image_ids, patch_ids, N_IMAGES).finalize()
    monkeypatch.setattr(stats_mod, "_MAX_PAIRS", 37)
    chunked = _accumulate(codes, image_ids, patch_ids, N_IMAGES).finalize()
    _assert_same(whole, chunked, d_atol=1e-6)


def test_merge_of_halves_equals_whole() -> None:
    codes, image_ids, patch_ids = _random_codes(seed=6)
    whole = _accumulate(codes, image_ids, patch_ids, 5).finalize()
    h = (N_IMAGES // 2) * P
    a = _accumulate(codes[:h], image_ids[:h], patch_ids[:h], 3)
    b = _accumulate(codes[h:], image_ids[h:], patch_ids[h:], 6)
    _assert_same(whole, a.merge(b).finalize(), d_atol=1e-6)
    with pytest.raises(ConfigError, match="merge"):
        a.merge(StatsAccumulator(M + 1, CFG))


def test_state_dict_round_trip_for_distributed_merge(tmp_path: Path) -> None:
    """A worker's accumulator survives safetensors serialisation and merges like the original."""
    codes, image_ids, patch_ids = _random_codes(seed=9)
    whole = _accumulate(codes, image_ids, patch_ids, 5).finalize()
    h = (N_IMAGES // 2) * P
    a = _accumulate(codes[:h], image_ids[:h], patch_ids[:h], 4)
    b = _accumulate(codes[h:], image_ids[h:], patch_ids[h:], 4)
    write_safetensors(tmp_path / "worker1.safetensors", b.state_dict())
    b_back = StatsAccumulator.from_state_dict(load_file(str(tmp_path / "worker1.safetensors")), CFG)
    _assert_same(b.finalize(), b_back.finalize())
    _assert_same(whole, a.merge(b_back).finalize(), d_atol=1e-6)
    state = b.state_dict()
    with pytest.raises(ConfigError, match="'self_sums_m' is missing"):
        StatsAccumulator.from_state_dict({k: v for k, v in state.items() if k != "self_sums_m"}, CFG)
    with pytest.raises(ConfigError, match="pair_keys_e"):
        StatsAccumulator.from_state_dict({k: v for k, v in state.items() if k != "pair_keys_e"}, CFG)
    shuffled = state["pair_keys_e"].flip(0)
    with pytest.raises(ConfigError, match="ascending distinct off-diagonal"):
        StatsAccumulator.from_state_dict({**state, "pair_keys_e": shuffled}, CFG)
    with pytest.raises(ConfigError, match="'ex_act_mn'"):
        StatsAccumulator.from_state_dict(state, StatsConfig(top_n=8, top_w=3))


def test_compute_stats_with_sae() -> None:
    sae = MatryoshkaSAE(SAEConfig(d_in=16, dict_size=32, k=4, group_fractions=(0.25, 0.75)), seed=0)
    with torch.no_grad():
        sae.threshold.fill_(0.3)
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(10, P, 16, generator=gen)
    batches = [(feats[s : s + 4], torch.arange(s, min(s + 4, 10)) + 100) for s in range(0, 10, 4)]
    got = compute_stats(sae, batches, CFG, progress=False)
    codes = sae.encode(feats.reshape(-1, 16)).detach()
    assert (codes > 0).any()
    acc = StatsAccumulator(32, CFG)
    acc.update(codes, torch.arange(100, 110).repeat_interleave(P), torch.arange(P).repeat(10))
    _assert_same(acc.finalize(), got, d_atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    m=st.integers(1, 12),
    n_images=st.integers(1, 6),
    density=st.floats(0.0, 1.0),
)
def test_property_d_is_a_confidence(seed: int, m: int, n_images: int, density: float) -> None:
    rng = np.random.default_rng(seed)
    b = n_images * 3
    codes = np.where(rng.random((b, m)) < density, rng.exponential(1.0, (b, m)) + 1e-3, 0.0).astype(
        np.float32
    )
    acc = StatsAccumulator(m, StatsConfig(top_n=2, top_w=1))
    for i in range(n_images):
        sl = slice(3 * i, 3 * i + 3)
        acc.update(torch.from_numpy(codes[sl]), np.full(3, i), np.arange(3))
    st_ = acc.finalize()
    d = st_.D_mm
    active = st_.freq_patches_m > 0
    assert ((d >= 0) & (d <= 1)).all()
    assert (d.diagonal()[active] == 1).all()
    assert (d[~active] == 0).all()
    assert (st_.freq_images_m <= st_.freq_images_m.new_tensor(n_images)).all()
    assert (st_.freq_images_m <= st_.freq_patches_m).all()


# --------------------------------------------------------------------------------------------------
# Input validation


def test_update_rejects_bad_input() -> None:
    acc = StatsAccumulator(4, CFG)
    ids, pids = np.zeros(2, np.int64), np.arange(2)
    with pytest.raises(ConfigError, match="codes_bm"):
        acc.update(torch.zeros(2, 5), ids, pids)
    with pytest.raises(ConfigError, match="negative"):
        acc.update(-torch.ones(2, 4), ids, pids)
    with pytest.raises(ConfigError, match="NaN"):
        acc.update(torch.full((2, 4), float("nan")), ids, pids)
    with pytest.raises(ConfigError, match="image_ids_b"):
        acc.update(torch.ones(2, 4), np.zeros(3, np.int64), pids)
    with pytest.raises(ConfigError, match="patch_ids_b"):
        acc.update(torch.ones(2, 4), ids, np.arange(2.0))
    with pytest.raises(ConfigError, match="image_ids_b must be >= 0"):
        acc.update(torch.ones(2, 4), -np.ones(2, np.int64), pids)
    assert acc.n_patches == 0  # rejected batches leave no trace


def test_update_detects_image_split_across_batches() -> None:
    acc = StatsAccumulator(4, CFG)
    acc.update(torch.ones(3, 4), np.array([0, 0, 1]), np.array([0, 1, 0]))
    with pytest.raises(ConfigError, match=r"image ids \[1\] also occurred in the previous batch"):
        acc.update(torch.ones(2, 4), np.array([1, 2]), np.array([1, 0]))


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="top_w"):
        StatsConfig(top_n=4, top_w=5)
    with pytest.raises(ConfigError, match="top_n"):
        StatsConfig(top_n=0)
    with pytest.raises(ConfigError, match="min_activation"):
        StatsConfig(min_activation=-1.0)
    with pytest.raises(ConfigError, match="m "):
        StatsAccumulator(0)
    with pytest.raises(ConfigError, match="multiple of band_bins"):
        StatsConfig(hist_bins=10, band_bins=4)
    with pytest.raises(ConfigError, match="hist_min"):
        StatsConfig(hist_min=0.0)
    with pytest.raises(ConfigError, match="band_samples"):
        StatsConfig(band_samples=0)


# --------------------------------------------------------------------------------------------------
# Persistence


@pytest.fixture
def small_stats() -> ConceptStats:
    codes, image_ids, patch_ids = _random_codes(seed=8)
    return _accumulate(codes, image_ids, patch_ids, 5).finalize()


def test_save_load_round_trip(tmp_path: Path, small_stats: ConceptStats) -> None:
    layout = AtlasLayout(tmp_path)
    small_stats.save(layout.stats_tensors, layout.stats_meta)
    assert sorted(layout.stats_dir.iterdir()) == sorted([layout.stats_meta, layout.stats_tensors])
    back = ConceptStats.load(layout.stats_tensors, layout.stats_meta)
    _assert_same(small_stats, back)
    assert back.w(1, 2) == small_stats.w(1, 2)
    doc = json.loads(layout.stats_meta.read_text())
    assert doc["m"] == M
    assert doc["n_images"] == N_IMAGES
    assert doc["config"]["top_n"] == CFG.top_n
    assert doc["version"] == 4
    assert doc["cooccurrence"] == {"layout": "csr", "floor": 0.0, "nnz": small_stats.cooc.nnz}
    assert "D_mm" not in load_file(str(layout.stats_tensors))
    assert back.hist_mb is not None
    assert back.config.hist_bins == CFG.hist_bins


def test_version_1_files_still_load(tmp_path: Path, small_stats: ConceptStats) -> None:
    """A statistics file written before histograms (version 1: no hist/band tensors, no hist config)."""
    layout = AtlasLayout(tmp_path)
    small_stats.save(layout.stats_tensors, layout.stats_meta)
    old_names = ("hist_", "band_", "D_", "ex_code_")
    tensors = {k: v for k, v in small_stats._tensors().items() if not k.startswith(old_names)}
    tensors["D_mm"] = small_stats.D_mm  # versions 1 and 2 stored D dense and padded exemplar codes
    tensors["ex_code_cols_mwk"] = small_stats.ex_code_cols_mwk
    tensors["ex_code_vals_mwk"] = small_stats.ex_code_vals_mwk
    write_safetensors(layout.stats_tensors, tensors, {"format": "insight-concept-stats"})
    doc = json.loads(layout.stats_meta.read_text())
    doc["version"] = 1
    doc["config"] = {k: doc["config"][k] for k in ("top_n", "top_w", "min_activation")}
    del doc["cooccurrence"], doc["exemplar_codes"]
    layout.stats_meta.write_text(json.dumps(doc))
    old = ConceptStats.load(layout.stats_tensors, layout.stats_meta)
    assert old.hist_mb is None
    assert old.band_image_msr is None
    torch.testing.assert_close(old.D_mm, small_stats.D_mm)
    assert old.cooc.floor == 0.0
    assert old.w(1, 2) == small_stats.w(1, 2)
    doc["version"] = 2  # a version-2 file must have them
    layout.stats_meta.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="missing tensor 'hist_mb'"):
        ConceptStats.load(layout.stats_tensors, layout.stats_meta)


def test_load_bad_files(tmp_path: Path, small_stats: ConceptStats) -> None:
    missing = AtlasLayout(tmp_path / "missing")
    with pytest.raises(CheckpointError, match=missing.stats_meta.name):
        ConceptStats.load(missing.stats_tensors, missing.stats_meta)
    layout = AtlasLayout(tmp_path / "s")
    json_path, st_path = layout.stats_meta, layout.stats_tensors
    small_stats.save(st_path, json_path)
    good_json = json_path.read_text()
    STATS_JSON, STATS_TENSORS = json_path.name, st_path.name

    json_path.write_text("{not json")
    with pytest.raises(CheckpointError, match=STATS_JSON):
        ConceptStats.load(st_path, json_path)
    json_path.write_text(json.dumps({"format": "something-else", "version": 1}))
    with pytest.raises(CheckpointError, match="not a concept statistics file"):
        ConceptStats.load(st_path, json_path)
    json_path.write_text(good_json.replace('"top_n": 7', '"top_n": 0'))
    with pytest.raises(CheckpointError, match="invalid entry"):
        ConceptStats.load(st_path, json_path)
    json_path.write_text(good_json.replace(f'"m": {M}', f'"m": {M + 1}'))
    with pytest.raises(CheckpointError, match=rf"{STATS_TENSORS}.*'freq_patches_m'"):
        ConceptStats.load(st_path, json_path)
    json_path.write_text(good_json)

    tensors = small_stats._tensors()
    write_safetensors(st_path, {k: v for k, v in tensors.items() if k != "D_vals_e"})
    with pytest.raises(CheckpointError, match=r"missing tensor 'D_vals_e'"):
        ConceptStats.load(st_path, json_path)
    write_safetensors(st_path, {**tensors, "D_cols_e": tensors["D_cols_e"].flip(0).contiguous()})
    with pytest.raises(CheckpointError, match=rf"{STATS_TENSORS}.*ascending"):
        ConceptStats.load(st_path, json_path)
    ptr = tensors["ex_code_ptr_g1"].clone()
    ptr[1] = ptr[2] + 1  # a row of the exemplar codes that ends before it starts
    write_safetensors(st_path, {**tensors, "ex_code_ptr_g1": ptr})
    with pytest.raises(CheckpointError, match=rf"{STATS_TENSORS}.*ex_code_ptr_g1"):
        ConceptStats.load(st_path, json_path)
    write_safetensors(st_path, {**tensors, "ex_image_mn": tensors["ex_image_mn"].int()})
    with pytest.raises(CheckpointError, match=r"'ex_image_mn' is torch.int32"):
        ConceptStats.load(st_path, json_path)
    st_path.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match=STATS_TENSORS):
        ConceptStats.load(st_path, json_path)


def test_range_bands_never_show_a_band_twice() -> None:
    # 8 bins, bands of 2 bins: concept 0 spread out, 1 narrow (all in one band), 2 narrow with a
    # lower band, 3 never active
    hist = np.array([[4, 4, 4, 4, 4, 4, 4, 4], [0, 0, 0, 0, 0, 9, 0, 0], [1, 0, 0, 0, 0, 0, 30, 2],
                     [0] * 8])  # fmt: skip
    bands = range_bands(hist, 2)
    assert list(bands) == ["middle", "low"]
    np.testing.assert_array_equal(bands["middle"], [1, 2, 3, -1])
    np.testing.assert_array_equal(bands["low"], [0, -1, 0, -1])  # 2: q10 is in the median's band -> below
    image_msr = np.arange(4 * 4 * 3).reshape(4, 4, 3)
    image_msr[0, 0] = -1  # an empty sample slot
    want = {*image_msr[0, 1], *image_msr[1, 2], *image_msr[2, 3], *image_msr[2, 0]}
    assert range_sample_images(hist, image_msr, 2).tolist() == sorted(want)


@pytest.mark.gpu
def test_cuda_accumulator_matches_cpu() -> None:
    """The same statistics (exemplars, histograms, band samples included) when accumulated on CUDA."""
    codes, image_ids, patch_ids = _random_codes(seed=11)
    cpu = _accumulate(codes, image_ids, patch_ids, 5).finalize()
    cuda = _accumulate(codes, image_ids, patch_ids, 5, device="cuda").finalize()
    _assert_same(cpu, cuda, d_atol=1e-5)


def _busy_codes(m: int = 8192, n_images: int = 40, p: int = 4, busy: int = 400, seed: int = 12):
    """~5 active concepts per patch, but three patches (in three images) with ``busy`` active concepts
    and large activations, so they are top exemplars of hundreds of concepts (k_max = busy)."""
    rng = np.random.default_rng(seed)
    b = n_images * p
    codes = np.zeros((b, m), np.float32)
    for i in range(b):
        codes[i, rng.choice(m, 5, replace=False)] = rng.integers(1, 6, 5) / 10
    for i in (5, 61, 130):
        codes[i, rng.choice(m, busy, replace=False)] = rng.uniform(1.0, 2.0, busy).astype(np.float32)
    image_ids = np.repeat(np.arange(n_images) * 3 + 1, p).astype(np.int64)
    return codes, image_ids, np.tile(np.arange(p), n_images).astype(np.int64)


def _top_w_codes(codes: np.ndarray, image_ids: np.ndarray, patch_ids: np.ndarray, w: int) -> list[list[int]]:
    """Per concept, the rows of its top-``w`` exemplar patches (the reference order)."""
    out = []
    for j in range(codes.shape[1]):
        rows = sorted(np.flatnonzero(codes[:, j] > 0).tolist(),
                      key=lambda i: (-codes[i, j], image_ids[i], patch_ids[i]))  # fmt: skip
        out.append(rows[:w])
    return out


def test_busy_exemplar_codes_stay_ragged(monkeypatch: pytest.MonkeyPatch) -> None:
    """Patches with hundreds of active concepts are top exemplars of hundreds of concepts: the exemplar
    code state holds their actual entries (bounded by the live entries and one batch), never a padded
    (m, top_w, k_max) table, and w(i, a), merging and the state dict still match the reference."""
    cfg = StatsConfig(top_n=6, top_w=4)
    codes, image_ids, patch_ids = _busy_codes()
    m, p = codes.shape[1], 4
    top = _top_w_codes(codes, image_ids, patch_ids, cfg.top_w)
    live = sum(int((codes[r] > 0).sum()) for rows in top for r in rows)
    k_max = int((codes > 0).sum(1).max())  # ~400: a busy patch
    assert live * 10 < m * cfg.top_w * k_max  # the data makes padding matter (dense: 13 M entries)

    monkeypatch.setattr(stats_mod, "_POOL_SLACK", 0)  # compact as soon as garbage outweighs live codes
    acc = StatsAccumulator(m, cfg)
    step, most_batch = 5 * p, 0
    for s in range(0, len(codes), step):
        acc.update(torch.from_numpy(codes[s : s + step]), image_ids[s : s + step], patch_ids[s : s + step])
        most_batch = max(most_batch, int((codes[s : s + step] > 0).sum()))
        kept = int(acc.ex.code_count_tw.sum())
        assert acc.codes.size <= 2 * kept + most_batch
        assert acc.codes.capacity <= 1.5 * (2 * kept + most_batch) + 1024
    assert acc.ex.code_start_tw.shape == acc.ex.code_count_tw.shape == (m, cfg.top_w)
    st_ = acc.finalize()
    assert st_.ex_code_cols_e.numel() == int(acc.ex.code_count_tw.sum()) == live
    assert st_.k_max == k_max

    # w(i, a) against the reference for concepts of busy patches, whatever the chunking
    rng = np.random.default_rng(0)
    ii = np.concatenate([np.flatnonzero(codes[5] > 0)[:40], rng.integers(0, m, 40)])
    aa = np.concatenate([np.flatnonzero(codes[61] > 0)[:40], np.flatnonzero(codes[5] > 0)[:40]])
    pairs = zip(ii.tolist(), aa.tolist(), strict=True)
    ref = np.array([codes[top[i], a].sum() / len(top[i]) if top[i] else 0.0 for i, a in pairs])
    np.testing.assert_allclose(st_.w_pairs(ii, aa).numpy(), ref, atol=1e-6)
    np.testing.assert_allclose(st_.w_pairs(ii, aa, chunk=3, max_entries=50).numpy(), ref, atol=1e-6)

    # compaction, merging and the state dict give the same statistics
    monkeypatch.setattr(stats_mod, "_POOL_SLACK", 1 << 20)
    _assert_same(st_, _accumulate_with(codes, image_ids, patch_ids, 3 * p, cfg).finalize())
    h = 20 * p
    a = _accumulate_with(codes[:h], image_ids[:h], patch_ids[:h], 7 * p, cfg)
    b = _accumulate_with(codes[h:], image_ids[h:], patch_ids[h:], 2 * p, cfg)
    b = StatsAccumulator.from_state_dict(b.state_dict(), cfg)
    _assert_same(st_, a.merge(b).finalize(), d_atol=1e-6)


def _accumulate_with(codes, image_ids, patch_ids, step: int, cfg: StatsConfig) -> StatsAccumulator:
    acc = StatsAccumulator(codes.shape[1], cfg)
    for s in range(0, len(codes), step):
        acc.update(torch.from_numpy(codes[s : s + step]), image_ids[s : s + step], patch_ids[s : s + step])
    return acc


def test_accumulator_state_rejects_bad_exemplar_codes() -> None:
    codes, image_ids, patch_ids = _random_codes(seed=13)
    state = _accumulate(codes, image_ids, patch_ids, 5).state_dict()
    ptr = state["ex_code_ptr_g1"].clone()
    ptr[3] = ptr[4] + 1  # a row that ends before it starts
    with pytest.raises(ConfigError, match="ex_code_ptr_g1 must rise"):
        StatsAccumulator.from_state_dict({**state, "ex_code_ptr_g1": ptr}, CFG)
    cols = state["ex_code_cols_e"].clone()
    cols[0] = M
    with pytest.raises(ConfigError, match=rf"ex_code_cols_e must hold concept ids in \[0, {M}\)"):
        StatsAccumulator.from_state_dict({**state, "ex_code_cols_e": cols}, CFG)
