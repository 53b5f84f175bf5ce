"""Sparse vs dense statistics on real photos at m = 8,192: the same edges, concept vectors, names, rows.

Not a test (extracting 1000 photos takes minutes on CPU): prints the comparison and writes
``benchmarks/reports/stats-sparse-photos.{json,md}``.

    python -m precompute extract --images ../shared/data/imagenet-samples --out /tmp/feats \
        --pretrained none
    python benchmarks/stats_sparse_photos.py --features /tmp/feats

A random-init m = 8,192 SAE (d = 512, threshold set on the photos' features to keep ~k = 12 latents
per patch) encodes the features once; the codes go through the dense accumulator of git
``--baseline-ref`` (default: the merge-base of HEAD and main) and through this tree's sparse one.
Compared: family edges
(``build_families`` on the dense D vs on the CSR D), Eq. B.9 concept vectors and the names they get
against a random 2,000-word vocabulary, and every co-occurrence row (entries >= the floor).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from stats_sparse import _baseline_module, _random_sae  # noqa: E402

from insight_core.concepts.families import build_families  # noqa: E402
from insight_core.concepts.naming import concept_vectors, name_concepts, parents_from_edges  # noqa: E402
from insight_core.concepts.stats import StatsAccumulator  # noqa: E402
from insight_core.concepts.vocab_embeddings import VocabEmbeddings  # noqa: E402
from insight_core.data.features import scan_features  # noqa: E402

REPORTS = Path(__file__).resolve().parent / "reports"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", type=Path, required=True)
    ap.add_argument("--baseline-ref", default=None)
    args = ap.parse_args()
    ref = args.baseline_ref or subprocess.run(["git", "merge-base", "HEAD", "main"], cwd=ROOT, check=True,
                                              capture_output=True, text=True).stdout.strip()  # fmt: skip
    m = 8192
    sae = _random_sae(m, 12)
    dense_acc, sparse_acc = _baseline_module(ref).StatsAccumulator(m), StatsAccumulator(m)
    feats = scan_features(args.features)
    first = torch.as_tensor(next(iter(feats.iter_image_batches(16)))[0]).float().reshape(-1, 512)
    with torch.no_grad():  # threshold on the photos' own features: ~12 active latents per patch
        pre = sae.pre_activations(first[:2048])
        sae.threshold.fill_(float(pre.flatten().kthvalue(pre.numel() - 12 * len(pre)).values))
    n_patches = 0
    for feats_bpd, ids in feats.iter_image_batches(64):
        feats_bpd = torch.as_tensor(feats_bpd).float()
        b, p, d = feats_bpd.shape
        with torch.no_grad():
            codes = sae.encode(feats_bpd.reshape(b * p, d))
        img, patch = torch.as_tensor(ids).long().repeat_interleave(p), torch.arange(p).repeat(b)
        dense_acc.update(codes, img, patch)
        sparse_acc.update(codes, img, patch)
        n_patches += b * p
    dense, sparse = dense_acc.finalize(), sparse_acc.finalize()
    d_mm = dense.D_mm
    fam_d = build_families(d_mm, dense.freq_patches_m)
    fam_s = build_families(sparse.cooc, sparse.freq_patches_m)
    same_edges = bool(
        np.array_equal(fam_d.parent_e, fam_s.parent_e) and np.array_equal(fam_d.child_e, fam_s.child_e)
    )
    conf_diff = 0.0
    if same_edges and len(fam_d.parent_e):
        conf_diff = float(np.abs(fam_d.confidence_e - fam_s.confidence_e).max())
    rng = np.random.default_rng(0)
    W, b_dec = sae.W_dec_md.detach().numpy(), sae.b_dec_d.detach().numpy()
    parents = parents_from_edges(fam_d.parent_e, fam_d.child_e, m)
    v_d = concept_vectors(W, b_dec, parents, d_mm.numpy(), dense.w_pairs)
    v_s = concept_vectors(W, b_dec, parents, sparse.cooc.lookup, sparse.w_pairs)
    words = tuple(f"w{i}" for i in range(2000))
    vocab = VocabEmbeddings(words, rng.standard_normal((1, 2000, W.shape[1])).astype(np.float32), ("any",))
    names_d = [r["name"] for r in name_concepts(v_d, vocab).to_records()]
    names_s = [r["name"] for r in name_concepts(v_s, vocab).to_records()]
    floor = sparse.cooc.floor
    ref_rows = torch.where(d_mm >= floor, d_mm, torch.zeros(()))
    row_diff = float((sparse.cooc.to_dense() - ref_rows).abs().max())
    report = {
        "features": str(args.features), "baseline_ref": ref, "m": m, "patches": n_patches,
        "images": sparse.n_images, "active_concepts": int((sparse.freq_patches_m > 0).sum()),
        "edges_dense": len(fam_d.parent_e), "edges_sparse": len(fam_s.parent_e), "same_edges": same_edges,
        "max_confidence_diff": conf_diff, "max_vector_diff": float(np.abs(v_d - v_s).max()),
        "same_names": names_d == names_s, "floor": floor, "max_row_diff_at_or_above_floor": row_diff,
        "d_entries_dense_nonzero": int((d_mm != 0).sum()), "d_entries_sparse": sparse.cooc.nnz,
        "d_bytes_dense": d_mm.numel() * 4, "d_bytes_sparse": sparse.cooc.nbytes,
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / "stats-sparse-photos.json").write_text(json.dumps(report, indent=2) + "\n")
    md = [
        "# Sparse vs dense statistics on real photos (m = 8,192, random-init backbone and SAE)", "",
        f"{report['images']} photos, {n_patches:,} patches, {report['active_concepts']} active concepts; "
        f"dense = `{ref[:10]}`'s accumulator.", "",
        f"- edges: dense {report['edges_dense']}, sparse {report['edges_sparse']}, identical: "
        f"**{same_edges}** (max confidence difference {conf_diff:.2g})",
        f"- concept vectors: max difference {report['max_vector_diff']:.2g}; names identical: "
        f"**{report['same_names']}**",
        f"- co-occurrence rows: max difference {row_diff:.2g} at entries >= the floor {floor}",
        f"- D: {report['d_entries_sparse']:,} stored entries ({report['d_bytes_sparse'] / 1e6:.1f} MB) vs "
        f"{report['d_entries_dense_nonzero']:,} non-zero of a dense {report['d_bytes_dense'] / 1e6:.0f} MB",
    ]  # fmt: skip
    (REPORTS / "stats-sparse-photos.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
