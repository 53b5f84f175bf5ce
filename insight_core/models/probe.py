"""A sparse linear probe on image-level concept vectors (paper Sec. 4.2, App. B.5, Eq. B.16).

``logits = W c + b`` with ``c = [c_max ; c_mean]`` or one of them (:mod:`insight_core.concepts.pooling`).
Concept ``i`` enters through its max column and its mean column, so its contribution to class ``y``
is ``W[y, i] c_max[i] + W[y, m + i] c_mean[i]``; the logit is the sum of the contributions plus the
bias (none by default, as DN-CBM's probes: then the concepts explain the whole logit).

On disk: ``probe.safetensors`` with ``weight_cf`` (classes x features) and, when used, ``bias_c``;
its metadata holds the config and the class names (JSON).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Json
from torch import nn

from insight_core.errors import CheckpointError, ConfigError
from insight_core.io import read_safetensors, write_safetensors
from insight_core.schema import JsonModel, validate, validate_config

PROBE_FORMAT = "insight-concept-probe"
POOLINGS = ("max", "mean", "both")
"""How patch codes become an image vector: max, mean, or both concatenated ``[max ; mean]``."""
CODES = ("global", "concept")
"""Which SAE codes are pooled: ``"global"`` = the SAE's learned global inference threshold;
``"concept"`` = each concept's own threshold (App. B.5's "thresholded variant", ``--thresholded``)."""


def check_pooling(pooling: str, what: str = "pooling") -> str:
    if pooling not in POOLINGS:
        raise ConfigError(f"{what} must be one of {list(POOLINGS)}, got {pooling!r}")
    return pooling


def check_codes(codes: str, what: str = "codes") -> str:
    if codes not in CODES:
        raise ConfigError(f"{what} must be one of {list(CODES)}, got {codes!r}")
    return codes


def n_features(m: int, pooling: str) -> int:
    """Width of the image vector: m, or 2m for ``both``."""
    return 2 * m if check_pooling(pooling) == "both" else m


ACTIVE_REL_TOL = 0.01
"""A concept is *active* for a class when a weight of it is at least this fraction of the class's
largest weight magnitude (L1 training drives unused weights towards, not exactly to, zero)."""


@dataclasses.dataclass(frozen=True, slots=True)
class ProbeConfig:
    """Shape and inputs of a concept probe."""

    n_concepts: int
    """Concepts m of the SAE the probe reads."""
    n_classes: int
    """Classes."""
    pooling: str = "both"
    """Image vector: 'both' = [max ; mean] (paper Eq. B.15), 'max' or 'mean'."""
    codes: str = "global"
    """SAE codes that were pooled ('global': the SAE's learned global threshold; 'concept': per-concept
    thresholds, the paper's thresholded variant)."""
    bias: bool = False
    """Learn a per-class bias (off by default, as DN-CBM: contributions then sum to the logit)."""

    def __post_init__(self) -> None:
        if self.n_concepts < 1:
            raise ConfigError(f"n_concepts must be >= 1, got {self.n_concepts}")
        if self.n_classes < 2:
            raise ConfigError(f"n_classes must be >= 2, got {self.n_classes}")
        check_pooling(self.pooling, "ProbeConfig.pooling")
        check_codes(self.codes, "ProbeConfig.codes")

    @property
    def n_features(self) -> int:
        return n_features(self.n_concepts, self.pooling)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ProbeMetadata(JsonModel):
    """The safetensors metadata of a probe file (strings, two of them JSON)."""

    format: Literal["insight-concept-probe"]
    config: Json[dict[str, Any]]
    """:class:`ProbeConfig` as JSON."""
    classes: Json[list[str]]
    """Class names in logit order, as a JSON list."""


class ConceptProbe(nn.Module):
    """Linear classifier over pooled concept activations, with named classes."""

    bias_c: torch.Tensor

    def __init__(self, cfg: ProbeConfig, classes: Sequence[str]) -> None:
        super().__init__()
        if len(classes) != cfg.n_classes:
            raise ConfigError(f"{len(classes)} class names for n_classes={cfg.n_classes}")
        if len(set(classes)) != len(classes):
            raise ConfigError("class names must be unique")
        self.cfg = cfg
        self.classes = [str(c) for c in classes]
        self.weight_cf = nn.Parameter(torch.zeros(cfg.n_classes, cfg.n_features))
        if cfg.bias:
            self.bias_c = nn.Parameter(torch.zeros(cfg.n_classes))
        else:
            self.register_buffer("bias_c", torch.zeros(cfg.n_classes))

    @property
    def m(self) -> int:
        return self.cfg.n_concepts

    def forward(self, x_bf: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) of probe inputs (B, F)."""
        if x_bf.shape[-1] != self.cfg.n_features:
            raise ConfigError(f"probe input must have {self.cfg.n_features} features, got {x_bf.shape[-1]}")
        return x_bf @ self.weight_cf.t() + self.bias_c

    def concept_weights(self) -> dict[str, torch.Tensor]:
        """The (C, m) weight block of each pooling: ``{"max": ..., "mean": ...}`` (the ones used)."""
        w = self.weight_cf.detach()
        if self.cfg.pooling == "both":
            return {"max": w[:, : self.m], "mean": w[:, self.m :]}
        return {self.cfg.pooling: w}

    def contributions(
        self, max_bm: torch.Tensor, mean_bm: torch.Tensor, class_b: torch.Tensor
    ) -> torch.Tensor:
        """Per-concept contributions (B, m) to class ``class_b[i]`` of image ``i``: weight x pooled
        activation, summed over the poolings used; ``contributions.sum(1) + bias = logit``."""
        blocks = self.concept_weights()
        out = torch.zeros_like(max_bm, dtype=torch.float32)
        pooled = {"max": max_bm, "mean": mean_bm}
        for kind, w_cm in blocks.items():
            out += w_cm[class_b.to(w_cm.device)].to(out.device) * pooled[kind].float()
        return out

    def concept_importance(self) -> torch.Tensor:
        """(C, m) largest weight magnitude of each concept for each class (over the poolings)."""
        return torch.stack([w.abs() for w in self.concept_weights().values()]).amax(0)

    def active_concepts(self, rel_tol: float = ACTIVE_REL_TOL) -> torch.Tensor:
        """(C, m) bool: concepts the probe uses for each class (see :data:`ACTIVE_REL_TOL`)."""
        imp = self.concept_importance()
        return imp >= rel_tol * imp.amax(1, keepdim=True).clamp_min(1e-30)

    # ----------------------------------------------------------------------------------- I/O
    def save(self, path: str | Path, extra_metadata: dict[str, str] | None = None) -> Path:
        tensors = {"weight_cf": self.weight_cf.detach()}
        if self.cfg.bias:
            tensors["bias_c"] = self.bias_c.detach()
        meta = {
            "format": PROBE_FORMAT,
            "config": json.dumps(self.cfg.to_json()),
            "classes": json.dumps(self.classes),
            **(extra_metadata or {}),
        }
        return write_safetensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> ConceptProbe:
        path = Path(path)
        tensors, meta = read_safetensors(path, "probe weights")
        if meta.get("format") != PROBE_FORMAT:
            raise CheckpointError(f"{path}: not a concept probe (format {meta.get('format')!r})")
        doc = validate(ProbeMetadata, meta, f"{path}: metadata", CheckpointError)
        cfg = validate_config(ProbeConfig, doc.config, f"{path}: metadata config", CheckpointError)
        try:
            probe = cls(cfg, doc.classes)
        except ConfigError as err:  # class names that do not fit the config
            raise CheckpointError(f"{path}: malformed probe metadata ({err})") from err
        weight = tensors.get("weight_cf")
        if weight is None or tuple(weight.shape) != (cfg.n_classes, cfg.n_features):
            got = None if weight is None else tuple(weight.shape)
            raise CheckpointError(
                f"{path}: weight_cf has shape {got}, expected {(cfg.n_classes, cfg.n_features)}"
            )
        with torch.no_grad():
            probe.weight_cf.copy_(weight.float())
            if cfg.bias:
                if "bias_c" not in tensors or tuple(tensors["bias_c"].shape) != (cfg.n_classes,):
                    raise CheckpointError(f"{path}: bias_c missing or of the wrong shape")
                probe.bias_c.copy_(tensors["bias_c"].float())
        if not torch.isfinite(probe.weight_cf).all():
            raise CheckpointError(f"{path}: weights contain NaN or inf")
        return probe.to(device).eval()
