"""FAISS indexes: exact flat search, IVF-PQ recall, normalisation, atomic save/load, clear errors."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from insight_core.concepts.index import (
    IndexConfig,
    build_index,
    default_nlist,
    describe_index,
    faiss_threads,
    load_index,
    normalize_rows,
    pq_subquantizers,
    save_index,
    search,
)
from insight_core.errors import CheckpointError, ConfigError


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """Idle OpenMP threads spin on a busy 2-core machine; one thread keeps these tests fast."""
    with faiss_threads(1):
        yield


def _brute_force(x_nd: np.ndarray, q_qd: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = normalize_rows(q_qd) @ normalize_rows(x_nd).T
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, ids, 1), ids


def test_flat_search_equals_numpy_brute_force() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 32)) * rng.uniform(0.1, 10, (300, 1))  # norms must not matter
    q = rng.standard_normal((20, 32)) * 7.0
    index = build_index(x)
    assert describe_index(index)["type"] == "flat"
    assert index.ntotal == 300
    scores, ids = search(index, q, 5)
    ref_scores, ref_ids = _brute_force(x, q, 5)
    assert scores.dtype == np.float32
    assert ids.dtype == np.int64
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    _, one_ids = search(index, q[0], 3)  # a single (d,) query
    assert one_ids.shape == (1, 3)
    np.testing.assert_array_equal(one_ids[0], ref_ids[0, :3])


def test_search_caps_k_and_handles_an_empty_index() -> None:
    x = np.eye(4, dtype=np.float32)
    scores, ids = search(build_index(x), x, 10)
    assert ids.shape == (4, 4)
    np.testing.assert_array_equal(ids[:, 0], np.arange(4))
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-6)
    empty = build_index(np.zeros((0, 4), np.float32))
    assert empty.ntotal == 0
    assert search(empty, x, 3)[1].shape == (4, 0)


def test_ivfpq_path_has_high_recall() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5000, 64)).astype(np.float32)
    cfg = IndexConfig(ivf_threshold=1000, nlist=16, pq_m=16, nprobe=8, threads=1)
    index = build_index(x, cfg)
    info = describe_index(index)
    assert info["type"] == "ivfpq"
    assert (info["nlist"], info["pq_m"], info["nprobe"], info["ntotal"]) == (16, 16, 8, 5000)
    assert info["metric"] == "inner_product"
    q = x[:200] + 0.5 * rng.standard_normal((200, 64)).astype(np.float32)
    _, true_ids = _brute_force(x, q, 1)
    scores, ids = search(index, q, 10)
    recall = float((ids == true_ids).any(axis=1).mean())
    assert recall >= 0.8, recall
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # descending
    # nprobe override: visiting every list cannot lower recall
    _, ids_all = search(index, q, 10, nprobe=16)
    assert float((ids_all == true_ids).any(axis=1).mean()) >= recall
    assert describe_index(index)["nprobe"] == 8  # the override does not change the index


def test_ivf_is_deterministic_and_small_inputs_fall_back_to_flat() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1200, 16)).astype(np.float32)
    cfg = IndexConfig(ivf_threshold=1000, nlist=8, pq_m=8, threads=1)
    q = x[:10]
    a, b = search(build_index(x, cfg), q, 5), search(build_index(x, cfg), q, 5)
    np.testing.assert_array_equal(a[1], b[1])
    tiny = build_index(x[:100], IndexConfig(ivf_threshold=10))
    assert describe_index(tiny)["type"] == "flat"


def test_save_load_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2000, 32)).astype(np.float32)
    q = rng.standard_normal((5, 32)).astype(np.float32)
    for name, cfg in (("flat", IndexConfig()), ("ivf", IndexConfig(ivf_threshold=1000, nlist=8, pq_m=8))):
        index = build_index(x, cfg)
        path = save_index(index, tmp_path / "sub" / f"{name}.faiss")
        assert path.is_file()
        assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
        loaded = load_index(path)
        assert describe_index(loaded) == describe_index(index)
        for got, want in zip(search(loaded, q, 7), search(index, q, 7), strict=True):
            np.testing.assert_array_equal(got, want)


def test_missing_or_corrupt_index_raises_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_index(tmp_path / "nope.faiss")
    garbage = tmp_path / "garbage.faiss"
    garbage.write_bytes(b"definitely not a faiss index" * 10)
    with pytest.raises(CheckpointError, match=r"garbage\.faiss"):
        load_index(garbage)
    good = save_index(build_index(np.eye(64, dtype=np.float32)), tmp_path / "good.faiss")
    truncated = tmp_path / "truncated.faiss"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.faiss"):
        load_index(truncated)


def test_helpers_and_config_validation() -> None:
    assert pq_subquantizers(512, 64) == 64
    assert pq_subquantizers(96, 64) == 48
    assert pq_subquantizers(7, 64) == 7
    assert default_nlist(1_000_000) == 4000
    z = normalize_rows(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(z, [[0.6, 0.8], [0.0, 0.0]])
    with pytest.raises(ConfigError, match="NaN"):
        build_index(np.array([[1.0, np.nan]]))
    with pytest.raises(ConfigError, match="shape"):
        build_index(np.ones(5))
    with pytest.raises(ConfigError, match="d=3"):
        search(build_index(np.eye(2)), np.ones((1, 3)), 1)
    for bad in ({"use_gpu": "maybe"}, {"nprobe": 0}, {"pq_m": 0}, {"nlist": 0}, {"threads": 0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            IndexConfig(**bad)
    if faiss.get_num_gpus() == 0:
        with pytest.raises(ConfigError, match="always"):
            build_index(np.ones((2000, 8)), IndexConfig(ivf_threshold=1000, use_gpu="always"))
