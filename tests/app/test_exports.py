"""The bounded download store (app/exports.py), alone and through the app's real export handlers.

The handler tests run each Gradio event as the server would (``Blocks.process_api``: preprocess, the
handler, postprocess, which hands returned files to Gradio's cache) with ``$GRADIO_TEMP_DIR`` in a
temporary folder, and count every file left on disk.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from app.exports import EXPORTS_FOLDER, CacheConfig, ExportStore, gradio_cache_dir, safe_name
from insight_core.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parents[2] / "assets" / "examples"


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _age(root: Path, seconds: float) -> None:
    """Make everything under ``root`` look ``seconds`` old (mtime and atime)."""
    old = time.time() - seconds
    for p in [*root.rglob("*"), root]:
        os.utime(p, (old, old))


# -- the store ------------------------------------------------------------------------------------
def test_identical_downloads_share_one_file(tmp_path: Path) -> None:
    store = ExportStore(CacheConfig(root=tmp_path))
    paths = {store.write("activations.json", b'{"a": 1}') for _ in range(100)}
    assert len(paths) == 1
    (path,) = paths
    assert Path(path).name == "activations.json"  # the download keeps its display name
    assert Path(path).read_bytes() == b'{"a": 1}'
    assert _files(tmp_path) == [Path(path)]
    other = {store.write("activations.json", b'{"a": 2}'), store.write("other.json", b'{"a": 1}')}
    assert len(other | paths) == 3  # another content or another name is another download
    assert len(_files(tmp_path)) == 3


def test_a_reused_download_is_fresh_again(tmp_path: Path) -> None:
    store = ExportStore(CacheConfig(root=tmp_path, max_age_s=60))
    path = Path(store.write("a.png", b"png"))
    _age(tmp_path, 3600)
    assert store.write("a.png", b"png") == str(path)  # reused, touched: not swept as old
    assert time.time() - path.stat().st_mtime < 60
    assert store.sweep() == 0
    assert path.is_file()


def test_a_download_deleted_meanwhile_is_written_again(tmp_path: Path) -> None:
    store = ExportStore(CacheConfig(root=tmp_path))
    path = Path(store.write("a.json", b"1"))
    path.unlink()  # e.g. Gradio's own cache sweep
    assert store.write("a.json", b"1") == str(path)
    assert path.read_bytes() == b"1"


def test_old_downloads_are_swept_on_the_next_write(tmp_path: Path) -> None:
    store = ExportStore(CacheConfig(root=tmp_path, max_age_s=600))
    for i in range(20):
        store.write(f"heatmap_{i}.png", bytes([i]) * 10)
    _age(tmp_path, 601)
    fresh = Path(store.write("activations.json", b"{}"))
    assert _files(tmp_path) == [fresh]
    assert store.entries() == [fresh.parent]  # no empty folders left behind either


def test_count_and_size_caps_drop_the_oldest(tmp_path: Path) -> None:
    store = ExportStore(CacheConfig(root=tmp_path, max_files=5, max_bytes=10**6))
    paths = []
    for i in range(12):
        paths.append(Path(store.write(f"f{i}.bin", bytes([i]) * 100)))
        old = time.time() - 100 + i  # distinct ages: f0 oldest
        os.utime(paths[-1].parent, (old, old))
    assert _files(tmp_path) == sorted(paths[-5:])
    sized = ExportStore(CacheConfig(root=tmp_path / "sized", max_bytes=250))
    for i in range(4):
        sized.write(f"g{i}.bin", bytes([i]) * 100)
        old = time.time() - 100 + i
        for p in (tmp_path / "sized").iterdir():
            if (p / f"g{i}.bin").exists():
                os.utime(p, (old, old))
    assert sorted(p.name for p in _files(tmp_path / "sized")) == ["g2.bin", "g3.bin"]
    big = Path(sized.write("big.bin", b"x" * 1000))  # over the cap alone: still served
    assert big.is_file()
    assert _files(tmp_path / "sized") == [big]


@pytest.mark.parametrize(
    ("name", "safe"),
    [("heatmap_12.png", "heatmap_12.png"), ("../../etc/passwd", "passwd"), ("a\\b\\c.json", "c.json"),
     (".hidden", "hidden"), ("my file (1).json", "my_file_1_.json"), ("", "download"), ("..", "download")],
)  # fmt: skip
def test_safe_names(name: str, safe: str) -> None:
    assert safe_name(name) == safe


def test_a_hostile_name_stays_inside_the_store(tmp_path: Path) -> None:
    store = ExportStore(CacheConfig(root=tmp_path / "store"))
    path = Path(store.write("../../escape.json", b"x"))
    assert path.name == "escape.json"
    assert path.parent.parent == (tmp_path / "store").resolve()


def test_cache_config_validation_and_environment() -> None:
    for field in ("max_age_s", "max_files", "max_bytes"):
        with pytest.raises(ConfigError, match=f"CacheConfig.{field}"):
            CacheConfig(**{field: 0})
    assert CacheConfig.from_env({}) == CacheConfig()
    assert CacheConfig.from_env({"INSIGHT_CACHE_MAX_AGE": "120"}).max_age_s == 120
    assert CacheConfig.from_env({"INSIGHT_CACHE_MAX_AGE": "120"}, 30).max_age_s == 30  # the CLI wins
    with pytest.raises(ConfigError, match="INSIGHT_CACHE_MAX_AGE"):
        CacheConfig.from_env({"INSIGHT_CACHE_MAX_AGE": "an hour"})
    assert CacheConfig(max_age_s=7200).delete_cache == (1800, 7200)
    assert CacheConfig(max_age_s=60).delete_cache == (60, 60)
    assert CacheConfig(max_age_s=10**6).delete_cache == (3600, 10**6)


def test_the_default_store_lives_in_gradios_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    assert gradio_cache_dir() == tmp_path.resolve()
    assert ExportStore().root == tmp_path.resolve() / EXPORTS_FOLDER


def test_the_cli_sets_the_max_age(monkeypatch: pytest.MonkeyPatch) -> None:
    from app import cli

    seen: dict[str, Any] = {}
    monkeypatch.setattr(cli, "start_app", lambda *a, **kw: seen.update(kw) or (None, None, _NoStartup()))
    monkeypatch.setattr(cli, "launch", lambda *a, **kw: None)
    monkeypatch.setattr(cli.atexit, "register", lambda fn: None)
    monkeypatch.setattr(cli.signal, "signal", lambda *a: None)
    quiet = SimpleNamespace(setLevel=lambda level: None)  # main() configures logging: not in a test
    monkeypatch.setattr(cli, "logging", SimpleNamespace(basicConfig=lambda **kw: None, WARNING=30, INFO=20,
                                                        getLogger=lambda name: quiet))  # fmt: skip
    assert cli.main(["--atlas", "x", "--cache-max-age", "90"]) == 0
    assert seen["cache"].max_age_s == 90
    with pytest.raises(SystemExit):
        cli.main(["--atlas", "x", "--cache-max-age", "-1"])


class _NoStartup:
    def close(self) -> None:
        pass


# -- through the app's export handlers --------------------------------------------------------------
@pytest.fixture
def app_in_tmp(app_state, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The explorer's Blocks with Gradio's cache in ``tmp_path/gradio``; (demo, views, cache dir)."""
    from app.ui import build_ui
    from app.views import Views

    cache = tmp_path / "gradio"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(cache))
    views = Views(app_state, exports=ExportStore(CacheConfig(max_age_s=600)))
    return build_ui(views, []), views, cache


