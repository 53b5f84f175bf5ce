"""Caption-file benchmark: reading a COCO ``captions_train2017.json``-sized file through its declared
schema (``precompute.captioner.coco_split``), against the plain dict walk it replaced.

Not a test: prints figures and writes ``benchmarks/reports/caption-files.{json,md}``.

    python benchmarks/caption_files.py [--images 118287] [--per-image 5] [--repeat 3]

The file is synthetic (COCO train2017's counts: 118,287 images, 5 captions each, the same keys). Each
timing is the best of ``--repeat`` and includes ``json.loads`` and building the split (paths,
loaders). The schema's items are TypedDicts (checked as strictly as models; one model instance per
record made the read ~4x slower), so the strict check adds a fraction of a second (2.7 s vs 2.4 s on
2 shared CPU cores).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from precompute.captioner import Split, _file_loader, coco_split

REPORTS = Path(__file__).resolve().parent / "reports"


def dict_walk(path: Path, images: Path) -> Split:
    """The reader before the schema (``coco_split`` as it was): parse, then index the dicts, checking
    nothing but what ``int()``/``str()`` and the key lookups do."""
    doc = json.loads(path.read_text())
    caps: dict[int, list[str]] = {}
    for ann in doc["annotations"]:
        caps.setdefault(int(ann["image_id"]), []).append(str(ann["caption"]).strip())
    files = {int(im["id"]): im["file_name"] for im in doc["images"]}
    ids = sorted(i for i in caps if i in files)
    paths = [images / files[i] for i in ids]
    return Split("train", [str(p) for p in paths], [_file_loader(p) for p in paths], [caps[i] for i in ids])


def best(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=118_287)
    parser.add_argument("--per-image", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    n, per = args.images, args.per_image
    doc = {
        "images": [{"id": i, "file_name": f"{i:012d}.jpg", "height": 480, "width": 640} for i in range(n)],
        "annotations": [
            {"image_id": i, "id": i * per + j, "caption": f"A caption number {j} of image {i}. "}
            for i in range(n)
            for j in range(per)
        ],
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "captions_train2017.json"
        path.write_text(json.dumps(doc))
        parse = best(lambda: json.loads(path.read_text()), args.repeat)
        schema = best(lambda: coco_split("train", path, Path(tmp)), args.repeat)
        walk = best(lambda: dict_walk(path, Path(tmp)), args.repeat)
    result = {
        "images": n,
        "captions": n * per,
        "json_loads_s": round(parse, 3),
        "schema_s": round(schema, 3),
        "dict_walk_s": round(walk, 3),
        "machine": f"{platform.processor() or platform.machine()}, {platform.python_version()}",
    }
    print(json.dumps(result, indent=1))
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / "caption-files.json").write_text(json.dumps(result, indent=1) + "\n")
    (REPORTS / "caption-files.md").write_text(
        f"# Caption files: COCO captions through the declared schema\n\n"
        f"{n:,} images, {n * per:,} captions (synthetic, COCO train2017's counts), best of {args.repeat}:\n\n"
        f"| reader | seconds |\n|---|---|\n| json.loads only | {parse:.2f} |\n"
        f"| `coco_split` (schema, with loaders) | {schema:.2f} |\n| dict walk (before) | {walk:.2f} |\n"
    )


if __name__ == "__main__":
    main()
