"""Hugging Face Space / local entry point of the INSIGHT concept explorer.

The Gradio explorer is not built yet (see the README's Status table); this entry point says so
instead of pretending. Run ``make demo`` for the pipeline that exists today.
"""

from __future__ import annotations

import sys


def main() -> int:
    print(
        "The INSIGHT explorer app is not implemented yet (see README, Status).\n"
        "Run `make demo` for the current pipeline: planted-concept world -> SAE -> recovery report.",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
