"""Throughput benchmark: SAE training (patches/s) and backbone dense features (images/s).

Not a test: prints figures and writes ``benchmarks/reports/throughput-<device>.{json,md}``.

SAE: our trainer vs dictionary_learning's ``MatryoshkaBatchTopKTrainer`` (the reference
implementation; install it with ``pip install --no-deps dictionary-learning==0.1.0 einops``), same
planted-world data, same steps, batch and learning rate; both report held-out FVE (BatchTopK codes)
so speed is compared at equal quality. Backbone: ``ClipBackbone.dense_features`` vs plain open_clip
``encode_image`` on the same pixels (random-init weights: speed does not depend on them).

    python benchmarks/throughput.py                 # CPU (or the GPU when present)
    python benchmarks/throughput.py --sae-steps 20 --skip-backbone
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import platform
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from insight_core.evaluation.sae import evaluate
from insight_core.models.backbone import BackboneConfig, ClipBackbone
from insight_core.models.sae import SAEConfig
from insight_core.planted import WorldConfig, make_world, sample_images
from insight_core.training.sae import SAETrainer, TrainConfig

REPORTS = Path(__file__).resolve().parent / "reports"


def planted_rows(n_images: int, seed: int = 0) -> torch.Tensor:
    world = make_world(WorldConfig(seed=seed))
    feats = sample_images(world, n_images, seed=seed).feats_npd
    return torch.from_numpy(feats.reshape(-1, feats.shape[-1]).astype(np.float32))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def heldout_fve(encode_decode, x_nd: torch.Tensor, device: torch.device) -> float:
    with torch.no_grad():
        x = x_nd.to(device)
        err = (x - encode_decode(x)).pow(2).sum()
        return float(1 - err / (x - x.mean(0)).pow(2).sum())


def bench_ours(train_nd, held_nd, cfg: SAEConfig, steps: int, batch: int, lr: float, device) -> dict:
    tcfg = TrainConfig(
        lr=lr,
        batch_size=batch,
        steps=steps + 2,
        warmup_steps=5,
        decay_start_fraction=None,
        threshold_start_step=10**9,
        device=str(device),
    )
    trainer = SAETrainer(cfg, tcfg, len(train_nd))
    batches = [train_nd[(i * batch) % (len(train_nd) - batch) :][:batch].to(device) for i in range(steps + 2)]
    for x in batches[:2]:  # warm-up (allocations, b_dec init)
        trainer.train_step(x)
    sync(device)
    t = time.perf_counter()
    for x in batches[2:]:
        trainer.train_step(x)
    sync(device)
    seconds = time.perf_counter() - t
    fve = heldout_fve(
        lambda x: trainer.sae.decode(trainer.sae.encode(x, use_threshold=False)), held_nd, device
    )
    metrics = evaluate(trainer.sae, held_nd[:8192]) if device.type == "cpu" else {}
    return {
        "patches_per_s": steps * batch / seconds,
        "step_ms": 1000 * seconds / steps,
        "heldout_fve": fve,
        "l0": metrics.get("l0"),
    }


def load_dictionary_learning():
    """Import the trainer module without the package __init__ (which pulls nnsight, wandb, ...)."""
    spec = importlib.util.find_spec("dictionary_learning")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    for name, path in (("dictionary_learning", root), ("dictionary_learning.trainers", root / "trainers")):
        module = types.ModuleType(name)
        module.__path__ = [str(path)]
        sys.modules[name] = module
    return importlib.import_module("dictionary_learning.trainers.matryoshka_batch_top_k")


def bench_dictionary_learning(train_nd, held_nd, cfg: SAEConfig, steps: int, batch: int, lr: float, device):
    mod = load_dictionary_learning()
    if mod is None:
        return {"skipped": "pip install --no-deps dictionary-learning==0.1.0 einops"}
    trainer = mod.MatryoshkaBatchTopKTrainer(
        steps=steps + 2,
        activation_dim=cfg.d_in,
        dict_size=cfg.dict_size,
        k=cfg.k,
        layer=0,
        lm_name="bench",
        group_fractions=list(cfg.group_fractions),
        lr=lr,
        warmup_steps=5,
        threshold_start_step=10**9,
        device=str(device),
        seed=0,
    )
    batches = [train_nd[(i * batch) % (len(train_nd) - batch) :][:batch].to(device) for i in range(steps + 2)]
    for i, x in enumerate(batches[:2]):
        trainer.update(i, x)
    sync(device)
    t = time.perf_counter()
    for i, x in enumerate(batches[2:], start=2):
        trainer.update(i, x)
    sync(device)
    seconds = time.perf_counter() - t
    ae = trainer.ae
    fve = heldout_fve(lambda x: ae.decode(ae.encode(x, use_threshold=False)), held_nd, device)
    return {"patches_per_s": steps * batch / seconds, "step_ms": 1000 * seconds / steps, "heldout_fve": fve}


def bench_backbone(arch: str, n_images: int, batch: int, device: torch.device) -> dict:
    bb = ClipBackbone(BackboneConfig(arch=arch, pretrained="none", device=str(device), batch_size=batch))
    pixels = torch.randn(n_images, 3, *bb.visual.image_size, generator=torch.Generator().manual_seed(0))
    model = bb.model

    def run(fn) -> float:
        fn(pixels[:batch])  # warm-up
        sync(device)
        t = time.perf_counter()
        for s in range(0, n_images, batch):
            fn(pixels[s : s + batch])
        sync(device)
        return n_images / (time.perf_counter() - t)

    def plain(px):
        with torch.no_grad(), bb.autocast():
            return model.encode_image(px.to(device))

    dense = run(bb.dense_features)
    base = run(plain)
    return {
        "arch": arch,
        "dense_images_per_s": dense,
        "encode_image_images_per_s": base,
        "ratio": dense / base,
        "batch": batch,
        "n_images": n_images,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sae-steps", type=int, default=30)
    ap.add_argument("--sae-batch", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--planted-images", type=int, default=1000)
    ap.add_argument("--backbone-images", type=int, default=32)
    ap.add_argument("--backbone-batch", type=int, default=16)
    ap.add_argument("--skip-baseline", action="store_true", help="skip dictionary_learning")
    ap.add_argument("--skip-backbone", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    cfg = SAEConfig()  # d=512, m=8192, k=12, paper groups
    rows = planted_rows(args.planted_images)
    held, train = rows[:8192], rows[8192:]
    report: dict = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "sae": {
            "d": cfg.d_in,
            "m": cfg.dict_size,
            "k": cfg.k,
            "batch": args.sae_batch,
            "steps": args.sae_steps,
            "lr": args.lr,
            "data": f"planted world, {len(train):,} train rows",
        },
    }
    print(
        f"SAE d={cfg.d_in} m={cfg.dict_size} k={cfg.k} batch {args.sae_batch}, "
        f"{args.sae_steps} steps on {device}"
    )
    ours = bench_ours(train, held, cfg, args.sae_steps, args.sae_batch, args.lr, device)
    print(
        f"  insight  : {ours['patches_per_s']:10,.0f} patches/s  ({ours['step_ms']:.0f} ms/step)  "
        f"held-out FVE {ours['heldout_fve']:.3f}"
    )
    report["sae"]["insight"] = ours
    if not args.skip_baseline:
        base = bench_dictionary_learning(train, held, cfg, args.sae_steps, args.sae_batch, args.lr, device)
        report["sae"]["dictionary_learning"] = base
        if "skipped" in base:
            print(f"  dictionary_learning: skipped ({base['skipped']})")
        else:
            speedup = ours["patches_per_s"] / base["patches_per_s"]
            report["sae"]["speedup"] = speedup
            print(
                f"  dict_lrn : {base['patches_per_s']:10,.0f} patches/s  ({base['step_ms']:.0f} ms/step)  "
                f"held-out FVE {base['heldout_fve']:.3f}   -> speed-up x{speedup:.2f}"
            )
    if not args.skip_backbone:
        bb = bench_backbone("ViT-B-16", args.backbone_images, args.backbone_batch, device)
        report["backbone"] = bb
        print(
            f"Backbone {bb['arch']}: dense {bb['dense_images_per_s']:.2f} img/s vs encode_image "
            f"{bb['encode_image_images_per_s']:.2f} img/s -> ratio {bb['ratio']:.3f}"
        )
    REPORTS.mkdir(exist_ok=True)
    tag = "gpu" if device.type == "cuda" else "cpu"
    (REPORTS / f"throughput-{tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    (REPORTS / f"throughput-{tag}.md").write_text(to_markdown(report))
    print(f"report -> {REPORTS / f'throughput-{tag}.md'}")


def to_markdown(r: dict) -> str:
    sae = r["sae"]
    lines = [
        f"# Throughput ({r['device']}, torch {r['torch']}, {r['torch_threads']} threads)",
        "",
        f"SAE d={sae['d']} m={sae['m']} k={sae['k']}, batch {sae['batch']}, "
        f"{sae['steps']} steps, lr {sae['lr']}, "
        f"{sae['data']}",
        "",
        "| trainer | patches/s | ms/step | held-out FVE |",
        "|---|---|---|---|",
    ]
    for name in ("insight", "dictionary_learning"):
        row = sae.get(name)
        if row and "skipped" not in row:
            lines.append(
                f"| {name} | {row['patches_per_s']:,.0f} | {row['step_ms']:.0f} | {row['heldout_fve']:.3f} |"
            )
    if "speedup" in sae:
        lines += ["", f"Speed-up: x{sae['speedup']:.2f}"]
    if "backbone" in r:
        b = r["backbone"]
        lines += [
            "",
            f"Backbone {b['arch']} (batch {b['batch']}, {b['n_images']} images): dense features "
            f"{b['dense_images_per_s']:.2f} img/s, encode_image {b['encode_image_images_per_s']:.2f} img/s, "
            f"ratio {b['ratio']:.3f}",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
