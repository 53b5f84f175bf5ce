"""SAE training from stored fp16 shards, stored int8 shards and streaming: images/s, patches/s, disk.

Not a test: prints figures and writes ``benchmarks/reports/streaming-cpu.{json,md}``.

    python benchmarks/streaming.py [--n-images 48] [--arch ViT-B-16] [--epochs 2]

Same run, same photos (the shared ImageNet samples), same random-init backbone (no pretrained
weights here; the cost of a forward pass does not depend on the weights), same SAE settings:

- ``extract`` (fp16 shards; seconds and images/s of the backbone pass) and ``convert-features
  --dtype int8``; ``plan-stream`` (one decode per image, no backbone);
- ``train-sae`` for ``--epochs`` epochs on each: training images/s and patches/s (the SAE's
  ``train_seconds``; a streamed run computes every batch's features then, every epoch);
- disk per image of each folder (arrays + ids + manifest; a streamed folder holds only json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from precompute.__main__ import main as precompute

REPORTS = Path(__file__).resolve().parent / "reports"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-samples"


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _timed(args: list[str]) -> float:
    t = time.perf_counter()
    assert precompute(args) == 0, args
    return time.perf_counter() - t


def _train(features: Path, out: Path, common: list[str], stream: list[str]) -> dict:
    wall = _timed(["train-sae", "--features", str(features), "--out", str(out), *common, *stream])
    m = json.loads((out / "sae_metrics.json").read_text())
    return {
        "fve": m["fve"],
        "steps": m["steps"],
        "patches": m["samples_seen"],
        "train_seconds": m["train_seconds"],
        "patches_per_second": m["patches_per_second"],
        "wall_seconds": round(wall, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-images", type=int, default=48)
    ap.add_argument("--arch", default="ViT-B-16", help="open_clip arch (random init)")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--dict-size", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    photos_src = sorted(SHARED.glob("*.JPEG"))[: args.n_images]
    if len(photos_src) < args.n_images:
        sys.exit(f"need {args.n_images} photos in {SHARED}")
    report: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": args.threads,
            "loadavg_1min": os.getloadavg()[0],
            "note": "2 CPU cores shared with ~6 other engineers' jobs: timings are noisy and low",
        },
        "command": "python benchmarks/streaming.py " + " ".join(sys.argv[1:]),
        "backbone": f"open_clip {args.arch}, random init (pretrained none), raw pooling, fp32 on CPU",
        "n_images": args.n_images,
    }
    common = [
        "--dict-size",
        str(args.dict_size),
        "--k",
        "12",
        "--batch-size",
        str(args.batch_size),
        "--epochs",
        str(args.epochs),
        "--warmup-steps",
        "5",
        "--threshold-start-step",
        "5",
        "--device",
        "cpu",
        "--no-progress",
    ]
    model = ["--arch", args.arch, "--pretrained", "none"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        photos = root / "photos"
        photos.mkdir()
        for p in photos_src:
            shutil.copy(p, photos / p.name)
        fp16, int8, stream = root / "fp16", root / "int8", root / "stream"
        t_extract = _timed(
            [
                "extract",
                "--images",
                str(photos),
                "--out",
                str(fp16),
                *model,
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        t_convert = _timed(
            ["convert-features", "--features", str(fp16), "--out", str(int8), "--dtype", "int8"]
        )
        t_plan = _timed(
            ["plan-stream", "--images", str(photos), "--out", str(stream), *model, "--no-progress"]
        )
        report["prepare_seconds"] = {
            "extract_fp16": round(t_extract, 1),
            "convert_int8": round(t_convert, 1),
            "plan_stream": round(t_plan, 1),
        }
        patches = json.loads((stream / "manifest.json").read_text())["n_patches"]
        report["backbone_images_per_second"] = round(args.n_images / t_extract, 2)
        report["plan_images_per_second"] = round(args.n_images / t_plan, 1)
        report["disk_bytes_per_image"] = {
            k: round(_bytes(f) / args.n_images)
            for k, f in (("fp16", fp16), ("int8", int8), ("stream", stream))
        }
        runs = {
            "fp16": _train(fp16, root / "a16", common, []),
            "int8": _train(int8, root / "a8", common, []),
            "stream": _train(stream, root / "as", common, ["--shuffle-images", "512"]),
        }
    for r in runs.values():
        r["images_per_second"] = round(r["patches_per_second"] / patches, 2)
        r["seconds_per_epoch"] = round(r["train_seconds"] / args.epochs, 1)
    report["train"] = runs
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / "streaming-cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    (REPORTS / "streaming-cpu.md").write_text(_markdown(report))
    print(_markdown(report))


def _markdown(r: dict) -> str:
    m, tr, disk = r["machine"], r["train"], r["disk_bytes_per_image"]
    lines = [
        "# Stored (fp16, int8) vs streamed features: SAE training on the CPU",
        "",
        f"`{r['command']}`; {m['cpus']} CPUs, {m['torch_threads']} torch threads, "
        f"load {m['loadavg_1min']:.1f}: {m['note']}.",
        "",
        f"{r['n_images']} ImageNet sample photos; backbone {r['backbone']}: "
        f"{r['backbone_images_per_second']} images/s (extract); plan-stream decodes "
        f"{r['plan_images_per_second']} images/s (no backbone).",
        "",
        "| features | disk / image (bytes) | train images/s | train patches/s | s / epoch | held-out FVE |",
        "|---|---|---|---|---|---|",
    ]
    for k in ("fp16", "int8", "stream"):
        t = tr[k]
        lines.append(
            f"| {k} | {disk[k]:,} | {t['images_per_second']} | {t['patches_per_second']:,} | "
            f"{t['seconds_per_epoch']} | {t['fve']:.4f} |"
        )
    p = r["prepare_seconds"]
    lines += [
        "",
        f"Preparation: extract fp16 {p['extract_fp16']} s, convert to int8 {p['convert_int8']} s, "
        f"plan-stream {p['plan_stream']} s. Stored runs pay the backbone once (extract); a streamed run "
        "pays it every epoch, inside training.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
