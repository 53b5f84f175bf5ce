"""Sparse co-occurrence: pair sums, the CSR D with its floor, and sameness with the dense path."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import insight_core.concepts.cooccurrence as cooc_mod
from insight_core.concepts.cooccurrence import Cooccurrence, PairSums, _reduce_batch
from insight_core.concepts.families import FamilyConfig, build_families
from insight_core.concepts.naming import concept_vectors, name_concepts, parents_from_edges
from insight_core.concepts.stats import ConceptStats, StatsAccumulator, StatsConfig
from insight_core.concepts.vocab_embeddings import VocabEmbeddings
from insight_core.errors import ConfigError
from insight_core.planted import WorldConfig, make_world, oracle_codes, sample_images

REPO = Path(__file__).resolve().parents[3]


def _dense_d(codes_bm: np.ndarray, min_activation: float = 0.0) -> np.ndarray:
    """Eq. 5 the dense way, as the stats stage computed it before (float64 sums, float32 result)."""
    m = codes_bm.shape[1]
    rows, cols = np.nonzero(codes_bm > min_activation)
    vals = codes_bm[rows, cols].astype(np.float64)
    # every ordered pair (j, j') of active concepts of a patch, weighted by A_ij, into a flat m*m array
    first = np.searchsorted(rows, rows, side="left")
    count = np.searchsorted(rows, rows, side="right") - first
    src = np.repeat(np.arange(len(rows)), count)
    partner = np.repeat(first, count) + (np.arange(len(src)) - np.repeat(np.cumsum(count) - count, count))
    n_mm = np.bincount(cols[src] * m + cols[partner], weights=vals[src], minlength=m * m).reshape(m, m)
    s = n_mm.diagonal().copy()
    d = np.clip(n_mm / np.where(s > 0, s, 1.0)[:, None], 0.0, 1.0).astype(np.float32)
    del n_mm
    d[s == 0] = 0.0
    np.fill_diagonal(d, np.where(s > 0, 1.0, 0.0))
    return d


def _stats(
    codes_bm: np.ndarray, patches_per_image: int, images_per_batch: int, cfg: StatsConfig
) -> ConceptStats:
    acc = StatsAccumulator(codes_bm.shape[1], cfg)
    step = images_per_batch * patches_per_image
    for s in range(0, len(codes_bm), step):
        n = min(step, len(codes_bm) - s) // patches_per_image
        ids = np.arange(s // patches_per_image, s // patches_per_image + n)
        acc.update(
            torch.from_numpy(codes_bm[s : s + step]),
            np.repeat(ids, patches_per_image),
            np.tile(np.arange(patches_per_image), n),
        )
    return acc.finalize()


# --------------------------------------------------------------------------------------------------
# Pair sums


def test_pair_sums_match_bincount_across_batches_and_merges(monkeypatch) -> None:
    monkeypatch.setattr(cooc_mod, "_COMPACT_MIN", 50)  # force many merges of sorted runs
    rng = np.random.default_rng(0)
    m = 40
    ref = np.zeros(m * m)
    acc = PairSums(m)
    for _ in range(30):
        keys = rng.integers(0, m * m, 200)  # repeats within and across batches
        vals = rng.random(200).astype(np.float32)
        acc.add(keys, vals)
        ref += np.bincount(keys, weights=vals.astype(np.float64), minlength=m * m)
    acc.compact()
    assert np.all(np.diff(acc.keys) > 0)
    np.testing.assert_array_equal(acc.keys, np.flatnonzero(ref))
    np.testing.assert_allclose(acc.sums, ref[acc.keys], rtol=1e-12)


def test_pair_sums_spilled_past_a_budget_give_the_same_sums_and_d(monkeypatch, tmp_path: Path) -> None:
    """A budget far below the distinct pairs spills sorted runs to disk; the sums read back block by
    block and the D built from them are those of the in-memory accumulator. Values are multiples of
    1/8 (exact in binary), so the float64 sums are exact whatever the order: equality is the test."""
    monkeypatch.setattr(cooc_mod, "_COMPACT_MIN", 64)
    rng = np.random.default_rng(4)
    m, budget = 60, 2048  # 128 pairs of 16 bytes; ~2,500 distinct pairs occur
    ref = np.zeros(m * m)
    mem, disk = PairSums(m), PairSums(m, budget_bytes=budget, spill_dir=tmp_path)
    for _ in range(40):
        keys = rng.integers(0, m * m, 300)
        keys = keys[keys // m != keys % m]  # off-diagonal, as the stats pass adds them
        vals = (rng.integers(1, 16, keys.size) / 8).astype(np.float32)
        mem.add(keys, vals)
        disk.add(keys, vals)
        ref += np.bincount(keys, weights=vals.astype(np.float64), minlength=m * m)
        assert disk.keys.nbytes + disk.sums.nbytes <= budget  # the main run never outgrows it
    assert len(disk.spilled) > 3
    assert all(p.parent.parent == tmp_path for p in disk.spilled)
    keys, sums = disk.items()
    np.testing.assert_array_equal(keys, np.flatnonzero(ref))
    np.testing.assert_array_equal(sums, ref[keys])
    blocks = list(disk.blocks(max_entries=100))
    assert len(blocks) > 10
    assert all(np.all(np.diff(k) > 0) for k, _ in blocks)
    np.testing.assert_array_equal(np.concatenate([k for k, _ in blocks]), keys)
    row_max = np.zeros(m)
    np.maximum.at(row_max, keys // m, sums)  # the largest sum of each row: D in (0, 1], the floor drops some
    s_m = torch.from_numpy(row_max)
    a, b = Cooccurrence.from_sums(m, mem, s_m, 0.3), Cooccurrence.from_sums(m, disk, s_m, 0.3)
    assert 100 < a.nnz < keys.size
    for x, y in ((a.rowptr_m1, b.rowptr_m1), (a.cols_e, b.cols_e), (a.vals_e, b.vals_e)):
        assert torch.equal(x, y)
    with pytest.raises(ConfigError, match="budget_bytes"):
        PairSums(m, budget_bytes=-1)


def test_stats_with_a_small_pair_budget_are_identical(monkeypatch, tmp_path: Path) -> None:
    """The stats pass with its pair sums spilled to disk gives the same D, also through merge and the
    state dict (dyadic activations: exact float64 sums, so equality holds)."""
    monkeypatch.setattr(cooc_mod, "_COMPACT_MIN", 64)
    rng = np.random.default_rng(5)
    m, p, n_img = 48, 4, 60
    codes = np.where(rng.random((n_img * p, m)) < 0.2, rng.integers(1, 9, (n_img * p, m)) / 8, 0.0)
    codes = codes.astype(np.float32)
    cfg = StatsConfig(cooc_floor=0.0)

    def run(lo: int, hi: int, budget: int) -> StatsAccumulator:
        acc = StatsAccumulator(m, cfg, pair_budget_bytes=budget, spill_dir=tmp_path)
        for s in range(lo, hi, 5):
            rows = slice(s * p, min(s + 5, hi) * p)
            ids = np.arange(s, min(s + 5, hi))
            acc.update(torch.from_numpy(codes[rows]), np.repeat(ids, p), np.tile(np.arange(p), ids.size))
        return acc

    ref = run(0, n_img, 0).finalize().cooc
    spilling = run(0, n_img, 1024)
    assert spilling.pairs.spilled
    merged = run(0, 30, 1024).merge(StatsAccumulator.from_state_dict(run(30, n_img, 1024).state_dict(), cfg))
    for got in (spilling.finalize().cooc, merged.finalize().cooc):
        assert torch.equal(got.to_dense(), ref.to_dense())


def test_packed_sort_and_argsort_reduce_alike() -> None:
    """m <= 2^16 packs key and float32 bits into one uint64 sort; larger m argsorts: same sums."""
    rng = np.random.default_rng(1)
    keys = rng.integers(0, 300, 5000).astype(np.int64)
    vals = rng.random(5000).astype(np.float32)
    k_packed, s_packed = _reduce_batch(keys, vals, 1 << 16)
    k_arg, s_arg = _reduce_batch(keys, vals, (1 << 16) + 1)
    np.testing.assert_array_equal(k_packed, k_arg)
    np.testing.assert_allclose(s_packed, s_arg, rtol=1e-12)
    np.testing.assert_allclose(s_packed, np.bincount(keys, weights=vals)[k_packed], rtol=1e-12)


# --------------------------------------------------------------------------------------------------
# The CSR D and its floor


def _codes(seed: int, b: int, m: int, k: int) -> np.ndarray:
    """Codes with ~k active concepts per patch, frequencies skewed like an SAE's (a few common)."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, m + 1) ** 0.8
    p /= p.sum()
    codes = np.zeros((b, m), np.float32)
    n_act = rng.integers(max(1, k // 2), 2 * k, b)
    for i in range(b):
        cols = rng.choice(m, size=n_act[i], replace=False, p=p)
        codes[i, cols] = rng.uniform(0.05, 2.0, n_act[i])
    return codes


def test_floor_keeps_exactly_the_entries_at_or_above_it() -> None:
    codes = _codes(2, 600, 60, 6)
    dense = _dense_d(codes)
    for floor in (0.0, 0.05, 0.3):
        st = _stats(codes, 6, 7, StatsConfig(top_n=4, top_w=2, cooc_floor=floor))
        cooc = st.cooc
        kept = dense >= floor if floor > 0 else dense != 0
        assert cooc.nnz == int(kept.sum())
        np.testing.assert_allclose(cooc.to_dense().numpy(), np.where(kept, dense, 0.0), rtol=1e-6, atol=1e-7)
        for j in (0, 7, 59):
            np.testing.assert_array_equal(cooc.row(j), cooc.to_dense()[j].numpy())
        # the size bound: a row's entries sum to at most the largest number of concepts active together
        k_max = int((codes > 0).sum(1).max())
        if floor > 0:
            assert np.diff(cooc.rowptr_m1.numpy()).max() <= 1 + k_max / floor
    with pytest.raises(ConfigError, match="below the co-occurrence floor"):
        cooc.candidates(0.2)  # floor 0.3
    with pytest.raises(ConfigError, match="below the co-occurrence floor"):
        build_families(cooc, st.freq_patches_m, FamilyConfig(min_confidence=0.2))


def test_lookup_and_from_dense() -> None:
    d = torch.tensor([[1.0, 0.8, 0.0], [0.0, 1.0, 0.02], [0.5, 0.0, 0.0]])
    cooc = Cooccurrence.from_dense(d)
    assert cooc.nnz == 5
    got = cooc.lookup([0, 1, 2, 2, 1], [1, 2, 0, 2, 0])
    np.testing.assert_array_equal(got, np.float32([0.8, 0.02, 0.5, 0, 0]))
    assert cooc.lookup(np.zeros((2, 3), np.int64), 1).shape == (2, 3)
    torch.testing.assert_close(cooc.to_dense(), d)
    floored = Cooccurrence.from_dense(d, floor=0.05)
    assert floored.nnz == 4
    assert float(floored.lookup([1], [2])[0]) == 0.0
    parent, child, conf = floored.candidates(0.75)
    assert (parent.tolist(), child.tolist(), conf.tolist()) == ([1], [0], [pytest.approx(0.8)])
    with pytest.raises(ConfigError, match="a_idx"):
        cooc.lookup([0], [3])
    with pytest.raises(ConfigError, match="square"):
        Cooccurrence.from_dense(torch.zeros(2, 3))


def test_validate_rejects_malformed_csr() -> None:
    good = Cooccurrence.from_dense(torch.tensor([[1.0, 0.5], [0.25, 1.0]]))
    good.validate("x")
    bad = [
        Cooccurrence(2, 0.0, torch.tensor([0, 2, 5]), good.cols_e, good.vals_e),  # rowptr past the end
        Cooccurrence(2, 0.0, good.rowptr_m1, torch.tensor([1, 0, 0, 1], dtype=torch.int32), good.vals_e),
        Cooccurrence(2, 0.0, good.rowptr_m1, torch.tensor([0, 1, 0, 2], dtype=torch.int32), good.vals_e),
        Cooccurrence(2, 0.0, good.rowptr_m1, good.cols_e, torch.tensor([1.0, 0.5, 0.25, 1.5])),
        Cooccurrence(2, 0.0, good.rowptr_m1, good.cols_e.long(), good.vals_e),
    ]
    for c, match in zip(bad, ["rise from 0", "ascending", r"\[0, 2\)", r"\[0, 1\]", "int32"], strict=True):
        with pytest.raises(ValueError, match=match):
            c.validate("x")


# --------------------------------------------------------------------------------------------------
# Same families, names and rows as the dense path


def _same_as_dense(
    codes_bm: np.ndarray, patches_per_image: int, cfg: StatsConfig, images_per_batch: int
) -> None:
    st = _stats(codes_bm, patches_per_image, images_per_batch, cfg)
    m = st.m
    dense = torch.from_numpy(_dense_d(codes_bm, cfg.min_activation))
    fam_dense = build_families(dense, st.freq_patches_m)
    fam_sparse = build_families(st.cooc, st.freq_patches_m)
    assert len(fam_dense.parent_e) > 0
    np.testing.assert_array_equal(fam_sparse.parent_e, fam_dense.parent_e)
    np.testing.assert_array_equal(fam_sparse.child_e, fam_dense.child_e)
    np.testing.assert_allclose(fam_sparse.confidence_e, fam_dense.confidence_e, rtol=1e-6)
    # names: the vectors of Eq. B.9 read D only at edges; the same vectors give the same names
    rng = np.random.default_rng(0)
    W, b = rng.standard_normal((m, 16)).astype(np.float32), rng.standard_normal(16).astype(np.float32)
    parents = parents_from_edges(fam_dense.parent_e, fam_dense.child_e, m)
    v_dense = concept_vectors(W, b, parents, dense.numpy(), st.w_pairs)
    v_sparse = concept_vectors(W, b, parents, st.cooc.lookup, st.w_pairs)
    np.testing.assert_allclose(v_sparse, v_dense, rtol=1e-6, atol=1e-6)
    vocab = VocabEmbeddings(
        tuple(f"w{i}" for i in range(300)), rng.standard_normal((1, 300, 16)).astype(np.float32), ("any",)
    )
    r_dense, r_sparse = name_concepts(v_dense, vocab), name_concepts(v_sparse, vocab)
    assert [r["name"] for r in r_sparse.to_records()] == [r["name"] for r in r_dense.to_records()]
    # co-occurrence rows: every share >= the floor, with its dense value; nothing below it
    for j in np.flatnonzero(st.freq_patches_m.numpy())[:50]:
        row, ref = st.cooc.row(int(j)), dense[j].numpy()
        np.testing.assert_allclose(row, np.where(ref >= cfg.cooc_floor, ref, 0.0), rtol=1e-6, atol=1e-7)


def test_planted_world_sparse_equals_dense() -> None:
    cfg = WorldConfig(d=128, n_objects=8, n_attributes=8, n_backgrounds=4, n_distractors=0, seed=1)
    world = make_world(cfg)
    codes = oracle_codes(world, sample_images(world, 200, seed=0)).reshape(-1, world.n_atoms)
    _same_as_dense(codes.astype(np.float32), world.config.n_patches, StatsConfig(), 50)


@pytest.mark.slow
def test_realistic_sparsity_at_m_8192_sparse_equals_dense() -> None:
    """m = 8,192 with ~12 active concepts per patch and skewed frequencies (the paper's SAE shape),
    plus planted implications (each of 300 rare concepts fires only with one of 100 common ones)."""
    m, b = 8192, 4000
    codes = _codes(3, b, m, 12)
    rng = np.random.default_rng(4)
    parents, children = rng.choice(100, 300), 1000 + rng.choice(m - 1000, 300, replace=False)
    for p, c in zip(parents.tolist(), children.tolist(), strict=True):
        on = np.flatnonzero(codes[:, p] > 0)
        codes[rng.choice(on, max(1, len(on) // 8), replace=False), c] = rng.uniform(0.1, 1.0)
    _same_as_dense(codes, 8, StatsConfig(top_n=8, top_w=4), images_per_batch=125)


# --------------------------------------------------------------------------------------------------
# Paper scale: m = 65,536 without an m x m allocation


@pytest.mark.slow
def test_m_65536_stays_small_in_memory_and_on_disk(tmp_path: Path) -> None:
    """A dense N would be 34 GB: the stats pass at m = 65,536 peaks far below that, and saves small files."""
    script = textwrap.dedent(
        f"""
        import json, resource, sys, numpy as np, torch
        from insight_core.concepts.stats import StatsAccumulator, StatsConfig
        m, p, n_img, per_batch = 65536, 196, 60, 20  # 20 images: the chunk compute_stats encodes at m = 65536
        rng = np.random.default_rng(0)
        acc = StatsAccumulator(m, StatsConfig())
        for s in range(0, n_img, per_batch):
            b = per_batch * p
            rows = np.repeat(np.arange(b), 12)
            cols = rng.integers(0, m, b * 12)
            codes = torch.zeros(b, m)
            codes[rows, cols] = torch.from_numpy(rng.uniform(0.1, 2.0, b * 12).astype(np.float32))
            acc.update(codes, np.repeat(np.arange(s, s + per_batch), p), np.tile(np.arange(p), per_batch))
            del codes
        st = acc.finalize()
        st.save("{tmp_path}/s.safetensors", "{tmp_path}/s.json")
        # VmHWM is this process's own peak: ru_maxrss would also count the parent (pytest) it was forked from
        hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")]
        kb = int(hwm[0].split()[1]) if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"rss_mb": kb / 1024, "nnz": st.cooc.nnz}}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    # the dense (1.0 GB) batch of codes, its masks and the exemplar tables; a dense m x m N would be 34 GB
    assert got["rss_mb"] < 5000, got
    d_bytes = got["nnz"] * 8 + (65536 + 1) * 8
    assert d_bytes < 20e6
    size = (tmp_path / "s.safetensors").stat().st_size
    assert size < 400e6, size  # exemplar tables dominate (m x 64 and m x 30 x k_max), D is a few MB


def test_compute_stats_encodes_large_batches_in_chunks_of_whole_images(monkeypatch) -> None:
    """Bounded code memory: the same statistics whether a batch is encoded at once or image by image."""
    from insight_core.concepts.stats import compute_stats
    from insight_core.models.sae import MatryoshkaSAE, SAEConfig

    sae = MatryoshkaSAE(SAEConfig(d_in=16, dict_size=64, k=4, group_fractions=(0.25, 0.75)), seed=0)
    with torch.no_grad():
        sae.threshold.fill_(0.2)
    feats = torch.randn(9, 5, 16, generator=torch.Generator().manual_seed(0))
    batches = [(feats[:6], torch.arange(6)), (feats[6:], torch.arange(6, 9))]
    cfg = StatsConfig(top_n=4, top_w=2, cooc_floor=0.0)
    seen: list[int] = []
    update = StatsAccumulator.update

    def spy(self, codes_bm, *args):
        seen.append(int(codes_bm.shape[0]))
        return update(self, codes_bm, *args)

    whole = compute_stats(sae, batches, cfg, progress=False)
    monkeypatch.setattr(StatsAccumulator, "update", spy)
    chunked = compute_stats(sae, batches, cfg, progress=False, max_code_elements=2 * 5 * 64)
    assert seen == [10, 10, 10, 10, 5]  # two images (2 x 5 patches x 64 codes) per chunk
    torch.testing.assert_close(chunked.cooc.to_dense(), whole.cooc.to_dense())
    torch.testing.assert_close(chunked.ex_act_mn, whole.ex_act_mn, equal_nan=True)
    assert torch.equal(chunked.freq_images_m, whole.freq_images_m)
