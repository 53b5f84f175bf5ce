"""SAE training: learns a planted dictionary, revives dead latents, resumes exactly."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from insight_core.data.features import scan_features
from insight_core.errors import CheckpointError, ConfigError
from insight_core.evaluation.sae import evaluate
from insight_core.models.sae import SAEConfig, geometric_median
from insight_core.training.sae import (
    ConceptTopK,
    SAETrainer,
    TrainConfig,
    resolve_schedule,
    training_warnings,
)


def planted_features(tmp_path: Path, n: int = 4000, d: int = 32, n_atoms: int = 24, seed: int = 0) -> Path:
    """Rows = offset + 2 random unit atoms with coefficients in [0.5, 1.5] + small noise, (n, d) float16."""
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(n_atoms, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    picks = np.argsort(rng.random((n, n_atoms)), axis=1)[:, :2]
    coefs = np.zeros((n, n_atoms))
    np.put_along_axis(coefs, picks, rng.uniform(0.5, 1.5, size=(n, 2)), axis=1)
    x = 0.5 + coefs @ atoms + rng.normal(scale=0.01, size=(n, d))
    out = tmp_path / "features"
    out.mkdir(parents=True)
    np.save(out / "rows.npy", x.astype(np.float16))
    return out


SMALL_SAE = SAEConfig(d_in=32, dict_size=48, k=2, group_fractions=(0.25, 0.75))


def test_geometric_median_is_robust_to_outliers() -> None:
    pts = torch.cat([torch.zeros(50, 3), torch.full((5, 3), 100.0)])
    assert geometric_median(pts).norm() < 1.0
    assert pts.mean(0).norm() > 10


def test_training_learns_planted_dictionary(tmp_path: Path) -> None:
    fs = scan_features(planted_features(tmp_path))
    train, held = fs.split(0.1, seed=0)
    cfg = TrainConfig(lr=3e-3, batch_size=256, steps=400, warmup_steps=20, threshold_start_step=150, seed=0)
    trainer = SAETrainer(SMALL_SAE, cfg, train.n_rows)
    state = trainer.fit(train, progress=False)
    assert state.step == 400
    metrics = evaluate(trainer.sae, held.sample(10_000))
    assert metrics["thresholded"]
    assert metrics["fve"] > 0.9, metrics
    assert 1.0 < metrics["l0"] < 8.0, metrics  # the threshold reproduces roughly k active latents
    assert metrics["fve_per_shell"][0] < metrics["fve_per_shell"][1]
    assert trainer.sae.W_dec_md.norm(dim=1).sub(1).abs().max() < 1e-5
    assert state.history[-1]["loss"] < state.history[0]["loss"]


def _revived_fraction(aux_alpha: float, tmp_path: Path) -> float:
    """Latents 0..11 start with tiny encoder rows so they never win the top-k: dead from the start."""
    fs = scan_features(planted_features(tmp_path / f"aux{aux_alpha}", n=4000))
    train, held = fs.split(0.1, seed=0)
    cfg = TrainConfig(
        lr=2e-3,
        batch_size=200,
        steps=300,
        warmup_steps=10,
        aux_alpha=aux_alpha,
        dead_after_samples=400,
        threshold_start_step=10_000,
        seed=0,
    )
    trainer = SAETrainer(SMALL_SAE, cfg, train.n_rows)
    with torch.no_grad():
        trainer.sae.W_enc_md[:12] *= 0.01
    trainer.fit(train, progress=False)
    codes = trainer.sae.encode(held.sample(2000), use_threshold=False)
    return float((codes[:, :12] > 0).any(0).float().mean())


def test_aux_loss_revives_dead_latents(tmp_path: Path) -> None:
    without = _revived_fraction(0.0, tmp_path)
    with_aux = _revived_fraction(1 / 32, tmp_path)
    assert without <= 0.1
    assert with_aux >= 0.5
    assert with_aux > without + 0.4


def test_interrupted_run_resumes_to_identical_weights(tmp_path: Path) -> None:
    fs = scan_features(planted_features(tmp_path, n=3000))
    train, _ = fs.split(0.1, seed=0)
    cfg = TrainConfig(
        lr=1e-3,
        batch_size=128,
        steps=45,
        warmup_steps=5,
        threshold_start_step=10,
        checkpoint_every=10,
        dead_after_samples=500,
        seed=0,
    )
    reference = SAETrainer(SMALL_SAE, cfg, train.n_rows)
    reference.fit(train, progress=False)

    class Crash(Exception):
        pass

    def crash_at_27(step: int, _: dict) -> None:
        if step == 27:
            raise Crash

    ckpt = tmp_path / "train_state.safetensors"
    with pytest.raises(Crash):
        SAETrainer(SMALL_SAE, cfg, train.n_rows).fit(
            train, checkpoint=ckpt, progress=False, on_step=crash_at_27
        )
    resumed = SAETrainer(SMALL_SAE, cfg, train.n_rows)
    resumed.fit(train, checkpoint=ckpt, progress=False)
    assert resumed.state.step == 45
    for (name, a), b in zip(
        reference.sae.state_dict().items(), resumed.sae.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name  # bitwise: resuming is exact, not approximate


def test_checkpoint_from_other_config_is_refused(tmp_path: Path) -> None:
    fs = scan_features(planted_features(tmp_path, n=2000))
    train, _ = fs.split(0.1)
    cfg = TrainConfig(batch_size=100, steps=10, checkpoint_every=5)
    ckpt = tmp_path / "state.safetensors"
    SAETrainer(SMALL_SAE, cfg, train.n_rows).fit(train, checkpoint=ckpt, progress=False)
    other = SAETrainer(SMALL_SAE, TrainConfig(batch_size=100, steps=10, lr=5e-4), train.n_rows)
    with pytest.raises(CheckpointError, match="different SAE/training config"):
        other.fit(train, checkpoint=ckpt, progress=False)


def test_batch_larger_than_data_is_a_clear_error(tmp_path: Path) -> None:
    fs = scan_features(planted_features(tmp_path, n=100))
    train, _ = fs.split(0.1)
    trainer = SAETrainer(SMALL_SAE, TrainConfig(batch_size=4096, steps=3), train.n_rows)
    with pytest.raises(ConfigError, match="fewer rows than one batch"):
        trainer.fit(train, progress=False)


@pytest.mark.parametrize("field", [{"lr": 0.0}, {"held_out_fraction": 1.0}, {"steps": 0}])
def test_train_config_validation(field: dict) -> None:
    with pytest.raises(ConfigError, match=next(iter(field))):
        TrainConfig(**field)


def test_lr_schedule_warmup_and_decay() -> None:
    trainer = SAETrainer(SMALL_SAE, TrainConfig(steps=100, warmup_steps=10, decay_start_fraction=0.5), 10_000)
    factors = [trainer._lr_factor(s) for s in range(100)]
    assert factors[0] == pytest.approx(0.1)
    assert factors[9] == pytest.approx(1.0)
    assert factors[49] == pytest.approx(1.0)
    assert factors[75] == pytest.approx(0.5)
    assert factors[99] == pytest.approx(0.02)


# ---- automatic settings, diagnostics ------------------------------------------------------------


def test_resolve_schedule_rules() -> None:
    paper = resolve_schedule(TrainConfig(), 8192, 20_000_000)  # a large data set: the paper's settings
    assert (paper.batch_size, paper.lr) == (16_384, pytest.approx(1e-4))
    assert paper.total_steps == math.ceil(3 * (20_000_000 // 16_384))
    assert set(paper.auto) == {"batch_size", "lr", "steps"}
    small = resolve_schedule(TrainConfig(), 128, 245_980)  # ~1250 planted images
    assert small.batch_size == 2048  # largest power of two <= 245980 / 64 = 3843
    assert small.lr == pytest.approx(8e-4)  # 1e-4 * sqrt(8192 / 128)
    assert small.total_steps == 1000  # 3 epochs are only 360 steps: the minimum wins
    tiny = resolve_schedule(TrainConfig(), 48, 1000)
    assert tiny.batch_size == 256  # the floor, still <= n
    assert resolve_schedule(TrainConfig(), 48, 100).batch_size == 100  # never more than the data
    given = resolve_schedule(TrainConfig(lr=3e-3, batch_size=100, epochs=2.0), 48, 1000)
    assert (given.batch_size, given.lr, given.total_steps, given.auto) == (100, 3e-3, 20, {})
    assert resolve_schedule(TrainConfig(steps=7, min_steps=50), 48, 1000).total_steps == 7


def test_training_warnings() -> None:
    flat = [{"step": i, "loss": 1.0 + 0.001 * (i % 3)} for i in range(100)]
    falling = [{"step": i, "loss": 2.0 - 0.01 * i} for i in range(100)]
    ok = training_warnings(flat, 0.93)
    assert (ok["low_fve"], ok["still_falling"], ok["warnings"]) == (False, False, [])
    bad = training_warnings(falling, 0.21)
    assert bad["low_fve"]
    assert bad["still_falling"]
    assert bad["loss_trend"] < -0.01
    assert len(bad["warnings"]) == 2
    assert "0.210" in bad["warnings"][0]
    assert training_warnings(falling[:5], None)["loss_trend"] is None  # too short to tell


# ---- per-concept thresholds (paper App. B.5) ------------------------------------------------------


def test_concept_top_k_equals_sorting_everything() -> None:
    g = torch.Generator().manual_seed(0)
    m, k = 20, 4
    top = ConceptTopK(m, k)
    seen: list[list[float]] = [[] for _ in range(m)]
    for _ in range(30):
        n = int(torch.randint(1, 60, (1,), generator=g))
        cols = torch.randint(0, m - 3, (n,), generator=g)  # the last 3 concepts never fire
        vals = torch.rand(n, generator=g) * 5
        top.update(cols, vals)
        for c, v in zip(cols.tolist(), vals.tolist(), strict=True):
            seen[c].append(v)
    thr = top.thresholds()
    for c in range(m):
        values = sorted(seen[c], reverse=True)
        if len(values) >= k:
            assert float(thr[c]) == pytest.approx(values[k - 1])
            assert torch.allclose(top.top_mk[c], torch.tensor(values[:k]))
        elif values:
            assert float(thr[c]) == pytest.approx(values[-1])
        else:
            assert math.isinf(float(thr[c]))


@pytest.mark.gpu
def test_concept_top_k_on_cuda_matches_cpu() -> None:
    g = torch.Generator().manual_seed(1)
    cpu, gpu = ConceptTopK(512, 12), ConceptTopK(512, 12, device="cuda")
    for _ in range(20):
        cols = torch.randint(0, 512, (20_000,), generator=g)
        vals = torch.rand(20_000, generator=g)
        cpu.update(cols, vals)
        gpu.update(cols.cuda(), vals.cuda())
    assert torch.equal(gpu.top_mk.cpu(), cpu.top_mk)
    assert torch.equal(gpu.thresholds().cpu(), cpu.thresholds())


def test_training_records_per_concept_thresholds(tmp_path: Path) -> None:
    fs = scan_features(planted_features(tmp_path))
    train, held = fs.split(0.1, seed=0)
    cfg = TrainConfig(lr=3e-3, batch_size=256, steps=200, warmup_steps=20, threshold_start_step=100)
    trainer = SAETrainer(SMALL_SAE, cfg, train.n_rows)
    seen: list[torch.Tensor] = []
    original = trainer.concept_top.update

    def spy(cols: torch.Tensor, vals: torch.Tensor) -> None:
        seen.append(torch.stack([cols.float(), vals]))
        original(cols, vals)

    trainer.concept_top.update = spy  # type: ignore[method-assign]
    trainer.fit(train, progress=False)
    assert len(seen) == 100  # from threshold_start_step on
    sae = trainer.sae
    assert sae.has_concept_thresholds
    all_cols, all_vals = torch.cat(seen, 1)
    for c in range(SMALL_SAE.dict_size):
        vals = all_vals[all_cols == c].sort(descending=True).values
        expected = vals[11] if len(vals) >= 12 else (vals[-1] if len(vals) else torch.tensor(math.inf))
        assert float(sae.concept_threshold_m[c]) == pytest.approx(float(expected)), c
    x = held.sample(2000)
    global_codes, concept_codes = sae.encode(x), sae.encode(x, threshold="concept")
    pre = sae.pre_activations(x)
    assert torch.equal(concept_codes, pre * (pre > sae.concept_threshold_m))
    assert (concept_codes > 0).sum() < (global_codes > 0).sum()  # 12th-largest thresholds are strict