def _event(demo, name: str, with_inputs: bool):
    return next(f for f in demo.fns.values()
                if getattr(f.fn, "__name__", "") == name and bool(f.inputs) == with_inputs)  # fmt: skip


def _clicks(demo, fn, inputs: list, n: int, state=None) -> list[list[str]]:
    """``n`` clicks on ``fn``'s button, one after the other; per click the paths of the files served."""

    async def go() -> list[list[str]]:
        served = []
        for _ in range(n):
            files, status = (await demo.process_api(fn, inputs, state=state))["data"]
            assert status == "", status
            served.append([f["path"] for f in files])
        return served

    return asyncio.run(go())


def _explained(demo, views):
    """The explain tab's export event and a session whose explanation is the first example photo."""
    from gradio.state_holder import SessionState

    fn = _event(demo, "on_export", with_inputs=True)
    state = SessionState(demo)
    state[fn.inputs[0]._id] = views.explain(str(sorted(EXAMPLES.glob("*.jpg"))[0]))
    return fn, state


@pytest.mark.slow
def test_100_identical_downloads_leave_a_bounded_number_of_files(app_in_tmp) -> None:
    demo, views, cache = app_in_tmp
    assert demo.delete_cache == views.exports.config.delete_cache  # Gradio's own cache is swept too
    fn, state = _explained(demo, views)
    clicks = _clicks(demo, fn, [None, 1, views.n_groups - 1, 0.6, []], 100, state)
    first = clicks[0]
    assert [Path(p).name for p in first][:2] == ["activations.json", "overlay.png"]
    assert len(first) == 3  # the JSON, the overlay and one heatmap
    assert all(c == first for c in clicks)
    assert sorted(str(p) for p in _files(cache) if p.name != "vibe_edit_history") == sorted(first)
    assert all(Path(p).is_relative_to(views.exports.root) for p in first)  # Gradio served them in place


