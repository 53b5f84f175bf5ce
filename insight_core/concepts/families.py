"""Concept families: a DAG of general -> specific edges from co-occurrence (paper Sec. 3.3, App. B.3).

``D[j, j']`` (Eq. 5, :mod:`insight_core.concepts.stats`) is the fraction of concept j's activation mass that
falls on patches where j' is also active. ``D[j, j'] >= min_confidence`` reads "j implies j'", so j' is
the more general concept: the edge is inverted to ``parent = j' -> child = j``. Multiple parents are
allowed and grandparent (transitive) edges are kept by default, as in the paper.

Making the result a DAG, deterministically:

1. **Support.** A candidate needs ``freq_patches[child] >= min_support``: a confidence computed from a
   handful of patches is noise (a concept seen on 2 patches "implies" whatever else was on them).
2. **Mutual pairs.** When both ``a -> b`` and ``b -> a`` pass, the two concepts (nearly) always fire
   together and either could be the parent; the *more frequent* concept (more active patches) is kept
   as the parent, ties going to the lower id. Counted as ``mutual_broken``.
3. **Longer cycles.** The remaining edges are added in order of (confidence desc, parent id, child
   id); an edge that would close a cycle (its parent is already reachable from its child) is skipped
   and counted as ``cycle_edges_dropped``. Only edges inside one strongly connected component of the
   candidate graph can close a cycle, so only those are checked, with an incrementally maintained
   topological order (Pearce-Kelly) instead of a full reachability search per edge.
4. **Transitive edges** (optional, ``keep_transitive=False``): an edge ``p -> c`` is dropped when ``c``
   is also reachable from ``p`` through another child of ``p`` (a path of length >= 2).

networkx, scipy and hand-written code. :attr:`Families.graph` is the DAG as an ``nx.DiGraph`` (for
exports, user code and display: :meth:`FamilyView.reduced` is ``nx.transitive_reduction``), a cycle
is reported with ``nx.find_cycle``, and strongly connected components are scipy's
(``csgraph.connected_components(connection="strong")``, C over the CSR arrays; faster than the
iterative Tarjan it replaced and than networkx: ``benchmarks/families.py``, "scc"). The other passes
that run on the whole graph at build and load time stay hand-written because each is measurably
faster than its networkx counterpart at m = 8192..65536 (``python benchmarks/families.py``, report in
``benchmarks/reports/families-cpu.md``; the tests check each against networkx): the incremental
cycle check (networkx has no dynamic topological order; ``nx.has_path`` per edge), depths (Kahn's
order over CSR vs ``nx.topological_generations``), ancestor/descendant walks and family sizes
(CSR slices vs ``nx.ancestors``/``nx.descendants``), and transitive edges (Python-int bitsets vs
``nx.transitive_reduction``'s descendant sets).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections import deque
from typing import Any

import networkx as nx
import numpy as np
import scipy.sparse
import torch
from scipy.sparse.csgraph import connected_components

from insight_core.concepts.cooccurrence import Cooccurrence
from insight_core.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class FamilyConfig:
    """How the family DAG is extracted from the co-occurrence matrix."""

    min_confidence: float = 0.75
    """Keep ``j' -> j`` when ``D[j, j'] >= min_confidence`` (paper: 0.75)."""
    min_support: int = 5
    """Minimum number of active patches of the child concept; below it the confidence is noise
    (with 2 patches, every concept active on both "is implied" with confidence 1)."""
    keep_transitive: bool = True
    """Keep edges also implied by a longer path (grandparent edges), as in the paper."""

    def __post_init__(self) -> None:
        if not 0.0 < self.min_confidence <= 1.0:
            raise ConfigError(f"FamilyConfig.min_confidence must be in (0, 1], got {self.min_confidence}")
        if self.min_support < 0:
            raise ConfigError(f"FamilyConfig.min_support must be >= 0, got {self.min_support}")


def _csr(m: int, key_e: np.ndarray, val_e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CSR (ptr (m+1), idx) of ``val_e`` grouped by ``key_e``; within a group sorted by value."""
    order = np.lexsort((val_e, key_e))
    ptr = np.zeros(m + 1, dtype=np.int64)
    np.cumsum(np.bincount(key_e, minlength=m), out=ptr[1:])
    return ptr, val_e[order].astype(np.int64)


