"""Training of the steerable captioner (paper Sec. 4, App. B.6; ClipCap's recipe): the adapter and
(by default, as in the paper) the LM learn to caption (image, caption) pairs; the weights of the best
validation epoch are kept. Also the batched helpers that evaluate a captioner on a data set (loss,
captions).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from insight_core.errors import ConfigError
from insight_core.models.captioner import SteerableCaptioner
from insight_core.progress import tqdm

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class CaptionTrainConfig:
    """Optimisation of the adapter and the LM: the paper's settings (App. B.6: LM fine-tuned, lr 1e-4,
    checkpoint chosen on validation), ClipCap's for the rest."""

    epochs: int = 10
    """Passes over the (image, caption) training pairs."""
    batch_size: int = 40
    """Caption pairs per step."""
    lr: float = 1e-4
    """AdamW learning rate (the paper's, App. B.6)."""
    warmup_steps: int = 5000
    """Linear learning-rate warmup (capped at 10 % of the run)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    finetune_lm: bool = True
    """Train the LM with the adapter (the paper; needed for a random-init LM); False freezes it and
    only the adapter learns (cheaper)."""
    grad_clip: float = 1.0
    """Gradient norm clipping (0 disables)."""
    seed: int = 0
    """Seed for batch order and dropout."""
    device: str = "cpu"
    """Torch device for training."""

    def __post_init__(self) -> None:
        for name, ok in (
            ("epochs", self.epochs >= 1),
            ("batch_size", self.batch_size >= 1),
            ("lr", self.lr > 0),
            ("warmup_steps", self.warmup_steps >= 0),
            ("weight_decay", self.weight_decay >= 0),
            ("grad_clip", self.grad_clip >= 0),
        ):
            if not ok:
                raise ConfigError(f"CaptionTrainConfig.{name} is out of range: {getattr(self, name)!r}")


@dataclasses.dataclass(slots=True)
class CaptionData:
    """Adapter inputs and their captions: one row per image, several captions per image."""

    tokens_bhwd: torch.Tensor
    """Adapter inputs (SAE reconstructions or dense features), (n_images, gh, gw, d)."""
    captions: list[list[str]]
    """Reference captions of each image."""

    def __post_init__(self) -> None:
        if self.tokens_bhwd.shape[0] != len(self.captions):
            raise ConfigError(
                f"CaptionData: {self.tokens_bhwd.shape[0]} images but {len(self.captions)} caption lists"
            )
        if any(not caps for caps in self.captions):
            raise ConfigError("CaptionData: every image needs at least one caption")

    def pairs(self) -> list[tuple[int, str]]:
        return [(i, c) for i, caps in enumerate(self.captions) for c in caps]


@dataclasses.dataclass(slots=True)
class TrainHistory:
    """Per-epoch losses of :func:`train_captioner` and the epoch whose weights were kept."""

    train_loss: list[float] = dataclasses.field(default_factory=list)
    """Mean training loss of each epoch."""
    val_loss: list[float] = dataclasses.field(default_factory=list)
    """Validation loss after each epoch (empty without validation data)."""
    first_batch_loss: float = float("nan")
    """Loss of the very first batch (before any update)."""
    best_epoch: int = -1
    """0-based epoch with the lowest validation (else training) loss; its weights are kept."""


def _lr_lambda(warmup: int) -> Callable[[int], float]:
    return lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def train_captioner(
    model: SteerableCaptioner,
    train: CaptionData,
    val: CaptionData | None,
    cfg: CaptionTrainConfig,
    *,
    progress: bool = True,
) -> TrainHistory:
    """Train the adapter (+ LM if ``cfg.finetune_lm``); keeps the weights of the best validation epoch.

    Reproducible: batch order and dropout draw from ``cfg.seed`` (the global RNG state is restored).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return _train(model, train, val, cfg, progress)


def _train(
    model: SteerableCaptioner,
    train: CaptionData,
    val: CaptionData | None,
    cfg: CaptionTrainConfig,
    progress: bool,
) -> TrainHistory:
    device = torch.device(cfg.device)
    model.to(device)
    model.lm.requires_grad_(cfg.finetune_lm)
    params = [p for p in model.adapter.parameters()] + (
        list(model.lm.parameters()) if cfg.finetune_lm else []
    )
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    pairs = train.pairs()
    steps_per_epoch = math.ceil(len(pairs) / cfg.batch_size)
    warmup = min(cfg.warmup_steps, max(1, steps_per_epoch * cfg.epochs // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(warmup))
    gen = torch.Generator().manual_seed(cfg.seed)
    hist, best, best_loss = TrainHistory(), None, math.inf
    bar = tqdm(total=steps_per_epoch * cfg.epochs, desc="captioner", disable=not progress, unit="step")
    for epoch in range(cfg.epochs):
        model.adapter.train()
        model.lm.train(cfg.finetune_lm)
        total = 0.0
        for batch in torch.randperm(len(pairs), generator=gen).split(cfg.batch_size):
            idx = torch.tensor([pairs[j][0] for j in batch.tolist()])
            loss = model.loss(
                train.tokens_bhwd[idx].to(device).float(), [pairs[j][1] for j in batch.tolist()]
            )
            if math.isnan(hist.first_batch_loss):
                hist.first_batch_loss = float(loss.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(batch)
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", epoch=epoch)
        hist.train_loss.append(total / len(pairs))
        if val is not None:
            hist.val_loss.append(evaluate_loss(model, val, batch_size=cfg.batch_size))
        current = hist.val_loss[-1] if val is not None else hist.train_loss[-1]
        if current < best_loss:
            best_loss, hist.best_epoch = current, epoch
            best = _snapshot(model, cfg.finetune_lm)
        log.info(
            "epoch %d: train loss %.4f%s",
            epoch,
            hist.train_loss[-1],
            f" val loss {hist.val_loss[-1]:.4f}" if val else "",
        )
    bar.close()
    if best is not None:
        _restore(model, best)
    model.lm.requires_grad_(False)
    model.cpu().eval()
    return hist


def _snapshot(model: SteerableCaptioner, with_lm: bool) -> dict[str, dict[str, torch.Tensor]]:
    snap = {"adapter": copy.deepcopy(model.adapter.state_dict())}
    if with_lm:
        snap["lm"] = {k: v.detach().clone() for k, v in model.lm.state_dict().items()}
    return snap


def _restore(model: SteerableCaptioner, snap: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    model.adapter.load_state_dict(snap["adapter"])
    if "lm" in snap:
        model.lm.load_state_dict(snap["lm"])


@torch.no_grad()
def evaluate_loss(model: SteerableCaptioner, data: CaptionData, *, batch_size: int = 64) -> float:
    """Mean caption loss over all (image, caption) pairs of ``data`` (eval mode)."""
    model.eval()
    device = next(model.adapter.parameters()).device
    pairs = data.pairs()
    total = 0.0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        idx = torch.tensor([i for i, _ in chunk])
        total += float(model.loss(data.tokens_bhwd[idx].to(device).float(), [c for _, c in chunk])) * len(
            chunk
        )
    return total / max(len(pairs), 1)


@torch.no_grad()
def caption_all(
    model: SteerableCaptioner, tokens_bhwd: torch.Tensor, *, batch_size: int = 32, **kwargs: Any
) -> list[str]:
    """Captions of many adapter inputs, ``batch_size`` at a time (see :meth:`SteerableCaptioner.generate`)."""
    out: list[str] = []
    for start in range(0, tokens_bhwd.shape[0], batch_size):
        out += model.generate(tokens_bhwd[start : start + batch_size], **kwargs)
    return out
