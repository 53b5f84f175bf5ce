"""Training of the Matryoshka BatchTopK SAE (paper App. B.2); held-out metrics are in
:mod:`insight_core.evaluation.sae`.

Adam (lr 1e-4), ~16k patches per batch, 3 epochs, 10 % held out; aux loss (alpha 1/32) for latents
that did not fire in the last 10M samples (capped at one epoch of data, so small datasets still
revive dead latents); learned inference threshold = running mean of the smallest kept activation
(dictionary_learning's rule: EMA with beta 0.999 after ``threshold_start_step``). Like
dictionary_learning: b_dec starts at the geometric median of the first batch, gradients parallel to
decoder rows are removed, grad norm clipped at 1, decoder rows renormalised after each step, linear
warmup and optional linear decay of the learning rate.

Settings that are not given are chosen from the data and the dictionary (:func:`resolve_schedule`),
so the paper's defaults also work on small data sets:

* **batch**: the paper's 16,384 patches, capped so that an epoch has at least 64 steps (the largest
  power of two <= n_train / 64, at least 256, at most n_train);
* **lr**: dictionary_learning's rule ``lr ~ 1 / sqrt(m)``, anchored at the paper's 1e-4 for
  m = 8192: ``lr = 1e-4 * sqrt(8192 / m)`` (8e-4 for m = 128);
* **steps**: the paper's 3 epochs, but at least ``min_steps`` (1,000) optimisation steps.

After training, :func:`training_warnings` flags a low held-out FVE or a loss still falling at the end.

Per-concept thresholds (the paper's thresholded variant, App. B.5): from ``threshold_start_step``
on, the trainer keeps each concept's ``concept_threshold_k`` (12) largest kept activations; the k-th
largest becomes the concept's threshold (a concept seen fewer than k times gets the smallest value
seen, one never seen +inf) in ``MatryoshkaSAE.concept_threshold_m``.

Training state (weights, Adam moments, counters, thresholds) is checkpointed atomically as
safetensors + JSON so an interrupted run resumes where it stopped. On a streamed feature set
(features computed on read) the resumed epoch skips consumed shuffle buffers without running the
backbone; the few rows such a buffer carried into the next one are not replayed
(:meth:`~insight_core.data.features.FeatureSplit.iter_batches`).

Data-parallel training (``torchrun``, see :mod:`insight_core.distributed`): every process holds an
identical replica and trains on its shard of the batches (every world-th chunk) with a per-process
batch of ``batch_size // world_size``, so the global batch is unchanged. The replicas stay equal:
b_dec's initial value comes from rank 0, gradients are all-reduced and averaged right after
``backward()`` (before the parallel-gradient removal, clipping and the Adam step), the "fired" mask
is OR-reduced so all ranks agree on dead latents, the threshold EMA uses the global minimum of the
kept activations and the sample counters count the global batch. BatchTopK itself stays per process
(``k * local batch`` activations per process): the standard data-parallel approximation of a
global BatchTopK, exact in expectation. Only rank 0 writes checkpoints; they record every rank's
position in its data stream so a resume with the same number of processes continues exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from insight_core import distributed
from insight_core.data.features import FeatureSplit
from insight_core.device import resolve_device
from insight_core.distributed import DistInfo
from insight_core.errors import CheckpointError, ConfigError
from insight_core.io import write_safetensors
from insight_core.models.sae import MatryoshkaSAE, SAEConfig
from insight_core.models.sae_kinds import build_sae
from insight_core.models.sparse_shells import stable_argsort
from insight_core.progress import tqdm

log = logging.getLogger(__name__)

_CHUNK_ROWS = 16_384  # FeatureSplit.iter_batches' default read/shuffle unit

PAPER_BATCH = 16_384
"""Patches per step in the paper (~83 images x 196 patches)."""
PAPER_LR = 1e-4
"""The paper's Adam learning rate, for its m = 8192 dictionary."""
PAPER_DICT_SIZE = 8192
PAPER_EPOCHS = 3.0
MIN_STEPS_PER_EPOCH = 64
"""The automatic batch keeps at least this many steps per epoch."""
MIN_AUTO_BATCH = 256
LOW_FVE = 0.5
"""Held-out FVE below this gets a loud warning (the paper reports ~0.73 on CC12M)."""
STILL_FALLING = 0.01
"""Relative drop of the training loss between the last two tenths of a run that counts as
"still falling"."""


