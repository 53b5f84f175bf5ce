"""int8 feature shards vs fp16: bytes, quantisation error, held-out FVE, read + dequantise throughput.

Not a test: prints figures and writes ``benchmarks/reports/int8-features-cpu.{json,md}``.

    python benchmarks/int8_features.py [--n-images 1400] [--no-train] [--repeats 3]

- bytes per patch of the shard files (fp16; int8 with one fp16 scale per patch and group of G dims);
- quantisation error against the fp16 values (relative L2 and cosine per patch) on planted patches
  and on Gaussian patches with 3 outlier dims x15 (CLIP residual streams have a few such dims; no
  pretrained weights are available here, so real CLIP features could not be measured);
- held-out FVE of ``train-sae`` with its defaults (``--dict-size 128 --k 3``) on fp16 and int8;
- read + dequantise throughput: one shuffled pass of ``FeatureSplit.iter_batches`` (16384-patch
  batches, float32 out, ``device='cpu'`` as train-sae reads on a CPU: numpy dequantises whole
  chunks), and the GPU path run on the CPU (int8 kept in the shuffle buffer, each batch
  dequantised in torch). The files sit in the page cache: this is the CPU cost of decoding, not
  disk speed; a disk-bound reader gets ``disk MB/s / bytes per patch`` patches/s instead.
- disk at ImageNet-1k size (1,281,167 images) for ViT-B/16 (196 patches x 512 dims).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import insight_core.data.features as features
from insight_core.data.feature_convert import ConvertConfig, convert_folder
from insight_core.data.features import scan_features
from insight_core.data.quantise import dequantise, quantise
from precompute.__main__ import main as precompute

REPORTS = Path(__file__).resolve().parent / "reports"
WORLD = ["--world.n-objects", "20", "--world.subparts-per-part", "0", "--world.n-attributes", "16",
         "--world.n-backgrounds", "16"]  # fmt: skip
IMAGENET_IMAGES, VIT_B16_PATCHES, D = 1_281_167, 196, 512
GROUPS = (512, 128, 64, 32)
_DEFAULT_ON = features._dequantise_on


def _errors(x: np.ndarray, group_size: int) -> dict:
    xh = dequantise(*quantise(x, group_size))
    norm = np.linalg.norm(x, axis=1)
    ok = norm > 0
    rel = np.linalg.norm(xh - x, axis=1)[ok] / norm[ok]
    cos = (xh * x).sum(1)[ok] / (np.linalg.norm(xh, axis=1)[ok] * norm[ok])
    return {"group_size": group_size, "bytes_per_patch": x.shape[1] + 2 * x.shape[1] // group_size,
            "rel_l2_mean": float(rel.mean()), "rel_l2_p99": float(np.quantile(rel, 0.99)),
            "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}  # fmt: skip


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.npy"))


def _throughput(folder: Path, repeats: int, *, per_batch_torch: bool = False) -> dict:
    """One shuffled pass as train-sae reads it on the CPU (``device='cpu'``); ``per_batch_torch``:
    int8 kept in the buffer and dequantised per batch in torch, the path a GPU run takes."""
    features._dequantise_on = (lambda device: device is not None) if per_batch_torch else _DEFAULT_ON
    split = scan_features(folder).all_rows()
    best = float("inf")
    for r in range(repeats):
        t, n = time.perf_counter(), 0
        for x in split.iter_batches(16_384, seed=r, device="cpu"):
            n += len(x)
        best = min(best, time.perf_counter() - t)
    return {"patches": n, "seconds": round(best, 3), "patches_per_second": round(n / best)}


def _train(features: Path, out: Path) -> dict:
    args = ["train-sae", "--features", str(features), "--out", str(out), "--dict-size", "128", "--k", "3",
            "--device", "cpu", "--no-progress"]  # fmt: skip
    t = time.perf_counter()
    assert precompute(args) == 0, args
    m = json.loads((out / "sae_metrics.json").read_text())
    keys = ("fve", "l0", "steps", "patches_per_second")
    return {**{k: m[k] for k in keys}, "wall_seconds": round(time.perf_counter() - t, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-images", type=int, default=1400, help="planted images of 196 patches")
    ap.add_argument("--no-train", action="store_true", help="skip the two train-sae runs")
    ap.add_argument("--repeats", type=int, default=3, help="throughput passes (best is reported)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    report: dict = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": args.threads, "loadavg_1min": os.getloadavg()[0],
                    "note": "2 CPU cores shared with ~6 other engineers' jobs: timings are noisy and low"},
        "command": "python benchmarks/int8_features.py " + " ".join(sys.argv[1:]),
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        assert precompute(["synth", "--out", str(root / "planted"), "--n-images", str(args.n_images),
                           "--no-oracle-atlas", "--no-masks", "--no-taxonomy", *WORLD]) == 0  # fmt: skip
        fp16 = root / "planted" / "features"
        int8 = root / "int8"
        t = time.perf_counter()
        convert_folder(fp16, int8, ConvertConfig(group_size=64))
        convert_s = time.perf_counter() - t
        n_patches = scan_features(fp16).n_rows
        x_planted = scan_features(fp16).all_rows().sample(200_000, seed=0).numpy()
        rng = np.random.default_rng(0)
        x_outlier = rng.standard_normal((50_000, D)).astype(np.float32)
        x_outlier[:, [7, 100, 300]] *= 15
        report["patches"] = n_patches
        report["bytes"] = {
            "fp16_per_patch": _folder_bytes(fp16) / n_patches,
            "int8_g64_per_patch": _folder_bytes(int8) / n_patches,
            "ratio": _folder_bytes(int8) / _folder_bytes(fp16),
            "convert_seconds": round(convert_s, 2),
        }
        report["quantisation_error"] = {
            "planted": [_errors(x_planted, g) for g in GROUPS],
            "gaussian_3_outlier_dims": [_errors(x_outlier, g) for g in GROUPS],
        }
        report["throughput_cpu"] = {
            "fp16": _throughput(fp16, args.repeats),
            "int8 (CPU path: numpy, per chunk)": _throughput(int8, args.repeats),
            "int8 (GPU path on the CPU: torch, per batch)": _throughput(
                int8, args.repeats, per_batch_torch=True
            ),
        }
        features._dequantise_on = _DEFAULT_ON
        if not args.no_train:
            report["train_sae_defaults"] = {
                "fp16": _train(fp16, root / "a16"),
                "int8": _train(int8, root / "a8"),
            }
            tr = report["train_sae_defaults"]
            tr["fve_difference"] = tr["int8"]["fve"] - tr["fp16"]["fve"]
    per_image = {k: VIT_B16_PATCHES * b for k, b in (("fp16", 2 * D), ("int8_g64", D + 2 * D // 64))}
    report["imagenet_1k_vit_b16"] = {
        "bytes_per_image": per_image,
        "total_gb": {k: round(v * IMAGENET_IMAGES / 1e9, 1) for k, v in per_image.items()},
    }
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / "int8-features-cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    (REPORTS / "int8-features-cpu.md").write_text(_markdown(report))
    print(_markdown(report))


def _train_row(name: str, t: dict) -> str:
    return f"| {name} | {t['fve']:.4f} | {t['l0']:.2f} | {t['steps']} | {t['wall_seconds']} |"


def _markdown(r: dict) -> str:
    b, tp = r["bytes"], r["throughput_cpu"]
    lines = [
        "# int8 feature shards vs fp16 (CPU)",
        "",
        f"`{r['command']}`; {r['machine']['cpus']} CPUs, {r['machine']['torch_threads']} torch threads, "
        f"load {r['machine']['loadavg_1min']:.1f}: {r['machine']['note']}.",
        "",
        f"Planted world, {r['patches']:,} patches of d={D}.",
        "",
        "| storage | bytes per patch | ratio to fp16 |",
        "|---|---|---|",
        f"| fp16 | {b['fp16_per_patch']:.1f} | 1 |",
        f"| int8 + fp16 scale per 64 dims | {b['int8_g64_per_patch']:.1f} | {b['ratio']:.3f} |",
        "",
        "Quantisation error against the fp16 values (per patch), by scale group size:",
        "",
        "| data | group size | bytes/patch | rel. L2 mean | rel. L2 p99 | cosine mean | cosine min |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rows in r["quantisation_error"].items():
        for e in rows:
            cells = (name, e["group_size"], e["bytes_per_patch"], f"{e['rel_l2_mean']:.5f}",
                     f"{e['rel_l2_p99']:.5f}", f"{e['cosine_mean']:.6f}",
                     f"{e['cosine_min']:.6f}")  # fmt: skip
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += [
        "",
        "Read + dequantise, one shuffled pass in 16384-patch float32 batches (page cache; best pass):",
        "",
        "| storage | patches/s |",
        "|---|---|",
        *(f"| {k} | {v['patches_per_second']:,} |" for k, v in tp.items()),
    ]
    if "train_sae_defaults" in r:
        tr = r["train_sae_defaults"]
        lines += [
            "",
            "`train-sae --dict-size 128 --k 3` (defaults otherwise), held-out FVE:",
            "",
            "| storage | FVE | L0 | steps | wall s |",
            "|---|---|---|---|---|",
            *(_train_row(k, tr[k]) for k in ("fp16", "int8")),
            "",
            f"FVE difference int8 - fp16: {tr['fve_difference']:+.4f}",
        ]
    im = r["imagenet_1k_vit_b16"]
    lines += [
        "",
        "ImageNet-1k (1,281,167 images) at ViT-B/16 (196 x 512):",
        "",
        "| storage | bytes per image | total |",
        "|---|---|---|",
        *(f"| {k} | {im['bytes_per_image'][k]:,} | {im['total_gb'][k]} GB |" for k in im["bytes_per_image"]),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
