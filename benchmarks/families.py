"""Families benchmark: the hand-written graph passes of ``insight_core.concepts.families`` against their
networkx counterparts at m = 8192..65536, and the ``families`` build before/after a git ref.

Not a test: prints figures and writes ``benchmarks/reports/families-{tag}.{json,md}``.

    python benchmarks/families.py                            # pieces at m = 8192..65536
    python benchmarks/families.py --before main --sizes 8192 # + the build of a git ref, same input

Inputs are synthetic, shaped like an SAE's candidate edges (:func:`synthetic_candidates`): a planted
forest over Matryoshka-like levels (each concept implies all its ancestors, so grandparent edges are
candidates too) plus random "noise" implications that create mutual pairs and longer cycles.

Per m, each hand-written pass and its networkx equivalent run on the same graph and must agree
(asserted); the networkx time includes building the ``nx.DiGraph`` it needs (the hand-written code
works on the CSR arrays the ``Families`` object already has):

- scc: scipy's ``connected_components(connection="strong")`` vs ``nx.strongly_connected_components``
  (and, with ``--before REF``, vs that ref's ``_strongly_connected``: the iterative Tarjan it replaced);
- cycle check: Pearce-Kelly incremental order vs ``nx.has_path`` per intra-component edge;
- depth: Kahn's order + longest-path relaxation vs ``nx.topological_generations``;
- walks: 200 depth-2 and 200 unlimited ancestor+descendant queries vs ``nx`` BFS / ``nx.ancestors``;
- family sizes: one walk per root vs ``nx.descendants`` per root;
- transitive: Python-int bitsets vs ``nx.transitive_reduction`` (skipped above ``--max-nx-transitive``).

``build``: ``build_families`` on a dense D (m, m) holding the candidates, plus ``summary()`` (the
``families`` stage minus I/O); with ``--before REF`` the same for ``insight_core/concepts/families.py``
of that git ref, and the edges (parent, child, confidence) must be identical.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import networkx as nx
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from insight_core.concepts import families as F  # noqa: E402

REPORTS = Path(__file__).resolve().parent / "reports"
PIECES = ("scc", "cycle_check", "depth", "walks", "family_sizes", "transitive")


def synthetic_candidates(m: int, seed: int = 0, noise_per_concept: float = 0.1) -> tuple[np.ndarray, ...]:
    """Candidate implications ``(child, parent, confidence)`` and patch counts of ``m`` concepts.

    Levels sized like the Matryoshka groups (coarse concepts few and frequent); every concept below
    the top level has one parent one level up (10 % a second one) and implies all its ancestors
    (confidence 0.75..1); ``noise_per_concept * m`` random implications add mutual pairs and cycles.
    """
    rng = np.random.default_rng(seed)
    fractions = np.array([0.008, 0.03, 0.06, 0.12, 0.24, 0.542])
    ends = np.minimum(np.cumsum(np.floor(fractions * m).astype(int)), m)
    ends[-1] = m
    starts = np.concatenate([[0], ends[:-1]])
    anc: list[set[int]] = [set() for _ in range(m)]
    for lvl in range(1, len(ends)):
        for node in range(starts[lvl], ends[lvl]):  # levels are in id order: parents are done first
            n_par = 2 if rng.random() < 0.1 else 1
            for p in rng.integers(starts[lvl - 1], ends[lvl - 1], n_par).tolist():
                anc[node] |= {p} | anc[p]
    child = [c for c in range(m) for _ in anc[c]]
    parent = [p for c in range(m) for p in sorted(anc[c])]
    n_noise = int(noise_per_concept * m)
    child += rng.integers(0, m, n_noise).tolist()
    parent += rng.integers(0, m, n_noise).tolist()
    c_e, p_e = np.asarray(child, np.int64), np.asarray(parent, np.int64)
    key = np.unique((c_e * m + p_e)[c_e != p_e])
    c_e, p_e = key // m, key % m
    conf = rng.uniform(0.75, 1.0, len(c_e)).astype(np.float32)
    freq = np.zeros(m, np.int64)
    for lvl, (s, e) in enumerate(zip(starts, ends, strict=True)):
        freq[s:e] = rng.integers(50, 5000, e - s) // (lvl + 1)
    return c_e, p_e, conf, freq


def dense_matrix(m: int, c_e: np.ndarray, p_e: np.ndarray, conf: np.ndarray, seed: int = 0) -> torch.Tensor:
    """A dense D (m, m): the candidates, sub-threshold background values elsewhere, 1 on the diagonal."""
    rng = np.random.default_rng(seed + 1)
    d = torch.from_numpy(rng.random((m, m), dtype=np.float32) * 0.6)
    d[torch.from_numpy(c_e), torch.from_numpy(p_e)] = torch.from_numpy(conf)
    d.fill_diagonal_(1.0)
    return d


def load_module_at(ref: str) -> ModuleType:
    """``insight_core/concepts/families.py`` of git ``ref`` as a standalone module."""
    src = subprocess.run(
        ["git", "show", f"{ref}:insight_core/concepts/families.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    tmp = Path(tempfile.mkdtemp()) / "families_before.py"
    tmp.write_text(src)
    spec = importlib.util.spec_from_file_location("families_before", tmp)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load the families module of {ref}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def timed(fn: Callable[[], Any], repeat: int = 1) -> tuple[float, Any]:
    """Best wall time of ``repeat`` runs (seconds) and the last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def _digraph(m: int, p: np.ndarray, c: np.ndarray) -> nx.DiGraph:
    g = nx.DiGraph()
    g.add_nodes_from(range(m))
    g.add_edges_from(zip(p.tolist(), c.tolist(), strict=True))
    return g


