"""Probe benchmark (not a test): planted-world accuracy, training time per epoch, classify throughput.

    nice taskset -c 0,1 .venv/bin/python benchmarks/probe.py --threads 2           # CPU
    .venv/bin/python benchmarks/probe.py --device cuda --train-images 100000        # GPU
    .venv/bin/python benchmarks/probe.py --large-atlas /tmp/insight-large-atlas --only-atlas

1. **planted**: a planted world (40 objects, d=512) with the oracle SAE; images labelled by their
   object (one object per image, then up to three labelled by the largest): held-out top-1 and how
   often the top contributing concept of a correct image is the object or one of its descendants.
2. **train**: seconds per epoch of the L1 probe at the paper's size (m=8192 concepts, [max ; mean] =
   16384 features, 1000 classes, batch 1024) on synthetic sparse image vectors (~300 active concepts
   per image), extrapolated to ImageNet's 1.28M training images.
3. **classify**: ``precompute classify`` end to end on synthetic 196 x 512 features with a random
   m=8192 SAE whose threshold keeps ~12 concepts per patch (SAE encoding + pooling + probe +
   explanations + JSONL), cold (encoding) and warm (pooled codes cached).
4. ``--large-atlas DIR`` builds a synthetic 8192-concept atlas (random ViT-B-16 backbone, random SAE,
   stats, families, names from random words, a 20-class probe trained by ``precompute probe`` and a
   random 1000-class probe) for ``benchmarks/app.py --atlas DIR`` (the ``/classify`` latency).

Writes ``benchmarks/reports/probe-{cpu,gpu}.{json,md}``. Everything runs on random weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from insight_core.atlas import AtlasLayout, register_probes, write_manifest  # noqa: E402
from insight_core.concepts.contributions import probe_decision  # noqa: E402
from insight_core.concepts.pooling import PooledConcepts, pool_images  # noqa: E402
from insight_core.evaluation.probe import probe_logits  # noqa: E402
from insight_core.io import write_json, write_npz  # noqa: E402
from insight_core.models.probe import ConceptProbe, ProbeConfig  # noqa: E402
from insight_core.models.sae import MatryoshkaSAE, SAEConfig  # noqa: E402
from insight_core.planted import WorldConfig, make_world, object_labels, oracle_sae, sample_images  # noqa: E402
from insight_core.training.probe import ProbeTrainConfig, stratified_split, train_probe  # noqa: E402
from precompute import classify, families, name, probe, stats  # noqa: E402
from precompute.options import NamingOptions  # noqa: E402

REPORTS = ROOT / "benchmarks" / "reports"


def bench_planted(device: str, n_images: int) -> dict:
    out = {}
    for key, per_image in (("one_object", (1, 1)), ("up_to_3_objects", (1, 3))):
        world = make_world(WorldConfig(objects_per_image=per_image, n_distractors=10))
        sample = sample_images(world, n_images, seed=1)
        y = object_labels(world, sample.layout)
        pooled = pool_images(oracle_sae(world), torch.from_numpy(sample.feats_npd))
        rows = np.arange(n_images)
        tr, va = stratified_split(y, 0.2, seed=0)
        n_obj = world.config.n_objects
        cfg = ProbeTrainConfig(lr=1e-3, batch_size=256, epochs=100)
        res = train_probe(pooled, (rows[tr], y[tr]), (rows[va], y[va]), world.names[:n_obj],
                          ProbeConfig(world.n_atoms, n_obj), cfg, device=device, progress=False)  # fmt: skip
        pred = probe_logits(res.probe, pooled, rows[va]).argmax(1).numpy()
        ok = pred == y[va]
        fam = []
        for r, p in zip(rows[va][ok], pred[ok], strict=True):
            top = int(probe_decision(res.probe, *pooled.row_concepts(int(r)), int(p)).concepts[0])
            fam.append(top == p or int(p) in world.ancestors(top))
        out[key] = {"n_images": n_images, "n_classes": n_obj, "held_out_top1": float(ok.mean()),
                    "top_concept_in_object_family": float(np.mean(fam)), "train": dataclasses.asdict(cfg),
                    "best_epoch": res.best_epoch}  # fmt: skip
        print(f"planted {key}: held-out top-1 {ok.mean():.3f}, top concept in the object's family "
              f"{np.mean(fam):.3f}")  # fmt: skip
    return out


def synthetic_pooled(n: int, m: int = 8192, per_image: int = 300, seed: int = 0) -> PooledConcepts:
    """Sparse image vectors with Zipf-like concept frequencies (a few concepts in many images)."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, m + 1) ** 0.8
    p /= p.sum()
    cols = [np.sort(rng.choice(m, per_image, replace=False, p=p)) for _ in range(n)]
    cols_e = torch.from_numpy(np.concatenate(cols))
    mx = torch.from_numpy(rng.gamma(2.0, 1.0, len(cols_e)).astype(np.float32))
    mean = mx * torch.from_numpy(rng.uniform(0.005, 0.2, len(cols_e)).astype(np.float32))
    return PooledConcepts(m, torch.arange(n + 1) * per_image, cols_e, mx, mean)


