"""An atlas from the Hub is someone else's files: any corruption is a clean ``AtlasError`` or a verified load.

Each file of the small demo atlas is corrupted in turn (truncated, bytes flipped, one bit flipped so
JSON stays valid) and the atlas is opened the way the app opens it. Files the app reads (and the
manifest) must fail with an ``AtlasError`` naming them; files it never reads may change without
effect, which one full load with all of them corrupted at once checks against the pristine load.
A second pass rewrites the manifest after corrupting a file (a hash-consistent but broken file, as a
careless or hostile author would publish): every reader must then fail with an ``AtlasError``
naming the file, or load; never a traceback of another type.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from app import state as S
from app.server import load_views
from app.ui import build_ui
from app.views import Views
from insight_core.atlas import Atlas, AtlasError, AtlasLayout, register_evals, write_manifest
from insight_core.io import write_json, write_npz

EXAMPLE = sorted((Path(__file__).resolve().parents[2] / "assets" / "examples").glob("*.jpg"))[0]


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _flip_bytes(data: bytes) -> bytes:
    i = len(data) // 2
    return data[:i] + bytes(b ^ 0xFF for b in data[i : i + 4]) + data[i + 4 :]


def _flip_bit(data: bytes) -> bytes:
    i = len(data) // 3
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]


CORRUPTIONS: dict[str, Callable[[bytes], bytes]] = {
    "truncate": _truncate,
    "flip-bytes": _flip_bytes,
    "flip-bit": _flip_bit,
}


EVAL, OVS = "parts", "ovs-classes"
"""Evaluations added to the copy, so that the files the app reads from them are corrupted too: a
per-concept table and a report (concept pages), an OVS report and class embeddings (Segment tab)."""


def _add_evaluations(root: Path, m: int, d: int) -> None:
    """Small evaluations (``evals/NAME/``), listed in the manifest as the eval stages list theirs."""
    layout = AtlasLayout(root)
    for name in (EVAL, OVS):
        layout.evaluation(name).mkdir(parents=True, exist_ok=True)
    ids = np.arange(0, m, 3)
    table = {"id": ids, "locality": np.linspace(0, 1, len(ids)), "best_label": ["sky"] * len(ids)}
    pd.DataFrame(table).to_parquet(layout.evaluation_file(EVAL, "concepts"))
    write_json(layout.evaluation_file(EVAL, "report"), {"kind": "concepts", "locality": 0.5})
    emb = np.random.default_rng(0).standard_normal((1, 2, d)).astype(np.float32)
    write_npz(layout.evaluation_file(OVS, "class_embeddings"), words=np.array(["sky", "sea"]), embeddings=emb)
    report = {"kind": "ovs", "classes": ["sky", "sea"], "per_class": []}
    write_json(layout.evaluation_file(OVS, "report"), report)
    register_evals(root)


@pytest.fixture(scope="module")
def atlas_copy(app_atlas: Path, app_state, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("untrusted") / "atlas"
    shutil.copytree(app_atlas, root)
    _add_evaluations(root, app_state.m, int(app_state.sae.cfg.d_in))
    return root


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


class corrupted:
    """Replace a file's bytes inside the block, restore them after."""

    def __init__(self, path: Path, how: Callable[[bytes], bytes]) -> None:
        self.path, self.how = path, how

    def __enter__(self) -> bytes:
        self.original = self.path.read_bytes()
        self.path.write_bytes(self.how(self.original))
        return self.original

    def __exit__(self, *exc) -> None:
        self.path.write_bytes(self.original)


def test_every_corrupted_file_is_a_clean_error_or_never_read(atlas_copy: Path) -> None:
    root = atlas_copy
    hashed = Atlas.open(root).verified  # the files the app reads, hash-checked on every open
    assert "index/exemplars.faiss" in hashed
    assert "captioner/lm/model.safetensors" in hashed
    assert "thumbs/0.webp" in hashed
    # the image search index (FAISS), its stored codes, thumbnail list and thumbnails
    assert {"similar/images.faiss", "similar/images.safetensors", "similar/thumbs/index.json",
            "similar/thumbs/0.webp"} <= hashed  # fmt: skip
    # what concept pages read: statistics (histograms, range exemplars, co-occurrence), the SAE's
    # held-out metrics and the evaluations
    assert {"stats/concept_stats.safetensors", "stats/concept_stats.json", "sae_metrics.json",
            f"evals/{EVAL}/concepts.parquet", f"evals/{EVAL}/report.json",
            f"evals/{OVS}/class_embeddings.npz", f"evals/{OVS}/report.json"} <= hashed  # fmt: skip
    cases = errors = 0
    unread: set[str] = set()
    problems: list[str] = []
    for path in _files(root):
        rel = path.relative_to(root).as_posix()
        for name, how in CORRUPTIONS.items():
            cases += 1
            with corrupted(path, how):
                try:
                    Atlas.open(root)
                except AtlasError as err:
                    errors += 1
                    if rel not in str(err):
                        problems.append(f"{rel} ({name}): the error does not name the file: {err}")
                    continue
                except Exception as err:
                    problems.append(f"{rel} ({name}): {type(err).__name__} escaped: {err}")
                    continue
                if rel in hashed or rel == "manifest.json":
                    problems.append(f"{rel} ({name}): read by the app, yet opened without complaint")
                unread.add(rel)
    assert not problems, "\n".join(problems)
    assert cases == 3 * len(_files(root)) > 90
    assert errors >= 3 * (len(hashed) + 1)
    assert not unread & hashed
    assert "manifest.json" not in unread
    Atlas.open(root)  # restored: opens again (from the verification cache)


