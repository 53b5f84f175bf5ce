"""Pipeline benchmark: extract (images/s vs plain open_clip encode_image) and stats (patches/s, memory).

Not a test: prints figures and writes ``benchmarks/reports/pipeline-{cpu,gpu}.{json,md}``.

    python benchmarks/pipeline.py --images ../shared/data/imagenet-samples --n-images 64

extract: the ``extract`` stage end to end (decode, preprocess, dense features, DINOiser raw
pooling, fp16 shard writes) vs ``model.encode_image`` on the same decoded, preprocessed images.
stats: the ``stats`` accumulator with a random m=8192 SAE whose threshold keeps ~k=12 active
latents per patch, fed the extracted features repeatedly; peak RSS is the process high-water mark.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from insight_core.concepts.stats import StatsAccumulator
from insight_core.data.images import list_image_files, load_image
from insight_core.models.backbone import BackboneConfig, ClipBackbone
from insight_core.models.sae import MatryoshkaSAE, SAEConfig
from precompute import extract
from precompute.options import BackboneOptions, SourceOptions

REPORTS = Path(__file__).resolve().parent / "reports"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_extract(images: list[Path], device: str, batch: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "imgs"
        folder.mkdir()
        for p in images:
            shutil.copy(p, folder / p.name)
        job = extract.ExtractJob(
            out=Path(tmp) / "feats",
            source=SourceOptions(images=folder),
            backbone=BackboneOptions(pretrained="none"),
            batch_size=batch,
            device=device,
            progress=False,
        )
        t = time.perf_counter()
        extract.run(job)
        stage = len(images) / (time.perf_counter() - t)
        bb = ClipBackbone(BackboneConfig(pretrained="none", device=device, batch_size=batch))
        pixels = bb.preprocess([load_image(p) for p in images])
        t = time.perf_counter()
        with torch.no_grad(), bb.autocast():
            for s in range(0, len(pixels), batch):
                bb.model.encode_image(pixels[s : s + batch].to(bb.device))
        if bb.device.type == "cuda":
            torch.cuda.synchronize()
        plain = len(images) / (time.perf_counter() - t)
    return {
        "n_images": len(images),
        "batch": batch,
        "extract_images_per_s": stage,
        "encode_image_images_per_s": plain,
        "ratio": stage / plain,
    }


def bench_stats(n_patches: int, device: str, m: int = 8192, k: int = 12) -> dict:
    torch.manual_seed(0)
    sae = MatryoshkaSAE(SAEConfig(dict_size=m, k=k)).to(device)
    x = torch.randn(4096, 512, device=device)
    with torch.no_grad():  # a threshold that keeps ~k latents per patch
        pre = sae.pre_activations(x)
        sae.threshold.fill_(float(pre.flatten().kthvalue(pre.numel() - k * len(x)).values))
    acc = StatsAccumulator(m)
    rss0, batch, done = peak_rss_mb(), 64 * 196, 0
    t = time.perf_counter()
    image = 0
    while done < n_patches:
        feats = torch.randn(batch, 512, device=device)
        with torch.no_grad():
            codes = sae.encode(feats).cpu()
        ids = torch.arange(image, image + 64).repeat_interleave(196)
        acc.update(codes, ids, torch.arange(196).repeat(64))
        done, image = done + batch, image + 64
    acc.finalize()
    seconds = time.perf_counter() - t
    return {
        "m": m,
        "k": k,
        "patches": done,
        "patches_per_s": done / seconds,
        "peak_rss_mb": peak_rss_mb(),
        "rss_growth_mb": peak_rss_mb() - rss0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--images", type=Path, default=Path(__file__).resolve().parents[1] / "assets" / "examples"
    )
    ap.add_argument("--n-images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--stats-patches", type=int, default=200_000)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    images = list_image_files(args.images)[: args.n_images]
    report = {"device": args.device, "torch_threads": torch.get_num_threads()}
    report["extract"] = bench_extract(images, args.device, args.batch)
    e = report["extract"]
    ext, enc = e["extract_images_per_s"], e["encode_image_images_per_s"]
    print(f"extract: {ext:.2f} img/s vs encode_image {enc:.2f} img/s -> ratio {e['ratio']:.3f}")
    report["stats"] = bench_stats(args.stats_patches, args.device)
    s = report["stats"]
    print(
        f"stats  : {s['patches_per_s']:,.0f} patches/s (m={s['m']}, k~{s['k']}, {s['patches']:,} patches), "
        f"peak RSS {s['peak_rss_mb']:.0f} MB"
    )
    REPORTS.mkdir(exist_ok=True)
    tag = "gpu" if args.device.startswith("cuda") else "cpu"
    (REPORTS / f"pipeline-{tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    md = [
        f"# Pipeline throughput ({args.device}, {report['torch_threads']} threads)",
        "",
        f"- extract: {ext:.2f} img/s vs plain encode_image {enc:.2f} img/s = **{e['ratio']:.3f}x** "
        f"({e['n_images']} images, batch {e['batch']}; decode, preprocess, writes in extract only)",
        f"- stats: **{s['patches_per_s']:,.0f} patches/s** at m={s['m']}, ~{s['k']} active per patch "
        f"({s['patches']:,} patches); peak RSS {s['peak_rss_mb']:.0f} MB",
        "",
    ]
    (REPORTS / f"pipeline-{tag}.md").write_text("\n".join(md))
    print(f"report -> {REPORTS / f'pipeline-{tag}.md'}")


if __name__ == "__main__":
    main()
