"""``push`` / ``pull`` / ``resolve_atlas`` against an in-memory fake of the Hub (no network).

The fake ``HfApi.upload_folder`` selects files with huggingface_hub's own ``filter_repo_objects``
and the same default ignore patterns as the real one, so the tests see what would be uploaded.
"""

from __future__ import annotations

import json
import logging
import shutil
import types
from pathlib import Path

import pytest
from huggingface_hub.utils import LocalEntryNotFoundError, RepositoryNotFoundError, filter_repo_objects

from insight_core.atlas import ATLAS_FILES, MANIFEST, REQUIRED_ROLES, Atlas, AtlasError, hub, write_manifest
from insight_core.atlas.hub import HubError, resolve_atlas
from precompute.__main__ import main

HF_DEFAULT_IGNORE = [".git", ".git/*", "*/.git", "**/.git/**", ".cache/huggingface", ".cache/huggingface/*",
                     "*/.cache/huggingface", "**/.cache/huggingface/**"]  # fmt: skip
UPLOADED = {
    MANIFEST, "sae.safetensors", "concepts.parquet", "edges.parquet", "stats/concept_stats.safetensors",
    "families.json", "dinoiser.safetensors", "dinoiser_metrics.json", "thumbs/7.webp", "thumbs/index.json",
}  # fmt: skip


@pytest.fixture
def atlas_dir(tmp_path: Path) -> Path:
    root = tmp_path / "atlas"
    for role in (*REQUIRED_ROLES, "dinoiser", "thumbnails"):
        path = root / ATLAS_FILES[role]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"content of {role}".encode())
    (root / ATLAS_FILES["families"]).write_text(json.dumps({"config": {}, "n_edges": 3, "max_depth": 1}))
    (root / "dinoiser_metrics.json").write_text("{}")
    (root / "thumbs" / "7.webp").write_bytes(b"RIFF....WEBP")
    # what must stay home: interrupted-run state, atomic-write temp files, caches
    (root / ".train_state.safetensors").write_bytes(b"state")
    (root / "stats" / ".concept_stats.json.abc123.tmp").write_bytes(b"half")
    (root / "cache").mkdir()
    (root / "cache" / "vocab_emb_0123.npz").write_bytes(b"big")
    (root / ".cache" / "huggingface").mkdir(parents=True)
    (root / ".cache" / "huggingface" / "x.metadata").write_text("meta")
    write_manifest(root, backbone={"arch": "ViT-B-16", "pretrained": "none", "random_weights": True})
    return root


class FakeHub:
    """Records calls; ``repos[(repo_type, repo_id, revision)]`` is a folder holding that repo's files."""

    def __init__(self, root: Path) -> None:
        self.root, self.calls, self.repos = root, [], {}

    def _folder(self, repo_id: str, repo_type: str, revision: str | None) -> Path:
        key = (repo_type, repo_id, revision or "main")
        if key not in self.repos:
            self.repos[key] = self.root / repo_type / repo_id / (revision or "main")
        return self.repos[key]

    # -- HfApi ---------------------------------------------------------------------------------
    def create_repo(self, repo_id: str, **kwargs) -> str:
        self.calls.append(("create_repo", repo_id, kwargs))
        self._folder(repo_id, kwargs["repo_type"], None).mkdir(parents=True, exist_ok=True)
        return f"https://huggingface.co/datasets/{repo_id}"

    def create_branch(self, repo_id: str, **kwargs) -> None:
        self.calls.append(("create_branch", repo_id, kwargs))
        main_dir = self._folder(repo_id, kwargs["repo_type"], None)
        shutil.copytree(
            main_dir, self._folder(repo_id, kwargs["repo_type"], kwargs["branch"]), dirs_exist_ok=True
        )

    def upload_folder(
        self, *, repo_id: str, folder_path: str, repo_type: str, revision: str | None, **kwargs
    ):
        self.calls.append(
            ("upload_folder", repo_id, {"repo_type": repo_type, "revision": revision, **kwargs})
        )
        src = Path(folder_path)
        rel = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
        ignore = [*kwargs.get("ignore_patterns", []), *HF_DEFAULT_IGNORE]
        dest = self._folder(repo_id, repo_type, revision)
        for name in filter_repo_objects(rel, ignore_patterns=ignore):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dest / name)
        return types.SimpleNamespace(commit_url=f"https://huggingface.co/datasets/{repo_id}/commit/abc")

    # -- snapshot_download ---------------------------------------------------------------------
    def snapshot_download(
        self, repo_id: str, *, repo_type: str, revision, local_dir, cache_dir, token
    ) -> str:
        self.calls.append(("snapshot_download", repo_id, {"local_dir": local_dir, "cache_dir": cache_dir}))
        src = self.repos.get((repo_type, repo_id, revision or "main"))
        if src is None:
            response = types.SimpleNamespace(headers={}, request=None, status_code=404)
            raise RepositoryNotFoundError(f"404 Client Error: {repo_id}", response=response)
        dest = (
            Path(local_dir) if local_dir else Path(cache_dir) / f"{repo_type}s--{repo_id.replace('/', '--')}"
        )
        shutil.copytree(src, dest, dirs_exist_ok=True)
        return str(dest)

    def uploaded(self, repo_id: str, revision: str | None = None, repo_type: str = "dataset") -> set[str]:
        folder = self.repos[(repo_type, repo_id, revision or "main")]
        return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(hub, "HfApi", lambda token=None: fake)
    monkeypatch.setattr(hub, "snapshot_download", fake.snapshot_download)
    return fake


