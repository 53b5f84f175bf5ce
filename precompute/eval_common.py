"""What ``eval-ovs`` and ``eval-concepts`` share: inputs, evaluation names, provenance, report helpers."""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from insight_core.atlas import AtlasLayout, EvalLayout, register_evals
from insight_core.atlas.layout import check_name
from insight_core.data.masks import MaskSet, open_masks
from insight_core.device import resolve_device
from insight_core.errors import CheckpointError
from insight_core.models.sae import MatryoshkaSAE
from precompute.common import atlas_manifest, features_manifest, load_atlas_sae

log = logging.getLogger(__name__)

PLUMBING_NOTE = (
    "RANDOM WEIGHTS: the backbone behind these features is a random init, so these numbers only show "
    "that the pipeline runs (plumbing); they say nothing about concept or segmentation quality."
)


@dataclasses.dataclass
class EvalInputs:
    """An evaluation's opened inputs."""

    layout: AtlasLayout
    ev: EvalLayout
    name: str
    masks: MaskSet
    sae: MatryoshkaSAE
    backbone: dict[str, Any]
    """The backbone block of the atlas manifest, else of the features manifest ({} if neither)."""
    random_weights: bool


def default_name(prefix: str, masks: Path, *suffixes: str) -> str:
    """``PREFIX-<masks folder>[-suffix...]``, made safe as a folder name."""
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(masks).resolve().name).strip("-.") or "masks"
    return "-".join([prefix, base, *[s for s in suffixes if s]])[:64]


def open_inputs(atlas: Path, features: Path, masks: Path, name: str, device: str) -> EvalInputs:
    layout = AtlasLayout(atlas)
    ms = open_masks(masks, features)
    sae = load_atlas_sae(layout)
    if sae.cfg.d_in != ms.d:
        raise CheckpointError(
            f"{layout.sae}: SAE d_in={sae.cfg.d_in} but features in {features} have d={ms.d}"
        )
    sae = sae.eval().to(resolve_device(device, what="--device"))
    backbone = atlas_manifest(layout).get("backbone") or {}
    feats_bb = features_manifest(features).get("backbone") or {}
    backbone = backbone or feats_bb
    random_weights = bool(
        backbone.get("random_weights")
        or feats_bb.get("random_weights")
        or str(backbone.get("pretrained")) == "none"
    )
    name = check_name(name, "--name")
    return EvalInputs(layout, layout.eval_layout(name), name, ms, sae, backbone, random_weights)


def concept_names(layout: AtlasLayout, m: int) -> list[str]:
    """Concept names from concepts.parquet, else ``#id``."""
    names = [f"#{i}" for i in range(m)]
    if layout.concepts.is_file():
        table = pq.read_table(layout.concepts, columns=["id", "name"]).to_pydict()
        for i, n in zip(table["id"], table["name"], strict=True):
            if 0 <= int(i) < m:
                names[int(i)] = str(n)
    return names


def device_name(sae: MatryoshkaSAE) -> str:
    dev = sae.W_dec_md.device
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def list_in_manifest(layout: AtlasLayout, name: str, changed: bool = True) -> None:
    """List the evaluation's files in the atlas manifest (its ``evals`` block), so that the app reads
    them: it reads only hash-verified files the manifest lists. ``changed=False`` (the stage was up to
    date) rewrites the block only when the manifest does not list this evaluation yet. Atlases without
    a manifest (planted oracle atlases) are left alone."""
    if not layout.manifest.is_file():
        return
    if not changed and name in (atlas_manifest(layout).get("evals") or {}):
        return
    register_evals(layout.root)


def clear_parts(ev: EvalLayout) -> None:
    ev.partial.unlink(missing_ok=True)
    shutil.rmtree(ev.parts_dir, ignore_errors=True)


def md_cell(value: Any) -> str:
    """A markdown table cell (pipes escaped, numbers short)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return out