def bench_train(device: str, n_images: int, n_classes: int = 1000, epochs: int = 2) -> dict:
    pooled = synthetic_pooled(n_images)
    y = np.arange(n_images) % n_classes
    rows = np.arange(n_images)
    cfg = ProbeTrainConfig(batch_size=1024, epochs=epochs)  # paper batch and lr
    res = train_probe(pooled, (rows, y), None, [str(c) for c in range(n_classes)],
                      ProbeConfig(8192, n_classes), cfg, device=device, progress=False)  # fmt: skip
    per_epoch = res.seconds_per_epoch
    imagenet = per_epoch * 1_281_167 / n_images
    print(f"train: {per_epoch:.2f} s/epoch for {n_images} images x 16384 features x {n_classes} classes "
          f"-> ~{imagenet / 60:.1f} min/epoch for ImageNet (1.28M images)")  # fmt: skip
    return {"n_images": n_images, "n_classes": n_classes, "features": 16384, "batch_size": 1024,
            "seconds_per_epoch": per_epoch, "images_per_second": n_images / per_epoch,
            "imagenet_minutes_per_epoch": imagenet / 60}  # fmt: skip


def random_sae(m: int = 8192, k: int = 12, seed: int = 0) -> MatryoshkaSAE:
    torch.manual_seed(seed)
    sae = MatryoshkaSAE(SAEConfig(dict_size=m, k=k), seed=seed)
    x = torch.randn(4096, 512)
    with torch.no_grad():  # a threshold that keeps ~k latents per patch
        pre = sae.pre_activations(x)
        sae.threshold.fill_(float(pre.flatten().kthvalue(pre.numel() - k * len(x)).values))
    return sae