def test_push_uploads_the_atlas_without_temp_state_or_caches(atlas_dir: Path, fake_hub: FakeHub) -> None:
    assert hub.upload_files(atlas_dir) == sorted(UPLOADED)
    assert main(["push", "--atlas", str(atlas_dir), "--repo-id", "me/atlas", "--private"]) == 0
    assert fake_hub.uploaded("me/atlas") == UPLOADED
    (_, repo_id, create), (_, _, upload) = fake_hub.calls
    assert repo_id == "me/atlas"
    assert create == {"repo_type": "dataset", "private": True, "exist_ok": True, "token": None}
    assert upload["revision"] is None
    assert "ViT-B-16" in upload["commit_message"]


def test_push_to_a_branch_of_a_model_repo(atlas_dir: Path, fake_hub: FakeHub) -> None:
    args = ["push", "--atlas", str(atlas_dir), "--repo-id", "me/atlas", "--repo-type", "model"]
    assert main([*args, "--revision", "v1"]) == 0
    assert [c[0] for c in fake_hub.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert fake_hub.calls[1][2]["branch"] == "v1"
    assert fake_hub.calls[0][2]["private"] is None  # not --private: the Hub's default visibility
    assert fake_hub.uploaded("me/atlas", "v1", "model") == UPLOADED


@pytest.mark.parametrize("damage", ["manifest", "stale", "same_size"])
def test_invalid_atlas_is_never_pushed(atlas_dir: Path, fake_hub: FakeHub, damage: str, caplog) -> None:
    if damage == "manifest":
        (atlas_dir / MANIFEST).unlink()
    elif damage == "stale":
        (atlas_dir / "edges.parquet").write_bytes(b"rewritten after the manifest")
    else:  # same size, other bytes: only the hash check sees it
        (atlas_dir / "sae.safetensors").write_bytes(b"CONTENT OF SAE")
    with pytest.raises(AtlasError):
        hub.push_atlas(atlas_dir, "me/atlas", api=fake_hub)
    assert main(["push", "--atlas", str(atlas_dir), "--repo-id", "me/atlas"]) == 2
    assert str(atlas_dir) in caplog.text
    assert fake_hub.calls == []  # validation comes before any Hub call


def test_pull_downloads_and_validates(atlas_dir: Path, fake_hub: FakeHub, tmp_path: Path) -> None:
    assert main(["push", "--atlas", str(atlas_dir), "--repo-id", "me/atlas"]) == 0
    out = tmp_path / "pulled"
    assert main(["pull", "--repo-id", "me/atlas", "--out", str(out)]) == 0
    atlas = Atlas.open(out, verify="all")
    assert atlas.random_weights
    assert atlas.path("sae").read_bytes() == (atlas_dir / "sae.safetensors").read_bytes()
    assert not (out / "cache").exists()
    assert fake_hub.calls[-1][2]["local_dir"] == str(out)


def test_pulling_a_corrupt_or_missing_repo_is_a_clear_error(
    atlas_dir: Path, fake_hub: FakeHub, tmp_path: Path, caplog
) -> None:
    assert main(["push", "--atlas", str(atlas_dir), "--repo-id", "me/atlas"]) == 0
    remote = fake_hub.repos[("dataset", "me/atlas", "main")]
    (remote / "concepts.parquet").write_bytes(b"truncated")  # e.g. an upload that changed a file
    with pytest.raises(AtlasError, match=r"'me/atlas'.*not a valid atlas.*concepts\.parquet"):
        hub.pull_atlas("me/atlas", tmp_path / "a")
    with caplog.at_level(logging.ERROR):
        assert main(["pull", "--repo-id", "me/nothing", "--out", str(tmp_path / "b")]) == 2
    assert "'me/nothing': not found on the Hub" in caplog.text


def test_resolve_atlas_local_dir_repo_id_and_failures(
    atlas_dir: Path, fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert resolve_atlas(atlas_dir) == atlas_dir
    assert resolve_atlas(str(atlas_dir)) == atlas_dir
    assert fake_hub.calls == []  # a local folder never touches the Hub
    hub.push_atlas(atlas_dir, "me/atlas", api=fake_hub)
    cache = tmp_path / "hf-cache"
    local = resolve_atlas("me/atlas", cache_dir=cache)
    assert local.is_relative_to(cache)
    assert Atlas.open(local).manifest == Atlas.open(atlas_dir).manifest
    with pytest.raises(AtlasError, match="not a directory"):
        resolve_atlas(tmp_path / "no" / "such" / "atlas")  # a path, not a repo id: no Hub lookup
    with pytest.raises(AtlasError, match="is a file"):
        resolve_atlas(atlas_dir / MANIFEST)
    with pytest.raises(HubError, match=r"me/missing is not a local directory.*not found on the Hub"):
        resolve_atlas("me/missing", cache_dir=cache)

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("cannot reach the Hub and nothing is cached")

    monkeypatch.setattr(hub, "snapshot_download", offline)
    with pytest.raises(HubError, match=r"could not be reached \(offline\?\)"):
        resolve_atlas("me/elsewhere")
