"""Shared fixtures: paths to the shared data (skipped cleanly when absent), GPU auto-skip, and a
temporary user cache (atlas verification results) for the whole session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is available")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session", autouse=True)
def isolated_user_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Tests write the atlas verification cache into a temp folder, never into ~/.cache."""
    folder = tmp_path_factory.mktemp("user-cache")
    previous = os.environ.get("INSIGHT_CACHE_DIR")
    os.environ["INSIGHT_CACHE_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("INSIGHT_CACHE_DIR", None)
    else:
        os.environ["INSIGHT_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of ../shared/data; tests that need it skip with a reason when it is missing."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (needed for real-photo tests)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def imagenet_samples(shared_data: Path) -> list[Path]:
    """The 1000 ImageNet sample photos, sorted by file name."""
    folder = shared_data / "imagenet-samples"
    paths = sorted(folder.glob("*.JPEG"))
    if not paths:
        pytest.skip(f"no ImageNet sample photos in {folder}")
    return paths


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models run faster on one thread, especially on a busy shared machine (module-wide)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def fake_gs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # -> tests.hostile.FakeGhostscript
    """A ``gs`` first on PATH that leaves a mark, and a record of every program started (untrusted
    image tests: decoding an EPS must never get that far)."""
    from tests.hostile import FakeGhostscript

    return FakeGhostscript(tmp_path / "fake-gs-bin", monkeypatch)
