"""Training sparse concept probes (paper App. B.5, Eq. B.16); metrics are in
:mod:`insight_core.evaluation.probe`.

Loss ``CE(W c + b, y) + lambda * mean|W|`` (the L1 term normalised by the number of weights, as
DN-CBM's ``L1Loss`` on the weights, which the paper's lambda range 0.1-8 refers to), AdamW
(betas 0.9 / 0.999), lr 1e-4, batch 1024, 100 epochs, keeping the epoch with the best held-out top-1
accuracy. :func:`sweep_probe` runs the paper's grid (batch {256, 512, 1024} x lr {1e-3, 5e-4, 1e-4}
x lambda {0.1, 1, 2, 4, 8}) and keeps the best held-out run. Weights start at zero, so a feature
that is never active keeps an exactly-zero weight.

Batches are densified from a sparse :class:`~insight_core.concepts.pooling.PooledConcepts` held on
the training device (dense products beat torch's sparse kernels here, on CPU too: measured).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from insight_core.concepts.pooling import PooledConcepts
from insight_core.device import resolve_device
from insight_core.errors import ConfigError
from insight_core.evaluation.probe import probe_logits, topk_accuracy
from insight_core.models.probe import ConceptProbe, ProbeConfig
from insight_core.progress import tqdm

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class ProbeTrainConfig:
    """Optimisation of one probe (paper App. B.5 defaults)."""

    lr: float = 1e-4
    """AdamW learning rate."""
    batch_size: int = 1024
    """Images per step."""
    epochs: int = 100
    """Passes over the training images; the best held-out epoch is kept."""
    l1: float = 1.0
    """lambda of Eq. B.16, on the mean absolute weight."""
    weight_decay: float = 0.01
    """AdamW's decoupled weight decay (PyTorch's default; the paper names AdamW without a value)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas (paper)."""
    seed: int = 0
    """Seed of the batch order."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {self.epochs}")
        if self.l1 < 0:
            raise ConfigError(f"--l1 must be >= 0, got {self.l1}")


@dataclasses.dataclass(frozen=True, slots=True)
class SweepConfig:
    """The hyper-parameter grid of App. B.5 (every combination is trained)."""

    batch_sizes: tuple[int, ...] = (256, 512, 1024)
    """Batch sizes tried."""
    lrs: tuple[float, ...] = (1e-3, 5e-4, 1e-4)
    """Learning rates tried."""
    l1s: tuple[float, ...] = (0.1, 1.0, 2.0, 4.0, 8.0)
    """L1 weights (lambda) tried."""

    def __post_init__(self) -> None:
        if not (self.batch_sizes and self.lrs and self.l1s):
            raise ConfigError("the sweep needs at least one batch size, learning rate and L1 weight")

    def grid(self, base: ProbeTrainConfig) -> list[ProbeTrainConfig]:
        return [
            dataclasses.replace(base, batch_size=b, lr=lr, l1=l1)
            for b, lr, l1 in itertools.product(self.batch_sizes, self.lrs, self.l1s)
        ]


@dataclasses.dataclass
class ProbeTrainResult:
    """A trained probe (its best held-out epoch) and how training went."""

    probe: ConceptProbe
    config: ProbeTrainConfig
    best_epoch: int
    """1-based epoch of the kept weights."""
    best_val_top1: float
    """Held-out top-1 accuracy of the kept weights (NaN without held-out images)."""
    best_val_ce: float
    """Held-out cross-entropy of the kept weights (breaks ties of accuracy)."""
    history: list[dict[str, float]]
    """Per epoch: loss, cross-entropy, L1 term, held-out top-1."""
    seconds: float
    """Wall time of training (without the held-out evaluation)."""

    @property
    def seconds_per_epoch(self) -> float:
        return self.seconds / max(len(self.history), 1)

    def summary(self) -> dict[str, Any]:
        return {
            "batch_size": self.config.batch_size,
            "lr": self.config.lr,
            "l1": self.config.l1,
            "best_epoch": self.best_epoch,
            "best_val_top1": self.best_val_top1,
            "best_val_ce": self.best_val_ce,
            "seconds_per_epoch": self.seconds_per_epoch,
        }


def stratified_split(y_n: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) positions into ``y_n``: ``fraction`` of every class held out (rounded), at least
    one image of each class kept for training."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"held-out fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    y = np.asarray(y_n)
    held = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        n_held = min(round(fraction * len(idx)), len(idx) - 1)
        held.append(rng.permutation(idx)[:n_held])
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    train_mask = np.ones(len(y), dtype=bool)
    train_mask[held_idx] = False
    return np.flatnonzero(train_mask), held_idx


