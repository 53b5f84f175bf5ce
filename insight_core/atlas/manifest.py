"""The atlas: the one contract between the precompute jobs and the app (see docs/atlas.md).

An atlas is a directory with ``manifest.json`` and the files it lists. The manifest records the
schema version, the backbone, each stage's configuration and input fingerprint, counts, the size
and SHA-256 of every file (roles, and the members of the file sets: thumbnails, the captioner's
bundled LM) and a checksum of itself, so that opening an atlas can tell a missing, stale (changed
after the manifest was written) or corrupt file, or an atlas written by an incompatible version,
with a message that says what to do.

Atlases from the Hub are someone else's files. :meth:`Atlas.open` therefore hashes every file the
explorer reads before anything parses it (remembering results per file identity, see
:mod:`insight_core.atlas.verify`), accepts only relative paths inside the atlas, and hands readers a
path only through :meth:`Atlas.read_path` / :meth:`Atlas.member` / :meth:`Atlas.member_dir`, which
refuse files that were not verified in this open.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import struct
import sys
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, Literal, get_args

from safetensors import SafetensorError

from insight_core.atlas.layout import (
    ATLAS_FILE_SETS,
    ATLAS_FILES,
    EVAL_EXPLORER_ROLES,
    EVAL_FILES,
    EXPLORER_ROLES,
    MANIFEST,
    PROBE_FILES,
    REQUIRED_ROLES,
    AtlasLayout,
    ProbeLayout,
    verification_cache,
)
from insight_core.atlas.manifest_schema import (
    FileEntry,
    ManifestDoc,
    ProbeConfigSummary,
    ProbeMetricsSummary,
    ReportKind,
)
from insight_core.atlas.verify import VerificationCache, sha256_file
from insight_core.errors import CheckpointError, InsightError
from insight_core.io import write_json
from insight_core.schema import validate

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
ATLAS_FORMAT = "insight-atlas"
CHECKSUM_KEY = "manifest_sha256"
"""Manifest key holding the SHA-256 of the rest of the manifest (canonical JSON): catches a manifest
corrupted or edited by hand after it was written (absent from manifests written before it existed)."""

VerifyMode = Literal["read", "all", "sizes"]
"""What :meth:`Atlas.open` hashes: ``"read"`` the files the explorer reads (:data:`EXPLORER_ROLES`
and the file sets), ``"all"`` every listed file, ``"sizes"`` nothing (presence and sizes only)."""


class AtlasError(CheckpointError):
    """The atlas is missing, incomplete, stale, corrupt or from an incompatible schema."""


PARSE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # I/O; PIL and transformers report missing or corrupt files this way too
    ValueError,  # json (JSONDecodeError), UnicodeDecodeError, numpy .npy/.npz headers, pyarrow ArrowInvalid
    KeyError,  # a well-formed file without the entry asked for (npz member, safetensors tensor)
    IndexError,
    EOFError,
    struct.error,
    zipfile.BadZipFile,  # a corrupt .npz
    OverflowError,  # sizes from a crafted header
    MemoryError,
    RecursionError,  # deeply nested JSON
    SafetensorError,
)
"""What parsing an untrusted file raises; :func:`reading` turns these, and only these, into an
:class:`AtlasError`. Programming errors (``AttributeError``, ``NameError``, a ``TypeError`` from a wrong
call, ``AssertionError`` ...) pass through with their traceback. Every pyarrow error counts too
(:func:`_parse_errors`)."""


def _parse_errors(also: tuple[type[BaseException], ...]) -> tuple[type[BaseException], ...]:
    arrow = sys.modules.get("pyarrow")  # not imported: nothing in the block can raise its errors
    return (*PARSE_ERRORS, *also, *((arrow.ArrowException,) if arrow is not None else ()))


@contextlib.contextmanager
def reading(path: Path, what: str, also: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Turn a parse or I/O failure while reading ``path`` into one :class:`AtlasError` naming it.

    Readers of untrusted files (pyarrow, safetensors, numpy, json) raise many types
    (:data:`PARSE_ERRORS`); inside this block each becomes ``AtlasError("PATH: unreadable WHAT (Type:
    message)")``. ``also`` adds the types a particular reader uses for bad input: ``RuntimeError`` for
    FAISS and torch ``load_state_dict``, ``TypeError`` where the block coerces untrusted JSON values
    (``int([1])``). Any other exception is a bug and propagates unchanged.
    """
    try:
        yield
    except AtlasError:
        raise
    except InsightError as err:  # our readers' errors already say what is wrong
        raise AtlasError(str(err) if str(path) in str(err) else f"{path}: {what}: {err}") from err
    except _parse_errors(also) as err:
        text = str(err).strip()
        first = text.splitlines()[0][:300] if text else ""
        raise AtlasError(f"{path}: unreadable {what} ({type(err).__name__}: {first})") from err


