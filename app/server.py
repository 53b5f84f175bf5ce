"""Create and launch the explorer: atlas resolution, startup (build/load in the background), queue and
upload limits."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import gradio as gr

from app.exports import CacheConfig, ExportStore
from app.startup import DemoBuild, Startup, demo_command
from app.state import DEFAULT_ATLAS, ENV_ATLAS, atlas_location, load_state
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

__all__ = ["create_demo", "demo_command", "example_images", "launch", "load_views", "start_app"]


def example_images() -> list[str]:
    return sorted(str(p) for p in EXAMPLES_DIR.glob("*.jpg"))


def load_views(location: str | Path, cache: CacheConfig | None = None) -> Views:
    """Views over the loaded atlas, or over the load error (the app then serves that message)."""
    exports = ExportStore(cache)
    try:
        return Views(load_state(location), exports=exports)
    except (InsightError, OSError) as err:
        log.error("could not load the atlas %s: %s", location, err)
        return Views(None, f"{location}: {err}", exports)


def needs_demo_build(cli_atlas: str | None, env: Mapping[str, str]) -> bool:
    """True when no atlas is configured and ./demo_atlas has no manifest (missing or half built)."""
    configured = bool(cli_atlas or env.get(ENV_ATLAS))
    return not configured and not AtlasLayout(Path(DEFAULT_ATLAS)).manifest.is_file()


def _queued(demo: gr.Blocks) -> gr.Blocks:
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=DEFAULT_CONCURRENCY)
    return demo


def start_app(
    cli_atlas: str | None,
    env: Mapping[str, str],
    build_command: Sequence[str] | None = None,
    cache: CacheConfig | None = None,
) -> tuple[gr.Blocks, Views, Startup]:
    """The page at once; the atlas (built first by ``precompute demo`` in a separate process when
    nothing is configured and ./demo_atlas is missing) loads in the background.

    ``build_command`` replaces the demo build's command line (tests); ``cache``: how long downloads
    and Gradio's cached files live (default: :meth:`CacheConfig.from_env`).
    """
    location = atlas_location(cli_atlas) if cli_atlas or env.get(ENV_ATLAS) else DEFAULT_ATLAS
    build = DemoBuild(DEFAULT_ATLAS, build_command) if needs_demo_build(cli_atlas, env) else None
    views = Views(None, exports=ExportStore(cache or CacheConfig.from_env(env)))
    startup = Startup(views, location, build).begin()
    return _queued(build_ui(views, example_images(), startup)), views, startup


def create_demo(location: str | Path, cache: CacheConfig | None = None) -> tuple[gr.Blocks, Views]:
    """The explorer over an atlas loaded now, before the page is served (benchmarks, embedding)."""
    views = load_views(location, cache)
    return _queued(build_ui(views, example_images())), views


LAUNCH_OPTIONS: dict = {"max_file_size": MAX_FILE_SIZE, "show_error": False,
                        "allowed_paths": [str(EXAMPLES_DIR)]}  # fmt: skip
"""``Blocks.launch`` options of the served app. ``show_error=False``: an exception no handler caught
reaches the browser as a bare "Error" (its text may hold server paths; the log has it); our own
messages are ``gr.Error`` s, which Gradio always shows (``app.components``)."""


def launch(demo: gr.Blocks, host: str | None = None, port: int | None = None, **kw) -> None:
    demo.launch(server_name=host, server_port=port, **LAUNCH_OPTIONS, **kw)
