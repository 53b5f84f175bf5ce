"""SAE defaults benchmark: ``train-sae`` given nothing but the dictionary, on planted patches.

Not a test: prints figures and writes ``benchmarks/reports/sae-defaults-{cpu,gpu}.{json,md}``.

    python benchmarks/sae_defaults.py [--n-images 1400] [--no-paper-settings]

The acceptance run of the automatic settings: ``train-sae --features DIR --out A --dict-size 128
--k 3`` with nothing else, on ~270k patches of a planted world whose 112 atoms a 128-concept, k = 3
SAE can represent (20 objects x 3 parts, 16 attributes, 16 backgrounds; written by ``python -m
precompute synth``). For comparison, the same data with the paper's fixed settings (batch 16384,
lr 1e-4, 3 epochs): what ``train-sae`` did before the settings followed the data size.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from precompute.__main__ import main as precompute

REPORTS = Path(__file__).resolve().parent / "reports"
WORLD = ["--world.n-objects", "20", "--world.subparts-per-part", "0", "--world.n-attributes", "16",
         "--world.n-backgrounds", "16"]  # fmt: skip
PAPER = ["--batch-size", "16384", "--lr", "1e-4", "--epochs", "3"]


def train(features: Path, out: Path, extra: list[str], device: str) -> dict:
    args = ["train-sae", "--features", str(features), "--out", str(out), "--dict-size", "128", "--k", "3",
            "--device", device, "--no-progress", *extra]  # fmt: skip
    t, cpu = time.perf_counter(), time.process_time()
    assert precompute(args) == 0, args
    seconds, cpu_seconds = time.perf_counter() - t, time.process_time() - cpu
    m = json.loads((out / "sae_metrics.json").read_text())
    keys = ("fve", "l0", "steps", "samples_seen", "patches_per_second", "warnings")
    return {
        "command": "python -m precompute " + " ".join(args[:9] + args[11:-1]),
        "wall_seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),
        "batch_size": m["schedule"]["batch_size"],
        "lr": m["schedule"]["lr"],
        "auto": m["schedule"]["auto"],
        **{k: m[k] for k in keys},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-images", type=int, default=1400, help="planted images of 196 patches")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-paper-settings", action="store_true", help="skip the fixed-settings comparison")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kind = "gpu" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        planted = Path(tmp) / "planted"
        assert precompute(["synth", "--out", str(planted), "--n-images", str(args.n_images),
                           "--no-oracle-atlas", *WORLD]) == 0  # fmt: skip
        features = planted / "features"
        runs = {"defaults": train(features, Path(tmp) / "auto", [], args.device)}
        if not args.no_paper_settings:
            runs["paper_fixed"] = train(features, Path(tmp) / "paper", PAPER, args.device)
    report = {
        "machine": f"{kind}, {args.threads} threads" if kind == "cpu" else torch.cuda.get_device_name(),
        "n_patches": args.n_images * 196,
        "world": " ".join(WORLD),
        "goal": "held-out FVE >= 0.9 in a few CPU minutes with defaults",
        "runs": runs,
    }
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / f"sae-defaults-{kind}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# train-sae defaults on planted patches ({report['machine']})",
        "",
        f"{report['n_patches']:,} patches (`python -m precompute synth --n-images {args.n_images} "
        f"{report['world']}`), `--dict-size 128 --k 3`.",
        "",
        "| settings | batch | lr | steps | held-out FVE | L0 | wall s | CPU s | warnings |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        lines.append(
            f"| {name} | {r['batch_size']} | {r['lr']:.2e} | {r['steps']} | **{r['fve']:.3f}** | "
            f"{r['l0']:.2f} | {r['wall_seconds']:.0f} | {r['cpu_seconds']:.0f} | {len(r['warnings'])} |"
        )
    (REPORTS / f"sae-defaults-{kind}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