def test_files_the_app_never_reads_cannot_change_what_it_shows(atlas_copy: Path, app_state) -> None:
    """Every file that is not hash-verified (unlisted, or listed but never read) is corrupted at once,
    keeping sizes (so the manifest check passes): the app loads and answers exactly as before."""
    root = atlas_copy
    hashed = Atlas.open(root).verified
    unread = [p for p in _files(root) if p.relative_to(root).as_posix() not in {*hashed, "manifest.json"}]
    assert {p.relative_to(root).as_posix() for p in unread} >= {"families.json", "sae.json"}
    before = Views(S.load_state(root))  # the copy (with its evaluation), pristine
    originals = {p: p.read_bytes() for p in unread}
    try:
        for p, data in originals.items():
            p.write_bytes(_flip_bytes(data) if data else data)
        state = S.load_state(root)
        after = Views(state)
        for cid in (0, 3, int(app_state.families.parent_e[0]) if app_state.families.n_edges else 1):
            assert after.api_concept(str(cid)) == before.api_concept(str(cid))
            assert after.api_family(str(cid), 3) == before.api_family(str(cid), 3)
        assert after.api_search(app_state.name(2), "name", 5) == before.api_search(
            app_state.name(2), "name", 5
        )
        assert after.api_concept("0")["metrics"][EVAL] == {"locality": 0.0}  # evaluation figures unchanged
        assert set(state.evaluations[OVS].class_embeddings) == {"sky", "sea"}
        assert state.thumbs == app_state.thumbs
        assert state.captioner is not None, state.captioner_note
        assert after.api_caption(str(EXAMPLE))["caption"] == before.api_caption(str(EXAMPLE))["caption"]
    finally:
        for p, data in originals.items():
            p.write_bytes(data)


def test_the_app_reports_a_corrupt_atlas_and_keeps_serving(atlas_copy: Path) -> None:
    path = atlas_copy / "index" / "index.json"
    with corrupted(path, _flip_bytes):
        views = load_views(atlas_copy)
    assert views.state is None
    assert "index/index.json" in views.load_error
    assert "content hash differs" in views.load_error
    build_ui(views, [])  # the page renders with the error banner


def test_faiss_indexes_are_read_only_after_their_hash_matched(
    atlas_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from insight_core.concepts import index as index_module

    calls: list[str] = []
    real = index_module.load_index
    monkeypatch.setattr(index_module, "load_index", lambda p: calls.append(Path(p).name) or real(p))
    with (
        corrupted(atlas_copy / "index" / "exemplars.faiss", _flip_bytes),
        pytest.raises(AtlasError, match=r"exemplars\.faiss: content hash differs"),
    ):
        S.load_state(atlas_copy)
    assert calls == []
    unverified = Atlas.open(atlas_copy, verify="sizes")
    with pytest.raises(AtlasError, match="refusing to read"):
        unverified.read_path("exemplar_index")


# one file per reader: JSON (index and thumbnail metadata, statistics metadata, SAE metrics, an
# evaluation report), parquet (three tables and an evaluation's per-concept table), safetensors (SAE,
# vectors, statistics, adapter, LM weights, image search codes), FAISS (flat indexes, the image
# index), the LM's config and tokenizer, the captioner config
READERS = [
    "index/index.json",
    "thumbs/index.json",
    "concepts.parquet",
    "edges.parquet",
    "exemplars.parquet",
    "sae.safetensors",
    "concept_vectors.safetensors",
    "index/concepts.faiss",
    "index/exemplars.faiss",
    "similar/images.faiss",
    "similar/images.safetensors",
    "similar/thumbs/index.json",
    "stats/concept_stats.safetensors",
    "stats/concept_stats.json",
    "sae_metrics.json",
    f"evals/{EVAL}/report.json",
    f"evals/{EVAL}/concepts.parquet",
    f"evals/{OVS}/class_embeddings.npz",
    "captioner/config.json",
    "captioner/adapter.safetensors",
    "captioner/lm/model.safetensors",
    "captioner/lm/config.json",
    "captioner/lm/tokenizer.json",
]


@pytest.fixture
def fast_load(monkeypatch: pytest.MonkeyPatch, app_state) -> None:
    """load_state without rebuilding the backbone (not part of the atlas) for every case."""
    monkeypatch.setattr(S, "_backbone", lambda atlas: (app_state.backbone, app_state.pool))


@pytest.mark.slow
def test_hash_consistent_garbage_is_one_atlas_error_naming_the_file(
    atlas_copy: Path, fast_load, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = atlas_copy
    real_captioner = S._captioner
    problems: list[str] = []
    try:
        for rel in READERS:
            # the captioner (transformers) is slow to load: only when the case is about it
            monkeypatch.setattr(
                S, "_captioner", real_captioner if rel.startswith("captioner/") else lambda s: None
            )
            for name in ("truncate", "flip-bytes"):
                with corrupted(root / rel, CORRUPTIONS[name]):
                    try:
                        write_manifest(root)  # the corrupt file now matches its manifest entry
                    except AtlasError as err:  # a file the manifest summarises (statistics metadata)
                        if rel not in str(err):
                            problems.append(f"{rel} ({name}): the manifest error does not name it: {err}")
                        continue
                    try:
                        state = S.load_state(root)
                    except AtlasError as err:
                        if rel not in str(err):
                            problems.append(f"{rel} ({name}): the error does not name the file: {err}")
                        continue
                    except Exception as err:
                        problems.append(f"{rel} ({name}): {type(err).__name__} escaped: {err}")
                        continue
                    if rel.startswith("captioner/") and state.captioner is None:
                        assert rel in state.captioner_note or "captioner" in state.captioner_note
                    if rel.startswith("evals/") and rel.split("/")[1] not in state.evaluations:
                        assert rel in state.eval_note  # skipped, with a note naming the file
    finally:
        write_manifest(root)
    assert not problems, "\n".join(problems)
    Atlas.open(root)
