"""Resumable streaming over (features, masks) shards, shared by the OVS and concept-metric evaluations.

An evaluation keeps only accumulators (confusion matrices, sums); after every shard their state is
saved atomically to a hidden safetensors file together with the evaluation's input key and the
position of the next shard. A rerun with the same key starts from there, so an interrupted
evaluation of a large dataset loses at most one shard of work; a different key (other inputs or
settings) starts over. Progress is shown in patches (the throughput unit of ``benchmarks/evals.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open

from insight_core.data.masks import MaskBatch, MaskSet
from insight_core.errors import ConfigError
from insight_core.io import write_safetensors
from insight_core.progress import tqdm

log = logging.getLogger(__name__)


class Resumable(Protocol):
    def state(self) -> dict[str, torch.Tensor]: ...

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None: ...


def copy_state(current: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> None:
    """Copy a saved accumulator state into ``current`` in place (same names, shapes and dtypes)."""
    for name, now in current.items():
        t = saved[name]
        if t.shape != now.shape or t.dtype != now.dtype:
            raise ConfigError(
                f"resume state {name}: {tuple(t.shape)} {t.dtype}, expected {tuple(now.shape)} {now.dtype}"
            )
        now.copy_(t.to(now.device))


@dataclasses.dataclass(frozen=True, slots=True)
class StreamStats:
    """What a streaming pass did."""

    n_images: int
    """Images processed by this call (resumed shards excluded)."""
    n_patches: int
    seconds: float
    resumed_shards: int
    """Shards skipped because an earlier interrupted run had finished them."""

    @property
    def patches_per_s(self) -> float:
        return self.n_patches / self.seconds if self.seconds > 0 else float("nan")


def _resume_point(partial: Path, key: str, acc: Resumable) -> int:
    if not partial.is_file():
        return 0
    try:
        with safe_open(str(partial), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                log.info("%s belongs to other inputs or settings; starting over", partial)
                return 0
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        acc.load_state(tensors)
        return int(meta["next_shard"])
    except (OSError, SafetensorError, KeyError, ValueError) as err:
        log.warning("ignoring unreadable resume state %s (%s); starting over", partial, err)
        return 0


def stream_masks(
    ms: MaskSet,
    acc: Resumable,
    step: Callable[[MaskBatch], None],
    *,
    partial: Path,
    key: str,
    images_per_batch: int = 16,
    progress: bool = True,
    desc: str = "eval",
    on_shard_done: Callable[[int], None] | None = None,
) -> StreamStats:
    """Call ``step`` on every batch of whole images, saving ``acc``'s state after each shard.

    ``on_shard_done(shard_index)`` runs after a shard's last batch and before its state is saved
    (flush per-shard outputs there). The partial file is left in place; delete it once the final
    outputs are written.
    """
    first = _resume_point(partial, key, acc)
    if first:
        log.info("resuming %s after %d of %d shards (%s)", desc, first, len(ms.shards), partial)
    done_patches = sum(s.n_images * s.file.rows_per_unit for s in ms.shards[:first])
    bar = tqdm(
        total=ms.n_patches,
        initial=done_patches,
        unit="patch",
        unit_scale=True,
        desc=desc,
        disable=not progress,
        dynamic_ncols=True,
    )
    n_images = n_patches = 0
    t0 = time.perf_counter()
    current = ms.shards[first].index if first < len(ms.shards) else None
    pos = first

    def finish_shard(shard_index: int, next_pos: int) -> None:
        if on_shard_done is not None:
            on_shard_done(shard_index)
        write_safetensors(partial, acc.state(), {"key": key, "next_shard": str(next_pos)})

    for batch in ms.iter_batches(images_per_batch, first_shard=first):
        if batch.shard != current:
            pos += 1
            finish_shard(current, pos)  # type: ignore[arg-type]
            current = batch.shard
        step(batch)
        b, p = batch.feats_bpd.shape[:2]
        n_images += b
        n_patches += b * p
        bar.update(b * p)
    if current is not None:
        finish_shard(current, len(ms.shards))
    bar.close()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return StreamStats(n_images, n_patches, time.perf_counter() - t0, first)
