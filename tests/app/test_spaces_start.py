"""The app started the way a Hugging Face Space starts it: ``python app.py`` with the Gradio server
address in the environment and the atlas in ``$INSIGHT_ATLAS`` (README front matter: app_file)."""

from __future__ import annotations

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

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.read()


@pytest.mark.slow
def test_python_app_py_serves_with_spaces_environment(app_atlas: Path, tmp_path: Path) -> None:
    from insight_core.atlas.spaces import front_matter

    app_file = front_matter((ROOT / "README.md").read_text(encoding="utf-8"))["app_file"]
    port = _free_port()
    env = {**os.environ, "INSIGHT_ATLAS": str(app_atlas), "GRADIO_SERVER_NAME": "127.0.0.1",
           "GRADIO_SERVER_PORT": str(port), "SPACE_ID": "me/insight-explorer",
           "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(ROOT)}  # fmt: skip
    log = tmp_path / "space.log"
    with log.open("wb") as out:
        # cwd without ./demo_atlas: the atlas must come from $INSIGHT_ATLAS, nothing is built
        proc = subprocess.Popen([sys.executable, str(ROOT / app_file)], cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline, status = time.monotonic() + 300, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status, _ = _get(f"http://127.0.0.1:{port}/")
                break
            except OSError:
                time.sleep(2)
        assert status == 200, f"app did not come up (exit {proc.poll()}):\n{log.read_text()[-3000:]}"
        _, body = _get(f"http://127.0.0.1:{port}/gradio_api/info")
        assert "/family" in json.loads(body)["named_endpoints"]
        # the page is served at once; the atlas loads in the background (app/startup.py)
        while time.monotonic() < deadline and "atlas ready" not in log.read_text() and proc.poll() is None:
            time.sleep(1)
        text = log.read_text()
        assert f"loaded atlas {app_atlas}" in text
        assert "building the demo atlas" not in text
        assert not (tmp_path / "demo_atlas").exists()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