def test_different_downloads_are_swept_after_the_max_age(app_in_tmp) -> None:
    demo, views, cache = app_in_tmp
    fn, state = _explained(demo, views)
    paths = [p for alpha in (0.3, 0.5, 0.7)  # other overlays and heatmaps: other files
             for p in _clicks(demo, fn, [None, 1, views.n_groups - 1, alpha, []], 1, state)[0]]  # fmt: skip
    assert len(views.exports.entries()) == len(set(paths)) > 3
    _age(views.exports.root, 601)
    (latest,) = _clicks(demo, fn, [None, 1, views.n_groups - 1, 0.9, []], 1, state)
    assert sorted(views.exports.entries()) == sorted({Path(p).parent for p in latest})
    assert {str(p) for p in _files(cache)} - {str(cache.resolve() / "vibe_edit_history")} == set(latest)


@pytest.mark.slow
def test_files_from_elsewhere_are_cached_once_by_gradio(app_state, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A store outside Gradio's folder: Gradio copies each file into its cache, by content hash, so
    identical downloads still leave one copy, which the Blocks tracks for its ``delete_cache`` sweep."""
    from gradio.route_utils import delete_files_created_by_app

    from app.ui import build_ui
    from app.views import Views

    cache = tmp_path / "gradio"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(cache))
    views = Views(app_state, exports=ExportStore(CacheConfig(root=tmp_path / "exports", max_age_s=600)))
    demo = build_ui(views, [])
    clicks = _clicks(demo, _event(demo, "on_export", with_inputs=False), [], 100)
    assert [Path(p).name for p in clicks[0]] == ["families.graphml", "families.gexf"]
    assert all(c == clicks[0] for c in clicks)
    assert sorted(str(p) for p in _files(cache) if p.name != "vibe_edit_history") == sorted(clicks[0])
    assert len(_files(tmp_path / "exports")) == 2
    # what delete_cache runs; Gradio ages by ctime, which a test cannot backdate: everything is older
    # than 0 s
    delete_files_created_by_app(demo, 0)
    assert not any(Path(p).exists() for p in clicks[0])
    assert len(_files(tmp_path / "exports")) == 2  # our store keeps its own (swept by their age)
