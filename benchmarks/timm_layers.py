"""Throughput of timm block tokens (``TimmBackbone.layer_tokens``), images/s.

Not a test: prints figures and writes ``benchmarks/reports/timm-layers-<device>.{json,md}``.
Compares, on the same preprocessed pixels (random-init weights: speed does not depend on them):

- ``forward_features``: timm's own full forward (the reference cost of one pass);
- ``one pass``: our ``layer_tokens`` for the last block, and for several blocks at once (what
  ``extract --layer -1 -4 -8`` runs);
- ``separate passes``: one ``layer_tokens`` call per block (what one extract per layer would cost).

    python benchmarks/timm_layers.py                                   # CPU (or the GPU when present)
    python benchmarks/timm_layers.py --model vit_base_patch14_dinov2.lvd142m --batch 64 --images 512
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from insight_core.models.timm_backbone import TimmBackbone, TimmConfig

REPORTS = Path(__file__).resolve().parent / "reports"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rate(fn, pixels: torch.Tensor, device: torch.device, repeats: int) -> float:
    fn(pixels[: min(2, len(pixels))])  # warm-up (cudnn, allocator)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn(pixels)
    _sync(device)
    return repeats * len(pixels) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_small_patch14_dinov2.lvd142m")
    ap.add_argument("--layers", type=int, nargs="+", default=[-1, -4, -8])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    bb = TimmBackbone(TimmConfig(name=args.model, pretrained="none", layers=tuple(args.layers),
                                 device=args.device, batch_size=args.batch))  # fmt: skip
    device = bb.device
    pixels = torch.randn(args.images, 3, *bb.image_size)

    def plain(px: torch.Tensor) -> None:
        with torch.no_grad(), bb.autocast():
            for start in range(0, len(px), args.batch):
                bb.model.forward_features(px[start : start + args.batch].to(device))

    n = len(args.layers)
    paths = {
        "forward_features (timm, full pass)": plain,
        "layer_tokens, last block": lambda px: bb.layer_tokens(px, [-1]),
        f"layer_tokens, {n} blocks in one pass": bb.layer_tokens,
        f"layer_tokens, {n} separate passes": lambda px: [bb.layer_tokens(px, [i]) for i in args.layers],
    }
    figures = {name: _rate(fn, pixels, device, args.repeats) for name, fn in paths.items()}
    report = {
        "model": args.model, "layers": args.layers, "grid": list(bb.grid_hw), "images": args.images,
        "batch": args.batch, "device": str(device), "dtype": str(bb.compute_dtype),
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "images_per_s": {k: round(v, 2) for k, v in figures.items()},
    }  # fmt: skip
    for name, rate in figures.items():
        print(f"{name:45s} {rate:9.2f} img/s")
    REPORTS.mkdir(exist_ok=True)
    tag = "gpu" if device.type == "cuda" else "cpu"
    (REPORTS / f"timm-layers-{tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    gh, gw = bb.grid_hw
    layers = " ".join(map(str, args.layers))
    command = (f"python benchmarks/timm_layers.py --model {args.model} --layers {layers} "
               f"--images {args.images} --batch {args.batch}")  # fmt: skip
    lines = [f"# timm block tokens: {args.model}, {gh}x{gw} grid, {device} ({bb.compute_dtype})", "",
             f"`{command}`", "", "| path | images/s |", "|---|---|",
             *[f"| {k} | {v:.2f} |" for k, v in figures.items()], ""]  # fmt: skip
    (REPORTS / f"timm-layers-{tag}.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
