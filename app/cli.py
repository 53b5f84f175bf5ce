"""Command line of the explorer: ``insight-app`` (console script) and ``python app.py`` (Spaces).

    insight-app [--atlas PATH_OR_HUB_REPO] [--host 0.0.0.0] [--port 7860] [--trust-atlas-weights]
                [--cache-max-age SECONDS]

The atlas comes from --atlas, else $INSIGHT_ATLAS, else ./demo_atlas. The page is served at once and
the atlas loads in the background; with nothing configured and no ./demo_atlas, ``insight demo``
builds it first in a separate process while the page shows its progress. Host and port default to
$GRADIO_SERVER_NAME and $GRADIO_SERVER_PORT, which is how Hugging Face Spaces starts the app. See
docs/app.md and docs/spaces.md.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

from app.exports import DEFAULT_MAX_AGE_S, ENV_MAX_AGE, CacheConfig
from app.server import launch, start_app
from app.state import atlas_location
from insight_core.atlas.spaces import preload_hint
from insight_core.atlas.trust import ENV_TRUST
from insight_core.errors import ConfigError

log = logging.getLogger(__name__)

README = Path(__file__).resolve().parents[1] / "README.md"
"""The Space configuration (front matter) when the app runs as a Hugging Face Space."""


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="insight-app", description="INSIGHT concept explorer (Gradio)")
    ap.add_argument(
        "--atlas", default=None, help="atlas folder or Hub repo id (default: $INSIGHT_ATLAS or ./demo_atlas)"
    )
    ap.add_argument(
        "--host", default=os.environ.get("GRADIO_SERVER_NAME"), help="interface to bind (0.0.0.0 for all)"
    )
    ap.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    ap.add_argument(
        "--trust-atlas-weights",
        action="store_true",
        help=f"let the atlas name any backbone/LM weights (local paths, Hub repos); default: only built-in "
        f"open_clip/timm tags, GPT-2 and files the atlas lists (same as ${ENV_TRUST}=1; docs/atlas.md)",
    )
    ap.add_argument(
        "--cache-max-age", type=int, default=None, metavar="SECONDS",
        help=f"delete downloads and Gradio's cached files this long after their last use (default: "
             f"${ENV_MAX_AGE}, else {DEFAULT_MAX_AGE_S}; docs/app.md)",
    )  # fmt: skip
    return ap


def spaces_hint(location: str, env: Mapping[str, str], readme: Path = README) -> str | None:
    """On a Space ($SPACE_ID set): how to preload the atlas at build time, if the README does not."""
    if not env.get("SPACE_ID") or not readme.is_file():
        return None
    return preload_hint(readme.read_text(encoding="utf-8"), location)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, serve the page at once (the atlas loads, or is built, in the background)."""
    args = parser().parse_args(argv)
    # our own loggers say what happens (startup, build stages, the atlas); libraries (open_clip logs
    # its whole config, faiss its loader, httpx every request) only warn: the terminal stays short
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for ours in ("app", "insight_core"):
        logging.getLogger(ours).setLevel(logging.INFO)
    if args.trust_atlas_weights:  # the loader reads it (also in the demo build's process)
        os.environ[ENV_TRUST] = "1"
        log.warning("--trust-atlas-weights: the atlas may make this server load any weights it names")
    hint = spaces_hint(atlas_location(args.atlas), os.environ)
    if hint:
        log.warning("%s", hint)
    try:
        cache = CacheConfig.from_env(os.environ, args.cache_max_age)
    except ConfigError as err:
        parser().error(str(err))
    demo, _, startup = start_app(args.atlas, dict(os.environ), cache=cache)
    atexit.register(startup.close)  # a demo build still running stops with the app (a rerun resumes it)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # SIGTERM runs the atexit hooks too
    launch(demo, args.host, args.port)
    return 0
