"""Durable-write benchmark: what the fsyncs of ``atomic_write`` cost per file, and the thumbnail path.

Not a test: prints figures and writes ``benchmarks/reports/atomic-write.{json,md}``.

    python benchmarks/atomic_write.py                 # in a temp folder under --dir (default: this repo)
    python benchmarks/atomic_write.py --dir /tmp --files 500

Three ways to write ``--files`` small files (``--size`` bytes, thumbnail-like):

- ``plain``: ``atomic_write(..., durable=False)`` (temp file + rename: survives a kill, not a power cut);
- ``durable``: ``atomic_write`` (fsync of the file before the rename and of the folder after);
- ``batched``: ``durable=False`` then one ``flush_to_disk`` (what the index stage does for thumbnails).

Figures depend on the disk and on what else is writing; compare them on one machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from insight_core.io import atomic_write, flush_to_disk

REPORTS = Path(__file__).resolve().parent / "reports"
MODES = (("plain", False, False), ("durable", True, False), ("batched", False, True))
"""(name, durable, flush_to_disk at the end)"""


def _write_all(folder: Path, n: int, data: bytes, durable: bool, batched: bool) -> float:
    t0 = time.perf_counter()
    paths = [
        atomic_write(folder / f"{i:05d}.webp", lambda tmp: tmp.write_bytes(data), durable=durable)
        for i in range(n)
    ]
    if batched:
        flush_to_disk(paths)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--files", type=int, default=300)
    ap.add_argument("--size", type=int, default=3000)
    args = ap.parse_args()
    data = b"x" * args.size
    rows = {}
    root = Path(tempfile.mkdtemp(prefix=".bench-atomic-", dir=args.dir))
    try:
        for name, durable, batched in MODES:
            folder = root / name
            folder.mkdir()
            seconds = _write_all(folder, args.files, data, durable, batched)
            rows[name] = {"seconds": seconds, "ms_per_file": 1e3 * seconds / args.files}
            print(f"{name:8s} {rows[name]['ms_per_file']:7.2f} ms/file ({seconds:.2f} s for {args.files})")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report = {"files": args.files, "size": args.size, "dir": str(args.dir), "machine": platform.platform(),
              "results": rows}  # fmt: skip
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / "atomic-write.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| write | ms per file |", "|---|---|"]
    lines += [f"| {k} | {v['ms_per_file']:.2f} |" for k, v in rows.items()]
    head = f"# atomic_write: {args.files} files of {args.size} B in {args.dir}\n\n"
    (REPORTS / "atomic-write.md").write_text(head + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