def _edges(fam: Any) -> tuple[list, list, list]:
    return fam.parent_e.tolist(), fam.child_e.tolist(), fam.confidence_e.tolist()


def bench_pieces(
    m: int, c_e, p_e, conf, freq, max_nx_transitive: int, before: ModuleType | None = None
) -> tuple[dict, Any]:
    """Hand-written vs networkx, per pass, on the graph of this input (see the module docstring)."""
    out: dict[str, dict] = {}
    p, c, cf, _ = F._break_mutual(m, p_e, c_e, conf, freq)
    order = np.lexsort((c, p, -cf.astype(np.float64)))
    p, c, cf = p[order], c[order], cf[order]

    def nx_scc() -> np.ndarray:
        comp = np.full(m, -1, np.int64)
        for i, nodes in enumerate(nx.strongly_connected_components(_digraph(m, p, c))):
            comp[list(nodes)] = i
        return comp

    t_hand, comp = timed(lambda: F._strongly_connected(m, p, c))
    t_nx, comp_nx = timed(nx_scc)
    same = comp[p] == comp[c]
    assert np.array_equal(same, comp_nx[p] == comp_nx[c]), "scc: the two disagree"
    out["scc"] = {"hand_s": t_hand, "nx_s": t_nx, "edges": len(p)}
    if before is not None:
        t_before, comp_before = timed(lambda: before._strongly_connected(m, p, c))
        assert np.array_equal(same, comp_before[p] == comp_before[c]), "scc: before and after disagree"
        out["scc"]["before_s"] = t_before

    inside = np.flatnonzero(same)

    def pearce_kelly() -> np.ndarray:
        topo, keep = F._DynamicTopoOrder(m), np.ones(len(p), bool)
        for e in inside.tolist():
            keep[e] = topo.add(int(p[e]), int(c[e]))
        return keep

    def nx_has_path() -> np.ndarray:
        outside = np.ones(len(p), bool)
        outside[inside] = False
        g, keep = _digraph(m, p[outside], c[outside]), np.ones(len(p), bool)
        for e in inside.tolist():
            u, v = int(p[e]), int(c[e])
            if nx.has_path(g, v, u):
                keep[e] = False
            else:
                g.add_edge(u, v)
        return keep

    t_hand, keep = timed(pearce_kelly)
    t_nx, keep_nx = timed(nx_has_path)
    assert np.array_equal(keep, keep_nx), "cycle check: the two disagree"
    out["cycle_check"] = {"hand_s": t_hand, "nx_s": t_nx, "intra_component_edges": len(inside)}

    p, c, cf = p[keep], c[keep], cf[keep]
    fam = F.Families(m, p, c, cf)

    def nx_depth() -> np.ndarray:
        depth = np.zeros(m, np.int64)
        for lvl, nodes in enumerate(nx.topological_generations(_digraph(m, p, c))):
            depth[list(nodes)] = lvl
        return depth

    t_hand, fam2 = timed(lambda: F.Families(m, p, c, cf))  # CSR + Kahn + depths: what the DAG needs
    t_nx, depth_nx = timed(nx_depth)
    assert np.array_equal(fam2.depth_m, depth_nx), "depth: the two disagree"
    out["depth"] = {"hand_s": t_hand, "nx_s": t_nx, "max_depth": int(fam.depth_m.max())}

    queries = np.random.default_rng(1).integers(0, m, 200).tolist()

    def hand_walks() -> list:
        return [
            (fam.ancestors(i, 2), fam.descendants(i, 2), fam.ancestors(i), fam.descendants(i))
            for i in queries
        ]

    def nx_walks() -> list:
        g = _digraph(m, p, c)
        rev = g.reverse(copy=False)

        def near(graph: Any, i: int) -> np.ndarray:
            return np.asarray(sorted(set(nx.single_source_shortest_path_length(graph, i, cutoff=2)) - {i}))

        def every(found: set) -> np.ndarray:
            return np.asarray(sorted(found))

        return [
            (near(rev, i), near(g, i), every(nx.ancestors(g, i)), every(nx.descendants(g, i)))
            for i in queries
        ]

    t_hand, walks = timed(hand_walks)
    t_nx, walks_nx = timed(nx_walks)
    pairs = [(a, b) for wa, wb in zip(walks, walks_nx, strict=True) for a, b in zip(wa, wb, strict=True)]
    assert all(np.array_equal(a, b) for a, b in pairs), "walks: the two disagree"
    out["walks"] = {"hand_s": t_hand, "nx_s": t_nx, "queries": len(queries)}

    def nx_sizes() -> np.ndarray:
        g = _digraph(m, p, c)
        return np.asarray([1 + len(nx.descendants(g, r)) for r in fam.roots.tolist()])

    t_hand, sizes = timed(fam.family_sizes)
    t_nx, sizes_nx = timed(nx_sizes)
    assert np.array_equal(sizes, sizes_nx), "family sizes: the two disagree"
    out["family_sizes"] = {"hand_s": t_hand, "nx_s": t_nx, "roots": len(fam.roots)}

    def nx_transitive() -> np.ndarray:
        tr = nx.transitive_reduction(_digraph(m, p, c))
        return np.asarray([not tr.has_edge(u, v) for u, v in zip(p.tolist(), c.tolist(), strict=True)])

    t_hand, red = timed(lambda: F._transitive_redundant(m, p, c))
    row = {"hand_s": t_hand, "nx_s": None, "redundant_edges": int(red.sum())}
    if m <= max_nx_transitive:
        row["nx_s"], red_nx = timed(nx_transitive)
        assert np.array_equal(red, red_nx), "transitive: the two disagree"
    out["transitive"] = row
    return out, fam


