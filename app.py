"""Hugging Face Space / local entry point of the INSIGHT concept explorer.

    python app.py [--atlas PATH_OR_HUB_REPO] [--host 0.0.0.0] [--port 7860]

The atlas comes from --atlas, else $INSIGHT_ATLAS, else ./demo_atlas. The page is served at once and
the atlas loads in the background; with nothing configured and no ./demo_atlas, ``precompute demo``
builds it first in a separate process while the page shows its progress. See docs/app.md.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import signal
import sys

from app.server import launch, start_app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="INSIGHT concept explorer (Gradio)")
    parser.add_argument(
        "--atlas", default=None, help="atlas folder or Hub repo id (default: $INSIGHT_ATLAS or ./demo_atlas)"
    )
    parser.add_argument(
        "--host", default=os.environ.get("GRADIO_SERVER_NAME"), help="interface to bind (0.0.0.0 for all)"
    )
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    args = parser.parse_args(argv)
    # our own loggers say what happens (startup, build stages, the atlas); libraries (open_clip logs
    # its whole config, faiss its loader, httpx every request) only warn: the terminal stays short
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for ours in ("app", "insight_core"):
        logging.getLogger(ours).setLevel(logging.INFO)
    demo, _, startup = start_app(args.atlas, dict(os.environ))
    atexit.register(startup.close)  # a demo build still running stops with the app (a rerun resumes it)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # SIGTERM runs the atexit hooks too
    launch(demo, args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
