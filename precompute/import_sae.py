"""``import-sae``: a foreign SAE checkpoint -> ``ATLAS/sae.safetensors`` + ``sae.json``.

    python -m precompute import-sae --checkpoint 6144_768_TopKReLU_64_RW_False_False_0.0_cc3m.pth --out A
    python -m precompute import-sae --kind matryoshka --checkpoint ae.pt --out A

``--kind msae`` (default): a checkpoint of the public MSAE code (``train.py``'s ``torch.save``; see
:func:`insight_core.models.msae.import_msae_checkpoint`: levels from the file name unless
``--k-levels``, inference level ``--k``). ``--kind matryoshka``: a dictionary_learning ``ae.pt``
(:func:`insight_core.models.sae.import_dictionary_learning`). Foreign files are read with
``torch.load(weights_only=True)``. The later stages (stats, families, name, index) then run on the
atlas as on a trained one; the imported SAE expects the features it was trained on.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from insight_core.atlas import AtlasLayout, fingerprint
from insight_core.errors import ConfigError
from insight_core.models.msae import Weighting, import_msae_checkpoint
from insight_core.models.sae import MatryoshkaSAE, import_dictionary_learning
from insight_core.models.sae_kinds import SaeKindName, sae_kind

log = logging.getLogger(__name__)

STAGE = "import-sae"


@dataclasses.dataclass(frozen=True, slots=True)
class ImportSaeJob:
    """Import a foreign SAE checkpoint into an atlas."""

    checkpoint: Path
    """The foreign checkpoint (MSAE train.py .pth, or dictionary_learning ae.pt)."""
    out: Path
    """Atlas directory to write sae.safetensors and sae.json into."""
    kind: SaeKindName = "msae"
    """'msae' (the public MSAE code) or 'matryoshka' (dictionary_learning's MatryoshkaBatchTopKSAE)."""
    k_levels: tuple[int, ...] = ()
    """msae: the levels it was trained with; empty: from the file name (train.py's doubling rule)."""
    weighting: Weighting | None = None
    """msae: level weighting it was trained with; default: from the file name (RW/UW), else uniform."""
    k: int | None = None
    """msae: inference level; default: the largest level below the dictionary size."""
    force: bool = False
    """Overwrite an existing sae.safetensors."""


def run(job: ImportSaeJob) -> dict:
    layout = AtlasLayout(job.out)
    settings = {"kind": job.kind, "k_levels": list(job.k_levels), "weighting": job.weighting, "k": job.k}
    key = fingerprint([job.checkpoint], {STAGE: settings})
    record = layout.stage_record(STAGE)
    if not job.force and record.is_current(key):
        log.info("%s is up to date with %s; skipping (use --force)", layout.sae, job.checkpoint)
        return {"sae": str(layout.sae), "skipped": True}
    if layout.sae.exists() and not job.force and not record.is_current(key):
        raise ConfigError(f"{layout.sae} exists: pass --force to replace it with {job.checkpoint}")
    sae: MatryoshkaSAE
    if job.kind == "msae":
        sae = import_msae_checkpoint(
            job.checkpoint, k_levels=job.k_levels or None, weighting=job.weighting, k=job.k
        )
    else:
        if job.k_levels or job.weighting or job.k:
            raise ConfigError("--k-levels, --weighting and --k apply to --kind msae only")
        sae = import_dictionary_learning(job.checkpoint)
    layout.root.mkdir(parents=True, exist_ok=True)
    meta = {"imported_from": Path(job.checkpoint).name}  # the file, not the builder's folders
    sae.save(layout.sae, config_path=layout.sae_config, extra_metadata=meta)
    record.write(key, [layout.sae, layout.sae_config], kind=sae_kind(sae))
    log.info("imported %s (%s) -> %s", job.checkpoint, sae_kind(sae), layout.sae)
    return {"sae": str(layout.sae), "kind": sae_kind(sae), "config": sae.cfg.to_json()}
