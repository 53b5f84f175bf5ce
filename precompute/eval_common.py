"""What the evaluation jobs share: inputs, evaluation names, provenance, the skip-if-current check and
the report writing (:class:`EvalRun`), markdown helpers."""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from insight_core.atlas import AtlasLayout, EvalLayout, read_json_dict, register_evals
from insight_core.atlas.layout import check_name
from insight_core.data.features import scan_features
from insight_core.data.masks import MaskSet, open_masks
from insight_core.device import resolve_device
from insight_core.errors import CheckpointError
from insight_core.io import atomic_write, write_json
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


def eval_name(
    given: str | None, prefix: str, path: Path, *suffixes: str, empty: str, stem: bool = False
) -> str:
    """``--name`` (``given``), else ``PREFIX-<path>[-suffix...]`` made safe as a folder name: the input
    folder's name, or with ``stem`` the input file's stem (``empty`` when nothing safe is left)."""
    if given is None:
        base = Path(path).stem if stem else Path(path).resolve().name
        base = re.sub(r"[^A-Za-z0-9_.-]+", "-", base).strip("-.") or empty
        given = "-".join([prefix, base, *[s for s in suffixes if s]])[:64]
    return check_name(given, "--name")


def feature_paths(features: Path) -> list[Path]:
    """The files that hold a feature folder's values, for stage fingerprints: arrays and int8 scales,
    or a streamed folder's image plan (which holds no ``.npy``)."""
    return scan_features(features).paths


def provenance(layout: AtlasLayout, features: Path) -> tuple[dict[str, Any], bool, dict[str, Any]]:
    """The backbone block of the atlas manifest (else of the features manifest; {} if neither),
    whether either records random weights, and the features manifest."""
    feats = features_manifest(features)
    feats_bb = feats.get("backbone") or {}
    backbone = atlas_manifest(layout).get("backbone") or feats_bb
    pretrained_none = str(backbone.get("pretrained")) == "none"
    random_weights = bool(backbone.get("random_weights") or feats_bb.get("random_weights") or pretrained_none)
    return backbone, random_weights, feats


def open_inputs(atlas: Path, features: Path, masks: Path, name: str, device: str) -> EvalInputs:
    layout = AtlasLayout(atlas)
    ms = open_masks(masks, features)
    sae = load_atlas_sae(layout)
    if sae.cfg.d_in != ms.d:
        raise CheckpointError(
            f"{layout.sae}: SAE d_in={sae.cfg.d_in} but features in {features} have d={ms.d}"
        )
    sae = sae.eval().to(resolve_device(device, what="--device"))
    backbone, random_weights, _ = provenance(layout, features)
    return EvalInputs(layout, layout.eval_layout(name), name, ms, sae, backbone, random_weights)


@dataclasses.dataclass(frozen=True, slots=True)
class EvalRun:
    """One evaluation's bookkeeping: its folder ``evals/NAME/``, its stage record ``STAGE.NAME`` and
    the fingerprint of its inputs and settings."""

    layout: AtlasLayout
    stage: str
    name: str
    key: str

    @property
    def ev(self) -> EvalLayout:
        return self.layout.eval_layout(self.name)

    @property
    def is_current(self) -> bool:
        return self.layout.stage_record(f"{self.stage}.{self.name}").is_current(self.key)

    def current_report(self, force: bool) -> dict[str, Any] | None:
        """The report when the evaluation is up to date and not ``force``d (then listed in the
        manifest if it was not yet), else None: the job runs."""
        if force or not self.is_current:
            return None
        log.info("%s is up to date; skipping (use --force to recompute)", self.ev.root)
        list_in_manifest(self.layout, self.name, changed=False)
        return read_json_dict(self.ev.report_json)

    def finish(
        self, report: dict[str, Any], markdown: str, outputs: Sequence[Path] = (), **summary: Any
    ) -> None:
        """Write ``report.json`` and ``report.md``, then the stage record over them and the job's other
        ``outputs`` (already written), then list the evaluation in the atlas manifest."""
        ev = self.ev
        write_json(ev.report_json, report)
        atomic_write(ev.report_md, lambda tmp: tmp.write_text(markdown))
        record = self.layout.stage_record(f"{self.stage}.{self.name}")
        record.write(self.key, [ev.report_json, ev.report_md, *outputs], **summary)
        list_in_manifest(self.layout, self.name)


def write_parquet(path: Path, table: pa.Table) -> Path:
    """``table`` written atomically as parquet; returns ``path``."""
    atomic_write(path, lambda tmp: pq.write_table(table, str(tmp)))
    return path


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
