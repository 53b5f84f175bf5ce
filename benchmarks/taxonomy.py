"""Taxonomy-alignment and bias-analysis benchmark (not a test): seconds of the library steps behind
``eval-taxonomy`` and ``eval-bias`` at ImageNet scale, after the pooled codes exist.

    nice taskset -c 0,1 .venv/bin/python benchmarks/taxonomy.py [--images 50000] [--concepts 8192]

Synthetic inputs of the real sizes: m concepts, 1000 classes under a random taxonomy tree (1.9k
nodes before keeping the classes' ancestors, depth ~ 14, near ImageNet-1k's WordNet closure), N
images with ~300 active concepts each (CSR pooled codes, as ``PooledConcepts``), a family DAG of
~1.5 edges per concept. Random numbers: speed
only. Writes benchmarks/reports/taxonomy-cpu.{json,md}.

``--before REF`` also times the library kernels against ``insight_core/concepts/taxonomy.py`` and
``insight_core/evaluation/bias.py`` of a git ref, on the same inputs (outputs asserted equal; float
results to 1e-9): reading a taxonomy + its depths (the 1.9k-node tree and a WordNet-sized 80k-node one;
Kahn's order level by level, vectorised, vs node by node; and a 10k-deep chain, the worst case for
the level-by-level pass) and the Welch tests of
``bias_statistics`` (``scipy.stats.ttest_ind_from_stats`` vs the hand-written t / df / p).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _taxonomy(path: Path, n_classes: int, n_inner: int, rng) -> list[str]:
    """A random tree: inner nodes attached to an earlier inner node, classes to a random inner node."""
    lines = ["child,parent"]
    for i in range(1, n_inner):
        lines.append(f"n{i},n{int(rng.integers(0, i))}")  # random recursive tree: depth ~ e ln(n)
    classes = [f"c{i}" for i in range(n_classes)]
    lines += [f"{c},n{int(rng.integers(n_inner // 2, n_inner))}" for c in classes]
    path.write_text("\n".join(lines) + "\n")
    return classes


def _module_at(ref: str, rel: str):
    """The file ``rel`` of git ``ref`` as a standalone module (its imports resolve to this checkout)."""
    show = ["git", "show", f"{ref}:{rel}"]
    path = Path(tempfile.mkdtemp()) / Path(rel).name
    path.write_text(subprocess.run(show, cwd=ROOT, check=True, capture_output=True, text=True).stdout)
    spec = importlib.util.spec_from_file_location(f"before_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {rel} of {ref}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _best(fn, repeat: int = 3) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


TAXONOMIES = (("1.9k nodes", 900, 1000), ("WordNet-sized, 80k nodes", 60_000, 20_000))
"""(label, inner nodes, classes) of the taxonomies the kernels are timed on."""


def _taxonomy_kernels(tax_before, tax_now, tmp: Path, rng) -> list[dict]:

    rows = []
    chain = tmp / "chain.csv"  # the worst case of a level-by-level pass: one level per node
    chain.write_text("child,parent\n" + "".join(f"n{i + 1},n{i}\n" for i in range(10_000)))
    for label, n_inner, n_classes in (*TAXONOMIES, ("a 10k-deep chain", 0, 0)):
        path = tmp / f"t{n_inner}.csv" if n_inner else chain
        if n_inner:
            _taxonomy(path, n_classes, n_inner, rng)
        out = {}
        for when, mod in (("before", tax_before), ("after", tax_now)):
            tax = mod.read_taxonomy(path)
            out[when] = (tax.nodes, tax.parents, tax.depths().tolist())
            out[f"{when}_s"] = _best(lambda mod=mod, path=path: mod.read_taxonomy(path).depths())[0]
        if out["before"] != out["after"]:
            raise AssertionError(f"read taxonomy + depths ({label}): before and after differ")
        rows.append({"kernel": f"read taxonomy + depths ({label})", "before_s": out["before_s"],
                     "after_s": out["after_s"]})  # fmt: skip
    return rows


def _bias_kernels(bias_before, bias_now, sums: tuple, rng) -> list[dict]:
    import numpy as np

    rows = []
    for n_groups in (2, 8):
        s, ss, fires, n_g = sums
        if n_groups > 2:  # spread the two-group sums over more groups (speed only)
            w = rng.dirichlet(np.ones(n_groups))
            s, ss, fires = (np.outer(w, x.sum(0)) for x in (s, ss, fires))
            n_g = np.maximum((w * n_g.sum()).astype(np.int64), 2)
        inputs = (s, ss, np.round(fires), n_g, [f"g{i}" for i in range(n_groups)])
        res, secs = {}, {}
        for when, mod in (("before", bias_before), ("after", bias_now)):
            run = functools.partial(mod.bias_statistics, *inputs, cfg=mod.BiasConfig())
            secs[when], res[when] = _best(run)
        for field in ("t_gm", "p_gm", "q_gm"):
            a, b = getattr(res["before"], field), getattr(res["after"], field)
            if not np.allclose(a, b, rtol=1e-9, atol=1e-12, equal_nan=True):
                raise AssertionError(f"bias_statistics {field}: before and after differ")
        rows.append({"kernel": f"bias: d, Welch tests, BH ({n_groups} groups x {s.shape[1]} concepts)",
                     "before_s": secs["before"], "after_s": secs["after"]})  # fmt: skip
    return rows


def kernels_vs(ref: str, sums: tuple, rng) -> list[dict]:
    """Seconds (best of 3) of this checkout's taxonomy/bias kernels and ``ref``'s, same inputs."""
    from insight_core.concepts import taxonomy as tax_now
    from insight_core.evaluation import bias as bias_now

    tax_before = _module_at(ref, "insight_core/concepts/taxonomy.py")
    bias_before = _module_at(ref, "insight_core/evaluation/bias.py")
    with tempfile.TemporaryDirectory() as tmp:
        rows = _taxonomy_kernels(tax_before, tax_now, Path(tmp), rng)
    rows += _bias_kernels(bias_before, bias_now, sums, rng)
    for r in rows:
        print(f"{r['kernel']}: before {r['before_s']:.3f} s, after {r['after_s']:.3f} s", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--concepts", type=int, default=8192)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--active", type=int, default=300, help="active concepts per image")
    ap.add_argument("--out", default=None)
    ap.add_argument("--before", default=None, help="git ref whose taxonomy/bias kernels are timed too")
    args = ap.parse_args()

    import numpy as np
    import torch

    from insight_core.concepts.families import Families
    from insight_core.concepts.pooling import PooledConcepts
    from insight_core.concepts.taxonomy import (
        TaxonomyConfig,
        align,
        class_statistics,
        map_concepts,
        read_taxonomy,
    )
    from insight_core.evaluation.bias import BiasConfig, bias_statistics, group_sums

    rng = np.random.default_rng(0)
    n, m, c, k = args.images, args.concepts, args.classes, args.active
    times: dict[str, float] = {}

    def timed(name: str, fn):
        t0 = time.perf_counter()
        out = fn()
        times[name] = time.perf_counter() - t0
        print(f"{name}: {times[name]:.2f} s", flush=True)
        return out

    cols = np.sort(rng.random((n, m)).argpartition(k, axis=1)[:, :k], axis=1) if n * m <= 2e8 else None
    if cols is None:
        cols = np.stack([np.sort(rng.choice(m, k, replace=False)) for _ in range(n)])
    indptr = torch.arange(0, n * k + 1, k, dtype=torch.int64)
    vals = torch.from_numpy(rng.exponential(1.0, n * k).astype(np.float32))
    pooled = PooledConcepts(m, indptr, torch.from_numpy(cols.reshape(-1)), vals * 2, vals)
    y = rng.integers(0, c, n)
    with tempfile.TemporaryDirectory() as tmp:
        classes = _taxonomy(Path(tmp) / "t.csv", c, 900, rng)
        tax_full = timed("read taxonomy (1.9k nodes, 1.9k edges)", lambda: read_taxonomy(Path(tmp) / "t.csv"))
    nodes = tax_full.resolve_classes(classes, "labels")
    tax, new_of = timed("restrict to the classes' ancestors", lambda: tax_full.restrict(nodes))
    member = np.zeros((tax.n, c), dtype=bool)
    for ci, node in enumerate(new_of[nodes].tolist()):
        member[[node, *tax.ancestors(node)], ci] = True
    depth = tax.depths()
    anc = timed("ancestor matrix", tax.ancestor_matrix)
    stats = timed("class statistics (sparse sums)", lambda: class_statistics(pooled, np.arange(n), y, c))
    mapping = timed("map concepts to nodes", lambda: map_concepts(*stats, member, depth, TaxonomyConfig()))
    parent = rng.integers(0, m, 3 * m)
    child = rng.integers(0, m, 3 * m)
    keep = parent < child  # acyclic
    pairs = np.unique(np.stack([parent[keep], child[keep]], 1), axis=0)
    fam = Families.from_arrays(m, pairs[:, 0], pairs[:, 1], np.ones(len(pairs)))
    group = np.minimum(np.arange(m) * 6 // m, 5)
    res = timed("edge agreement + depth correlation", lambda: align(mapping.node_m, fam, anc, depth, group))
    g = rng.integers(0, 2, n)
    sums = timed("bias: group sums", lambda: group_sums(pooled, np.arange(n), g, 2))
    timed("bias: d, Welch tests, BH", lambda: bias_statistics(*sums, groups=["a", "b"], cfg=BiasConfig()))
    kernels = kernels_vs(args.before, sums, rng) if args.before else []
    report = {
        "images": n, "concepts": m, "classes": c, "taxonomy_nodes": tax.n, "max_depth": int(depth.max()),
        "active_per_image": k, "family_edges": int(fam.n_edges), "mapped": res.n_mapped,
        "seconds": {key: round(v, 3) for key, v in times.items()},
        "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(), "note": "random data: speed only",
        "before": args.before, "kernels_before_after": kernels,
    }  # fmt: skip
    out = Path(args.out or ROOT / "benchmarks" / "reports" / "taxonomy-cpu")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    md = [
        f"# Taxonomy alignment / bias analysis benchmark (cpu, CPUs {report['cpus']})",
        "",
        f"{n} images x {k} active concepts (pooled, CSR), m = {m}, {c} classes under {tax.n} taxonomy nodes "
        f"(depth up to {report['max_depth']}), {fam.n_edges} family edges. Random data: speed only; the "
        "pooling of the patch codes (shared with `probe`, cached) is not included.",
        "",
        "| step | seconds |",
        "|---|---|",
        *[f"| {key} | {v:.2f} |" for key, v in times.items()],
    ]
    if kernels:
        md += ["", f"Library kernels, `{args.before}` vs this checkout (best of 3, outputs asserted equal):",
               "", "| kernel | before (s) | after (s) |", "|---|---|---|"]  # fmt: skip
        md += [f"| {r['kernel']} | {r['before_s']:.3f} | {r['after_s']:.3f} |" for r in kernels]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
