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

import http.server
import json
import os
import re
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
import torch

from app import state as S
from app.server import load_views
from app.ui import build_ui
from app.views import Views
from insight_core.atlas import Atlas, AtlasError, AtlasLayout, register_evals, write_manifest
from insight_core.atlas.manifest import CHECKSUM_KEY, manifest_checksum
from insight_core.atlas.trust import ENV_TRUST
from insight_core.errors import InsightError
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


# --- an atlas names weights: only built-in tags, GPT-2 or its own listed files (issue 19, item 3) ---

_OPENED: list[str] | None = None
"""Paths Python opens while a test records them (an audit hook: catches ``open``, ``torch.load``...)."""


def _audit(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and args and isinstance(args[0], str | bytes | os.PathLike):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # for the whole session (hooks cannot be removed); records only when asked


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: ClassVar[list[str]] = []

    def _any(self) -> None:
        self.seen.append(f"{self.command} {self.path}")
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = do_POST = _any

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def loopback_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[list[str]]:
    """A loopback 'Hub' that records every request (404 to all), as ``HF_ENDPOINT``, online, with an
    empty Hub cache: any download an atlas could trigger shows up in the list."""
    import huggingface_hub.constants as hf

    seen: list[str] = []
    handler = type("Handler", (_Recorder,), {"seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv(ENV_TRUST, raising=False)
    monkeypatch.setattr(hf, "ENDPOINT", url)
    monkeypatch.setattr(hf, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    try:
        yield seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def model_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Calls of the loaders that fetch or read weights (open_clip, timm, torch.load), and every path
    Python opens, recorded while the test runs."""
    import open_clip
    import timm

    global _OPENED
    calls: list[str] = []

    def record(name: str, real):
        return lambda *a, **k: calls.append(f"{name} {a[:1]}") or real(*a, **k)

    monkeypatch.setattr(open_clip, "create_model", record("open_clip.create_model", open_clip.create_model))
    monkeypatch.setattr(timm, "create_model", record("timm.create_model", timm.create_model))
    monkeypatch.setattr(torch, "load", record("torch.load", torch.load))
    _OPENED = []
    try:
        yield calls
    finally:
        _OPENED = None


def _opened() -> list[str]:
    return list(_OPENED or [])


def _forget_opened() -> None:
    if _OPENED is not None:
        _OPENED.clear()


@pytest.fixture
def hostile(app_atlas: Path, tmp_path: Path) -> Path:
    """A fresh copy of the app atlas to make hostile (hashes and checksum kept consistent)."""
    root = tmp_path / "hostile"
    shutil.copytree(app_atlas, root, ignore=shutil.ignore_patterns(".cache"))  # caches: never listed
    return root


def _edit_backbone(root: Path, **fields) -> None:
    """Change the manifest's backbone block and re-seal it (what an author controlling the atlas can do)."""
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["backbone"] = {**manifest["backbone"], **fields}
    manifest[CHECKSUM_KEY] = manifest_checksum(manifest)
    path.write_text(json.dumps(manifest))


def _edit_captioner_lm(root: Path, lm: str) -> None:
    """Name another LM in the captioner config (and drop the bundled one), then rewrite the manifest."""
    config = AtlasLayout(root).captioner.config
    doc = json.loads(config.read_text())
    doc["config"]["lm"] = lm
    config.write_text(json.dumps(doc))
    shutil.rmtree(AtlasLayout(root).captioner.lm_dir)
    write_manifest(root)


def _outside_weights(root: Path) -> Path:
    """A weights file beside (outside) the atlas: a pickle the app must never open."""
    path = root.parent / "outside.pt"
    torch.save({"state_dict": {}}, path)
    return path


def _unlisted_copy(root: Path) -> str:
    """A weights file inside the atlas folder that its manifest does not list."""
    shutil.copy(_outside_weights(root), root / "weights.pt")
    return "weights.pt"


HOSTILE = {
    # case: (edit of the atlas, the field the error must name)
    "pretrained-absolute-path": (lambda r: _edit_backbone(r, pretrained=str(_outside_weights(r))),
                                 "backbone.pretrained"),
    "pretrained-relative-escape": (lambda r: _edit_backbone(r, pretrained=f"../{_outside_weights(r).name}"),
                                   "backbone.pretrained"),
    "pretrained-unlisted-file-inside": (lambda r: _edit_backbone(r, pretrained=_unlisted_copy(r)),
                                        "backbone.pretrained"),
    "pretrained-hub-repo": (lambda r: _edit_backbone(r, pretrained="hf-hub:evil-org/evil-clip"),
                            "backbone.pretrained"),
    "arch-hub-repo": (lambda r: _edit_backbone(r, arch="hf-hub:evil-org/evil-clip"), "backbone.arch"),
    "timm-hub-repo": (lambda r: _edit_backbone(r, kind="timm", arch="hf-hub:evil-org/evil-vit",
                                               pretrained="hub", text_aligned=False), "backbone.arch"),
    "timm-outside-file": (lambda r: _edit_backbone(r, kind="timm", arch="vit_small_patch16_224",
                                                   pretrained=str(_outside_weights(r)), text_aligned=False),
                          "backbone.pretrained"),
    "lm-hub-repo": (lambda r: _edit_captioner_lm(r, "evil-org/evil-lm"), "config.lm"),
    "lm-outside-folder": (lambda r: _edit_captioner_lm(r, str(r.parent)), "config.lm"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_atlas_is_refused_before_any_outside_file_or_request(
    case: str, hostile: Path, loopback_hub: list[str], model_calls: list[str]
) -> None:
    edit, field = HOSTILE[case]
    edit(hostile)
    Atlas.open(hostile)  # hashes and checksum are consistent: only the names are hostile
    model_calls.clear()
    _forget_opened()
    with pytest.raises(AtlasError, match=re.escape(field)) as err:
        S.load_state(hostile)
    assert "--trust-atlas-weights" in str(err.value)
    assert loopback_hub == [], "the atlas made the app send requests"
    assert model_calls == [], "a model was built from the atlas's names"
    beside = hostile.parent.resolve()  # the outside weights, the LM folder named: all beside the atlas
    touched = [p for p in _opened() if Path(p).resolve().is_relative_to(beside)
               and not Path(p).resolve().is_relative_to(hostile.resolve())]  # fmt: skip
    assert touched == []
    views = load_views(hostile)  # the app serves the refusal instead of crashing
    assert views.state is None
    assert field in views.load_error


def test_trust_restores_loading_what_the_atlas_names(
    hostile: Path, loopback_hub: list[str], model_calls: list[str], monkeypatch: pytest.MonkeyPatch, app_state
) -> None:
    """The same hostile names with the operator's opt-in: the loaders get them (a request for the LM
    repo, the outside weights file opened), as before the check existed."""
    monkeypatch.setattr(S, "_backbone", lambda atlas: (app_state.backbone, app_state.pool))
    _edit_captioner_lm(hostile, "evil-org/evil-lm")
    state = S.load_state(hostile, trust_weights=True)
    assert state.captioner is None
    assert "evil-org/evil-lm" in state.captioner_note  # no such repo on the loopback Hub
    assert any("evil-org/evil-lm" in r for r in loopback_hub)
    monkeypatch.setenv(ENV_TRUST, "1")  # the environment variable does the same
    loopback_hub.clear()
    assert S.load_state(hostile).captioner is None
    assert loopback_hub


def test_trust_lets_the_backbone_read_a_named_outside_file(
    hostile: Path, loopback_hub: list[str], model_calls: list[str]
) -> None:
    outside = _outside_weights(hostile)
    _edit_backbone(hostile, pretrained=str(outside))
    with pytest.raises(InsightError, match=r"outside\.pt"):  # an empty checkpoint: no ViT weights in it
        S.load_state(hostile, trust_weights=True)
    assert any(c.startswith("open_clip.create_model") for c in model_calls)
    assert str(outside) in _opened()  # the recorder sees an outside file opened: it can fail


def test_the_papers_tags_and_the_bundled_lm_still_load(
    hostile: Path, loopback_hub: list[str], fast_load, app_state
) -> None:
    """Built-in weights pass the check: the paper's open_clip tag (the backbone itself is not
    downloaded here) and the captioner's bundled LM, which loads without any request."""
    _edit_backbone(hostile, pretrained="laion2b_s34b_b88k", random_weights=False)
    state = S.load_state(hostile)
    assert state.atlas.backbone["pretrained"] == "laion2b_s34b_b88k"
    assert state.captioner is not None, state.captioner_note
    assert loopback_hub == []
    _edit_backbone(hostile, pretrained="openai")
    assert S.load_state(hostile).captioner is not None


def test_a_hostile_hub_atlas_is_refused_by_pull(
    hostile: Path, tmp_path: Path, loopback_hub: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from insight_core.atlas import hub

    _edit_captioner_lm(hostile, "evil-org/evil-lm")
    monkeypatch.setattr(hub, "download_atlas", lambda *a, **k: hostile)  # the Hub's copy of the files
    with pytest.raises(AtlasError, match=r"config\.lm='evil-org/evil-lm'"):
        hub.pull_atlas("someone/atlas", tmp_path / "pulled")
    assert hub.pull_atlas("someone/atlas", tmp_path / "pulled", trust_weights=True).root == hostile
    assert loopback_hub == []


def test_published_files_carry_no_builder_paths(app_atlas: Path) -> None:
    """The test atlas was built from folders outside it (work dir, photos, tiny LM): no file that is
    published (hidden caches are not uploaded) names them."""
    outside = str(app_atlas.parent).encode()
    hidden = [p for p in _files(app_atlas) if any(s.startswith(".") for s in p.relative_to(app_atlas).parts)]
    published = sorted(set(_files(app_atlas)) - set(hidden))
    leaks = [p.relative_to(app_atlas).as_posix() for p in published if outside in p.read_bytes()]
    assert leaks == []
    config = json.loads(AtlasLayout(app_atlas).captioner.config.read_text())
    assert config["config"]["lm"] == "lm"
    assert config["lm_source"] is None
