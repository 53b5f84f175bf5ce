"""Hugging Face Space / local entry point of the INSIGHT concept explorer.

    python app.py [--atlas PATH_OR_HUB_REPO] [--host 0.0.0.0] [--port 7860]

Same as the ``insight-app`` console script (:mod:`app.cli`). The atlas comes from --atlas, else
$INSIGHT_ATLAS, else ./demo_atlas. The page is served at once and the atlas loads in the background;
with nothing configured and no ./demo_atlas, ``insight demo`` builds it first in a separate process
while the page shows its progress. Spaces run this file with $GRADIO_SERVER_NAME /
$GRADIO_SERVER_PORT set. See docs/app.md and docs/spaces.md.
"""

from __future__ import annotations

import sys

from app.cli import main

if __name__ == "__main__":
    sys.exit(main())
