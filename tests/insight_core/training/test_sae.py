"""SAE training: learns a planted dictionary, revives dead latents, resumes exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from insight_core.data.features import scan_features
from insight_core.errors import CheckpointError, ConfigError
from insight_core.evaluation.sae import evaluate
from insight_core.models.sae import SAEConfig
from insight_core.training.sae import SAETrainer, TrainConfig, geometric_median


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
