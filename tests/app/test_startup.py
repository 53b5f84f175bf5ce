"""Instant first run: the page is served while the demo atlas is built in a separate process (its
progress shown stage by stage), then the atlas loads into the running app: no restart."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from app import server
from app.startup import DemoBuild, Startup, build_progress_html
from app.state import DEFAULT_ATLAS
from app.views import Views
from insight_core.atlas.layout import AtlasLayout
from insight_core.progress import read_progress

ROOT = Path(__file__).resolve().parents[2]

FAKE_BUILD = r"""
import shutil, sys, time
from pathlib import Path
from insight_core.progress import reporting, stage, tqdm
src, out, progress, go = sys.argv[1:5]
print("fake build: every line of output goes to the build log")
with reporting(progress, [("one", "first <stage>"), ("two", "second stage")], job="demo"):
    with stage("one"):
        pass
    with stage("two"), tqdm(total=10, unit="step") as bar:
        bar.update(3)
        deadline = time.time() + 120
        while not Path(go).exists() and time.time() < deadline:  # the test looks at the page meanwhile
            time.sleep(0.05)
        bar.update(7)
    shutil.copytree(src, out)
"""


def fake_build(src: Path, go: Path) -> list[str]:
    """A stand-in for `precompute demo`: reports two stages, waits for ``go`` to exist, copies ``src``."""
    layout = AtlasLayout(Path(DEFAULT_ATLAS))
    return [sys.executable, "-c", FAKE_BUILD, str(src), DEFAULT_ATLAS, str(layout.demo_progress), str(go)]


def _until(check, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # DEFAULT_ATLAS (./demo_atlas) is relative to the working directory
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    return tmp_path


@pytest.mark.slow
def test_page_first_then_build_progress_then_the_atlas(in_tmp: Path, app_atlas: Path, app_state) -> None:
    go = in_tmp / "go"
    demo, views, startup = server.start_app(None, {}, build_command=fake_build(app_atlas, go))
    t0 = time.monotonic()
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            assert r.status == 200
        assert time.monotonic() - t0 < 10
        assert views.state is None
        assert startup.phase == "building"
        def running_two() -> str | None:
            html = startup.status_html()
            running = 'data-stage="two" data-status="running"' in html
            return html if running and "3/10 step" in html else None  # sampled twice a second

        html = _until(running_two, what="stage two running")
        assert "3/10 step" in html
        assert "first &lt;stage&gt;" in html  # labels are escaped
        assert 'data-stage="one" data-status="done"' in html
        with pytest.raises(Exception, match="still being built"):
            views.api_concept("0")
        go.touch()
        assert startup.wait(120), startup.error
        assert views.state is not None
        assert views.state.m == app_state.m
        assert views.api_concept("0")["id"] == 0  # the same app now serves the atlas
        assert "data-insight-ready" in startup.status_html()  # the page reloads itself
        report = read_progress(AtlasLayout(Path(DEFAULT_ATLAS)).demo_progress)
        assert report.status == "done"
        log = AtlasLayout(Path(DEFAULT_ATLAS)).demo_build_log.read_text()
        assert "every line of output goes to the build log" in log
    finally:
        go.touch()
        startup.close()
        demo.close()


def test_a_failed_build_is_shown_with_its_log(in_tmp: Path) -> None:
    cmd = [sys.executable, "-c", "import sys; print('no photos <found>'); sys.exit(3)"]
    views = Views(None)
    startup = Startup(views, DEFAULT_ATLAS, DemoBuild(DEFAULT_ATLAS, cmd), poll_s=0.05).begin()
    assert not startup.wait(60)
    assert startup.phase == "failed"
    assert "exited with code 3" in startup.error
    assert views.load_error == startup.error
    html = startup.status_html()
    assert "no photos &lt;found&gt;" in html  # the log tail, escaped
    assert "insight-msg insight-error" in html


def test_a_missing_atlas_is_reported_and_the_app_keeps_serving(in_tmp: Path) -> None:
    views = Views(None)
    startup = Startup(views, in_tmp / "nope").begin()
    assert startup.phase in ("loading", "failed")
    assert not startup.wait(60)
    assert "not a directory" in startup.error
    assert "not a directory" in startup.status_html()


HOLD_LOCK = r"""
import sys, time
from insight_core.locks import holding
with holding(sys.argv[1], "a demo build"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_start_follows_a_build_already_running(in_tmp: Path) -> None:
    """An earlier app start left its build running (killed app): it holds the build lock, so this start
    follows it and never starts a second build; it ends when the holder does."""
    layout = AtlasLayout(Path(DEFAULT_ATLAS))
    cmd = [sys.executable, "-c", HOLD_LOCK, str(layout.demo_lock)]
    holder = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == b"held"
        build = DemoBuild(DEFAULT_ATLAS, [sys.executable, "-c", "raise SystemExit(9)"])
        build.start()
        assert build.attached
        assert build.proc is None
        assert build.poll() is None
        holder.kill()
        holder.wait()
        assert build.poll() == 1  # the lock is free and no manifest was left: failed
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_progress_file_naming_a_live_process_does_not_attach(in_tmp: Path) -> None:
    """After a reboot or PID reuse the PID in a progress file left "running" names an unrelated live
    process: with the build lock free, the app starts its own build instead of waiting on it."""
    unrelated = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        layout = AtlasLayout(Path(DEFAULT_ATLAS))
        layout.demo_work_dir.mkdir(parents=True)
        for pid in (unrelated.pid, os.getpid()):
            layout.demo_progress.write_text(
                f'{{"kind": "job", "job": "demo", "status": "running", "pid": {pid}}}\n'
            )
            build = DemoBuild(DEFAULT_ATLAS, [sys.executable, "-c", "raise SystemExit(9)"])
            build.start()
            assert not build.attached
            assert build.proc is not None
            assert build.proc.wait(60) == 9
            assert build.poll() == 9
    finally:
        unrelated.kill()
        unrelated.wait()


def test_progress_panel_without_a_report_yet() -> None:
    html = build_progress_html(None, None, time.time() - 5)
    assert "starting" in html
    assert "python -m precompute demo" in html