def identical_on_real_inputs(before: ModuleType, atlases: list[Path]) -> list[dict]:
    """Edges of ``before`` vs this checkout on planted worlds (oracle codes, clean and noisy) and on the
    statistics of existing atlases (``--atlas``), with and without transitive edges."""
    from insight_core.atlas import AtlasLayout
    from insight_core.concepts.stats import ConceptStats, StatsAccumulator, StatsConfig
    from insight_core.planted import WorldConfig, make_world, oracle_codes, sample_images

    inputs: list[tuple[str, Any, Any]] = []
    small = WorldConfig(d=128, n_objects=8, n_attributes=8, n_backgrounds=4, n_distractors=0, seed=1)
    worlds = [("planted (tests)", small, 300), ("planted (default)", WorldConfig(), 400)]
    for name, wcfg, n in worlds:
        world = make_world(wcfg)
        codes = oracle_codes(world, sample_images(world, n, seed=0)).reshape(-1, world.n_atoms)
        rng = np.random.default_rng(0)
        noisy = codes * np.clip(1 + 0.1 * rng.standard_normal(codes.shape), 0.5, 1.5).astype(np.float32)
        spurious = rng.random(codes.shape) < 0.002
        noisy[spurious] += rng.uniform(0.05, 0.3, int(spurious.sum())).astype(np.float32)
        for label, c in ((name, codes), (f"{name}, noisy", noisy)):
            p = world.config.n_patches
            acc = StatsAccumulator(world.n_atoms, StatsConfig(top_n=8, top_w=4))
            for s in range(0, len(c), 50 * p):
                k = min(50 * p, len(c) - s) // p
                ids = np.arange(s // p, s // p + k)
                acc.update(torch.from_numpy(np.ascontiguousarray(c[s : s + 50 * p])), np.repeat(ids, p),
                           np.tile(np.arange(p), k))  # fmt: skip
            st = acc.finalize()
            inputs.append((label, st.D_mm, st.freq_patches_m))
    for root in atlases:
        layout = AtlasLayout(root)
        st = ConceptStats.load(layout.stats_tensors, layout.stats_meta)
        inputs.append((f"atlas {root}", st.D_mm, st.freq_patches_m))
    rows = []
    for label, d, freq in inputs:
        for keep in (True, False):
            old = before.build_families(d, freq, before.FamilyConfig(keep_transitive=keep))
            new = F.build_families(d, freq, F.FamilyConfig(keep_transitive=keep))
            same = _edges(old) == _edges(new) and old.summary() == new.summary()
            rows.append(
                {"input": label, "m": new.m, "keep_transitive": keep, "edges": new.n_edges, "identical": same}
            )
            print(json.dumps(rows[-1]), flush=True)
            assert same, f"{label}: edges or summary differ"
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    ap.add_argument("--build-sizes", type=int, nargs="+", default=[8192], help="m with a dense-D build run")
    ap.add_argument("--noise", type=float, default=0.1, help="random implications per concept")
    ap.add_argument("--before", default=None, help="git ref whose families module the build is compared with")
    ap.add_argument("--repeat", type=int, default=3, help="runs of the build (best is kept)")
    ap.add_argument(
        "--max-nx-transitive", type=int, default=65536, help="largest m for nx.transitive_reduction"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--atlas", type=Path, nargs="*", default=[], help="atlases whose stats --before also checks"
    )
    ap.add_argument("--tag", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    before = load_module_at(args.before) if args.before else None
    rows: list[dict] = []
    for m in args.sizes:
        c_e, p_e, conf, freq = synthetic_candidates(m, noise_per_concept=args.noise)
        row: dict[str, Any] = {"m": m, "candidates": len(c_e)}
        row["pieces"], fam = bench_pieces(m, c_e, p_e, conf, freq, args.max_nx_transitive, before)
        row.update(edges=fam.n_edges, roots=len(fam.roots), max_depth=int(fam.depth_m.max()))
        if m in args.build_sizes:
            d, f_t = dense_matrix(m, c_e, p_e, conf), torch.from_numpy(freq)

            def build(mod: ModuleType, d: torch.Tensor = d, f_t: torch.Tensor = f_t) -> Any:
                fam = mod.build_families(d, f_t, mod.FamilyConfig())
                fam.summary()
                return fam

            row["build_after_s"], new = timed(lambda: build(F), args.repeat)
            if before is not None:
                row["build_before_s"], old = timed(lambda: build(before), args.repeat)
                assert _edges(old) == _edges(new), f"m={m}: edges differ from {args.before}"
                row["identical_edges"] = True
            del d
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {
        "benchmark": "families",
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch_threads": args.threads,
            "networkx": nx.__version__,
        },
        "noise_per_concept": args.noise,
        "before": args.before,
        "rows": rows,
        "identical_on_real_inputs": identical_on_real_inputs(before, args.atlas)
        if before is not None
        else [],
    }
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / f"families-{args.tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# families benchmark ({args.tag}; networkx {nx.__version__}; {args.threads} torch threads)",
        "",
        f"Synthetic forest + {args.noise} noise implications per concept (`python benchmarks/families.py`).",
        "Seconds, this checkout (hand-written; scipy for scc) / networkx "
        "(networkx time includes building its DiGraph); "
        "outputs asserted equal.",
        "",
        "| m | candidates | edges | max depth | " + " | ".join(PIECES) + " |",
        "|---|---|---|---|" + "---|" * len(PIECES),
    ]
    for r in rows:
        cells = []
        for piece in PIECES:
            x = r["pieces"][piece]
            nx_s = "skipped" if x["nx_s"] is None else f"{x['nx_s']:.3f}"
            cells.append(f"{x['hand_s']:.3f} / {nx_s}")
        lines.append(
            f"| {r['m']} | {r['candidates']} | {r['edges']} | {r['max_depth']} | " + " | ".join(cells) + " |"
        )
    if before is not None:
        lines += ["", f"scc: `{args.before}` (iterative Tarjan) vs this checkout (scipy), seconds:", ""]
        lines += ["| m | before (s) | after (s) |", "|---|---|---|"]
        for r in rows:
            x = r["pieces"]["scc"]
            lines.append(f"| {r['m']} | {x['before_s']:.3f} | {x['hand_s']:.3f} |")
    builds = [r for r in rows if "build_after_s" in r]
    if builds:
        lines += ["", f"`build_families` + `summary` on a dense D (best of {args.repeat}):", ""]
        lines += ["| m | before (s) | after (s) | identical edges |", "|---|---|---|---|"]
        for r in builds:
            b = f"{r['build_before_s']:.2f}" if "build_before_s" in r else "-"
            same = r.get("identical_edges", "-")
            lines.append(f"| {r['m']} | {b} (`{args.before}`) | {r['build_after_s']:.2f} | {same} |")
    if report["identical_on_real_inputs"]:
        lines += [
            "",
            f"Identical edges and summary vs `{args.before}` (`build_families` on real statistics):",
            "",
        ]
        lines += ["| input | m | keep transitive | edges | identical |", "|---|---|---|---|---|"]
        for r in report["identical_on_real_inputs"]:
            lines.append(
                f"| {r['input']} | {r['m']} | {r['keep_transitive']} | {r['edges']} | {r['identical']} |"
            )
    (REPORTS / f"families-{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
