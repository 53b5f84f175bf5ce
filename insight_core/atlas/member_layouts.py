"""Layouts of the sub-folders inside an atlas: the captioner (``captioner/``), each probe
(``probes/NAME/``) and each evaluation (``evals/NAME/``), with the roles of their files.

Part of :mod:`insight_core.atlas.layout` (which re-exports every name here): the only place the
file names of these folders are spelled.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, overload

from insight_core.errors import ConfigError


class Under:
    """A layout attribute that is a path below the layout's ``root``, computed on access:
    ``config = Under("config.json")``; ``Under(role="sae")`` is the path of a file role, through the
    layout's ``file(role)`` (its role table spells the name)."""

    def __init__(self, rel: str = "", *, role: str | None = None) -> None:
        self.rel, self.role = rel, role

    @overload
    def __get__(self, obj: None, owner: type) -> Under: ...
    @overload
    def __get__(self, obj: object, owner: type | None = None) -> Path: ...
    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return self
        return obj.file(self.role) if self.role is not None else obj.root / self.rel


@dataclasses.dataclass(frozen=True, slots=True)
class CaptionerLayout:
    """A captioner folder (``ATLAS/captioner/``; its dense baseline is the same layout in ``dense/``)."""

    root: Path

    CONFIG = "config.json"
    ADAPTER = "adapter.safetensors"
    LM_DIR = "lm"
    METRICS = "metrics.json"

    config = Under(CONFIG)
    adapter = Under(ADAPTER)
    lm_dir = Under(LM_DIR)
    """The bundled LM + tokenizer (``save_pretrained``), when fine-tuned or local."""
    metrics = Under(METRICS)

    @property
    def dense(self) -> CaptionerLayout:
        """The dense-backbone baseline captioner."""
        return CaptionerLayout(self.root / "dense")

    cache_dir = Under(".cache")
    """fp16 feature caches of the training job (hidden: not uploaded, not needed by the app)."""

    @property
    def tiny_lm_dir(self) -> Path:
        """The offline test LM built from the training captions (``--lm tiny``)."""
        return self.cache_dir / "tiny_lm"

    def split_cache(self, split: str) -> tuple[Path, Path, Path]:
        """A split's cached dense features, SAE reconstructions (``.npy``) and their key (JSON)."""
        prefix = self.cache_dir / split
        return (prefix.with_name(f"{split}_dense.npy"), prefix.with_name(f"{split}_insight.npy"),
                prefix.with_name(f"{split}_key.json"))  # fmt: skip


@dataclasses.dataclass(frozen=True, slots=True)
class ProbeLayout:
    """A probe folder (``ATLAS/probes/NAME/``): a linear classifier on pooled concept activations."""

    root: Path

    WEIGHTS = "probe.safetensors"
    CONFIG = "config.json"
    METRICS = "metrics.json"

    @property
    def name(self) -> str:
        return self.root.name

    weights = Under(WEIGHTS)
    """The probe weights (safetensors) with its config and classes in the metadata."""
    config = Under(CONFIG)
    """Classes, pooling, codes, training settings, data summary (readable JSON)."""
    metrics = Under(METRICS)
    """Held-out top-1/top-5, per-class accuracy, active concepts per class, the sweep."""

    def file(self, role: str) -> Path:
        """The path of a probe file role (see :data:`PROBE_FILES`)."""
        try:
            return self.root / PROBE_FILES[role]
        except KeyError:
            raise ConfigError(f"unknown probe file role {role!r} (known: {sorted(PROBE_FILES)})") from None


PROBE_FILES: dict[str, str] = {
    "weights": ProbeLayout.WEIGHTS,
    "config": ProbeLayout.CONFIG,
    "metrics": ProbeLayout.METRICS,
}
"""Role -> file name inside a probe folder; the manifest's ``probes`` block lists each probe's files
by these roles (all three are required for a probe to be listed)."""


@dataclasses.dataclass(frozen=True, slots=True)
class EvalLayout:
    """One evaluation folder (``ATLAS/evals/NAME/``, written by ``eval-ovs`` or ``eval-concepts``)."""

    root: Path

    REPORT_JSON = "report.json"
    REPORT_MD = "report.md"
    CONCEPTS = "concepts.parquet"
    PER_CLASS = "per_class.parquet"
    SEGMENTS = "segments.parquet"
    CLASS_EMBEDDINGS = "class_embeddings.npz"
    LEVELS = "levels.parquet"

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    report_json = Under(REPORT_JSON)
    """Summary figures, settings and inputs (``kind``: ``"ovs"`` or ``"concepts"``)."""
    report_md = Under(REPORT_MD)
    """The same figures as a markdown table."""
    concepts = Under(CONCEPTS)
    """Per-concept results: an ``id`` column and one column per metric (concept metrics: images,
    impurity, best label and its IoU); the app's concept pages show them."""
    per_class = Under(PER_CLASS)
    """Per class (OVS) or per label (concept metrics) figures."""
    segments = Under(SEGMENTS)
    """OVS: one row per predicted segment with its top concept contributions."""
    class_embeddings = Under(CLASS_EMBEDDINGS)
    """OVS: the class text embeddings used (the ``--vocab-embeddings`` ``.npz`` format)."""
    levels = Under(LEVELS)
    """sae-pareto: one row per sparsity level (rule, k, L0, FVE, dead fraction, MSE, on_frontier),
    ready to plot."""
    partial = Under(".partial.safetensors")
    """Accumulators after the last finished shard, to resume an interrupted run (hidden)."""
    parts_dir = Under(".parts")
    """Per-shard pieces of a table written while streaming (hidden; joined at the end)."""

    def part(self, shard: int) -> Path:
        return self.parts_dir / f"part_{shard:05d}.parquet"

    def file(self, role: str) -> Path:
        """The path of an evaluation file role (see :data:`EVAL_FILES`)."""
        try:
            return self.root / EVAL_FILES[role]
        except KeyError:
            known = sorted(EVAL_FILES)
            raise ConfigError(f"unknown evaluation file role {role!r} (known: {known})") from None


EVAL_FILES: dict[str, str] = {
    "report": EvalLayout.REPORT_JSON,
    "report_md": EvalLayout.REPORT_MD,
    "concepts": EvalLayout.CONCEPTS,
    "per_class": EvalLayout.PER_CLASS,
    "segments": EvalLayout.SEGMENTS,
    "class_embeddings": EvalLayout.CLASS_EMBEDDINGS,
    "levels": EvalLayout.LEVELS,
}
"""Role -> file name inside an evaluation folder (``evals/NAME/``); the manifest's ``evals`` block lists
each evaluation's files present by these roles (at least one of them)."""
