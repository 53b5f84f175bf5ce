"""The app stays a reader of atlases: it never imports ``precompute``; it runs its CLI instead."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from app import server
from app.state import DEFAULT_ATLAS, ENV_ATLAS, AppError

ROOT = Path(__file__).resolve().parents[2]


def _app_sources() -> list[Path]:
    return sorted({*ROOT.glob("app/*.py"), *ROOT.glob("app/**/*.py"), ROOT / "app.py"})


def _imported_modules(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_the_app_never_imports_precompute() -> None:
    sources = _app_sources()
    assert ROOT / "app" / "tabs" / "explain.py" in sources  # the glob reaches the subpackages
    offenders = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in sources
        for name in sorted(_imported_modules(ast.parse(path.read_text(), str(path))))
        if name == "precompute" or name.startswith("precompute.")
    ]
    assert not offenders, f"app modules import precompute (run its CLI instead): {offenders}"


class FakeRun:
    """Stands in for ``subprocess.run``: records the command line, returns ``returncode``."""

    def __init__(self, returncode: int = 0) -> None:
        self.returncode = returncode
        self.calls: list[list[str]] = []

    def __call__(self, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        self.calls.append(list(cmd))
        assert not {"capture_output", "stdout", "stderr"} & set(kw)  # its output goes to the terminal
        return subprocess.CompletedProcess(cmd, self.returncode)


@pytest.fixture
def fake_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeRun:
    monkeypatch.chdir(tmp_path)  # DEFAULT_ATLAS is relative to the working directory
    fake = FakeRun()
    monkeypatch.setattr(server.subprocess, "run", fake)
    return fake


def test_ensure_demo_atlas_runs_the_precompute_cli(fake_run: FakeRun, caplog) -> None:
    with caplog.at_level("WARNING", logger="app.server"):
        assert server.ensure_demo_atlas(None, {}) == DEFAULT_ATLAS
    assert fake_run.calls == [[sys.executable, "-m", "precompute", "demo", "--out", DEFAULT_ATLAS]]
    assert "building the demo atlas first" in caplog.text


def test_ensure_demo_atlas_builds_nothing_when_configured_or_present(
    fake_run: FakeRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert server.ensure_demo_atlas("some/atlas", {}) == "some/atlas"
    monkeypatch.setenv(ENV_ATLAS, "user/atlas")
    assert server.ensure_demo_atlas(None, {ENV_ATLAS: "user/atlas"}) == "user/atlas"
    monkeypatch.delenv(ENV_ATLAS)
    (tmp_path / DEFAULT_ATLAS).mkdir()
    (tmp_path / DEFAULT_ATLAS / "manifest.json").write_text("{}")
    assert server.ensure_demo_atlas(None, {}) == DEFAULT_ATLAS
    assert fake_run.calls == []


def test_a_failed_demo_build_names_the_command_and_exit_code(fake_run: FakeRun) -> None:
    fake_run.returncode = 3
    with pytest.raises(AppError, match=r"precompute demo --out demo_atlas.* exited with code 3"):
        server.ensure_demo_atlas(None, {})
