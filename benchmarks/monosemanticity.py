"""Monosemanticity scoring benchmark (not a test): time and peak memory of
:func:`insight_core.evaluation.sae_suite.monosemanticity` on synthetic max-pooled codes of an
8192-latent SAE, with the evaluator embeddings given as an array (the evaluator backbone's own cost is
that of ``extract``: see benchmarks/throughput.py and timm_layers.py).

    nice taskset -c 0,1 .venv/bin/python benchmarks/monosemanticity.py --threads 2

Synthetic codes: each image has ``--active`` latents active (log-normal values, Zipf-like popularity),
so many latents are alive; embeddings are Gaussian (e = 768). Figures: seconds per call and the number
of images the evaluator would have to embed (the union of the scored latents' weighted top images).

Writes ``benchmarks/reports/NAME.{json,md}`` (default ``monosemanticity-cpu``).
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from insight_core.evaluation.sae_suite import monosemanticity  # noqa: E402
from insight_core.io import write_json  # noqa: E402


def synthetic_codes(n: int, m: int, active: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, m + 1) ** 0.8
    popularity /= popularity.sum()
    codes = np.zeros((n, m), dtype=np.float32)
    for i in range(n):
        cols = rng.choice(m, size=active, replace=False, p=popularity)
        codes[i, cols] = rng.lognormal(0.0, 0.5, size=active)
    return codes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000])
    ap.add_argument("--m", type=int, default=8192)
    ap.add_argument("--active", type=int, default=60)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--max-features", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="monosemanticity-cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for n in args.sizes:
        codes = synthetic_codes(n, args.m, args.active)
        emb = np.random.default_rng(1).normal(size=(n, args.dim)).astype(np.float32)
        t0 = time.perf_counter()
        res = monosemanticity(codes, emb, top_k=args.top_k, max_features=args.max_features)
        sec = time.perf_counter() - t0
        row = {"images": n, "m": args.m, "alive": res.n_alive, "scored": int(res.latents_s.size),
               "images_to_embed": res.n_images, "seconds": round(sec, 3), "value": res.value}  # fmt: skip
        print(row, flush=True)
        rows.append(row)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {
        "rows": rows,
        "peak_rss_mb": round(peak_mb),
        "threads": args.threads,
        "top_k": args.top_k,
        "max_features": args.max_features,
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
    reports = ROOT / "benchmarks" / "reports"
    write_json(reports / f"{args.name}.json", out)
    lines = [
        f"# Monosemanticity scoring ({args.name})",
        "",
        f"m = {args.m}, {args.active} active latents per image, top {args.top_k}, at most "
        f"{args.max_features} latents scored, e = {args.dim}, {args.threads} threads; "
        f"peak RSS {out['peak_rss_mb']} MB.",
        "",
        "| images | alive | scored | images to embed | seconds |",
        "|---|---|---|---|---|",
    ]
    keys = ("images", "alive", "scored", "images_to_embed", "seconds")
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    (reports / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print(f"peak RSS {out['peak_rss_mb']} MB -> {reports / args.name}.json|md")


if __name__ == "__main__":
    main()