def write_features(folder: Path, n_images: int, shard: int = 128, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, s in enumerate(range(0, n_images, shard)):
        n = min(shard, n_images - s)
        np.save(folder / f"shard_{i:05d}.npy", rng.standard_normal((n, 196, 512)).astype(np.float16))


def random_probe(atlas: AtlasLayout, probe_name: str, n_classes: int, m: int = 8192, seed: int = 0) -> None:
    """A probe with random sparse weights (~100 concepts per class) written like ``precompute probe`` does."""
    rng = np.random.default_rng(seed)
    p = ConceptProbe(ProbeConfig(m, n_classes), [f"class {c:04d}" for c in range(n_classes)])
    w = np.zeros((n_classes, 2 * m), np.float32)
    for c in range(n_classes):
        w[c, rng.choice(2 * m, 100, replace=False)] = rng.normal(0, 0.5, 100)
    with torch.no_grad():
        p.weight_cf.copy_(torch.from_numpy(w))
    files = atlas.probe_layout(probe_name)
    files.root.mkdir(parents=True, exist_ok=True)
    p.save(files.weights)
    write_json(files.config, {"format": "insight-concept-probe", "name": probe_name, "classes": p.classes,
                              **p.cfg.to_json(), "random_weights": True, "held_out": "none",
                              "description": "Benchmark probe: random sparse weights."})  # fmt: skip
    write_json(files.metrics, {"held_out": {"top1": None, "top5": None}})


def build_large_atlas(root: Path, n_images: int = 200) -> Path:
    """A synthetic 8192-concept atlas the app can open (random weights everywhere)."""
    layout = AtlasLayout(root)
    if layout.manifest.is_file() and layout.probe_names():
        print(f"large atlas: reusing {root}")
        return root
    t = time.perf_counter()
    feats = root.parent / f"{root.name}-features"
    write_features(feats, n_images)
    root.mkdir(parents=True, exist_ok=True)
    random_sae().save(layout.sae, config_path=layout.sae_config)
    stats.run(stats.StatsJob(atlas=root, features=feats, progress=False))
    families.run(families.FamiliesJob(atlas=root, progress=False))
    rng = np.random.default_rng(0)
    vocab = root.parent / f"{root.name}-vocab.npz"
    emb = rng.standard_normal((3000, 512)).astype(np.float32)
    write_npz(vocab, words=np.array([f"word{i}" for i in range(3000)]),
              embeddings=emb / np.linalg.norm(emb, axis=1, keepdims=True))  # fmt: skip
    name.run(name.NameJob(atlas=root, naming=NamingOptions(vocab_embeddings=vocab), progress=False))
    write_manifest(root, backbone={"arch": "ViT-B-16", "pretrained": "none", "random_weights": True,
                                   "resize": "squash", "pool": "raw", "dinoiser": None, "embed_dim": 512,
                                   "grid": [14, 14]})  # fmt: skip
    labels = root.parent / f"{root.name}-labels.csv"
    labels.write_text("image,label\n" + "".join(f"{i},class{i % 20:02d}\n" for i in range(n_images)))
    probe.run(probe.ProbeJob(atlas=root, features=feats, labels=labels, name="synthetic-20",
                             train=ProbeTrainConfig(lr=1e-2, batch_size=64, epochs=20), progress=False,
                             description="Benchmark probe: random features, random labels."))  # fmt: skip
    random_probe(layout, "synthetic-1000", 1000)
    register_probes(root)
    print(f"large atlas: built {root} in {time.perf_counter() - t:.0f} s")
    return root


def bench_classify(device: str, n_images: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        atlas = AtlasLayout(Path(tmp) / "atlas")
        atlas.root.mkdir()
        random_sae().save(atlas.sae, config_path=atlas.sae_config)
        random_probe(atlas, "p1000", 1000)
        write_features(Path(tmp) / "feats", n_images)
        job = classify.ClassifyJob(atlas=atlas.root, probe="p1000", features=Path(tmp) / "feats",
                                   out=Path(tmp) / "pred.jsonl", device=device, progress=False)  # fmt: skip
        cold = classify.run(job)
        warm = classify.run(job)
    print(f"classify: {cold['images_per_second']:.1f} images/s cold (SAE encoding), "
          f"{warm['images_per_second']:.1f} images/s warm (pooled codes cached), {n_images} images, "
          "m=8192, 1000 classes, top-5 concepts + 3 families per image")  # fmt: skip
    return {"n_images": n_images, "cold_images_per_second": cold["images_per_second"],
            "warm_images_per_second": warm["images_per_second"], "m": 8192, "n_classes": 1000}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    ap.add_argument("--planted-images", type=int, default=3000)
    ap.add_argument("--train-images", type=int, default=4096)
    ap.add_argument("--classify-images", type=int, default=256)
    ap.add_argument("--large-atlas", type=Path, default=None, help="build a synthetic 8192-concept atlas")
    ap.add_argument("--only-atlas", action="store_true", help="only build --large-atlas")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.large_atlas is not None:
        build_large_atlas(args.large_atlas)
        if args.only_atlas:
            return 0
    report = {
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "cpu_affinity": sorted(os.sched_getaffinity(0)),
        "random_weights": True,
    }
    report["planted"] = bench_planted(args.device, args.planted_images)
    report["train"] = bench_train(args.device, args.train_images)
    report["classify"] = bench_classify(args.device, args.classify_images)
    tag = "gpu" if args.device.startswith("cuda") else "cpu"
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / f"probe-{tag}.json").write_text(json.dumps(report, indent=1) + "\n")
    pl, tr, cl = report["planted"], report["train"], report["classify"]
    md = [
        f"# Probe benchmark ({args.device}, {report['torch_threads']} torch threads, "
        f"CPUs {report['cpu_affinity']})",
        "",
        "Random weights throughout (planted world + oracle SAE; synthetic features and vectors).",
        "",
        "| measure | value |",
        "|---|---|",
        f"| planted, one object per image: held-out top-1 | {pl['one_object']['held_out_top1']:.3f} "
        "(target >= 0.95) |",
        f"| planted, one object: top concept = object or descendant (correct images) | "
        f"{pl['one_object']['top_concept_in_object_family']:.3f} (target >= 0.90) |",
        f"| planted, up to 3 objects (largest-object label): held-out top-1 | "
        f"{pl['up_to_3_objects']['held_out_top1']:.3f} (issue: ~0.78 expected) |",
        f"| planted, up to 3 objects: top concept in the object's family | "
        f"{pl['up_to_3_objects']['top_concept_in_object_family']:.3f} |",
        f"| probe training, 16384 features x 1000 classes, batch 1024 | {tr['seconds_per_epoch']:.2f} s/epoch"
        " "
        f"for {tr['n_images']} images ({tr['images_per_second']:.0f} images/s; ImageNet ~"
        f"{tr['imagenet_minutes_per_epoch']:.0f} min/epoch) |",
        f"| classify (SAE + pooling + probe + explanations + JSONL), cold | "
        f"{cl['cold_images_per_second']:.1f} images/s |",
        f"| classify, pooled codes cached | {cl['warm_images_per_second']:.1f} images/s |",
        "",
    ]  # fmt: skip
    (REPORTS / f"probe-{tag}.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
