"""Tests of the statistics file format: version 4 stores each exemplar patch's sparse code once."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import insight_core.concepts.stats as stats_mod
from insight_core.atlas import AtlasLayout
from insight_core.concepts.stats import ConceptStats, StatsAccumulator, StatsConfig
from insight_core.errors import CheckpointError
from insight_core.io import write_safetensors

CFG = StatsConfig(top_n=6, top_w=4, cooc_floor=0.0)
P = 4


def _shared_busy_codes(m: int = 512, n_images: int = 30, busy: int = 150, seed: int = 3):
    """~5 active concepts per patch, plus three patches with ``busy`` active concepts and the largest
    activations: each is a top exemplar of ``busy`` concepts, so hundreds of (concept, rank) slots
    hold the same three codes."""
    rng = np.random.default_rng(seed)
    b = n_images * P
    codes = np.zeros((b, m), np.float32)
    for i in range(b):
        codes[i, rng.choice(m, 5, replace=False)] = rng.integers(1, 6, 5) / 10
    for i in (5, 41, 90):
        codes[i, rng.choice(m, busy, replace=False)] = rng.uniform(1.0, 2.0, busy).astype(np.float32)
    image_ids = np.repeat(np.arange(n_images) * 2 + 5, P).astype(np.int64)
    return codes, image_ids, np.tile(np.arange(P), n_images).astype(np.int64)


def _accumulate(codes, image_ids, patch_ids, images_per_batch: int = 4) -> StatsAccumulator:
    acc = StatsAccumulator(codes.shape[1], CFG)
    step = images_per_batch * P
    for s in range(0, len(codes), step):
        acc.update(torch.from_numpy(codes[s : s + step]), image_ids[s : s + step], patch_ids[s : s + step])
    return acc


def _distinct_entries(st_: ConceptStats, codes: np.ndarray, image_ids, patch_ids) -> tuple[int, int]:
    """(distinct top_w exemplar patches, their code entries counted once each), from the raw codes."""
    row_of = {(int(i), int(p)): r for r, (i, p) in enumerate(zip(image_ids, patch_ids, strict=True))}
    w = CFG.top_w
    img, patch = st_.ex_image_mn[:, :w].reshape(-1), st_.ex_patch_mn[:, :w].reshape(-1)
    slots = {(int(i), int(p)) for i, p in zip(img, patch, strict=True) if i >= 0}
    return len(slots), sum(int((codes[row_of[s]] > 0).sum()) for s in slots)


def _assert_same(a: ConceptStats, b: ConceptStats) -> None:
    for f in dataclasses.fields(ConceptStats):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert torch.equal(x.nan_to_num(-7.0), y.nan_to_num(-7.0)), f.name
        elif f.name == "cooc":
            assert torch.equal(x.to_dense(), y.to_dense())
        else:
            assert x == y, f.name


@pytest.fixture
def busy() -> tuple[ConceptStats, np.ndarray, np.ndarray, np.ndarray]:
    codes, image_ids, patch_ids = _shared_busy_codes()
    return _accumulate(codes, image_ids, patch_ids).finalize(), codes, image_ids, patch_ids


def test_shared_exemplar_codes_are_stored_once(tmp_path: Path, busy) -> None:
    st_, codes, image_ids, patch_ids = busy
    n_distinct, distinct_entries = _distinct_entries(st_, codes, image_ids, patch_ids)
    per_slot = int(st_.ex_code_cols_e.numel())  # in memory: every (concept, rank) slot's code
    assert per_slot > 10 * distinct_entries  # the data makes sharing matter

    layout = AtlasLayout(tmp_path)
    st_.save(layout.stats_tensors, layout.stats_meta)
    tensors = load_file(str(layout.stats_tensors))
    assert tensors["ex_code_cols_e"].numel() == tensors["ex_code_vals_e"].numel() == distinct_entries
    assert tensors["ex_code_ptr_g1"].shape == (n_distinct + 1,)
    row_mw = tensors["ex_code_row_mw"]
    assert row_mw.shape == (st_.m, CFG.top_w)
    assert torch.equal(row_mw >= 0, st_.ex_image_mn[:, : CFG.top_w] >= 0)
    doc = json.loads(layout.stats_meta.read_text())
    assert doc["version"] == 4
    assert doc["exemplar_codes"] == {"layout": "csr-shared", "rows": n_distinct, "nnz": distinct_entries}

    back = ConceptStats.load(layout.stats_tensors, layout.stats_meta)
    _assert_same(st_, back)  # the per-slot codes, bit for bit
    ii, aa = np.meshgrid(np.arange(0, st_.m, 7), np.arange(0, st_.m, 5), indexing="ij")
    assert torch.equal(back.w_pairs(ii, aa), st_.w_pairs(ii, aa))


def test_version_3_files_still_load(tmp_path: Path, busy) -> None:
    """A version-3 file: one CSR row per (concept, rank) slot, no ``ex_code_row_mw``."""
    st_ = busy[0]
    layout = AtlasLayout(tmp_path)
    st_.save(layout.stats_tensors, layout.stats_meta)
    tensors = {k: v for k, v in st_._tensors().items() if k != "ex_code_row_mw"}
    tensors |= {"ex_code_ptr_g1": st_.ex_code_ptr_g1, "ex_code_cols_e": st_.ex_code_cols_e,
                "ex_code_vals_e": st_.ex_code_vals_e}  # fmt: skip
    write_safetensors(layout.stats_tensors, tensors, {"format": "insight-concept-stats"})
    doc = json.loads(layout.stats_meta.read_text())
    doc["version"] = 3
    doc["exemplar_codes"] = {"layout": "csr", "nnz": int(st_.ex_code_cols_e.numel())}
    layout.stats_meta.write_text(json.dumps(doc))
    _assert_same(st_, ConceptStats.load(layout.stats_tensors, layout.stats_meta))


def test_bad_slot_rows_are_refused(tmp_path: Path, busy) -> None:
    st_ = busy[0]
    layout = AtlasLayout(tmp_path)
    st_.save(layout.stats_tensors, layout.stats_meta)
    tensors = load_file(str(layout.stats_tensors))
    rows = int(tensors["ex_code_ptr_g1"].numel()) - 1
    filled = torch.nonzero(tensors["ex_code_row_mw"] >= 0)[0]
    empty = torch.nonzero(tensors["ex_code_row_mw"] < 0)[0]
    for where, value in ((filled, rows), (filled, -1), (empty, 0)):
        row_mw = tensors["ex_code_row_mw"].clone()
        row_mw[where[0], where[1]] = value
        write_safetensors(layout.stats_tensors, {**tensors, "ex_code_row_mw": row_mw})
        with pytest.raises(CheckpointError, match=rf"{layout.stats_tensors.name}.*ex_code_row_mw"):
            ConceptStats.load(layout.stats_tensors, layout.stats_meta)
    write_safetensors(layout.stats_tensors, {**tensors, "ex_code_row_mw": tensors["ex_code_row_mw"][:-1]})
    with pytest.raises(CheckpointError, match=r"'ex_code_row_mw' is torch.int64 \("):
        ConceptStats.load(layout.stats_tensors, layout.stats_meta)


def test_accumulator_keeps_and_ships_shared_codes_once(busy) -> None:
    """Compacting the code pool and the state dict keep each exemplar patch's code once, and neither
    changes the statistics."""
    st_, codes, image_ids, patch_ids = busy
    _, distinct_entries = _distinct_entries(st_, codes, image_ids, patch_ids)
    acc = _accumulate(codes, image_ids, patch_ids)
    ex = acc.ex
    ex.code_start_tw = acc.codes.compact(ex.code_start_tw, ex.code_count_tw)
    assert acc.codes.size == distinct_entries
    _assert_same(st_, acc.finalize())
    state = acc.state_dict()
    assert state["ex_code_cols_e"].numel() == distinct_entries
    again = StatsAccumulator.from_state_dict(state, CFG)
    assert again.codes.size == distinct_entries
    _assert_same(st_, again.finalize())


def test_code_pool_is_bounded_by_the_distinct_live_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    """One busy patch per image, active on every concept and stronger than the last, evicts the oldest
    busy patch from every concept's top exemplars: the pool is compacted against the entries it holds
    once each (distinct patches), not against the per-slot count, which counts a busy patch's code
    once per slot and would let the evicted codes pile up far past the live ones."""
    monkeypatch.setattr(stats_mod, "_POOL_SLACK", 0)
    rng = np.random.default_rng(7)
    m, n_img = 64, 100
    codes = np.zeros((n_img * P, m), np.float32)
    for i in range(n_img * P):
        codes[i, rng.choice(m, 3, replace=False)] = rng.integers(1, 6, 3) / 10
    codes[::P] = 1.0 + np.arange(n_img)[:, None] / 100  # patch 0 of every image: the busy one
    image_ids = np.repeat(np.arange(n_img), P)
    patch_ids = np.tile(np.arange(P), n_img)
    acc = StatsAccumulator(m, CFG)
    most_distinct, most_batch, step = 0, 0, 2 * P
    for s in range(0, len(codes), step):
        acc.update(torch.from_numpy(codes[s : s + step]), image_ids[s : s + step], patch_ids[s : s + step])
        most_batch = max(most_batch, int((codes[s : s + step] > 0).sum()))
        most_distinct = max(most_distinct, int(acc.shared_codes()[2].numel()))
        assert acc.codes.size <= 2 * most_distinct + most_batch
    assert int(acc.ex.code_count_tw.sum()) == m * CFG.top_w * m  # per slot: 4 busy codes x 64 concepts
    assert acc.shared_codes()[2].numel() == CFG.top_w * m  # held once: the 4 strongest busy patches
