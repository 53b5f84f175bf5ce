"""The SAE kinds an atlas can hold, and the one function everything downstream loads an SAE with.

=============  ===============================  ==================================================
kind           class / config                   what it is
=============  ===============================  ==================================================
``matryoshka`` :class:`MatryoshkaSAE` /          the paper's Matryoshka BatchTopK SAE: nested
               :class:`SAEConfig`               dictionary groups, learned global threshold
``msae``       :class:`~insight_core.models.    MSAE (arXiv 2502.20578): one group, per-input
               msae.MSAE` / ``MSAEConfig``      TopK at several k levels; inference at the largest
=============  ===============================  ==================================================

Both kinds share one interface (``MSAE`` subclasses ``MatryoshkaSAE``): ``encode`` (batch-independent
codes), ``decode``, ``W_dec_md``/``b_dec_d`` in raw feature units, ``cfg.d_in``/``cfg.dict_size``/
``cfg.group_ends``. A file says its kind in its safetensors metadata (``kind``, or ``format``);
files without one (dictionary_learning names, older atlases) are the Matryoshka kind.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal, get_args

import torch

from insight_core.errors import CheckpointError, ConfigError
from insight_core.models.msae import MSAE, MSAE_FORMAT, MSAEConfig
from insight_core.models.sae import SAE_FORMAT, MatryoshkaSAE, SAEConfig, read_sae_file

SaeKindName = Literal["matryoshka", "msae"]
"""Names of the SAE kinds (``train-sae --kind``)."""


@dataclasses.dataclass(frozen=True, slots=True)
class SaeKind:
    """One registered SAE kind."""

    name: str
    """Registry name (``--kind``; the ``kind`` metadata of its files)."""
    cls: type[MatryoshkaSAE]
    """Model class (``load`` reads its files)."""
    config_cls: type[SAEConfig]
    """Config class (``build_sae`` dispatches on it)."""
    format: str
    """``format`` metadata its files carry."""
    description: str
    """One line for docs and the app."""


SAE_KINDS: dict[str, SaeKind] = {
    "matryoshka": SaeKind(
        "matryoshka", MatryoshkaSAE, SAEConfig, SAE_FORMAT,
        "Matryoshka BatchTopK SAE (INSIGHT, App. B.2): nested dictionary groups, global threshold",
    ),
    "msae": SaeKind(
        "msae", MSAE, MSAEConfig, MSAE_FORMAT,
        "MSAE (arXiv 2502.20578): one dictionary, per-input TopK at several k levels",
    ),
}  # fmt: skip
assert set(SAE_KINDS) == set(get_args(SaeKindName))


def kind_of(path: str | Path) -> str:
    """The kind of an SAE file, from its safetensors metadata (``matryoshka`` when it names none)."""
    path = Path(path)
    _, meta = read_sae_file(path, tensors=False)
    if "kind" in meta:
        kind = meta["kind"]
    else:  # another tool's format tag (e.g. "pt") or none: dictionary_learning names, the BatchTopK kind
        by_format = {k.format: k.name for k in SAE_KINDS.values()}
        kind = by_format.get(meta.get("format", SAE_FORMAT), "matryoshka")
    if kind not in SAE_KINDS:
        raise CheckpointError(
            f"{path}: unknown SAE kind {meta.get('kind') or meta.get('format')!r} "
            f"(known: {sorted(SAE_KINDS)})"
        )
    return kind


def load_sae(path: str | Path, *, device: str | torch.device = "cpu") -> MatryoshkaSAE:
    """Load an SAE file of any registered kind (the one loader of stages, evaluations and the app)."""
    return SAE_KINDS[kind_of(path)].cls.load(path, device=device)


def sae_kind(sae: MatryoshkaSAE) -> str:
    """The registry name of a loaded SAE."""
    for kind in sorted(SAE_KINDS.values(), key=lambda k: k.cls is MatryoshkaSAE):  # subclasses first
        if isinstance(sae, kind.cls):
            return kind.name
    raise ConfigError(f"unregistered SAE class {type(sae).__name__}")


def build_sae(cfg: SAEConfig, *, seed: int | None = 0) -> MatryoshkaSAE:
    """A freshly initialised SAE of the kind its config describes."""
    if isinstance(cfg, MSAEConfig):
        return MSAE(cfg, seed=seed)
    return MatryoshkaSAE(cfg, seed=seed)
