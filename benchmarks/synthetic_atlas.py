"""A synthetic full-size atlas (m = 8192 concepts by default) for app benchmarks, built in minutes on CPU.

    python benchmarks/synthetic_atlas.py --out /tmp/synthetic-atlas [--m 8192] [--n-images 1000]

Nothing is trained: a random-init SAE (the shape of the paper's: d = 512, m = 8192, six Matryoshka
groups), and concept statistics computed by the real streaming accumulator over synthetic sparse
codes that follow a hidden hierarchy (a concept fires with its ancestors, at Zipf-like frequencies),
so the family DAG, the co-occurrence matrix, the histograms and the exemplars have the size and
structure of a real atlas. Names are "concept <i>"; exemplar patches get random feature vectors and
each image a small WebP thumbnail. The manifest says ``random_weights: true``: nothing in it has
meaning; it exists to time the app on an atlas of realistic size.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from insight_core.atlas import Atlas, AtlasLayout, write_manifest
from insight_core.concepts.exemplars import range_sample_images
from insight_core.concepts.families import build_families
from insight_core.concepts.index import IndexConfig, build_index, save_index
from insight_core.concepts.stats import StatsAccumulator, StatsConfig
from insight_core.io import write_json
from insight_core.models.sae import MatryoshkaSAE, SAEConfig

GRID = 14
P = GRID * GRID


def synthetic_family(n: int) -> dict:
    """A ``family_data``-shaped DAG of n nodes (a tree plus extra parents), for graph timings."""
    rng = random.Random(0)
    nodes = [
        {"id": i, "name": f"concept <{i}>", "group": i % 6, "frequency": 1 / (i + 1),
         "role": "center" if i == 0 else "descendant"}
        for i in range(n)
    ]  # fmt: skip
    edges = [{"parent": rng.randrange(i), "child": i, "confidence": 0.8} for i in range(1, n)]
    edges += [{"parent": rng.randrange(i // 2), "child": i, "confidence": 0.76} for i in range(2, n, 3)]
    return {"center": 0, "depth": 6, "truncated": False, "nodes": nodes, "edges": edges}


def _hidden_parents(m: int, rng: np.random.Generator) -> np.ndarray:
    """A random forest: concepts past the first 2 % have a parent among lower ids with prob 0.6."""
    parent = np.full(m, -1, dtype=np.int64)
    for j in range(max(1, m // 50), m):
        if rng.random() < 0.6:
            parent[j] = rng.integers(0, max(1, j // 2))
    return parent


def _codes(m: int, n_images: int, parent: np.ndarray, rng: np.random.Generator, k: int = 12):
    """Batches (codes (B*P, m), image ids, patch ids) of 64 images: per patch a few Zipf-drawn concepts
    and all their ancestors, log-normal activations."""
    weights = 1.0 / np.arange(1, m + 1) ** 0.9
    weights /= weights.sum()
    for start in range(0, n_images, 64):
        b = min(64, n_images - start)
        codes = np.zeros((b * P, m), dtype=np.float32)
        for img in range(b):
            themes = rng.choice(m, size=6, p=weights)  # what the image is about
            for patch in range(P):
                row = img * P + patch
                picked = rng.choice(themes, size=rng.integers(1, 4))
                extra = rng.choice(m, size=max(0, k // 3 - len(picked)), p=weights)
                for j in (*picked, *extra):
                    while j >= 0:  # a concept fires with its ancestors
                        codes[row, j] = max(codes[row, j], float(rng.lognormal(0.5, 0.6)))
                        j = parent[j]
        ids = np.repeat(np.arange(start, start + b), P)
        yield torch.from_numpy(codes), torch.from_numpy(ids), torch.from_numpy(np.tile(np.arange(P), b))


@torch.no_grad()
def _set_threshold(sae: MatryoshkaSAE) -> None:
    """An inference threshold that keeps ~k latents per patch of the example photos, as the
    random-init backbone the manifest names sees them (so /explain behaves like a trained SAE's)."""
    from insight_core.atlas.layout import EXAMPLES_DIR
    from insight_core.data.images import load_image
    from insight_core.models.backbone import BackboneConfig, ClipBackbone

    backbone = ClipBackbone(BackboneConfig(pretrained="none", device="cpu"))
    images = [load_image(p) for p in sorted(EXAMPLES_DIR.glob("*.jpg"))]
    feats = backbone.dense_features(images).patches_bhwd.reshape(-1, 512)
    pre = sae.pre_activations(feats)
    keep = sae.cfg.k * len(feats)
    sae.threshold.fill_(float(pre.flatten().kthvalue(pre.numel() - keep).values))


def build(out: Path, m: int = 8192, n_images: int = 1000, seed: int = 0) -> Path:
    """Write the synthetic atlas to ``out`` (reused when it exists with the same m and images)."""
    layout = AtlasLayout(out)
    stamp = out / "synthetic.json"
    if layout.manifest.is_file() and stamp.is_file():
        doc = json.loads(stamp.read_text())
        if doc.get("m") == m and doc.get("n_images") == n_images:
            return out
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    sae = MatryoshkaSAE(SAEConfig(d_in=512, dict_size=m, k=12), seed=seed)
    _set_threshold(sae)
    sae.save(layout.sae, config_path=layout.sae_config)
    parent = _hidden_parents(m, rng)
    acc = StatsAccumulator(m, StatsConfig())
    for codes, ids, patches in _codes(m, n_images, parent, rng):
        acc.update(codes, ids, patches)
    stats = acc.finalize()
    stats.save(layout.stats_tensors, layout.stats_meta)
    print(f"stats: {time.perf_counter() - t0:.0f} s", flush=True)
    fam = build_families(stats.D_mm, stats.freq_patches_m)
    pq.write_table(pa.table(fam.to_arrays()), str(layout.edges))
    write_json(layout.families, {"config": None, **fam.summary()})
    ends = list(sae.cfg.group_ends)
    group = np.searchsorted(np.asarray(ends), np.arange(m), side="right")
    freq = stats.freq_patches_m.numpy()
    names = [f"concept {i}" for i in range(m)]
    table = {
        "id": np.arange(m, dtype=np.int64), "name": names,
        "name_score": rng.uniform(0.2, 0.3, m).astype(np.float32),
        "name_pos": ["noun"] * m, "top_names": [[f"{n}", f"{n} alt"] for n in names],
        "top_scores": [[0.3, 0.25]] * m, "top_pos": [["noun", "adjective"]] * m,
        "group": group.astype(np.int32), "freq_patches": freq.astype(np.int64),
        "frequency": (freq / stats.n_patches).astype(np.float32),
        "freq_images": stats.freq_images_m.numpy().astype(np.int64),
        "mean_activation": stats.mean_act_m.numpy().astype(np.float32),
        "n_parents": np.diff(fam.parent_ptr).astype(np.int32),
        "n_children": np.diff(fam.child_ptr).astype(np.int32),
    }  # fmt: skip
    pq.write_table(pa.table(table), str(layout.concepts))
    vectors = torch.nn.functional.normalize(torch.randn(m, 512), dim=1)
    save_file({"vectors_md": vectors.contiguous()}, str(layout.concept_vectors))
    save_index(build_index(vectors.numpy(), IndexConfig()), layout.concept_index)
    n_ex = 16
    image_mn = stats.ex_image_mn[:, :n_ex].numpy()
    concept, rank = np.nonzero(image_mn >= 0)
    ex = {"row": np.arange(len(concept), dtype=np.int64), "concept": concept.astype(np.int32),
          "rank": rank.astype(np.int32), "image_id": image_mn[concept, rank].astype(np.int64),
          "patch": stats.ex_patch_mn[:, :n_ex].numpy()[concept, rank].astype(np.int32),
          "activation": stats.ex_act_mn[:, :n_ex].numpy()[concept, rank].astype(np.float32)}  # fmt: skip
    pq.write_table(pa.table(ex), str(layout.exemplars))
    feats = torch.nn.functional.normalize(torch.randn(len(concept), 512), dim=1).numpy()
    save_index(build_index(feats, IndexConfig()), layout.exemplar_index)
    ranges = range_sample_images(stats.hist_mb.numpy(), stats.band_image_msr.numpy(), stats.config.band_bins)
    wanted = np.union1d(ex["image_id"], ranges)
    layout.thumbs_dir.mkdir(parents=True, exist_ok=True)
    thumbs = {}
    for i in wanted.tolist():
        colour = tuple(int(c) for c in rng.integers(40, 220, 3))
        Image.new("RGB", (160, 120), colour).save(layout.thumb(i), format="WEBP", quality=80)
        thumbs[str(i)] = {"path": f"synthetic/{i}.jpg", "width": 640, "height": 480}
    write_json(layout.thumbs_index, thumbs)
    thumb_meta = {"resize": "squash", "grid": [GRID, GRID], "n": len(thumbs)}
    write_json(layout.index_meta, {"format": "insight-index", "version": 1, "dim": 512, "thumbs": thumb_meta})
    backbone = {"arch": "ViT-B-16", "pretrained": "none", "random_weights": True, "resize": "squash",
                "pool": "none", "dinoiser": None, "embed_dim": 512, "grid": [GRID, GRID]}  # fmt: skip
    write_manifest(out, backbone=backbone)
    Atlas.open(out)
    write_json(stamp, {"m": m, "n_images": n_images, "seed": seed, "seconds": time.perf_counter() - t0})
    print(f"synthetic atlas: m={m}, {n_images} images, {fam.n_edges} edges, {len(thumbs)} thumbnails, "
          f"{time.perf_counter() - t0:.0f} s -> {out}")  # fmt: skip
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--m", type=int, default=8192)
    ap.add_argument("--n-images", type=int, default=1000)
    args = ap.parse_args()
    build(args.out, args.m, args.n_images)
    return 0


if __name__ == "__main__":
    sys.exit(main())
