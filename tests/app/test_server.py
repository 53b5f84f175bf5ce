"""The app stays a reader of atlases: it never imports ``precompute``; it runs its CLI instead. And
``python app.py`` serves the page within seconds, whatever state the atlas is in."""

from __future__ import annotations

import ast
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from app import server
from app.startup import demo_command
from app.state import DEFAULT_ATLAS, ENV_ATLAS

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


def test_the_demo_is_built_by_the_cli_with_a_progress_file() -> None:
    cmd = demo_command("demo_atlas", "w/progress.jsonl")
    assert cmd == [sys.executable, "-m", "precompute", "demo", "--out", "demo_atlas",
                   "--progress-file", "w/progress.jsonl"]  # fmt: skip


def test_a_build_is_needed_only_without_a_configured_or_present_atlas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # DEFAULT_ATLAS is relative to the working directory
    assert server.needs_demo_build(None, {})
    assert not server.needs_demo_build("some/atlas", {})
    assert not server.needs_demo_build(None, {ENV_ATLAS: "user/atlas"})
    (tmp_path / DEFAULT_ATLAS).mkdir()
    assert server.needs_demo_build(None, {})  # half built (no manifest yet): the build resumes it
    (tmp_path / DEFAULT_ATLAS / "manifest.json").write_text("{}")
    assert not server.needs_demo_build(None, {})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_app_py_serves_at_once_and_stops_its_demo_build(tmp_path: Path) -> None:
    """A fresh checkout (no atlas): `python app.py` answers within seconds while `precompute demo`
    runs in a separate process; stopping the app stops that build too (a rerun resumes it)."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop(ENV_ATLAS, None)
    t0 = time.monotonic()
    cmd = [sys.executable, str(ROOT / "app.py"), "--port", str(port), "--host", "127.0.0.1"]
    app = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    progress = tmp_path / f"{DEFAULT_ATLAS}-work" / "progress.jsonl"
    try:
        served = None
        while time.monotonic() - t0 < 60 and served is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    served = time.monotonic() - t0 if r.status == 200 else None
            except OSError:
                time.sleep(0.3)
        assert served is not None, "the page was not served within 60 s"
        assert served < 30, f"the page took {served:.1f} s"
        pid = None
        while time.monotonic() - t0 < 90 and pid is None:  # the build writes its pid once started
            try:
                pid = json.loads(progress.read_text().splitlines()[0])["pid"]
            except (OSError, ValueError, IndexError, KeyError):
                time.sleep(0.3)
        assert pid is not None, "the demo build never reported progress"
        assert pid != app.pid
        assert _alive(pid)
        app.send_signal(signal.SIGTERM)
        out, _ = app.communicate(timeout=30)
        deadline = time.monotonic() + 15
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(pid), "the demo build outlived the app"
        log = out.decode(errors="replace")
        assert "building the demo atlas in the background" in log
        assert "train-sae" not in log  # the build's own output goes to its log file, not the terminal
        assert (tmp_path / f"{DEFAULT_ATLAS}-work" / "build.log").is_file()
    finally:
        if app.poll() is None:
            app.kill()