@dataclasses.dataclass(frozen=True, slots=True)
class TrainConfig:
    """Optimisation settings (paper defaults where the paper gives them)."""

    lr: float | None = None
    """Adam learning rate; None: ``1e-4 * sqrt(8192 / m)`` (the paper's 1e-4 at m = 8192, scaled
    like dictionary_learning's ``1 / sqrt(m)`` rule)."""
    batch_size: int | None = None
    """Patches per step; None: the paper's 16,384 (~83 images x 196 patches), capped so that an epoch
    has >= 64 steps (largest power of two <= n_train / 64, at least 256)."""
    epochs: float | None = None
    """Passes over the training split; ignored when ``steps`` is set. None: the paper's 3, but at
    least ``min_steps`` steps."""
    steps: int | None = None
    """Total optimisation steps (overrides ``epochs``)."""
    min_steps: int = 1000
    """When neither ``steps`` nor ``epochs`` is given: train at least this many steps."""
    concept_threshold_k: int = 12
    """Per-concept thresholds = each concept's k-th largest training activation (paper App. B.5)."""
    held_out_fraction: float = 0.1
    """Fraction of images held out for evaluation."""
    aux_alpha: float = 1 / 32
    """Weight of the dead-latent aux loss (Eq. B.6); 0 disables it."""
    aux_k: int | None = None
    """Dead latents used per input by the aux loss; None = d_in // 2 (as OpenAI / dictionary_learning)."""
    dead_after_samples: int = 10_000_000
    """A latent is dead when it has not fired for this many training samples (capped at one epoch)."""
    warmup_steps: int = 1000
    """Linear learning-rate warmup (capped at 10 % of the run)."""
    decay_start_fraction: float | None = 0.8
    """Linear decay to zero from this fraction of the run; None keeps the rate constant."""
    threshold_beta: float = 0.999
    """EMA factor of the inference threshold."""
    threshold_start_step: int = 1000
    """Step from which the threshold is estimated (capped at half the run)."""
    grad_clip: float | None = 1.0
    """Max global gradient norm; None disables clipping."""
    group_weights: tuple[float, ...] | None = None
    """Weight of each shell's loss; None = 1 each (the sum of Eq. 4)."""
    seed: int = 0
    """Seed for initialisation, the split and batch order."""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ..."""
    eval_max_rows: int = 200_000
    """Held-out rows used for the final metrics."""
    checkpoint_every: int = 500
    """Steps between resumable checkpoints (0 disables)."""

    def __post_init__(self) -> None:
        checks = {
            "lr": self.lr is None or self.lr > 0,
            "batch_size": self.batch_size is None or self.batch_size >= 1,
            "epochs": self.epochs is None or self.epochs > 0,
            "steps": self.steps is None or self.steps >= 1,
            "min_steps": self.min_steps >= 1,
            "concept_threshold_k": self.concept_threshold_k >= 1,
            "held_out_fraction": 0 <= self.held_out_fraction < 1,
            "aux_alpha": self.aux_alpha >= 0,
            "threshold_beta": 0 <= self.threshold_beta < 1,
            "decay_start_fraction": self.decay_start_fraction is None or 0 <= self.decay_start_fraction <= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(f"invalid training config value(s) {bad}: {self}")


@dataclasses.dataclass(frozen=True, slots=True)
class Schedule:
    """Batch, learning rate and length of a run: given in :class:`TrainConfig` or chosen automatically."""

    batch_size: int
    lr: float
    total_steps: int
    steps_per_epoch: int
    auto: dict[str, str]
    """For each automatically chosen setting, the rule that chose it."""


def auto_batch_size(n_train_rows: int) -> int:
    """The paper's batch, capped so that an epoch has >= 64 steps (a power of two >= 256, <= n)."""
    cap = max(MIN_AUTO_BATCH, 2 ** math.floor(math.log2(max(n_train_rows // MIN_STEPS_PER_EPOCH, 1))))
    return max(1, min(PAPER_BATCH, cap, n_train_rows))


def auto_lr(dict_size: int) -> float:
    """dictionary_learning's ``1 / sqrt(m)`` scaling, anchored at the paper's 1e-4 for m = 8192."""
    return PAPER_LR * math.sqrt(PAPER_DICT_SIZE / dict_size)


def resolve_schedule(cfg: TrainConfig, dict_size: int, n_train_rows: int) -> Schedule:
    """Fill in the batch size, learning rate and step count that ``cfg`` leaves open (see the module
    docstring for the rules); returns them with the rule used for each."""
    auto: dict[str, str] = {}
    batch = cfg.batch_size
    if batch is None:
        batch = auto_batch_size(n_train_rows)
        auto["batch_size"] = (
            f"min({PAPER_BATCH}, largest power of two <= n_train/{MIN_STEPS_PER_EPOCH}, >= {MIN_AUTO_BATCH}) "
            f"with n_train={n_train_rows}"
        )
    lr = cfg.lr
    if lr is None:
        lr = auto_lr(dict_size)
        auto["lr"] = f"{PAPER_LR:g} * sqrt({PAPER_DICT_SIZE} / m) with m={dict_size}"
    steps_per_epoch = max(1, n_train_rows // batch)
    if cfg.steps is not None:
        total = cfg.steps
    elif cfg.epochs is not None:
        total = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    else:
        total = max(math.ceil(PAPER_EPOCHS * steps_per_epoch), cfg.min_steps)
        auto["steps"] = (
            f"max({PAPER_EPOCHS:g} epochs = {math.ceil(PAPER_EPOCHS * steps_per_epoch)} steps, "
            f"min_steps={cfg.min_steps})"
        )
    return Schedule(batch, lr, total, steps_per_epoch, auto)


def training_warnings(history: list[dict[str, float]], fve: float | None) -> dict[str, Any]:
    """Diagnostics of a finished run: whether held-out ``fve`` is low (< 0.5) and whether the training
    loss was still falling (mean of the last tenth of the logged steps more than 1 % below the tenth
    before); ``warnings`` lists them in words."""
    out: dict[str, Any] = {"low_fve": fve is not None and fve < LOW_FVE, "loss_trend": None}
    out["still_falling"] = False
    losses = [h["loss"] for h in history if "loss" in h]
    if len(losses) >= 20:
        tenth = len(losses) // 10
        before, last = losses[-2 * tenth : -tenth], losses[-tenth:]
        prev = sum(before) / len(before)
        trend = (sum(last) / len(last) - prev) / max(abs(prev), 1e-12)
        out["loss_trend"] = trend
        out["still_falling"] = trend < -STILL_FALLING
    warnings = []
    if out["low_fve"]:
        warnings.append(
            f"held-out FVE {fve:.3f} is low (< {LOW_FVE}): train longer (--steps), raise --lr, or use a "
            "larger --dict-size / --k"
        )
    if out["still_falling"]:
        warnings.append(
            f"the training loss was still falling at the end ({100 * out['loss_trend']:+.1f} % over the "
            "last tenth of the run): more --steps would likely help"
        )
    out["warnings"] = warnings
    return out


class ConceptTopK:
    """Each concept's ``k`` largest activations seen so far (descending, -inf padded), for the
    per-concept thresholds of the paper's thresholded variant."""

    def __init__(self, dict_size: int, k: int, device: torch.device | str = "cpu") -> None:
        self.k = k
        self.top_mk = torch.full((dict_size, k), -math.inf, device=device)

    @torch.no_grad()
    def update(self, cols_k: torch.Tensor, vals_k: torch.Tensor) -> None:
        """Merge a batch's kept activations (latent index, value) into the running top-k."""
        keep = vals_k > self.top_mk[cols_k, -1]  # only values that can enter a concept's top-k
        if not bool(keep.any()):
            return
        cols, vals = cols_k[keep], vals_k[keep].to(self.top_mk.dtype)
        by_value = stable_argsort(-vals)
        cols, vals = cols[by_value], vals[by_value]
        by_col = stable_argsort(cols)  # stable: values stay descending within each concept
        cols, vals = cols[by_col], vals[by_col]
        uniq, counts = torch.unique_consecutive(cols, return_counts=True)
        starts = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        rank = torch.arange(len(cols), device=cols.device) - starts
        first = rank < self.k
        row = torch.repeat_interleave(torch.arange(len(uniq), device=cols.device), counts)
        new_uk = torch.full((len(uniq), self.k), -math.inf, device=self.top_mk.device)
        new_uk[row[first], rank[first]] = vals[first]
        merged = torch.cat([self.top_mk[uniq], new_uk], 1).topk(self.k, dim=1).values
        self.top_mk[uniq] = merged

    def merge_(self, other_mk: torch.Tensor) -> None:
        """Merge another top-k table (e.g. from another rank)."""
        self.top_mk = torch.cat([self.top_mk, other_mk.to(self.top_mk)], 1).topk(self.k, dim=1).values

    def thresholds(self) -> torch.Tensor:
        """(m,) the k-th largest value; the smallest one seen when fewer than k; +inf when none."""
        kth = self.top_mk[:, -1].clone()
        seen = torch.isfinite(self.top_mk)
        fewer = ~torch.isfinite(kth) & seen.any(1)
        smallest = torch.where(seen, self.top_mk, torch.full_like(self.top_mk, math.inf)).min(1).values
        kth[fewer] = smallest[fewer]
        kth[~seen.any(1)] = math.inf
        return kth


@dataclasses.dataclass(slots=True)
class TrainState:
    """Mutable counters of a run (checkpointed with the weights)."""

    step: int = 0
    samples_seen: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)


class SAETrainer:
    """Trains a :class:`MatryoshkaSAE` on a :class:`FeatureSplit`."""

    def __init__(
        self,
        sae_cfg: SAEConfig,
        cfg: TrainConfig,
        n_train_rows: int,
        *,
        dist: DistInfo | None = None,
        shuffle_rows: int = 0,
    ) -> None:
        """``dist``: this process's place in a data-parallel run; None = the active process group
        (single process when none is initialised). ``shuffle_rows``: rows the shuffle buffer mixes at
        least (0: 8 chunks; ``train-sae --shuffle-images`` sets it for streamed features)."""
        self.sae_cfg, self.cfg = sae_cfg, cfg
        self.dist = dist if dist is not None else distributed.current()
        world = self.dist.world_size
        self.device = distributed.local_device(resolve_device(cfg.device), self.dist)
        self.schedule = schedule = resolve_schedule(cfg, sae_cfg.dict_size, n_train_rows)
        self.batch_size = schedule.batch_size
        for name, rule in schedule.auto.items():
            value = getattr(schedule, "total_steps" if name == "steps" else name)
            log.info("automatic %s = %s: %s", name, value, rule)
        self.local_batch_size = self.batch_size // world
        if self.local_batch_size < 1:
            raise ConfigError(
                f"batch_size={self.batch_size} is smaller than the number of processes ({world})"
            )
        if self.batch_size % world:
            log.warning(
                "batch_size=%d is not divisible by %d processes: the global batch is %d",
                self.batch_size,
                world,
                self.local_batch_size * world,
            )
        # data-parallel: chunks small enough that every rank gets several, even on small datasets
        self.chunk_rows = min(_CHUNK_ROWS, max(1, n_train_rows // (4 * world))) if world > 1 else _CHUNK_ROWS
        self.buffer_chunks = max(1, -(-shuffle_rows // self.chunk_rows)) if shuffle_rows else 8
        """Chunks whose rows are shuffled together."""
        self.sae: MatryoshkaSAE = build_sae(sae_cfg, seed=cfg.seed).to(self.device)
        self.steps_per_epoch = schedule.steps_per_epoch
        self.total_steps = schedule.total_steps
        self.log_every = max(1, min(50, self.total_steps // 100))
        self.dead_window = min(cfg.dead_after_samples, max(n_train_rows, self.batch_size))
        self.aux_k = cfg.aux_k or max(1, sae_cfg.d_in // 2)
        self.threshold_start = min(cfg.threshold_start_step, self.total_steps // 2)
        self.concept_top = ConceptTopK(sae_cfg.dict_size, cfg.concept_threshold_k, self.device)
        fused = self.device.type in ("cpu", "cuda")
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=schedule.lr, fused=fused)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._lr_factor)
        self.since_fired_m = torch.zeros(sae_cfg.dict_size, dtype=torch.long, device=self.device)
        n_terms = len(self.sae.loss_terms)
        if cfg.group_weights is not None and len(cfg.group_weights) != n_terms:
            raise ConfigError(
                f"group_weights has {len(cfg.group_weights)} values for {n_terms} loss terms "
                f"{list(self.sae.loss_terms)}"
            )
        self.group_weights_g: torch.Tensor | None = (  # None: the SAE kind's own weights
            torch.tensor(cfg.group_weights, dtype=torch.float32, device=self.device)
            if cfg.group_weights is not None
            else None
        )
        self.state = TrainState()

    def _lr_factor(self, step: int) -> float:
        warmup = min(self.cfg.warmup_steps, self.total_steps // 10)
        if warmup and step < warmup:
            return (step + 1) / warmup
        if self.cfg.decay_start_fraction is not None:
            start = int(self.cfg.decay_start_fraction * self.total_steps)
            if step >= start:
                return max(0.0, (self.total_steps - step) / max(1, self.total_steps - start))
        return 1.0

    # ------------------------------------------------------------------------------------ step
    def train_step(self, x_bd: torch.Tensor) -> dict[str, float]:
        """One optimisation step on this process's batch (collective in data-parallel runs)."""
        sae, st, world = self.sae, self.state, self.dist.world_size
        x_bd = x_bd.to(self.device, torch.float32, non_blocking=True)
        if st.step == 0 and not st.samples_seen:
            for tensor in sae.init_from_batch(x_bd):  # b_dec (and an MSAE's input normalisation)
                distributed.broadcast_(tensor, src=0)  # no-op in a single process
        out = sae.matryoshka_loss(x_bd, self.group_weights_g)
        fired = torch.zeros_like(self.since_fired_m, dtype=torch.bool)
        fired[out.selection.cols_k] = True
        global_min: torch.Tensor | None = None
        if world > 1:
            fired, global_min = self._reduce_selection(fired, out.selection.vals_k)
        self.since_fired_m += x_bd.shape[0] * world
        self.since_fired_m[fired] = 0
        dead_m = self.since_fired_m >= self.dead_window
        loss, aux = out.loss, torch.zeros((), device=self.device)
        if self.cfg.aux_alpha > 0 and bool(dead_m.any()):
            aux = sae.aux_loss(x_bd, out.residual_bd, dead_m, self.aux_k)
            loss = loss + self.cfg.aux_alpha * aux
        loss.backward()
        total_var = x_bd.var(0, unbiased=False).sum()
        if world > 1:  # averaged gradients, and the step's statistics averaged over ranks
            stats = torch.stack([out.loss.detach(), aux.detach(), out.shell_mse_g[-1], total_var])
            loss_v, aux_v, mse_v, var_v = self._average_grads(stats).tolist()
        sae.remove_parallel_decoder_grad()
        if self.cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        sae.normalize_decoder()
        if world > 1:
            gmin = global_min
            if gmin is not None and st.step >= self.threshold_start and bool(torch.isfinite(gmin)):
                self._update_threshold(gmin)
        elif st.step >= self.threshold_start and out.selection.vals_k.numel():
            self._update_threshold(out.selection.vals_k.min())
        if st.step >= self.threshold_start:  # per rank; merged across ranks at the end of fit
            self.concept_top.update(out.selection.cols_k, out.selection.vals_k)
        st.step += 1
        st.samples_seen += x_bd.shape[0] * world
        if world > 1:
            return {
                "loss": loss_v,
                "aux": aux_v,
                "fve": 1 - mse_v / max(var_v, 1e-12),
                "dead": int(dead_m.sum()),
            }
        return {
            "loss": float(out.loss.detach()),
            "aux": float(aux.detach()),
            "fve": float(1 - out.shell_mse_g[-1] / total_var.clamp_min(1e-12)),
            "dead": int(dead_m.sum()),
        }

    # ------------------------------------------------------------------------------------ data-parallel
    def _reduce_selection(
        self, fired_m: torch.Tensor, vals_k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One MAX all-reduce: the OR of every rank's fired mask and the global min kept activation
        (as the max of ``-min``; +inf when no rank kept anything)."""
        buf = torch.empty(fired_m.numel() + 1, dtype=torch.float32, device=self.device)
        buf[:-1] = fired_m
        buf[-1] = -vals_k.min() if vals_k.numel() else -math.inf
        distributed.all_reduce_(buf, "max")
        return buf[:-1] > 0, -buf[-1]

    def _average_grads(self, stats: torch.Tensor) -> torch.Tensor:
        """Average the gradients (and the step's loss statistics) over ranks with one flat all-reduce."""
        params = list(self.sae.parameters())
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
            + [stats.to(self.device, torch.float32)]
        )
        distributed.all_reduce_(flat, "sum")
        flat /= self.dist.world_size
        offset = 0
        for p in params:
            n = p.numel()
            if p.grad is None:
                p.grad = torch.empty_like(p)
            p.grad.copy_(flat[offset : offset + n].view_as(p))
            offset += n
        return flat[offset:].cpu()

    @torch.no_grad()
    def _sync_replicas(self) -> None:
        """Copy rank 0's weights and threshold to every rank (they should already be equal)."""
        for tensor in [*self.sae.parameters(), self.sae.threshold]:
            distributed.broadcast_(tensor.data, src=0)

    @torch.no_grad()
    def _replicas_agree(self) -> bool:
        """True when every rank holds bitwise the same weights (checksums compared across ranks)."""
        sums = torch.stack([p.double().sum() for p in self.sae.parameters()])
        both = torch.cat([sums, -sums])
        distributed.all_reduce_(both, "max")
        return bool(torch.equal(both[: len(sums)], -both[len(sums) :]))

    def _checkpoint_exists(self, checkpoint: Path) -> bool:
        """Whether to resume; every rank must see the same answer (the file lives on shared storage)."""
        exists = checkpoint.exists()
        if self.dist.world_size == 1:
            return exists
        flags = distributed.all_reduce_(torch.tensor([int(exists), -int(exists)]), "max")
        if int(flags[0]) != -int(flags[1]):
            raise CheckpointError(
                f"training checkpoint {checkpoint} is visible to some processes but not to others; "
                "the output folder must be on storage shared by all ranks"
            )
        return exists

    def _rank_positions(self) -> list[list[int]]:
        """Every rank's (epoch, batch_in_epoch): their data streams advance independently."""
        pos = torch.zeros(self.dist.world_size, 2, dtype=torch.int64)
        pos[self.dist.rank] = torch.tensor([self.state.epoch, self.state.batch_in_epoch])
        return distributed.all_reduce_(pos, "sum").tolist()

    @torch.no_grad()
    def _update_threshold(self, min_act: torch.Tensor) -> None:
        thr = self.sae.threshold
        if thr < 0:
            thr.copy_(min_act)
        else:
            thr.mul_(self.cfg.threshold_beta).add_((1 - self.cfg.threshold_beta) * min_act)

    # ------------------------------------------------------------------------------------ loop
    def fit(
        self,
        train: FeatureSplit,
        *,
        checkpoint: Path | None = None,
        progress: bool = True,
        on_step: Callable[[int, dict[str, float]], None] | None = None,
        shard: tuple[int, int] | None = None,
    ) -> TrainState:
        """Train to ``total_steps``; resumes from ``checkpoint`` when it exists and matches.

        ``shard=(rank, world_size)`` selects this process's chunks; None = from ``self.dist``
        ((0, 1) in a single process). In a data-parallel run every rank calls ``fit`` (all steps are
        collective) and only rank 0 writes the checkpoint.
        """
        if shard is None:
            shard = (self.dist.rank, self.dist.world_size)
        if checkpoint is not None and self._checkpoint_exists(checkpoint):
            self.load_checkpoint(checkpoint)
            log.info("resumed from %s at step %d", checkpoint, self.state.step)
        if self.dist.world_size > 1:
            self._sync_replicas()
        st = self.state
        bar = tqdm(
            total=self.total_steps,
            initial=st.step,
            disable=not progress,
            unit="step",
            desc="train-sae",
            dynamic_ncols=True,
        )
        t0, rows0, last = time.perf_counter(), st.samples_seen, {}
        while st.step < self.total_steps:
            for x_bd in self._epoch_batches(train, shard):
                last = self.train_step(x_bd)
                st.batch_in_epoch += 1
                if on_step is not None:
                    on_step(st.step, last)
                if st.step % self.log_every == 0 or st.step == self.total_steps:
                    st.history.append({"step": st.step, **last})
                    rate = (st.samples_seen - rows0) / max(1e-9, time.perf_counter() - t0)
                    bar.set_postfix(
                        loss=f"{last['loss']:.4g}",
                        fve=f"{last['fve']:.3f}",
                        dead=last["dead"],
                        patches_s=f"{rate:,.0f}",
                    )
                bar.update(1)
                if (
                    checkpoint is not None
                    and self.cfg.checkpoint_every
                    and st.step % self.cfg.checkpoint_every == 0
                ):
                    if self.dist.world_size > 1:
                        positions = self._rank_positions()
                        table = self._merged_concept_table()
                        if self.dist.is_main:
                            self.save_checkpoint(checkpoint, rank_positions=positions, concept_top_mk=table)
                    else:
                        self.save_checkpoint(checkpoint)
                if st.step >= self.total_steps:
                    break
            else:
                st.epoch += 1
                st.batch_in_epoch = 0
        bar.close()
        if self.dist.world_size > 1 and not self._replicas_agree():
            log.warning("data-parallel replicas diverged numerically; rank 0's weights are the result")
        self._set_concept_thresholds()
        self.sae.finish_training()
        return st

    @torch.no_grad()
    def _merged_concept_table(self) -> torch.Tensor:
        """The per-concept top-k over every rank's activations (one MAX all-reduce; collective)."""
        world, m, k = self.dist.world_size, self.sae_cfg.dict_size, self.concept_top.k
        if world == 1:
            return self.concept_top.top_mk
        table = torch.full((world, m, k), -math.inf, device=self.device)
        table[self.dist.rank] = self.concept_top.top_mk
        distributed.all_reduce_(table, "max")
        return table.permute(1, 0, 2).reshape(m, world * k).topk(k, dim=1).values

    @torch.no_grad()
    def _set_concept_thresholds(self) -> None:
        """Every rank's top-k merged, then the SAE's per-concept thresholds."""
        self.concept_top.top_mk = self._merged_concept_table()
        self.sae.concept_threshold_m.copy_(self.concept_top.thresholds())

    def _epoch_batches(self, train: FeatureSplit, shard: tuple[int, int]) -> Iterator[torch.Tensor]:
        """This epoch's batches, skipping those already consumed before a resume."""
        st = self.state
        batches = train.iter_batches(
            self.local_batch_size,
            shuffle=True,
            seed=self.cfg.seed + st.epoch,
            shard=shard,
            chunk_rows=self.chunk_rows,
            buffer_chunks=self.buffer_chunks,
            device=self.device,  # int8 shards move as int8 and are dequantised there
            skip=st.batch_in_epoch,  # a streamed set skips consumed buffers without computing them
        )
        yield from batches
        if st.batch_in_epoch == 0:
            if shard[1] > 1:
                raise ConfigError(
                    f"the training rows of process {shard[0]} of {shard[1]} are fewer than one "
                    f"per-process batch ({self.local_batch_size}); lower --batch-size or use fewer processes"
                )
            raise ConfigError(
                f"the training split has fewer rows than one batch ({self.batch_size}); "
                "lower --batch-size"
            )

    # ------------------------------------------------------------------------------------ checkpoints
    def fingerprint(self) -> str:
        doc = json.dumps([self.sae_cfg.to_json(), dataclasses.asdict(self.cfg)], sort_keys=True, default=str)
        return hashlib.sha256(doc.encode()).hexdigest()[:16]

    def save_checkpoint(
        self,
        path: Path,
        *,
        rank_positions: list[list[int]] | None = None,
        concept_top_mk: torch.Tensor | None = None,
    ) -> None:
        """Write the training state; ``rank_positions``: every rank's (epoch, batch) in a
        data-parallel run (rank 0 writes for all); ``concept_top_mk``: the per-concept top-k merged
        over the ranks (default: this process's)."""
        tensors = {f"sae.{k}": v for k, v in self.sae.state_dict().items()}
        tensors["since_fired_m"] = self.since_fired_m
        tensors["concept_top_mk"] = self.concept_top.top_mk if concept_top_mk is None else concept_top_mk
        for i, p in enumerate(self.sae.parameters()):
            for key, value in self.opt.state.get(p, {}).items():
                tensors[f"adam.{i}.{key}"] = value.reshape(-1) if value.ndim == 0 else value
        meta = {
            "fingerprint": self.fingerprint(),
            "state": json.dumps(dataclasses.asdict(self.state)),
            "sched": json.dumps(self.sched.state_dict()),
        }
        if rank_positions is not None:
            meta["rank_positions"] = json.dumps(rank_positions)
        write_safetensors(path, tensors, meta)

    def load_checkpoint(self, path: Path) -> None:
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"cannot read training checkpoint {path}: {err}") from err
        if meta.get("fingerprint") != self.fingerprint():
            raise CheckpointError(
                f"training checkpoint {path} was written with a different SAE/training config; "
                "delete it to start over or rerun with the original settings"
            )
        self.sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
        self.since_fired_m.copy_(tensors["since_fired_m"])
        if self.dist.rank == 0:  # the merged table of every rank; the others restart empty, so the
            self.concept_top.top_mk.copy_(tensors["concept_top_mk"])  # final merge counts each value once
        else:
            self.concept_top.top_mk.fill_(-math.inf)
        self.opt.zero_grad(set_to_none=True)
        for i, p in enumerate(self.sae.parameters()):
            state = {
                key.split(".", 2)[2]: v.to(self.device)
                for key, v in tensors.items()
                if key.startswith(f"adam.{i}.")
            }
            if state:
                state["step"] = state["step"].reshape(())
                self.opt.state[p] = state
        self.sched.load_state_dict(json.loads(meta["sched"]))
        for group, lr in zip(self.opt.param_groups, self.sched.get_last_lr(), strict=True):
            group["lr"] = lr  # the scheduler restores its counter, not the optimizer's current lr
        self.state = TrainState(**json.loads(meta["state"]))
        positions = json.loads(meta["rank_positions"]) if "rank_positions" in meta else None
        world = self.dist.world_size
        if positions is not None and len(positions) == world:
            self.state.epoch, self.state.batch_in_epoch = positions[self.dist.rank]
        elif positions is not None or world > 1:
            log.warning(
                "checkpoint %s was written by %d process(es), resuming with %d: the resumed epoch "
                "visits the data in another order",
                path,
                len(positions) if positions else 1,
                world,
            )