@dataclasses.dataclass(frozen=True)
class FamilyView:
    """The neighbourhood of one concept (for the app): nodes and the family edges among them."""

    center: int
    """The concept the view is about."""
    nodes: np.ndarray
    """Sorted concept ids: the center, its ancestors and descendants within the requested depth."""
    parent_e: np.ndarray
    """Parent of each edge between two nodes."""
    child_e: np.ndarray
    """Child of each edge."""
    confidence_e: np.ndarray
    """``D[child, parent]`` of each edge."""

    def reduced(self) -> FamilyView:
        """The same view without transitive edges (``nx.transitive_reduction``): for drawing, where a
        grandparent edge beside the parent -> child path only adds clutter."""
        g = nx.DiGraph()
        g.add_nodes_from(self.nodes.tolist())
        g.add_edges_from(zip(self.parent_e.tolist(), self.child_e.tolist(), strict=True))
        tr = nx.transitive_reduction(g)
        keep = np.asarray(
            [tr.has_edge(p, c) for p, c in zip(self.parent_e.tolist(), self.child_e.tolist(), strict=True)],
            dtype=bool,
        )
        return FamilyView(
            self.center, self.nodes, self.parent_e[keep], self.child_e[keep], self.confidence_e[keep]
        )


@dataclasses.dataclass
class Families:
    """The concept DAG. Edges are parallel arrays sorted by (parent, child); adjacency is CSR.

    ``parents(i)`` / ``children(i)`` give sorted neighbour ids. ``depth_m[i]`` is the length of the
    longest path from a root (a concept without parents) to ``i``.
    """

    m: int
    """Number of concepts."""
    parent_e: np.ndarray
    """(E,) int64 parent (general concept) of each edge."""
    child_e: np.ndarray
    """(E,) int64 child (specific concept) of each edge."""
    confidence_e: np.ndarray
    """(E,) float32 ``D[child, parent]``: fraction of the child's activation mass covered by the parent."""
    config: FamilyConfig | None = None
    """The configuration that built it (None when built from stored edges)."""
    n_candidates: int = 0
    """Edges passing confidence and support, before mutual/cycle/transitive pruning."""
    mutual_broken: int = 0
    """Mutual pairs (both directions passed) reduced to one edge."""
    cycle_edges_dropped: int = 0
    """Edges skipped because they would have closed a cycle."""
    transitive_dropped: int = 0
    """Edges dropped as implied by a longer path (only with ``keep_transitive=False``)."""
    parent_ptr: np.ndarray = dataclasses.field(init=False, repr=False)
    """(m+1,) CSR pointers: the parents of ``i`` are ``parent_idx[parent_ptr[i]:parent_ptr[i+1]]``."""
    parent_idx: np.ndarray = dataclasses.field(init=False, repr=False)
    """(E,) parent ids grouped by child."""
    child_ptr: np.ndarray = dataclasses.field(init=False, repr=False)
    """(m+1,) CSR pointers: the children of ``i`` are ``child_idx[child_ptr[i]:child_ptr[i+1]]``."""
    child_idx: np.ndarray = dataclasses.field(init=False, repr=False)
    """(E,) child ids grouped by parent."""
    depth_m: np.ndarray = dataclasses.field(init=False, repr=False)
    """(m,) int64 longest-path depth from a root (roots: 0)."""
    roots: np.ndarray = dataclasses.field(init=False, repr=False)
    """Sorted ids of the concepts without parents (isolated concepts included)."""

    def __post_init__(self) -> None:
        m = int(self.m)
        p = np.asarray(self.parent_e, dtype=np.int64).reshape(-1)
        c = np.asarray(self.child_e, dtype=np.int64).reshape(-1)
        conf = np.asarray(self.confidence_e, dtype=np.float32).reshape(-1)
        if not (len(p) == len(c) == len(conf)):
            raise ConfigError(
                f"edge arrays differ in length: parent {len(p)}, child {len(c)}, conf {len(conf)}"
            )
        if len(p) and (min(p.min(), c.min()) < 0 or max(p.max(), c.max()) >= m):
            raise ConfigError(f"edge endpoints must be concept ids in [0, {m})")
        if np.any(p == c):
            raise ConfigError(f"self-loop edges on concepts {np.unique(p[p == c])[:5].tolist()}")
        order = np.lexsort((c, p))
        p, c, conf = p[order], c[order], conf[order]
        if len(p) > 1 and np.any((p[1:] == p[:-1]) & (c[1:] == c[:-1])):
            raise ConfigError("duplicate (parent, child) edges")
        self.m, self.parent_e, self.child_e, self.confidence_e = m, p, c, conf
        self.parent_ptr, self.parent_idx = _csr(m, c, p)
        self.child_ptr, self.child_idx = _csr(m, p, c)
        topo = self._topological_order()
        depth = np.zeros(m, dtype=np.int64)
        for u in topo:  # longest path: relax children in topological order
            ch = self.children(u)
            if len(ch):
                np.maximum.at(depth, ch, depth[u] + 1)
        self.depth_m = depth
        self.roots = np.flatnonzero(np.diff(self.parent_ptr) == 0)

    @classmethod
    def from_arrays(cls, m: int, parent_e: Any, child_e: Any, confidence_e: Any) -> Families:
        """Rebuild from stored edges (e.g. ``edges.parquet`` columns); raises ``ConfigError`` on a cycle."""
        return cls(m=m, parent_e=parent_e, child_e=child_e, confidence_e=confidence_e)

    def _topological_order(self) -> np.ndarray:
        # hand-written Kahn's order over the CSR arrays: with the depth pass it is faster than building
        # the nx.DiGraph and running nx.topological_generations (benchmarks/families.py, "depth")
        indeg = np.diff(self.parent_ptr).copy()
        queue = deque(np.flatnonzero(indeg == 0).tolist())
        order = []
        while queue:
            u = queue.popleft()
            order.append(u)
            for v in self.children(u).tolist():
                indeg[v] -= 1
                if indeg[v] == 0:
                    queue.append(v)
        if len(order) != self.m:
            g = nx.DiGraph()
            g.add_edges_from(zip(self.parent_e.tolist(), self.child_e.tolist(), strict=True))
            cycle = [int(u) for u, _ in nx.find_cycle(g)]
            raise ConfigError(f"family edges contain a cycle: {' -> '.join(map(str, cycle[:10]))} -> ...")
        return np.asarray(order, dtype=np.int64)

    def topological_order(self) -> np.ndarray:
        """All concept ids, every parent before its children."""
        return self._topological_order()

    @functools.cached_property
    def graph(self) -> nx.DiGraph:
        """The DAG as a networkx ``DiGraph``: nodes ``0..m-1`` (isolated concepts included), edges
        parent -> child with attribute ``confidence`` (float). Built on first use; do not modify it."""
        g = nx.DiGraph()
        g.add_nodes_from(range(self.m))
        g.add_weighted_edges_from(
            zip(self.parent_e.tolist(), self.child_e.tolist(), self.confidence_e.tolist(), strict=True),
            weight="confidence",
        )
        return g

    def transitive_e(self) -> np.ndarray:
        """(E,) bool: the edge is also implied by a longer path (a grandparent edge); these are the
        edges ``nx.transitive_reduction`` would remove."""
        return (
            _transitive_redundant(self.m, self.parent_e, self.child_e) if self.n_edges else np.zeros(0, bool)
        )

    # ------------------------------------------------------------------------------------ queries
    @property
    def n_edges(self) -> int:
        """Number of edges."""
        return len(self.parent_e)

    def parents(self, i: int) -> np.ndarray:
        """Sorted direct parents of concept ``i``."""
        return self.parent_idx[self.parent_ptr[i] : self.parent_ptr[i + 1]]

    def children(self, i: int) -> np.ndarray:
        """Sorted direct children of concept ``i``."""
        return self.child_idx[self.child_ptr[i] : self.child_ptr[i + 1]]

    def _walk(self, i: int, step: Any, max_depth: int | None) -> np.ndarray:
        # breadth-first over CSR slices: faster than nx.ancestors / nx.descendants and their
        # depth-limited forms on the graph (benchmarks/families.py, "walks")
        if not 0 <= int(i) < self.m:
            raise ConfigError(f"concept id must be in [0, {self.m}), got {i}")
        seen = {int(i)}
        frontier = [int(i)]
        hops = 0
        while frontier and (max_depth is None or hops < max_depth):
            nxt = []
            for u in frontier:
                for v in step(u).tolist():
                    if v not in seen:
                        seen.add(v)
                        nxt.append(v)
            frontier, hops = nxt, hops + 1
        seen.discard(int(i))
        return np.asarray(sorted(seen), dtype=np.int64)

    def ancestors(self, i: int, max_depth: int | None = None) -> np.ndarray:
        """Sorted ids of all concepts with a path to ``i`` (within ``max_depth`` hops if given)."""
        return self._walk(i, self.parents, max_depth)

    def descendants(self, i: int, max_depth: int | None = None) -> np.ndarray:
        """Sorted ids of all concepts reachable from ``i`` (within ``max_depth`` hops if given)."""
        return self._walk(i, self.children, max_depth)

    def family_of(self, i: int, depth: int = 2) -> FamilyView:
        """The subgraph around ``i``: ancestors and descendants within ``depth`` hops, and their edges."""
        nodes = np.union1d(
            np.union1d(self.ancestors(i, depth), self.descendants(i, depth)), np.asarray([i], np.int64)
        )
        keep = np.isin(self.parent_e, nodes) & np.isin(self.child_e, nodes)
        return FamilyView(int(i), nodes, self.parent_e[keep], self.child_e[keep], self.confidence_e[keep])

    def family_sizes(self) -> np.ndarray:
        """(len(roots),) size of each root's family: 1 + its number of descendants."""
        return np.asarray([1 + len(self.descendants(int(r))) for r in self.roots], dtype=np.int64)

    def summary(self) -> dict[str, Any]:
        """Counts for logs and the atlas manifest (JSON-serialisable)."""
        has_parent = np.diff(self.parent_ptr) > 0
        has_child = np.diff(self.child_ptr) > 0
        sizes, counts = np.unique(self.family_sizes(), return_counts=True)
        return {
            "n_concepts": self.m,
            "n_edges": self.n_edges,
            "n_candidates": self.n_candidates,
            "n_roots": len(self.roots),
            "n_with_parents": int(has_parent.sum()),
            "n_isolated": int((~has_parent & ~has_child).sum()),
            "max_depth": int(self.depth_m.max()) if self.m else 0,
            "mutual_broken": self.mutual_broken,
            "cycle_edges_dropped": self.cycle_edges_dropped,
            "transitive_dropped": self.transitive_dropped,
            "family_size_hist": {int(s): int(n) for s, n in zip(sizes, counts, strict=True)},
        }

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Columns of ``edges.parquet``: ``parent`` (int64), ``child`` (int64), ``confidence`` (float32)."""
        return {
            "parent": self.parent_e.copy(),
            "child": self.child_e.copy(),
            "confidence": self.confidence_e.copy(),
        }


# --------------------------------------------------------------------------------------------------
# Construction


def _strongly_connected(m: int, p_e: np.ndarray, c_e: np.ndarray) -> np.ndarray:
    """Component id per node of the graph with edges ``p_e -> c_e`` (scipy's strong components, in C)."""
    adj = scipy.sparse.csr_array((np.ones(len(p_e), np.float32), (p_e, c_e)), shape=(m, m))
    return connected_components(adj, directed=True, connection="strong")[1]


class _DynamicTopoOrder:
    """Edge insertion with cycle rejection (Pearce & Kelly 2006, dynamic topological order).

    Keeps a topological order ``ord`` of the accepted edges; an edge ``x -> y`` with ``ord[x] < ord[y]``
    is accepted at once, otherwise only the nodes ordered between ``y`` and ``x`` are searched (and
    reordered when no cycle is found). Hand-written: networkx has no incremental topological order,
    and a reachability search per edge (``nx.has_path``) is several times slower
    (``benchmarks/families.py``, "cycle check").
    """

    def __init__(self, m: int) -> None:
        self.ord = list(range(m))
        self.out: dict[int, list[int]] = {}
        self.inc: dict[int, list[int]] = {}

    def add(self, x: int, y: int) -> bool:
        """Insert ``x -> y`` unless it closes a cycle; returns whether it was inserted."""
        ord_ = self.ord
        lb, ub = ord_[y], ord_[x]
        if lb < ub:
            fwd, seen, todo = [], {y}, [y]
            while todo:
                u = todo.pop()
                fwd.append(u)
                for w in self.out.get(u, ()):
                    if w == x:
                        return False
                    if w not in seen and ord_[w] < ub:
                        seen.add(w)
                        todo.append(w)
            back, seen, todo = [], {x}, [x]
            while todo:
                u = todo.pop()
                back.append(u)
                for w in self.inc.get(u, ()):
                    if w not in seen and ord_[w] > lb:
                        seen.add(w)
                        todo.append(w)
            back.sort(key=ord_.__getitem__)
            fwd.sort(key=ord_.__getitem__)
            moved = back + fwd
            for node, slot in zip(moved, sorted(ord_[v] for v in moved), strict=True):
                ord_[node] = slot
        self.out.setdefault(x, []).append(y)
        self.inc.setdefault(y, []).append(x)
        return True


def _transitive_redundant(m: int, p_e: np.ndarray, c_e: np.ndarray) -> np.ndarray:
    """Bool per edge: ``c`` is reachable from ``p`` through another path (DAG input).

    The edges ``nx.transitive_reduction`` removes. In reverse topological order, each node's strict
    descendants are one Python-int bitset; ``p -> c`` is redundant when bit ``c`` is set in the union of
    the descendant sets of ``p``'s children (a path of length >= 2). Hand-written: several times faster
    than networkx's descendant sets at m = 8192..65536 (``benchmarks/families.py``, "transitive").
    """
    fam = Families(m, p_e, c_e, np.zeros(len(p_e), np.float32))  # edges sorted by (parent, child) = CSR order
    ptr, idx = fam.child_ptr, fam.child_idx
    desc = [0] * m  # node -> bitset of strict descendants
    redundant = np.zeros(len(p_e), dtype=bool)
    for u in fam.topological_order()[::-1].tolist():
        start, kids = int(ptr[u]), idx[ptr[u] : ptr[u + 1]].tolist()
        below = 0  # descendants at distance >= 2
        for v in kids:
            below |= desc[v]
        if below:
            for j, v in enumerate(kids):
                if (below >> v) & 1:
                    redundant[start + j] = True
        for v in kids:
            below |= 1 << v
        desc[u] = below
    order = np.lexsort((c_e, p_e))  # back to the caller's edge order
    out = np.empty(len(p_e), dtype=bool)
    out[order] = redundant
    return out


def build_families(D_mm: Any, freq_m: Any, cfg: FamilyConfig | None = None) -> Families:
    """Extract the family DAG from the co-occurrence confidence ``D_mm`` (m, m) and patch counts (m,).

    ``D_mm`` may be a sparse :class:`~insight_core.concepts.cooccurrence.Cooccurrence` (what the stats
    stage saves): the same edges from its entries ``>= min_confidence`` (a ``ConfigError`` if the
    threshold is below its floor). See the module docstring for the rules (support, mutual pairs,
    cycles, transitive edges).
    """
    cfg = cfg or FamilyConfig()
    if isinstance(D_mm, Cooccurrence):
        return build_from_candidates(D_mm.m, *D_mm.candidates(cfg.min_confidence), freq_m, cfg)
    d = torch.as_tensor(D_mm)
    freq = torch.as_tensor(freq_m).reshape(-1)
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise ConfigError(f"D_mm must be a square (m, m) matrix, got shape {tuple(d.shape)}")
    m = int(d.shape[0])
    if freq.shape != (m,):
        raise ConfigError(f"freq_m must have shape ({m},) to match D_mm, got {tuple(freq.shape)}")
    mask = d >= cfg.min_confidence
    mask.fill_diagonal_(False)
    mask &= (freq.to(d.device) >= cfg.min_support)[:, None]
    child_t, parent_t = torch.nonzero(mask, as_tuple=True)  # D[child, parent] >= thr: child implies parent
    conf = d[child_t, parent_t].float().cpu().numpy()
    p, c = parent_t.cpu().numpy().astype(np.int64), child_t.cpu().numpy().astype(np.int64)
    return _prune(m, p, c, conf, freq.cpu().numpy(), cfg)


def build_from_candidates(
    m: int, parent_e: Any, child_e: Any, confidence_e: Any, freq_m: Any, cfg: FamilyConfig | None = None
) -> Families:
    """The family DAG from candidate pairs (``confidence_e = D[child, parent]``) instead of a dense D.

    Same rules and result as :func:`build_families` on a D holding these values (and anything below
    ``cfg.min_confidence`` elsewhere); for a sparse D, or m too large to hold D densely (m = 65536
    is 17 GB in float32). Candidates below the threshold, self-loops and children under
    ``cfg.min_support`` are dropped first.
    """
    cfg = cfg or FamilyConfig()
    p = np.asarray(parent_e, dtype=np.int64).reshape(-1)
    c = np.asarray(child_e, dtype=np.int64).reshape(-1)
    conf = np.asarray(confidence_e, dtype=np.float32).reshape(-1)
    freq = np.asarray(freq_m).reshape(-1)
    if not (len(p) == len(c) == len(conf)):
        raise ConfigError(
            f"candidate arrays differ in length: parent {len(p)}, child {len(c)}, conf {len(conf)}"
        )
    if freq.shape != (m,):
        raise ConfigError(f"freq_m must have shape ({m},), got {freq.shape}")
    if len(p) and (min(p.min(), c.min()) < 0 or max(p.max(), c.max()) >= m):
        raise ConfigError(f"candidate endpoints must be concept ids in [0, {m})")
    keep = (conf >= cfg.min_confidence) & (p != c) & (freq[c] >= cfg.min_support)
    p, c, conf = p[keep], c[keep], conf[keep]
    order = np.lexsort((p, c))  # the order torch.nonzero gives build_families: by child, then parent
    p, c, conf = p[order], c[order], conf[order]
    if len(p) > 1 and np.any((p[1:] == p[:-1]) & (c[1:] == c[:-1])):
        raise ConfigError("duplicate (parent, child) candidates")
    return _prune(m, p, c, conf, freq, cfg)


def _prune(
    m: int, p: np.ndarray, c: np.ndarray, conf: np.ndarray, f: np.ndarray, cfg: FamilyConfig
) -> Families:
    """Candidates -> the DAG: mutual pairs, cycles, optional transitive edges (module docstring)."""
    n_candidates = len(p)
    p, c, conf, mutual_broken = _break_mutual(m, p, c, conf, f)

    # cycles: greedy in (confidence desc, parent, child) order, only inside strongly connected components
    order = np.lexsort((c, p, -conf.astype(np.float64)))
    p, c, conf = p[order], c[order], conf[order]
    comp = _strongly_connected(m, p, c) if len(p) else np.full(m, -1)
    inside = comp[p] == comp[c]
    keep = np.ones(len(p), dtype=bool)
    topo = _DynamicTopoOrder(m)
    for e in np.flatnonzero(inside).tolist():
        keep[e] = topo.add(int(p[e]), int(c[e]))
    cycle_dropped = int((~keep).sum())
    p, c, conf = p[keep], c[keep], conf[keep]

    transitive_dropped = 0
    if not cfg.keep_transitive and len(p):
        redundant = _transitive_redundant(m, p, c)
        transitive_dropped = int(redundant.sum())
        p, c, conf = p[~redundant], c[~redundant], conf[~redundant]

    fam = Families(
        m=m,
        parent_e=p,
        child_e=c,
        confidence_e=conf,
        config=cfg,
        n_candidates=n_candidates,
        mutual_broken=mutual_broken,
        cycle_edges_dropped=cycle_dropped,
        transitive_dropped=transitive_dropped,
    )
    logger.info(
        "families: %d edges from %d candidates (%d mutual pairs broken, %d cycle edges dropped, "
        "%d transitive dropped), %d roots, max depth %d",
        fam.n_edges,
        n_candidates,
        mutual_broken,
        cycle_dropped,
        transitive_dropped,
        len(fam.roots),
        int(fam.depth_m.max()) if m else 0,
    )
    return fam


def _break_mutual(
    m: int, p: np.ndarray, c: np.ndarray, conf: np.ndarray, freq: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Drop one edge of every mutual pair: the parent is the more frequent concept, ties -> lower id."""
    key_sorted = np.sort(p * m + c)
    rev = c * m + p
    pos = np.searchsorted(key_sorted, rev)
    mutual = (pos < len(key_sorted)) & (key_sorted[np.minimum(pos, max(len(key_sorted) - 1, 0))] == rev)
    wins = (freq[p] > freq[c]) | ((freq[p] == freq[c]) & (p < c))
    keep = ~mutual | wins
    return p[keep], c[keep], conf[keep], int((~keep).sum())
