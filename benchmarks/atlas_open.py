"""Atlas-open benchmark: what hash verification costs when the app opens an atlas, first and after.

Not a test: prints figures and writes ``benchmarks/reports/atlas-open-{tag}.{json,md}``.

    python benchmarks/atlas_open.py                    # a synthetic 8192-concept atlas (~1.3 GB, temp dir)
    python benchmarks/atlas_open.py --atlas ATLAS_DIR  # an existing atlas

``Atlas.open`` only checks presence, sizes and SHA-256 (nothing is parsed), so the synthetic atlas is
random bytes with the sizes of an m = 8192 atlas with a bundled GPT-2 captioner: SAE (2 x m x 512
float32), statistics (dense m x m D plus exemplar arrays), concept vectors and flat concept index
(m x 512), exemplar index (16 patches per concept), tables, ``--thumbs`` WebP-sized thumbnails and
the captioner (adapter, 500 MB LM weights, tokenizer). Timings, each the best of ``--repeat``:

- ``sizes``: ``verify="sizes"`` (presence and sizes, what opening did before hashes were checked);
- ``first``: ``verify="read"`` with an empty verification cache (every file the app reads is hashed);
- ``reopen``: ``verify="read"`` again (unchanged files come from the cache);
- ``all``: ``verify="all"`` without the cache (``validate`` / ``push``: every listed file hashed).

Acceptance: ``reopen - sizes`` <= 1 s. The page cache is warm for every run after the first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from insight_core.atlas import Atlas, AtlasLayout, write_manifest
from insight_core.atlas.layout import verification_cache

REPORTS = Path(__file__).resolve().parent / "reports"
MB = 1 << 20


def _random_file(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        left = size
        while left:
            n = min(left, 8 * MB)
            fh.write(os.urandom(n))
            left -= n


def synthetic_atlas(root: Path, m: int, d: int, n_thumbs: int, lm_mb: int) -> dict[str, int]:
    """Random files with the sizes of an m-concept atlas; returns bytes per group."""
    layout = AtlasLayout(root)
    sizes = {
        layout.sae: 2 * m * d * 4 + (m + d) * 4,
        layout.stats_tensors: m * m * 4 + m * 64 * 12,
        layout.concept_vectors: m * d * 4,
        layout.concept_index: m * d * 4 + 100,
        layout.exemplar_index: m * 16 * d * 4 + 100,
        layout.concepts: m * 120,
        layout.edges: 3 * m * 16,
        layout.exemplars: m * 16 * 28,
        layout.captioner.adapter: 60 * MB,
        layout.captioner.lm_dir / "model.safetensors": lm_mb * MB,
        layout.captioner.lm_dir / "tokenizer.json": 2 * MB,
    }
    for path, size in sizes.items():
        _random_file(path, size)
    for path in (layout.sae_config, layout.stats_meta, layout.families, layout.index_meta,
                 layout.captioner.config, layout.captioner.lm_dir / "config.json"):  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"m": m, "note": "synthetic"}))
    thumbs = {}
    for i in range(n_thumbs):
        _random_file(layout.thumb(i), 6000 + (i * 37) % 4000)
        thumbs[str(i)] = {"path": f"img{i}.jpg", "width": 640, "height": 480}
    layout.thumbs_index.write_text(json.dumps(thumbs))
    write_manifest(root, backbone={"arch": "ViT-B-16", "pretrained": "none", "random_weights": True})
    return {"bytes_total": sum(p.stat().st_size for p in root.rglob("*") if p.is_file()), "thumbs": n_thumbs}


def best(fn: Callable[[], object], repeat: int, before: Callable[[], None] | None = None) -> float:
    out = float("inf")
    for _ in range(repeat):
        if before is not None:
            before()
        t = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--atlas", type=Path, default=None, help="an existing atlas (default: a synthetic one)")
    ap.add_argument("--m", type=int, default=8192)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--thumbs", type=int, default=2000)
    ap.add_argument("--lm-mb", type=int, default=500, help="bundled LM weights (GPT-2 small: ~500 MB)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tag", default="cpu")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="insight-atlas-open-"))
    os.environ["INSIGHT_CACHE_DIR"] = str(tmp / "user-cache")  # never touch the real user cache
    try:
        if args.atlas is None:
            root = tmp / "atlas"
            t = time.perf_counter()
            info = synthetic_atlas(root, args.m, args.d, args.thumbs, args.lm_mb)
            info["build_s"] = round(time.perf_counter() - t, 1)
            info["kind"] = f"synthetic m={args.m}"
        else:
            root, info = args.atlas, {"kind": str(args.atlas)}
        atlas = Atlas.open(root, verify="sizes")
        n_files = len(atlas.manifest["files"]) + sum(
            len(v) for v in atlas.manifest.get("file_sets", {}).values()
        )
        cache = verification_cache(root)

        def drop_cache() -> None:
            cache.unlink(missing_ok=True)

        sizes = best(lambda: Atlas.open(root, verify="sizes"), args.repeat)
        first = best(lambda: Atlas.open(root), args.repeat, before=drop_cache)
        Atlas.open(root)
        reopen = best(lambda: Atlas.open(root), args.repeat)
        every = best(lambda: Atlas.open(root, verify="all", cache=False), 1)
        hashed = Atlas.open(root).verified
        hashed_bytes = sum((root / rel).stat().st_size for rel in hashed)
        row = {
            **info,
            "files_listed": n_files,
            "files_hashed_on_open": len(hashed),
            "bytes_hashed_on_open": hashed_bytes,
            "sizes_s": sizes,
            "first_open_s": first,
            "reopen_s": reopen,
            "verify_all_s": every,
            "reopen_overhead_s": reopen - sizes,
            "cache_file_bytes": cache.stat().st_size if cache.is_file() else 0,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(row, indent=2))
    report = {"benchmark": "atlas-open", "machine": {"platform": platform.platform(),
              "python": platform.python_version(), "cpus": os.cpu_count()}, "row": row}  # fmt: skip
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / f"atlas-open-{args.tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    md = [
        f"# atlas open with SHA-256 verification ({args.tag})",
        "",
        f"`python benchmarks/atlas_open.py` — {row['kind']}, {row['files_listed']} listed files; the app "
        f"hashes {row['files_hashed_on_open']} of them ({row['bytes_hashed_on_open'] / MB:.0f} MB). "
        f"Best of {args.repeat}.",
        "",
        "| open | seconds |",
        "|---|---|",
        f"| sizes only (before) | {sizes:.3f} |",
        f"| first open, empty verification cache | {first:.3f} |",
        f"| reopen (cache) | {reopen:.3f} |",
        f"| verify all, no cache (validate, push) | {every:.3f} |",
        "",
        f"Reopen overhead over the sizes-only open: **{reopen - sizes:.3f} s** (acceptance: <= 1 s). "
        f"Verification cache: {row['cache_file_bytes'] / 1024:.0f} KB.",
    ]
    (REPORTS / f"atlas-open-{args.tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