def backbone_text_aligned(block: Mapping[str, Any]) -> bool:
    """Whether a manifest ``backbone`` block describes text-aligned features: its ``text_aligned``
    field, else true for CLIP (``kind`` "open_clip" or absent: atlases written before the field)."""
    value = block.get("text_aligned")
    if value is None:
        return block.get("kind", "open_clip") == "open_clip"
    return bool(value)


def _sha256(path: Path) -> str:
    return sha256_file(path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as err:  # UnicodeDecodeError is a ValueError
        raise AtlasError(f"{path}: unreadable JSON ({err})") from err


def manifest_checksum(manifest: dict[str, Any]) -> str:
    """SHA-256 of the manifest without its checksum key, as canonical JSON (sorted keys, ASCII)."""
    body = {k: v for k, v in manifest.items() if k != CHECKSUM_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _entry(layout: AtlasLayout, path: Path) -> dict[str, Any]:
    return {"path": layout.rel(path), "bytes": path.stat().st_size, "sha256": _sha256(path)}


def write_manifest(
    root: str | Path, *, backbone: dict[str, Any] | None = None, extra: dict[str, Any] | None = None
) -> dict:
    """(Re)write ``manifest.json`` describing every known file present in the atlas."""
    layout = AtlasLayout(Path(root))
    files = {}
    for role in ATLAS_FILES:
        path = layout.file(role)
        if path.is_file():
            files[role] = _entry(layout, path)
    missing = [r for r in REQUIRED_ROLES if r not in files]
    if missing:
        raise AtlasError(
            f"{layout.root}: cannot write a manifest, required files missing: "
            f"{[ATLAS_FILES[r] for r in missing]}"
        )
    file_sets = {
        name: {_entry(layout, p)["path"]: _entry(layout, p) for p in layout.file_set_members(name)}
        for name in ATLAS_FILE_SETS
    }
    previous = _read_json(layout.manifest) if layout.manifest.is_file() else {}
    if not isinstance(previous, dict):
        previous = {}
    manifest = {
        "format": ATLAS_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "backbone": backbone if backbone is not None else previous.get("backbone", {}),
        "configs": _configs(layout),
        "counts": _counts(layout),
        "stages": _fingerprints(layout),
        "files": files,
        "file_sets": {name: members for name, members in file_sets.items() if members},
        "probes": _probes(layout),
        "evals": _evals(layout),
        **(extra or {}),
    }
    manifest[CHECKSUM_KEY] = manifest_checksum(manifest)
    write_json(layout.manifest, manifest)
    return manifest


def _fingerprints(layout: AtlasLayout) -> dict[str, str | None]:
    """The ``stages`` block: stage -> the input fingerprint of its record (None when unreadable)."""
    records = {name: rec.parsed() for name, rec in layout.stage_records().items()}
    return {name: None if doc is None else doc.input_fingerprint for name, doc in records.items()}


def _probes(layout: AtlasLayout) -> dict[str, dict[str, Any]]:
    """The ``probes`` block: every complete probe folder, its files (by role) and a summary."""
    out: dict[str, dict[str, Any]] = {}
    for name in layout.probe_names():
        probe = layout.probe_layout(name)
        config = validate(ProbeConfigSummary, _read_json(probe.config), probe.config, AtlasError)
        held = validate(ProbeMetricsSummary, _read_json(probe.metrics), probe.metrics, AtlasError).held_out
        out[name] = {
            "n_classes": len(config.classes),
            "pooling": config.pooling,
            "codes": config.codes,
            "description": config.description,
            "top1": held.get("top1"),
            "top5": held.get("top5"),
            "files": {role: _entry(layout, probe.file(role)) for role in PROBE_FILES},
        }
    return out


def _evals(layout: AtlasLayout) -> dict[str, dict[str, Any]]:
    """The ``evals`` block: every evaluation folder holding files of :data:`EVAL_FILES`, its kind (from
    its report, when readable) and its files by role."""
    out: dict[str, dict[str, Any]] = {}
    for name in layout.evaluations():
        files = layout.evaluation_files(name)
        if not files:
            continue
        kind = None
        if "report" in files:
            with contextlib.suppress(AtlasError):  # listed anyway: the app names it when it reads it
                kind = ReportKind.read(_read_json(files["report"])).kind
        out[name] = {"kind": kind, "files": {role: _entry(layout, path) for role, path in files.items()}}
    return out


def _rewrite_blocks(root: str | Path, blocks: dict[str, Any]) -> dict[str, Any] | None:
    """Replace some blocks (and the stage fingerprints) of an existing manifest; None without one."""
    layout = AtlasLayout(Path(root))
    if not layout.manifest.is_file():
        return None
    manifest = _read_json(layout.manifest)
    if not isinstance(manifest, dict) or manifest.get("format") != ATLAS_FORMAT:
        raise AtlasError(f"{layout.manifest}: not an INSIGHT atlas manifest")
    manifest.update(blocks)
    manifest["stages"] = _fingerprints(layout)
    manifest[CHECKSUM_KEY] = manifest_checksum(manifest)
    write_json(layout.manifest, manifest)
    return manifest


def register_probes(root: str | Path) -> dict[str, Any] | None:
    """Rewrite only the ``probes`` block (and stage fingerprints) of an existing manifest.

    Called by the probe stage after it wrote ``probes/NAME/``; hashes only the probe files. Returns
    the new manifest, or None when the atlas has no manifest yet (``write_manifest`` lists the
    probes when it is written).
    """
    return _rewrite_blocks(root, {"probes": _probes(AtlasLayout(Path(root)))})


def register_evals(root: str | Path) -> dict[str, Any] | None:
    """Rewrite only the ``evals`` block (and stage fingerprints) of an existing manifest.

    Called by the evaluation stages after they wrote ``evals/NAME/``; hashes only the evaluation
    files. Returns the new manifest, or None when the atlas has no manifest yet.
    """
    return _rewrite_blocks(root, {"evals": _evals(AtlasLayout(Path(root)))})


def _configs(layout: AtlasLayout) -> dict:
    out = {}
    if layout.sae_config.is_file():
        out["sae"] = _read_json(layout.sae_config)
    if layout.families.is_file():
        out["families"] = _read_json(layout.families).get("config")
    if layout.stats_meta.is_file():
        out["stats"] = _read_json(layout.stats_meta).get("config")
    vocabulary = layout.stage_record("name").info().get("vocabulary")
    if isinstance(vocabulary, dict):  # which vocabulary named the concepts, and why (concept pages say it)
        out["naming"] = {"vocabulary": vocabulary}
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
    verified: frozenset[str] = frozenset()
    """Paths (relative, posix) whose SHA-256 matched the manifest when this atlas was opened."""

    @classmethod
    def open(
        cls,
        root: str | Path,
        *,
        require: Iterable[str] = REQUIRED_ROLES,
        verify: VerifyMode = "read",
        cache: bool = True,
    ) -> Atlas:
        """Open and validate an atlas.

        Parameters
        ----------
        require
            Roles the manifest must list.
        verify
            ``"read"`` (default): SHA-256 of every file the explorer reads, sizes of the rest;
            ``"all"``: SHA-256 of every listed file (``validate``, ``push``); ``"sizes"``: no hashing.
        cache
            Reuse hashes of unchanged files from the per-user verification cache (and record new ones).

        Raises
        ------
        AtlasError
            Naming the file: missing, unreadable or foreign manifest, schema or checksum mismatch, a
            path outside the atlas, a listed file missing or with another size or hash.
        """
        if verify not in get_args(VerifyMode):
            raise AtlasError(f"verify={verify!r}: expected one of {get_args(VerifyMode)}")
        root = Path(root)
        if not root.is_dir():
            raise AtlasError(f"atlas not found: {root} is not a directory")
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            raise AtlasError(
                f"{root}: no {MANIFEST}; build the atlas with `insight build` "
                "or write one with `insight manifest --atlas ...`"
            )
        manifest, doc = parse_manifest(manifest_path)
        entries = _entries(manifest_path, doc)
        for role in require:
            if role not in doc.files:
                raise AtlasError(
                    f"{root}: the manifest lists no {role!r} file ({ATLAS_FILES.get(role, role)})"
                )
        hashed = {rel for rel, (key, _) in entries.items() if _read_by_explorer(key)}
        store = VerificationCache(verification_cache(root) if cache and verify != "sizes" else None)
        verified = set()
        try:
            for rel, (_, entry) in entries.items():
                hash_it = verify == "all" or (verify == "read" and rel in hashed)
                if _check_file(root, rel, entry, hash_it, store):
                    verified.add(rel)
        finally:
            store.save()
        log.debug("%s: %d files hashed or taken from the cache (%d)", root, len(verified), store.hits)
        return cls(root=root, manifest=manifest, verified=frozenset(verified))

    def path(self, role: str) -> Path:
        """Where a listed role's file is (no check of its contents: see :meth:`read_path`)."""
        entry = self.manifest["files"].get(role)
        if entry is None:
            raise AtlasError(f"{self.root}: this atlas has no {role!r} file ({ATLAS_FILES.get(role, role)})")
        return self.root / entry["path"]

    def read_path(self, role: str) -> Path:
        """The path of a role's file for reading: only if its SHA-256 matched the manifest in this open.

        Raises
        ------
        AtlasError
            The role is not listed, or its file was not hash-verified (opened with ``verify="sizes"``,
            or a role outside :data:`EXPLORER_ROLES` opened with ``verify="read"``).
        """
        path = self.path(role)
        rel = self.manifest["files"][role]["path"]
        if rel not in self.verified:
            raise AtlasError(
                f"{path}: not verified against the manifest's SHA-256 in this open; refusing to read it "
                "(open the atlas with verify='read' or 'all')"
            )
        return path

    def members(self, file_set: str) -> list[str]:
        """Relative paths of the verified files of a file set (see ``ATLAS_FILE_SETS``), sorted."""
        listed = self.manifest.get("file_sets", {}).get(file_set, {})
        return sorted(rel for rel in listed if rel in self.verified)

    def member(self, file_set: str, path: Path) -> Path | None:
        """``path`` if it is a verified member of the file set, else None (unlisted: untrusted)."""
        try:
            rel = Path(path).relative_to(self.root).as_posix()
        except ValueError:
            return None
        listed = self.manifest.get("file_sets", {}).get(file_set, {})
        return self.root / rel if rel in listed and rel in self.verified else None

    def member_dir(self, file_set: str) -> Path:
        """The folder of a file set, for readers that take a whole folder (the bundled LM).

        Raises
        ------
        AtlasError
            A visible file in the folder is not listed in the manifest (it would be read unverified),
            or a listed file was not verified in this open.
        """
        layout = self.layout
        folder = layout.file_set_dir(file_set)
        listed = set(self.manifest.get("file_sets", {}).get(file_set, {}))
        present = {layout.rel(p) for p in layout.file_set_members(file_set)}
        extra = sorted(present - listed)
        if extra:
            raise AtlasError(
                f"{self.root / extra[0]}: in {layout.rel(folder)}/ but not listed in the manifest "
                f"({len(extra)} such file(s)); an unlisted file is untrusted: remove it, or rewrite the "
                "manifest with `insight manifest --atlas ...` if you made it"
            )
        unverified = sorted(listed - self.verified)
        if unverified:
            raise AtlasError(f"{self.root / unverified[0]}: not verified against the manifest in this open")
        return folder

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
        """The files of a listed probe, each hash-verified in this open; :class:`AtlasError` otherwise."""
        if name not in self.probes:
            known = ", ".join(sorted(self.probes)) or "none"
            raise AtlasError(f"{self.root}: no probe named {name!r} in the manifest (probes: {known})")
        files = self.layout.probe_layout(name)
        for role in PROBE_FILES:
            rel = self.layout.rel(files.file(role))
            if rel not in self.verified:
                raise AtlasError(f"{self.root / rel}: not verified against the manifest in this open")
        return files

    @property
    def evaluations(self) -> dict[str, dict[str, Any]]:
        """The evaluations the manifest lists: name -> kind and files (see docs/atlas.md)."""
        return dict(self.manifest.get("evals", {}))

    def evaluation_file(self, name: str, role: str) -> Path | None:
        """A listed evaluation's file for reading (None when the evaluation lists no such file).

        Raises
        ------
        AtlasError
            The evaluation is not listed, or its file was not hash-verified in this open.
        """
        if name not in self.evaluations:
            known = ", ".join(sorted(self.evaluations)) or "none"
            raise AtlasError(
                f"{self.root}: no evaluation named {name!r} in the manifest (evaluations: {known})"
            )
        if role not in self.evaluations[name].get("files", {}):
            return None
        path = self.layout.evaluation_file(name, role)
        if self.layout.rel(path) not in self.verified:
            raise AtlasError(
                f"{path}: not verified against the manifest's SHA-256 in this open; refusing to read it"
            )
        return path

    @property
    def backbone(self) -> dict[str, Any]:
        return dict(self.manifest.get("backbone", {}))  # an object: checked when opened

    @property
    def random_weights(self) -> bool:
        """True when the atlas was built on a random-init backbone (its concepts carry no semantics)."""
        return bool(self.backbone.get("random_weights", False))

    @property
    def text_aligned(self) -> bool:
        """Whether the features share a space with a text encoder (``backbone.text_aligned``; CLIP
        atlases and those written before the field existed: yes; timm backbones such as DINOv2: no).
        Naming, text search, zero-shot, segmentation and captioning need it."""
        return backbone_text_aligned(self.backbone)

    @property
    def backbone_kind(self) -> str:
        """``"open_clip"`` (CLIP; also atlases that do not say) or ``"timm"``."""
        return str(self.backbone.get("kind") or "open_clip")

    def listed_file(self, rel: str) -> Path | None:
        """A file the manifest lists (any block), for reading: its path when it stays inside the atlas
        and its SHA-256 matched (in this open, or hashed now); None when the manifest does not list it.

        Raises
        ------
        AtlasError
            ``rel`` is not a plain relative path, leads outside the atlas, or its content differs.
        """
        manifest_path = self.root / MANIFEST
        rel = _safe_rel(manifest_path, rel)
        doc = validate(ManifestDoc, self.manifest, manifest_path, AtlasError)
        listed = _entries(manifest_path, doc).get(rel)
        if listed is None:
            return None
        if rel not in self.verified:  # size, link and hash checks before anything parses it
            _check_file(self.root, rel, listed[1], True, VerificationCache(None))
        return self.root / rel


def _safe_rel(manifest_path: Path, rel: Any) -> str:
    """A manifest path: relative, posix, inside the atlas (no '..', no absolute or drive paths)."""
    pure = PurePosixPath(rel) if isinstance(rel, str) else None
    if (
        pure is None
        or not rel
        or pure.is_absolute()
        or ".." in pure.parts
        or "\\" in rel
        or ":" in rel
        or pure.as_posix() != rel
    ):
        raise AtlasError(f"{manifest_path}: file path {rel!r} is not a plain relative path inside the atlas")
    return rel


def resolves_inside(root: Path, path: Path) -> bool:
    """Whether ``path`` (links followed) stays inside the atlas ``root``; a Hub cache snapshot
    (``.../snapshots/REV``) may also link into its repo's blob store (``.../blobs``), as
    ``snapshot_download`` lays files out."""
    real = Path(path).resolve()
    bases = [Path(root).resolve()]
    if bases[0].parent.name == "snapshots":
        bases.append(bases[0].parent.parent / "blobs")
    return any(real == base or real.is_relative_to(base) for base in bases)


def parse_manifest(path: Path) -> tuple[dict[str, Any], ManifestDoc]:
    """Read ``manifest.json``: its object and its checked structure (:class:`ManifestDoc`).

    Raises
    ------
    AtlasError
        Naming the file (and the field): unreadable JSON, not an atlas manifest, another schema
        version, a checksum mismatch, or a block of the wrong shape.
    """
    manifest = _read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != ATLAS_FORMAT:
        raise AtlasError(f"{path}: not an INSIGHT atlas manifest")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise AtlasError(
            f"{path}: atlas schema version {version}, this code reads version "
            f"{SCHEMA_VERSION}; rebuild the atlas with this version of the precompute jobs"
        )
    if CHECKSUM_KEY in manifest and manifest[CHECKSUM_KEY] != manifest_checksum(manifest):
        raise AtlasError(
            f"{path}: checksum mismatch: the manifest was corrupted or edited after it was "
            "written; download the atlas again, or rewrite it with `insight manifest --atlas ...`"
        )
    return manifest, validate(ManifestDoc, manifest, path, AtlasError)


def _read_by_explorer(key: str) -> bool:
    """Whether :meth:`Atlas.open` hashes the entry at ``key`` by default: explorer roles, file sets,
    probes and the evaluation files the explorer reads."""
    kind, _, rest = key.partition(":")
    role = rest.rpartition(":")[2]
    return {"role": role in EXPLORER_ROLES, "eval": role in EVAL_EXPLORER_ROLES}.get(kind, True)


def _entries(manifest_path: Path, doc: ManifestDoc) -> dict[str, tuple[str, FileEntry]]:
    """Relative path -> where its entry is (``role:NAME``, ``set:NAME:PATH``, ``probe:NAME:ROLE`` or
    ``eval:NAME:ROLE``) and the entry, after checking each path is where its role says, once."""
    out: dict[str, tuple[str, FileEntry]] = {}

    def add(rel: str | None, entry: FileEntry, key: str, expected: str | None) -> None:
        rel = _safe_rel(manifest_path, rel)
        if expected is not None and rel != expected:
            raise AtlasError(f"{manifest_path}: {key!r} must be at {expected!r}, the manifest says {rel!r}")
        if rel in out:
            raise AtlasError(f"{manifest_path}: {rel!r} is listed twice")
        out[rel] = (key, entry)

    for role, entry in doc.files.items():
        add(entry.path, entry, f"role:{role}", ATLAS_FILES.get(role))
    for name, members in doc.file_sets.items():
        prefix = ATLAS_FILE_SETS[name] + "/"
        for rel, entry in members.items():
            if not rel.startswith(prefix):
                raise AtlasError(f"{manifest_path}: file set {name!r} lists {rel!r} outside {prefix}")
            if entry.path not in (None, rel):
                raise AtlasError(f"{manifest_path}: file set {name!r}: entry {rel!r} names another path")
            add(rel, entry, f"set:{name}:{rel}", None)
    layout = AtlasLayout(manifest_path.parent)
    for name, probe in doc.probes.items():
        if set(probe.files) != set(PROBE_FILES):
            raise AtlasError(
                f"{manifest_path}: probe {name!r} must list exactly the files {sorted(PROBE_FILES)}; rerun "
                f"`insight probe ... --name {name}` or `insight manifest --atlas ...`"
            )
        for role, entry in probe.files.items():
            add(entry.path, entry, f"probe:{name}:{role}", layout.rel(layout.probe_layout(name).file(role)))
    for name, evaluation in doc.evals.items():
        if not evaluation.files or not set(evaluation.files) <= set(EVAL_FILES):
            raise AtlasError(
                f"{manifest_path}: evaluation {name!r} must list some of the files {sorted(EVAL_FILES)}; "
                "rerun the evaluation or `insight manifest --atlas ...`"
            )
        for role, entry in evaluation.files.items():
            add(entry.path, entry, f"eval:{name}:{role}", layout.rel(layout.evaluation_file(name, role)))
    return out


def _check_file(root: Path, rel: str, entry: FileEntry, hash_it: bool, store: VerificationCache) -> bool:
    """Presence and size (always) and SHA-256 (when ``hash_it``); returns whether it was hashed."""
    path = root / rel
    if not resolves_inside(root, path):  # checked before anything reads (or stats) the target
        raise AtlasError(
            f"{path}: a link leading outside the atlas; an atlas may only list its own files"
        )
    if not path.is_file():
        raise AtlasError(
            f"{path}: listed in the manifest but missing; rebuild the atlas (or restore the file)"
        )
    size = path.stat().st_size
    if size != entry.bytes:
        raise AtlasError(
            f"{path}: {size} bytes but the manifest says {entry.bytes}: the file changed after "
            "the manifest was written (stale or corrupt); rerun the stage that writes it"
        )
    if not hash_it:
        return False
    try:
        digest = store.sha256(path)
    except OSError as err:
        raise AtlasError(f"{path}: unreadable ({err})") from err
    if digest != entry.sha256:
        raise AtlasError(
            f"{path}: content hash differs from the manifest (stale or corrupt); download the atlas "
            "again or rerun the stage that writes it"
        )
    return True