def train_probe(
    pooled: PooledConcepts,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray] | None,
    classes: Sequence[str],
    probe_cfg: ProbeConfig,
    cfg: ProbeTrainConfig | None = None,
    *,
    device: str | torch.device = "auto",
    progress: bool = True,
    desc: str = "probe",
) -> ProbeTrainResult:
    """Train one probe on the images ``train = (rows, y)`` of ``pooled``; keep the epoch with the best
    top-1 accuracy on ``val = (rows, y)``, ties broken by the lower held-out cross-entropy (the last
    epoch when ``val`` is None or empty)."""
    cfg = cfg or ProbeTrainConfig()
    if probe_cfg.n_concepts != pooled.m:
        raise ConfigError(f"probe reads {probe_cfg.n_concepts} concepts but the codes have {pooled.m}")
    rows_tr, y_tr = (np.asarray(a, dtype=np.int64) for a in train)
    if len(rows_tr) == 0:
        raise ConfigError("no training images")
    dev = resolve_device(device, what="--device")
    probe = ConceptProbe(probe_cfg, classes).to(dev)
    opt = torch.optim.AdamW(probe.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    data = pooled.to(dev)
    y_dev = torch.as_tensor(y_tr, device=dev)
    rows_dev = torch.as_tensor(rows_tr, device=dev)
    gen = torch.Generator().manual_seed(cfg.seed)
    has_val = val is not None and len(val[0]) > 0
    best_state, best_key, best_epoch = None, (-1.0, float("inf")), 0
    history, seconds = [], 0.0
    bar = tqdm(range(cfg.epochs), disable=not progress, desc=desc, unit="epoch", dynamic_ncols=True)
    for epoch in bar:
        t0 = time.perf_counter()
        probe.train()
        order = torch.randperm(len(rows_tr), generator=gen).to(dev)
        sums = torch.zeros(3, dtype=torch.float64)
        for start in range(0, len(order), cfg.batch_size):
            pick = order[start : start + cfg.batch_size]
            x = data.batch(rows_dev[pick], probe_cfg.pooling)
            ce = F.cross_entropy(probe(x), y_dev[pick])
            l1 = probe.weight_cf.abs().mean()
            loss = ce + cfg.l1 * l1
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums += torch.tensor([loss.item() * len(pick), ce.item() * len(pick), l1.item() * len(pick)],
                                 dtype=torch.float64)  # fmt: skip
        seconds += time.perf_counter() - t0
        probe.eval()
        top1, val_ce = float("nan"), float("nan")
        if has_val:
            assert val is not None
            logits = probe_logits(probe, data, val[0])
            top1 = topk_accuracy(logits, val[1], 1)
            val_ce = float(F.cross_entropy(logits, torch.as_tensor(val[1], dtype=torch.int64)))
        loss_, ce_, l1_ = (sums / len(rows_tr)).tolist()
        history.append({"epoch": epoch + 1, "loss": loss_, "ce": ce_, "l1": l1_, "val_top1": top1,
                        "val_ce": val_ce})  # fmt: skip
        bar.set_postfix(loss=f"{loss_:.3f}", val=f"{top1:.3f}")
        key = (top1, val_ce)
        if not has_val or key[0] > best_key[0] or (key[0] == best_key[0] and key[1] < best_key[1]):
            best_key, best_epoch = key, epoch + 1
            best_state = {k: v.detach().clone() for k, v in probe.state_dict().items()}
    bar.close()
    assert best_state is not None
    probe.load_state_dict(best_state)
    return ProbeTrainResult(probe.cpu().eval(), cfg, best_epoch, best_key[0], best_key[1], history, seconds)


def sweep_probe(
    pooled: PooledConcepts,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    classes: Sequence[str],
    probe_cfg: ProbeConfig,
    base: ProbeTrainConfig | None = None,
    sweep: SweepConfig | None = None,
    *,
    device: str | torch.device = "auto",
    progress: bool = True,
) -> tuple[ProbeTrainResult, list[dict[str, Any]]]:
    """Train every grid point of ``sweep`` and return the best held-out run (accuracy, then lower
    cross-entropy; first in grid order on a full tie) and the table of all runs."""
    if len(val[0]) == 0:
        raise ConfigError("the sweep needs held-out images (a held-out fraction > 0 or validation labels)")
    grid = (sweep or SweepConfig()).grid(base or ProbeTrainConfig())
    best: ProbeTrainResult | None = None
    table = []
    for i, cfg in enumerate(grid):
        desc = f"sweep {i + 1}/{len(grid)} bs={cfg.batch_size} lr={cfg.lr:g} l1={cfg.l1:g}"
        result = train_probe(pooled, train, val, classes, probe_cfg, cfg, device=device, progress=progress,
                             desc=desc)  # fmt: skip
        table.append(result.summary())
        log.info("%s: held-out top-1 %.4f (epoch %d)", desc, result.best_val_top1, result.best_epoch)
        if best is None or (result.best_val_top1, -result.best_val_ce) > (
            best.best_val_top1,
            -best.best_val_ce,
        ):
            best = result
    assert best is not None
    return best, table
