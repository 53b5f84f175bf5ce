"""Evaluation throughput benchmark (not a test): eval-ovs and eval-concepts in patches/s.

    nice taskset -c 0,1 .venv/bin/python benchmarks/evals.py [--device cpu|cuda] [--images 256]

Runs the library code the ``eval-ovs`` / ``eval-concepts`` jobs run (``run_ovs``,
``run_concept_metrics``: read shards, encode with the SAE, score, accumulate, per-shard resume
state) on synthetic data at paper scale: d = 512, m = 8192 concepts with ~12 active per patch (a
random SAE whose threshold is set to that rate), 14 x 14 patches, label maps at 224 x 224 with the
class counts of real benchmarks (59 = PASCAL Context, 171 = COCO-Stuff). Random features: the
numbers are speed only. Writes benchmarks/reports/evals-{cpu,gpu}.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _data(root: Path, n_images: int, n_labels: int, size: int, seed: int = 0):
    import numpy as np

    from insight_core.atlas.layout import FeaturesLayout
    from insight_core.data.masks import MaskLabels, feature_shards, open_masks, write_masks
    from insight_core.io import write_json, write_npy

    rng = np.random.default_rng(seed)
    fl = FeaturesLayout(root / "features")
    fl.root.mkdir(parents=True, exist_ok=True)
    shard = 128
    for k, s in enumerate(range(0, n_images, shard)):
        n = min(shard, n_images - s)
        write_npy(fl.shard(k), rng.standard_normal((n, 196, 512)).astype(np.float16))
        write_json(fl.shard_ids(k), {"ids": [f"{i}.jpg" for i in range(s, s + n)]})
    names = tuple(f"class {i}" for i in range(n_labels))
    labels = MaskLabels(names=names, size=(size, size), background=0, ignore=255, resize="squash",
                        grid=(14, 14))  # fmt: skip

    def maps(sh):  # blocky regions of a few labels per image, some ignore
        coarse = rng.integers(0, n_labels, (sh.n_images, 7, 7))
        out = np.kron(coarse, np.ones((size // 7, size // 7), dtype=np.int64)).astype(np.int32)
        out[:, :4] = 255
        return out

    write_masks(root / f"masks-{n_labels}-{size}", feature_shards(fl.root), labels, maps, progress=False)
    return open_masks(root / f"masks-{n_labels}-{size}", fl.root)


def _sae(device: str):
    import torch

    from insight_core.models.sae import MatryoshkaSAE, SAEConfig

    sae = MatryoshkaSAE(SAEConfig(d_in=512, dict_size=8192, k=12), seed=0)
    with torch.no_grad():
        pre = sae.pre_activations(torch.randn(4096, 512))
        sae.threshold.fill_(float(torch.quantile(pre.flatten()[:2_000_000], 1 - 12 / 8192)))
    return sae.eval().to(device)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--images", type=int, default=None, help="images per run (default: 96 CPU, 2048 GPU)")
    ap.add_argument("--batch", type=int, default=16, help="images per step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import numpy as np
    import torch

    from insight_core.device import resolve_device
    from insight_core.evaluation.concept_metrics import ConceptMetricsConfig, run_concept_metrics
    from insight_core.evaluation.encoding import encode_codes
    from insight_core.evaluation.ovs import OvsClasses, OvsConfig, class_prompts, run_ovs

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    kind = "gpu" if device.type == "cuda" else "cpu"
    n_images = args.images or (2048 if kind == "gpu" else 96)
    sae = _sae(str(device))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # label counts include the background value: 60 -> Context59's 59 classes, 172 -> COCO-Stuff's 171
        cases = [("ovs", 60, 224, "bilinear"), ("ovs", 172, 224, "bilinear"), ("ovs", 172, 224, "nearest"),
                 ("concepts", 172, 224, None), ("concepts", 172, 14, None)]  # fmt: skip
        sets = {}
        for what, k, size, mode in cases:
            ms = sets.get((k, size)) or _data(root, n_images, k, size)
            sets[(k, size)] = ms
            t0 = time.perf_counter()
            if what == "ovs":
                cfg = OvsConfig(upsample=mode)
                names, prompts, values = zip(*class_prompts(ms.labels, cfg), strict=True)
                emb = np.random.default_rng(1).standard_normal((len(names), 512)).astype(np.float32)
                classes = OvsClasses(names, prompts, values, emb)
                _, stats = run_ovs(ms, sae, classes, cfg, partial=root / f"p-{what}", key=str(t0),
                                   part_path=lambda s, r=root: r / f"part{s}.parquet",
                                   images_per_batch=args.batch, progress=False)  # fmt: skip
                label = f"eval-ovs, {len(names)} classes, masks {size}x{size}, {mode} upsampling"
            else:
                cfg = ConceptMetricsConfig()
                _, stats = run_concept_metrics(ms, sae, cfg, partial=root / f"p-{what}{size}", key=str(t0),
                                               images_per_batch=args.batch, progress=False)  # fmt: skip
                label = f"eval-concepts, {k} labels, masks {size}x{size}"
            rows.append({"case": label, "patches_per_s": stats.patches_per_s, "n_patches": stats.n_patches,
                         "seconds": stats.seconds})  # fmt: skip
            print(f"{label}: {stats.patches_per_s:,.0f} patches/s ({stats.seconds:.1f} s)")
        with torch.no_grad():  # the SAE encoding alone, for scale
            x = torch.randn(args.batch * 196, 512, device=device)
            encode_codes(sae, x)
            t0 = time.perf_counter()
            for _ in range(5):
                active = float((encode_codes(sae, x) > 0).sum(1).float().mean())
            if device.type == "cuda":
                torch.cuda.synchronize()
            enc = 5 * x.shape[0] / (time.perf_counter() - t0)
    report = {
        "device": torch.cuda.get_device_name(device) if kind == "gpu" else "cpu",
        "torch_threads": args.threads,
        "cpu_affinity": sorted(os.sched_getaffinity(0)),
        "load_average": os.getloadavg(),
        "n_images": n_images,
        "images_per_batch": args.batch,
        "m": 8192,
        "active_per_patch": active,
        "sae_encode_patches_per_s": enc,
        "cases": rows,
    }
    out = Path(args.out or ROOT / "benchmarks" / "reports" / f"evals-{kind}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    md = [
        f"# Evaluation throughput ({report['device']}, {args.threads} threads)", "",
        f"{n_images} synthetic images (196 patches, d = 512), random SAE m = 8192 with {active:.1f} active "
        f"concepts per patch, {args.batch} images per step; load average {report['load_average'][0]:.1f}. "
        "Speed only (random data).", "",
        "| case | patches/s |", "|---|---|",
        *[f"| {r['case']} | {r['patches_per_s']:,.0f} |" for r in rows],
        f"| (SAE encoding alone) | {enc:,.0f} |",
    ]  # fmt: skip
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
