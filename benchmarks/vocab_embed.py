"""Vocabulary benchmark: CLIP text-tower throughput, and ``name`` end to end with a precomputed file.

Not a test: prints figures and writes ``benchmarks/reports/vocab-embed-{device}.{json,md}``.

    python benchmarks/vocab_embed.py                       # CPU: text throughput + name at m = 8192
    python benchmarks/vocab_embed.py --device cuda         # the same on a GPU (autocast, larger batches)
    python benchmarks/vocab_embed.py --skip-name --seconds 60

1. Text throughput: open_clip ViT-B-16's text tower (random init: the cost does not depend on the
   weights, and no weights can be downloaded here) encodes prompts of the paper's templates through
   ``ClipBackbone.encode_text`` (the path ``name`` / ``vocab-embed`` use: fp32 on CPU, autocast on
   CUDA), in batches of ``--batch`` prompts, for at least ``--seconds`` after a warm-up. Reported:
   prompts/s, vocabulary words/s (30 prompts per word), and the time the shipped vocabulary
   (45,501 words) would take.
2. ``name`` at m = 8192: a synthetic full-size atlas (``benchmarks/synthetic_atlas.py``: random SAE,
   real statistics and family DAG over synthetic codes) named against a precomputed vocabulary file
   (45,501 words x 3 parts of speech x 512, random unit vectors with a manifest for the atlas's
   backbone; matching cost does not depend on the values). Timed: the ``name`` stage (read the file,
   concept vectors, matching, parquet), ``--force``; the text tower is never built (asserted).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from insight_core.concepts.vocab_embeddings import TEMPLATES_BY_POS, VocabEmbeddings
from insight_core.concepts.vocab_files import vocab_manifest
from insight_core.models.backbone import BackboneConfig, ClipBackbone

REPORTS = Path(__file__).resolve().parent / "reports"
SHIPPED_WORDS = 45_501
PROMPTS_PER_WORD = sum(len(t) for t in TEMPLATES_BY_POS.values())


def text_throughput(device: str, batch: int, seconds: float) -> dict:
    backbone = ClipBackbone(BackboneConfig(arch="ViT-B-16", pretrained="none", device=device))
    words = [f"word{i}" for i in range(4096)]
    templates = list(TEMPLATES_BY_POS["noun"])
    per_call = max(1, batch // len(templates))  # words per encode_text call -> `batch` prompts
    backbone.encode_text(words[:per_call], templates, batch_size=batch)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    n_prompts, start, i = 0, time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        chunk = words[(i * per_call) % 4000 : (i * per_call) % 4000 + per_call]
        backbone.encode_text(chunk, templates, batch_size=batch)
        n_prompts += len(chunk) * len(templates)
        i += 1
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    rate = n_prompts / elapsed
    return {"device": device, "batch_prompts": batch, "prompts": n_prompts, "seconds": round(elapsed, 2),
            "prompts_per_s": round(rate, 1), "words_per_s": round(rate / PROMPTS_PER_WORD, 3),
            "shipped_vocab_estimate_s": round(SHIPPED_WORDS * PROMPTS_PER_WORD / rate, 1),
            "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None}  # fmt: skip


def name_end_to_end(m: int, n_images: int, work: Path) -> dict:
    from benchmarks.synthetic_atlas import build
    from insight_core.atlas import Atlas
    from precompute import name as name_stage
    from precompute.options import NamingOptions

    t0 = time.perf_counter()
    atlas = build(work / "atlas", m=m, n_images=n_images)
    build_s = time.perf_counter() - t0
    bb = Atlas.open(atlas).backbone
    rng = np.random.default_rng(0)
    words = tuple(f"w{i}" for i in range(SHIPPED_WORDS))
    emb = rng.standard_normal((3, SHIPPED_WORDS, 512)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    subset = {"policy": "full", "n_words": SHIPPED_WORDS, "n_total": SHIPPED_WORDS, "reason": "benchmark"}
    man = vocab_manifest(arch=bb["arch"], pretrained=bb["pretrained"], words=words,
                         templates_by_pos=TEMPLATES_BY_POS, subset=subset)  # fmt: skip
    vocab_file = VocabEmbeddings(words, emb, tuple(TEMPLATES_BY_POS), man).save_npz(work / "vocab.npz")

    class NoTextTower:
        def __init__(self, cfg: object) -> None:
            raise AssertionError("the text tower was built although a vocabulary file was given")

    name_stage.ClipBackbone = NoTextTower  # type: ignore[misc,assignment]
    job = name_stage.NameJob(atlas=atlas, naming=NamingOptions(vocab_embeddings=vocab_file), force=True,
                             progress=False)  # fmt: skip
    t0 = time.perf_counter()
    records = name_stage.run(job)
    name_s = time.perf_counter() - t0
    assert len(records) == m
    return {"m": m, "n_images": n_images, "vocab_words": SHIPPED_WORDS, "vocab_file_mb":
            round(vocab_file.stat().st_size / 2**20, 1), "synthetic_atlas_s": round(build_s, 1),
            "name_s": round(name_s, 2)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=None, help="prompts per forward (cpu 256, cuda 1024)")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--m", type=int, default=8192)
    parser.add_argument("--n-images", type=int, default=200)
    parser.add_argument("--skip-name", action="store_true")
    args = parser.parse_args()
    batch = args.batch or (1024 if args.device.startswith("cuda") else 256)
    report: dict = {"machine": platform.machine(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "threads": torch.get_num_threads(),
                    "load_avg_1min_start": os.getloadavg()[0]}  # fmt: skip
    report["text"] = text_throughput(args.device, batch, args.seconds)
    print(json.dumps(report["text"], indent=1))
    if not args.skip_name:
        with tempfile.TemporaryDirectory() as tmp:
            report["name"] = name_end_to_end(args.m, args.n_images, Path(tmp))
        print(json.dumps(report["name"], indent=1))
    report["load_avg_1min_end"] = os.getloadavg()[0]  # a shared machine: other jobs slow the figures
    tag = "cuda" if args.device.startswith("cuda") else "cpu"
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / f"vocab-embed-{tag}.json").write_text(json.dumps(report, indent=1) + "\n")
    (REPORTS / f"vocab-embed-{tag}.md").write_text(_markdown(report, tag))
    return 0


def _markdown(report: dict, tag: str) -> str:
    t = report["text"]
    lines = [
        f"# vocabulary benchmark ({tag}; torch {report['torch']}; {report['threads']} threads)", "",
        f"Load average (1 min) {report['load_avg_1min_start']:.1f} at the start, "
        f"{report['load_avg_1min_end']:.1f} at the end, on {report['cpus']} CPUs.", "",
        "`python benchmarks/vocab_embed.py" + (" --device cuda`" if tag == "cuda" else "`"), "",
        "| what | figure |", "|---|---|",
        f"| text tower (ViT-B-16, batch {t['batch_prompts']} prompts) | {t['prompts_per_s']} prompts/s |",
        f"| vocabulary words/s ({PROMPTS_PER_WORD} prompts per word) | {t['words_per_s']} |",
        f"| the shipped vocabulary ({SHIPPED_WORDS:,} words) | ~{t['shipped_vocab_estimate_s'] / 3600:.2f} h"
        " |",
    ]  # fmt: skip
    if "name" in report:
        n = report["name"]
        lines.append(f"| `name` at m = {n['m']:,} with a precomputed {n['vocab_words']:,}-word file "
                     f"({n['vocab_file_mb']} MB) | {n['name_s']} s |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
