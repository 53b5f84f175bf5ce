"""The atlas: the one contract between the precompute jobs and the app (see docs/atlas.md).

An atlas is a directory with ``manifest.json`` and the files it lists. The manifest records the
schema version, the backbone, each stage's configuration and input fingerprint, counts, and the
size and SHA-256 of every file, so that opening an atlas can tell a missing, stale (changed after
the manifest was written) or corrupt file, or an atlas written by an incompatible version, with a
message that says what to do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from insight_core.atlas.layout import (
    ATLAS_FILES,
    MANIFEST,
    PROBE_FILES,
    REQUIRED_ROLES,
    AtlasLayout,
    ProbeLayout,
    check_name,
)
from insight_core.errors import CheckpointError, ConfigError
from insight_core.io import write_json

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
ATLAS_FORMAT = "insight-atlas"


class AtlasError(CheckpointError):
    """The atlas is missing, incomplete, stale, corrupt or from an incompatible schema."""


def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise AtlasError(f"{path}: unreadable JSON ({err})") from err


def write_manifest(
    root: str | Path, *, backbone: dict[str, Any] | None = None, extra: dict[str, Any] | None = None
) -> dict:
    """(Re)write ``manifest.json`` describing every known file present in the atlas."""
    layout = AtlasLayout(Path(root))
    files = {}
    for role in ATLAS_FILES:
        path = layout.file(role)
        if path.is_file():
            files[role] = _file_entry(layout, path)
    missing = [r for r in REQUIRED_ROLES if r not in files]
    if missing:
        raise AtlasError(
            f"{layout.root}: cannot write a manifest, required files missing: "
            f"{[ATLAS_FILES[r] for r in missing]}"
        )
    previous = _read_json(layout.manifest) if layout.manifest.is_file() else {}
    manifest = {
        "format": ATLAS_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "backbone": backbone if backbone is not None else previous.get("backbone", {}),
        "configs": _configs(layout),
        "counts": _counts(layout),
        "stages": {name: rec.read().get("input_fingerprint") for name, rec in layout.stage_records().items()},
        "files": files,
        "probes": _probes(layout),
        **(extra or {}),
    }
    write_json(layout.manifest, manifest)
    return manifest


def _file_entry(layout: AtlasLayout, path: Path) -> dict[str, Any]:
    return {"path": layout.rel(path), "bytes": path.stat().st_size, "sha256": _sha256(path)}


def _probes(layout: AtlasLayout) -> dict[str, dict[str, Any]]:
    """The ``probes`` block: every complete probe folder, its files (by role) and a summary."""
    out: dict[str, dict[str, Any]] = {}
    for name in layout.probe_names():
        probe = layout.probe_layout(name)
        config = _read_json(probe.config)
        metrics = _read_json(probe.metrics)
        if not isinstance(config, dict) or not isinstance(metrics, dict):
            raise AtlasError(f"{probe.root}: config.json and metrics.json must be JSON objects")
        held = metrics.get("held_out", {}) if isinstance(metrics.get("held_out"), dict) else {}
        out[name] = {
            "n_classes": len(config.get("classes", [])),
            "pooling": config.get("pooling"),
            "codes": config.get("codes"),
            "description": config.get("description", ""),
            "top1": held.get("top1"),
            "top5": held.get("top5"),
            "files": {role: _file_entry(layout, probe.file(role)) for role in PROBE_FILES},
        }
    return out


def register_probes(root: str | Path) -> dict[str, Any] | None:
    """Rewrite only the ``probes`` block (and stage fingerprints) of an existing manifest.

    Called by the probe stage after it wrote ``probes/NAME/``; hashes only the probe files. Returns
    the new manifest, or None when the atlas has no manifest yet (``write_manifest`` lists the
    probes when it is written).
    """
    layout = AtlasLayout(Path(root))
    if not layout.manifest.is_file():
        return None
    manifest = _read_json(layout.manifest)
    if not isinstance(manifest, dict) or manifest.get("format") != ATLAS_FORMAT:
        raise AtlasError(f"{layout.manifest}: not an INSIGHT atlas manifest")
    manifest["probes"] = _probes(layout)
    manifest["stages"] = {
        name: rec.read().get("input_fingerprint") for name, rec in layout.stage_records().items()
    }
    write_json(layout.manifest, manifest)
    return manifest


def _configs(layout: AtlasLayout) -> dict:
    out = {}
    if layout.sae_config.is_file():
        out["sae"] = _read_json(layout.sae_config)
    if layout.families.is_file():
        out["families"] = _read_json(layout.families).get("config")
    if layout.stats_meta.is_file():
        out["stats"] = _read_json(layout.stats_meta).get("config")
    return out


def _counts(layout: AtlasLayout) -> dict:
    counts: dict[str, Any] = {}
    if layout.stats_meta.is_file():
        meta = _read_json(layout.stats_meta)
        counts.update(
            n_concepts=meta.get("m"), n_images=meta.get("n_images"), n_patches=meta.get("n_patches")
        )
    if layout.families.is_file():
        fam = _read_json(layout.families)
        counts.update(n_edges=fam.get("n_edges"), max_depth=fam.get("max_depth"))
    return counts


@dataclasses.dataclass(frozen=True)
class Atlas:
    """An opened, validated atlas directory."""

    root: Path
    manifest: dict[str, Any]

    @classmethod
    def open(
        cls, root: str | Path, *, require: Iterable[str] = REQUIRED_ROLES, verify_hashes: bool = False
    ) -> Atlas:
        """Open and validate; ``verify_hashes`` also re-hashes every file (slow for large atlases)."""
        root = Path(root)
        if not root.is_dir():
            raise AtlasError(f"atlas not found: {root} is not a directory")
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            raise AtlasError(
                f"{root}: no {MANIFEST}; build the atlas with `python -m precompute build` "
                "or write one with `python -m precompute manifest --atlas ...`"
            )
        manifest = _read_json(manifest_path)
        if not isinstance(manifest, dict) or manifest.get("format") != ATLAS_FORMAT:
            raise AtlasError(f"{manifest_path}: not an INSIGHT atlas manifest")
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise AtlasError(
                f"{manifest_path}: atlas schema version {version}, this code reads version "
                f"{SCHEMA_VERSION}; rebuild the atlas with this version of the precompute jobs"
            )
        files = manifest.get("files", {})
        for role in require:
            if role not in files:
                raise AtlasError(
                    f"{root}: the manifest lists no {role!r} file ({ATLAS_FILES.get(role, role)})"
                )
        for role, entry in files.items():
            _check_file(root, role, entry, verify_hashes)
        probes = manifest.get("probes", {})
        if not isinstance(probes, dict):
            raise AtlasError(f"{manifest_path}: 'probes' must be an object of probe name -> entry")
        for name, entry in probes.items():
            _check_probe(root, name, entry, verify_hashes)
        return cls(root=root, manifest=manifest)

    def path(self, role: str) -> Path:
        entry = self.manifest["files"].get(role)
        if entry is None:
            raise AtlasError(f"{self.root}: this atlas has no {role!r} file ({ATLAS_FILES.get(role, role)})")
        return self.root / entry["path"]

    @property
    def layout(self) -> AtlasLayout:
        return AtlasLayout(self.root)

    def has(self, role: str) -> bool:
        return role in self.manifest["files"]

    @property
    def probes(self) -> dict[str, dict[str, Any]]:
        """The probes the manifest lists: name -> summary and files (see docs/atlas.md)."""
        return dict(self.manifest.get("probes", {}))

    def probe_layout(self, name: str) -> ProbeLayout:
        """The files of a listed probe; :class:`AtlasError` naming the known ones otherwise."""
        if name not in self.probes:
            known = ", ".join(sorted(self.probes)) or "none"
            raise AtlasError(f"{self.root}: no probe named {name!r} in the manifest (probes: {known})")
        return self.layout.probe_layout(name)

    @property
    def backbone(self) -> dict[str, Any]:
        return self.manifest.get("backbone", {})

    @property
    def random_weights(self) -> bool:
        """True when the atlas was built on a random-init backbone (its concepts carry no semantics)."""
        return bool(self.backbone.get("random_weights", False))


def _check_probe(root: Path, name: str, entry: Any, verify_hashes: bool) -> None:
    try:
        check_name(name, "probe name")
    except ConfigError as err:
        raise AtlasError(f"{root / MANIFEST}: {err}") from None
    files = entry.get("files") if isinstance(entry, dict) else None
    if not isinstance(files, dict):
        files = {}
    missing = [role for role in PROBE_FILES if role not in files]
    if missing:
        raise AtlasError(
            f"{root / MANIFEST}: probe {name!r} lists no {missing} file(s); rerun "
            f"`python -m precompute probe ... --name {name}` or `python -m precompute manifest`"
        )
    expected = AtlasLayout(root).probe_layout(name)
    for role, file_entry in files.items():
        if role in PROBE_FILES and root / file_entry.get("path", "") != expected.file(role):
            raise AtlasError(
                f"{root / MANIFEST}: probe {name!r} {role} file is {file_entry.get('path')!r}, "
                f"expected {AtlasLayout(root).rel(expected.file(role))!r}"
            )
        _check_file(root, f"probe {name} {role}", file_entry, verify_hashes)


def _check_file(root: Path, role: str, entry: dict, verify_hashes: bool) -> None:
    path = root / entry["path"]
    if not path.is_file():
        raise AtlasError(
            f"{path}: listed in the manifest but missing; rebuild the atlas (or restore the file)"
        )
    size = path.stat().st_size
    if size != entry.get("bytes"):
        raise AtlasError(
            f"{path}: {size} bytes but the manifest says {entry.get('bytes')}: the file changed after "
            "the manifest was written (stale or corrupt); rerun the stage that writes it"
        )
    if verify_hashes and _sha256(path) != entry.get("sha256"):
        raise AtlasError(f"{path}: content hash differs from the manifest (stale or corrupt)")
