"""Image-level concept vectors (Eq. B.14-B.15): pooling, the sparse matrix, the per-file cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from insight_core.concepts.pooling import (
    PooledConcepts,
    concept_codes,
    pool_codes,
    pool_features,
    pool_images,
    pooled_vector,
)
from insight_core.data.features import scan_features
from insight_core.errors import CheckpointError, ConfigError, FeatureFileError
from insight_core.models.sae import MatryoshkaSAE, SAEConfig


@pytest.fixture
def sae() -> MatryoshkaSAE:
    model = MatryoshkaSAE(SAEConfig(d_in=16, dict_size=40, k=3, group_fractions=(1.0,)), seed=0)
    model.threshold.fill_(0.6)
    return model.eval()


def _codes(seed: int = 0, b: int = 5, p: int = 9, m: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, p, m, generator=g) * (torch.rand(b, p, m, generator=g) < 0.2)


def test_pool_codes_is_max_and_mean_over_patches() -> None:
    z = _codes()
    mx, mn = pool_codes(z)
    np.testing.assert_allclose(mx.numpy(), z.numpy().max(1))
    np.testing.assert_allclose(mn.numpy(), z.numpy().mean(1), rtol=1e-6)
    both = pooled_vector(mx, mn, "both")
    assert both.shape == (5, 24)
    assert torch.equal(both[:, :12], mx)
    assert torch.equal(both[:, 12:], mn)
    assert torch.equal(pooled_vector(mx, mn, "mean"), mn)
    with pytest.raises(ConfigError, match="pooling"):
        pooled_vector(mx, mn, "sum")
    with pytest.raises(ConfigError, match="images, patches, m"):
        pool_codes(z[0])


def test_sparse_matrix_gives_back_the_dense_vectors() -> None:
    z = _codes(seed=1)
    z[2] = 0  # an image with no active concept
    mx, mn = pool_codes(z)
    pooled = PooledConcepts.from_dense(mx, mn)
    assert pooled.n == 5
    assert pooled.nnz == int((mx > 0).sum())
    rows = [4, 2, 0, 4]
    for pooling in ("both", "max", "mean"):
        expect = pooled_vector(mx, mn, pooling)[rows]
        torch.testing.assert_close(pooled.batch(rows, pooling), expect)
    torch.testing.assert_close(pooled.take(rows).batch(None), pooled_vector(mx, mn)[rows])
    ids, mxs, mns = pooled.row_concepts(1)
    assert np.array_equal(ids, np.flatnonzero(mx[1].numpy() > 0))
    np.testing.assert_allclose(mxs, mx[1].numpy()[ids])
    np.testing.assert_allclose(mns, mn[1].numpy()[ids])
    both = PooledConcepts.concat([pooled, pooled.take([3])])
    torch.testing.assert_close(both.batch([5]), pooled.batch([3]))
    with pytest.raises(ConfigError, match="row indices"):
        pooled.batch([5])


def test_save_load_round_trip_and_bad_file(tmp_path: Path) -> None:
    pooled = PooledConcepts.from_dense(*pool_codes(_codes(seed=2)))
    pooled.save(tmp_path / "p.safetensors")
    back = PooledConcepts.load(tmp_path / "p.safetensors")
    assert back.m == pooled.m
    torch.testing.assert_close(back.batch(None), pooled.batch(None))
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"bad\.safetensors"):
        PooledConcepts.load(tmp_path / "bad.safetensors")


def test_concept_codes_are_the_thresholded_sae_codes(sae: MatryoshkaSAE) -> None:
    x = torch.randn(7, 16)
    torch.testing.assert_close(concept_codes(sae, x), sae.encode(x))
    with pytest.raises(CheckpointError, match="per-concept thresholds"):
        concept_codes(sae, x, codes="concept")  # not recorded by this SAE
    theta_m = torch.rand(sae.cfg.dict_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        sae.concept_threshold_m.copy_(theta_m)
    pre = sae.pre_activations(x)
    torch.testing.assert_close(concept_codes(sae, x, codes="concept"), pre * (pre > theta_m))
    with pytest.raises(ConfigError, match="codes"):
        concept_codes(sae, x, codes="per-concept")


def _write_features(folder: Path, seed: int, sizes: tuple[int, ...] = (3, 4)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, n in enumerate(sizes):
        np.save(folder / f"shard_{i:05d}.npy", rng.standard_normal((n, 9, 16)).astype(np.float16))


def test_pool_features_matches_pool_images_and_caches_per_file(
    sae: MatryoshkaSAE, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_features(tmp_path / "f", seed=0)
    feats = scan_features(tmp_path / "f")
    cache = tmp_path / "cache"
    pooled = pool_features(sae, feats, cache_dir=cache, sae_key="k", images_per_batch=2, progress=False)
    everything = np.concatenate([np.load(f.path).astype(np.float32) for f in feats.files])
    expect = pool_images(sae, torch.from_numpy(everything))
    torch.testing.assert_close(pooled.batch(None), expect.batch(None))
    assert len(list(cache.glob("*.safetensors"))) == 2  # one per feature file

    def no_encoding(*_a, **_k):
        raise AssertionError("cached images must not be encoded again")

    monkeypatch.setattr(sae, "encode", no_encoding)
    again = pool_features(sae, feats, cache_dir=cache, sae_key="k", progress=False)
    torch.testing.assert_close(again.batch(None), pooled.batch(None))
    with pytest.raises(AssertionError, match="encoded again"):  # another SAE key misses the cache
        pool_features(sae, feats, cache_dir=cache, sae_key="other", progress=False)


def test_pool_features_rejects_bad_inputs(sae: MatryoshkaSAE, tmp_path: Path) -> None:
    _write_features(tmp_path / "f", seed=1, sizes=(2,))
    arr = np.load(tmp_path / "f" / "shard_00000.npy")
    arr[1, 3, 0] = np.nan
    np.save(tmp_path / "f" / "shard_00000.npy", arr)
    with pytest.raises(FeatureFileError, match="NaN"):
        pool_features(sae, scan_features(tmp_path / "f"), progress=False)
    np.save(tmp_path / "f" / "shard_00000.npy", np.zeros((2, 9, 8), np.float16))
    with pytest.raises(ConfigError, match="d_in=16"):
        pool_features(sae, scan_features(tmp_path / "f"), progress=False)


@pytest.mark.gpu
def test_pooling_and_probe_training_on_cuda_match_cpu(sae: MatryoshkaSAE, tmp_path: Path) -> None:
    from insight_core.models.probe import ProbeConfig
    from insight_core.training.probe import ProbeTrainConfig, train_probe

    _write_features(tmp_path / "f", seed=3, sizes=(5, 6))
    feats = scan_features(tmp_path / "f")
    cpu = pool_features(sae, feats, progress=False)
    gpu = pool_features(sae.to("cuda"), feats, images_per_batch=4, progress=False)
    assert gpu.device.type == "cpu"  # results come back to the CPU
    torch.testing.assert_close(gpu.batch(None), cpu.batch(None), rtol=1e-4, atol=1e-5)
    y = np.arange(cpu.n) % 2
    rows = np.arange(cpu.n)
    cfg = ProbeTrainConfig(lr=1e-2, batch_size=4, epochs=3)
    res = train_probe(cpu, (rows, y), (rows, y), ["a", "b"], ProbeConfig(sae.cfg.dict_size, 2), cfg,
                      device="cuda", progress=False)  # fmt: skip
    assert res.probe.weight_cf.device.type == "cpu"
    assert len(res.history) == 3
