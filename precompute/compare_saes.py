"""``compare-saes``: dictionary stability between two SAEs (issue 23).

    insight compare-saes A B [--features F] --out X.json

``A``/``B``: atlas directories (their ``sae.safetensors``) or SAE files, of either kind. Decoder
directions are matched one-to-one (Hungarian, by signed cosine): ``mean_matched_cosine`` and the share
of pairs above 0.9; with ``--features``, how often matched latents fire together (Jaccard of their
firing patches). See :mod:`insight_core.evaluation.stability`. Writes ``--out`` (JSON) and prints a
one-line summary to the log.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Annotated, Any

import tyro

from insight_core.data.features import scan_features
from insight_core.device import resolve_device
from insight_core.errors import CheckpointError
from insight_core.evaluation import stability
from insight_core.evaluation.sae_suite import SaeCodec
from insight_core.io import write_json
from insight_core.models.sae import MatryoshkaSAE
from insight_core.models.sae_kinds import load_sae, sae_kind

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class CompareSaesJob:
    """Match two SAEs' decoder directions (and, with features, their firing)."""

    a: Annotated[Path, tyro.conf.Positional]
    """First SAE: an atlas directory or a .safetensors file."""
    b: Annotated[Path, tyro.conf.Positional]
    """Second SAE: an atlas directory or a .safetensors file."""
    out: Path
    """JSON report to write."""
    features: Path | None = None
    """Feature folder to measure co-firing of matched latents on."""
    max_rows: int = 200_000
    """Feature rows (patches) read for co-firing, at most."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda' or 'cuda:N'."""


def sae_path(p: Path) -> Path:
    path = Path(p) / "sae.safetensors" if Path(p).is_dir() else Path(p)
    if not path.is_file():
        raise CheckpointError(
            f"{p}: no SAE there (expected an atlas directory with sae.safetensors, or a file)"
        )
    return path


def run(job: CompareSaesJob) -> dict[str, Any]:
    dev = resolve_device(job.device, what="--device")
    pa, pb = sae_path(job.a), sae_path(job.b)
    sae_a, sae_b = load_sae(pa, device=dev).eval(), load_sae(pb, device=dev).eval()
    matching = stability.match_decoders(sae_a.W_dec_md, sae_b.W_dec_md)
    report: dict[str, Any] = {
        "kind": "sae-stability",
        "a": _describe(pa, sae_a),
        "b": _describe(pb, sae_b),
        **matching.summary(),
    }
    if job.features is not None:
        fs = scan_features(job.features)
        if fs.d != sae_a.cfg.d_in:
            raise CheckpointError(
                f"{job.features}: features have d={fs.d} but the SAEs take d={sae_a.cfg.d_in}"
            )
        rows = fs.all_rows().sample(job.max_rows, seed=0).to(dev)
        ca, cb = SaeCodec(sae_a), SaeCodec(sae_b)
        batches = (rows[s : s + 8192] for s in range(0, len(rows), 8192))
        report["co_firing"] = stability.co_firing(ca.encode, cb.encode, matching, batches)
        report["features"] = str(job.features)
    write_json(job.out, report)
    log.info("compare-saes: mean matched cosine %.4f over %d pairs -> %s",
             report["mean_matched_cosine"], report["n_matched"], job.out)  # fmt: skip
    return report


def _describe(path: Path, sae: MatryoshkaSAE) -> dict[str, Any]:
    return {"path": str(path), "kind": sae_kind(sae), "dict_size": sae.cfg.dict_size, "d_in": sae.cfg.d_in}
