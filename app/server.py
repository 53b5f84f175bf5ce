"""Create and launch the explorer: atlas resolution, state loading, queue and upload limits."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import gradio as gr

from app.state import DEFAULT_ATLAS, ENV_ATLAS, AppError, atlas_location, load_state
from app.ui import build_ui
from app.views import Views
from insight_core.atlas.layout import EXAMPLES_DIR, AtlasLayout
from insight_core.errors import InsightError

log = logging.getLogger(__name__)

MAX_FILE_SIZE = "25mb"
"""Largest upload; images are further limited to 50 MP by the loader (decompression bombs)."""
QUEUE_SIZE = 64
"""Requests waiting at most; more get a 'queue full' error instead of piling up."""
DEFAULT_CONCURRENCY = 4
"""Light requests (concept pages, search, families) served at once."""


def example_images() -> list[str]:
    return sorted(str(p) for p in EXAMPLES_DIR.glob("*.jpg"))


def load_views(location: str | Path) -> Views:
    """Views over the loaded atlas, or over the load error (the app then serves that message)."""
    try:
        return Views(load_state(location))
    except (InsightError, OSError) as err:
        log.error("could not load the atlas %s: %s", location, err)
        return Views(None, f"{location}: {err}")


def demo_command(out: str | Path) -> list[str]:
    """The command line that builds the demo atlas into ``out`` (the ``precompute demo`` CLI)."""
    return [sys.executable, "-m", "precompute", "demo", "--out", str(out)]


def build_demo_atlas(out: str | Path) -> None:
    """Run ``precompute demo`` as a separate process (the app never imports ``precompute``).

    Blocks until it finishes; its output goes to this terminal.

    Raises
    ------
    AppError
        The command failed (names the command and its exit code).
    """
    cmd = demo_command(out)
    proc = subprocess.run(cmd, check=False)
    if proc.returncode != 0:
        raise AppError(
            f"building the demo atlas failed: `{subprocess.list2cmdline(cmd)}` exited with code "
            f"{proc.returncode} (see its output above)"
        )


def ensure_demo_atlas(cli_atlas: str | None, env: dict[str, str]) -> str:
    """The atlas to serve; builds ./demo_atlas first when nothing is configured and it is missing."""
    location = atlas_location(cli_atlas) if cli_atlas or env.get(ENV_ATLAS) else DEFAULT_ATLAS
    if not cli_atlas and not env.get(ENV_ATLAS) and not AtlasLayout(Path(DEFAULT_ATLAS)).manifest.is_file():
        log.warning(
            "no atlas configured and ./%s missing: building the demo atlas first (a few minutes)",
            DEFAULT_ATLAS,
        )
        build_demo_atlas(DEFAULT_ATLAS)
    return location


def create_demo(location: str | Path) -> tuple[gr.Blocks, Views]:
    views = load_views(location)
    demo = build_ui(views, example_images())
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=DEFAULT_CONCURRENCY)
    return demo, views


def launch(demo: gr.Blocks, host: str | None = None, port: int | None = None, **kw) -> None:
    demo.launch(server_name=host, server_port=port, max_file_size=MAX_FILE_SIZE, show_error=True,
                allowed_paths=[str(EXAMPLES_DIR)], **kw)  # fmt: skip
