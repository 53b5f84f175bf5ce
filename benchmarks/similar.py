"""Concept-based image search benchmark (not a test): build time, index size and query latency at 10k
and 100k synthetic images of an 8192-concept atlas, and the recall of the IVF-PQ index.

    nice taskset -c 0,1 .venv/bin/python benchmarks/similar.py --threads 2
    .venv/bin/python benchmarks/similar.py --sizes 10000 100000 1000000 --name similar-gpu-host

Synthetic images: each has ``--concepts-per-image`` active concepts (max- and mean-pooled values,
log-normal), 60 % drawn from one of 500 "themes" (60 concepts each) and the rest from a Zipf-like
popularity, so images have real neighbours. With at most ``top_t`` (64) concepts per image the stored
codes are lossless, so the exact cosine over all images (chunked dense products) is the ground truth
for recall@10 of image queries. Default settings (``ImageSearchConfig``): an exact flat index while
n * m * 4 bytes fit in 256 MiB (8k images at m = 8192), IVF-PQ (PQ128, nprobe 32, >= 256 candidates
re-scored exactly) above.

Query kinds: ``image`` (an indexed image's vector, itself skipped: "images with the same concepts",
through FAISS), ``image-exclude`` (the same, dropping images with its strongest concept),
``concepts`` (two weighted concepts, exact from the inverted lists) and ``concepts-exclude``
(+ one excluded concept). Latency is per query, single-threaded Python on top of faiss's threads.

Writes ``benchmarks/reports/NAME.{json,md}`` (default ``similar-cpu``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from insight_core.concepts.image_search import (  # noqa: E402
    ImageIndex,
    ImageSearchConfig,
    build_image_index,
    image_vectors,
    search_concepts,
    search_similar,
)
from insight_core.concepts.index import faiss_threads  # noqa: E402
from insight_core.concepts.pooling import PooledConcepts  # noqa: E402
from insight_core.io import write_json  # noqa: E402

REPORTS = ROOT / "benchmarks" / "reports"


def synthetic(n: int, m: int, per_image: int, seed: int = 0) -> PooledConcepts:
    """``n`` images with ``per_image`` active concepts each (see the module docstring)."""
    rng = np.random.default_rng(seed)
    themes = rng.integers(0, m, size=(500, 60))
    popularity = 1.0 / np.arange(1, m + 1) ** 0.8
    popularity /= popularity.sum()
    perm = rng.permutation(m)
    cdf = np.cumsum(popularity)
    cols = np.empty((n, per_image), np.int64)
    n_theme = int(0.6 * per_image)
    for start in range(0, n, 8192):
        b = min(8192, n - start)
        t = rng.integers(0, 500, size=b)
        pick = np.argsort(rng.random((b, 60)), axis=1)[:, :n_theme]
        theme_cols = themes[t[:, None], pick]
        popular = perm[np.minimum(np.searchsorted(cdf, rng.random((b, 3 * per_image))), m - 1)]
        for i in range(b):
            row = np.concatenate([np.unique(theme_cols[i]), popular[i]])
            _, first = np.unique(row, return_index=True)
            uniq = row[np.sort(first)]  # theme concepts first, then popular ones, no repeats
            if len(uniq) < per_image:  # rare: top up with random concepts
                extra = rng.choice(np.setdiff1d(np.arange(m), uniq), per_image - len(uniq), replace=False)
                uniq = np.concatenate([uniq, extra])
            cols[start + i] = uniq[:per_image]
    cols.sort(axis=1)
    mx = rng.lognormal(0.0, 0.6, size=(n, per_image)).astype(np.float32)
    mean = (mx * rng.uniform(0.01, 0.3, size=(n, per_image))).astype(np.float32)
    indptr = torch.arange(0, n * per_image + 1, per_image, dtype=torch.int64)
    return PooledConcepts(m, indptr, torch.from_numpy(cols.reshape(-1)), torch.from_numpy(mx.reshape(-1)),
                          torch.from_numpy(mean.reshape(-1)))  # fmt: skip


def exact_top(index: ImageIndex, q: np.ndarray, k: int, skip: int) -> np.ndarray:
    """Ground truth: the exact cosine top-k over every image (chunked dense products)."""
    qn = q / np.linalg.norm(q)
    scores = np.empty(index.n, np.float32)
    for s in range(0, index.n, 8192):
        rows = np.arange(s, min(index.n, s + 8192))
        scores[rows] = image_vectors(index.codes, rows, index.config.pooling, index.scale_f) @ qn
    scores[skip] = -np.inf
    top = np.argpartition(-scores, k)[:k]
    return top[np.argsort(-scores[top])]


def _lat(fn, queries: list) -> dict:
    times = []
    for q in queries:
        t0 = time.perf_counter()
        fn(q)
        times.append(time.perf_counter() - t0)
    ms = np.asarray(times) * 1000
    return {"p50_ms": round(float(np.median(ms)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2),
            "mean_ms": round(float(ms.mean()), 2)}  # fmt: skip


def run_size(n: int, args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    pooled = synthetic(n, args.m, args.concepts_per_image)
    gen_s = time.perf_counter() - t0
    cfg = ImageSearchConfig(threads=args.threads)
    t0 = time.perf_counter()
    index = build_image_index(pooled, cfg)
    build_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        ip, cp = Path(tmp) / "images.faiss", Path(tmp) / "images.safetensors"
        index.save(ip, cp)
        sizes = {"faiss_mb": ip.stat().st_size / 2**20, "codes_mb": cp.stat().st_size / 2**20}
        t0 = time.perf_counter()
        index = ImageIndex.load(ip, cp)
        load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _ = index.inverted
    inverted_s = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    rows = rng.choice(n, size=args.queries, replace=False)
    dense = index.codes.batch(torch.as_tensor(rows), "max").numpy()  # raw max-pooled codes
    qs = [(int(r), (dense[i] / index.scale_f).astype(np.float32)) for i, r in enumerate(rows)]  # image_query
    k = 10
    recall = []
    for r, q in qs[: args.recall_queries]:
        got = [h.row for h in search_similar(index, q, k, skip_rows=[r])]
        truth = exact_top(index, q, k, r)
        recall.append(len(set(got) & set(truth.tolist())) / k)
    strongest = [
        int(index.codes.row_concepts(r)[0][np.argmax(index.codes.row_concepts(r)[1])]) for r, _ in qs
    ]
    pairs = [(int(index.codes.row_concepts(r)[0][0]), int(index.codes.row_concepts(r)[0][1])) for r, _ in qs]
    excluded = strongest[0]

    def image(rq: tuple) -> object:
        return search_similar(index, rq[1], k, skip_rows=[rq[0]])

    def image_exclude(rq: tuple) -> object:
        return search_similar(index, rq[1], k, skip_rows=[rq[0]], exclude=[excluded])

    def concepts(ab: tuple) -> object:
        return search_concepts(index, {ab[0]: 1.0, ab[1]: 0.5}, k)

    def concepts_exclude(ab: tuple) -> object:
        return search_concepts(index, {ab[0]: 1.0}, k, exclude=[ab[1]])

    with faiss_threads(args.threads):
        lat = {"image": _lat(image, qs), "image-exclude": _lat(image_exclude, qs),
               "concepts": _lat(concepts, pairs),
               "concepts-exclude": _lat(concepts_exclude, pairs)}  # fmt: skip
    info = index.describe()
    return {
        "n_images": n,
        "m": args.m,
        "concepts_per_image": args.concepts_per_image,
        "index": info["type"],
        "nlist": info.get("nlist"),
        "generate_s": round(gen_s, 2),
        "build_s": round(build_s, 2),
        "load_s": round(load_s, 3),
        "inverted_lists_s": round(inverted_s, 3),
        **{key: round(v, 1) for key, v in sizes.items()},
        "recall_at_10_image": round(float(np.mean(recall)), 4),
        "recall_queries": len(recall),
        "latency": lat,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[5_000, 10_000, 100_000])
    ap.add_argument("--m", type=int, default=8192)
    ap.add_argument("--concepts-per-image", type=int, default=48)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--recall-queries", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None, help="faiss OpenMP threads (default: all)")
    ap.add_argument("--name", default="similar-cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads or torch.get_num_threads())
    results = []
    for n in args.sizes:
        res = run_size(n, args)
        print(json.dumps(res), flush=True)
        results.append(res)
        write_report(args, results)  # after every size: a long run leaves its finished sizes


def write_report(args: argparse.Namespace, results: list[dict]) -> None:
    doc = {"machine": {"platform": platform.platform(), "cpus": __import__("os").cpu_count(),
                       "threads": args.threads}, "results": results}  # fmt: skip
    REPORTS.mkdir(parents=True, exist_ok=True)
    write_json(REPORTS / f"{args.name}.json", doc)
    lines = [
        f"# Concept-based image search ({args.name})",
        "",
        f"Synthetic images, m = {args.m} concepts, {args.concepts_per_image} active concepts per image; "
        f"`python benchmarks/similar.py --threads {args.threads}`. Latency per query (p50 / p95, ms).",
        "",
        "| images | index | build s | FAISS MB | codes MB | recall@10 (image) | image | image+exclude "
        "| concepts | concepts+exclude |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lat = r["latency"]
        cells = " | ".join(f"{lat[q]['p50_ms']} / {lat[q]['p95_ms']}"
                           for q in ("image", "image-exclude", "concepts", "concepts-exclude"))  # fmt: skip
        lines.append(f"| {r['n_images']:,} | {r['index']} | {r['build_s']} | {r['faiss_mb']} "
                     f"| {r['codes_mb']} | {r['recall_at_10_image']} | {cells} |")  # fmt: skip
    (REPORTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
