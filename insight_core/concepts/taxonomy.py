"""Taxonomy alignment: do the concept families and Matryoshka groups follow a class taxonomy?

After "Analyzing Hierarchical Structure in Vision Models with Sparse Autoencoders" (arXiv
2505.15970), which lines SAE concepts up with the ImageNet (WordNet) hierarchy. Inputs: image class
labels and a taxonomy of the classes (child -> parent edges, a DAG: WordNet's is-a graph, or any
hierarchy the user supplies).

1. **Concept -> taxonomy node.** Every concept gets per-class statistics from its image-level
   (pooled) activations: its activation *mass* per class (sum over the class's images of the pooled
   code) and its *firing* count (images where it is active anywhere). For a taxonomy node ``n`` with
   the classes ``S(n)`` of its subtree (itself and every descendant):

   - ``share(j, n)`` = mass of ``j`` on images of ``S(n)`` / all of ``j``'s mass (how exclusive),
   - ``coverage(j, n)`` = fraction of the images of ``S(n)`` where ``j`` fires (how complete),

   and ``j`` is mapped to the node with the best F1 of the two (ties: the deeper node). A concept that
   fires on all dogs of every breed maps to "dog"; one that fires only on beagles maps to "beagle".
   Concepts whose best node holds less than ``min_share`` of their mass (colours, backgrounds: spread
   over the whole taxonomy) or that fire on fewer than ``min_images`` labelled images stay unmapped.
2. **Edge agreement.** A family edge ``parent -> child`` between two mapped concepts *agrees* when
   the parent's node is a proper ancestor of the child's node in the taxonomy; *collapsed* when both
   map to the same node. Precision = agreeing / evaluated edges. Recall: of the (ancestor,
   descendant) node pairs of the taxonomy among the mapped nodes, the fraction joined by a family
   path (a concept of the descendant node has a family ancestor on the ancestor node).
3. **Depth correlation.** Spearman correlation, over the mapped concepts, of the taxonomy depth of
   their node (longest path from a root, roots 0) with their family depth (``Families.depth_m``) and
   with their Matryoshka group (coarse groups first).
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np

from insight_core.concepts.families import Families
from insight_core.concepts.pooling import PooledConcepts
from insight_core.errors import ConfigError, InsightError


class TaxonomyError(InsightError, ValueError):
    """A taxonomy file is unreadable or not a DAG, or the labels name classes it does not have."""


def _show(items: Sequence[str], n: int = 8) -> str:
    shown = ", ".join(repr(x) for x in list(items)[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


# --------------------------------------------------------------------------------------------------
# The taxonomy file


@dataclasses.dataclass(frozen=True)
class Taxonomy:
    """A class taxonomy: a DAG of node ids with child -> parent edges."""

    path: Path
    """The edges file it was read from (for messages)."""
    nodes: list[str]
    """Node ids, in order of first appearance in the file."""
    parents: list[list[int]]
    """Direct parents of each node (indices into ``nodes``)."""
    names: dict[str, str]
    """Display name of a node id (from the names file; ids without one show as themselves)."""
    depth_n: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)
    """Depths computed when the file was checked (:meth:`depths` computes them when None)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {n: i for i, n in enumerate(self.nodes)})

    @property
    def n(self) -> int:
        return len(self.nodes)

    def index(self, node: str) -> int | None:
        return self._index.get(node)  # type: ignore[attr-defined]

    def name(self, node: str) -> str:
        return self.names.get(node, node)

    def ancestors(self, i: int) -> set[int]:
        """Proper ancestors of node ``i`` (indices)."""
        seen: set[int] = set()
        todo = list(self.parents[i])
        while todo:
            u = todo.pop()
            if u not in seen:
                seen.add(u)
                todo.extend(self.parents[u])
        return seen

    def depths(self) -> np.ndarray:
        """(n,) longest-path depth of every node from a root (a node without parents: 0)."""
        if self.depth_n is None:
            return _generations(self.parents, self.path, self.nodes)
        return self.depth_n.copy()

    def resolve_classes(self, classes: Sequence[str], labels_path: str | Path) -> list[int]:
        """The node of each label class: its id, else a display name that names one node only.

        Raises :class:`TaxonomyError` naming the labels file and the classes the taxonomy lacks.
        """
        by_name: dict[str, list[str]] = {}
        for node, name in self.names.items():
            by_name.setdefault(name, []).append(node)
        out: list[int] = []
        missing: list[str] = []
        ambiguous: list[str] = []
        for c in classes:
            i = self.index(c)
            if i is None and len(by_name.get(c, [])) == 1:
                i = self.index(by_name[c][0])
            if i is None:
                (ambiguous if len(by_name.get(c, [])) > 1 else missing).append(c)
                continue
            out.append(i)
        if missing or ambiguous:
            what = []
            if missing:
                what.append(f"{len(missing)} label(s) not in the taxonomy: {_show(missing)}")
            if ambiguous:
                what.append(f"{len(ambiguous)} label(s) naming several taxonomy nodes: {_show(ambiguous)}")
            raise TaxonomyError(
                f"{labels_path}: {'; '.join(what)} (taxonomy {self.path}: {self.n} nodes, e.g. "
                f"{_show(self.nodes, 3)}); every label must be a node id of the taxonomy or a unique name"
            )
        return out

    def restrict(self, keep: Sequence[int]) -> tuple[Taxonomy, np.ndarray]:
        """The sub-DAG of the nodes ``keep`` and all their ancestors; returns it and the new index of
        every old node (-1 when dropped). Keeps WordNet-sized taxonomies (80k nodes) small."""
        closure: set[int] = set()
        for i in keep:
            if i not in closure:
                closure.add(i)
                closure |= self.ancestors(i)
        old = sorted(closure)
        new_of = np.full(self.n, -1, dtype=np.int64)
        new_of[old] = np.arange(len(old))
        parents = [[int(new_of[p]) for p in self.parents[i]] for i in old]
        names = {self.nodes[i]: self.names[self.nodes[i]] for i in old if self.nodes[i] in self.names}
        sub = Taxonomy(self.path, [self.nodes[i] for i in old], parents, names)
        return sub, new_of

    def ancestor_matrix(self) -> np.ndarray:
        """(n, n) bool, ``[a, d]`` True when ``a`` is a proper ancestor of ``d``."""
        out = np.zeros((self.n, self.n), dtype=bool)
        for d in range(self.n):
            anc = list(self.ancestors(d))
            out[anc, d] = True
        return out


def _generations(parents: list[list[int]], path: Path, nodes: list[str]) -> np.ndarray:
    """(n,) longest-path depth of every node from a root; a cycle raises :class:`TaxonomyError` naming it.

    Hand-written: Kahn's order one level at a time, vectorised over each level's edges (numpy). Building
    an ``nx.DiGraph`` and running ``nx.topological_generations`` took about 1.5x the time of the
    node-by-node Kahn's order this replaced on an 80k-node taxonomy, this pass less than either
    (``python benchmarks/taxonomy.py --before REF``). networkx names the cycle when there is one.
    """
    n = len(parents)
    child_e = np.repeat(np.arange(n), [len(ps) for ps in parents])
    parent_e = np.fromiter((p for ps in parents for p in ps), dtype=np.int64, count=len(child_e))
    kids = child_e[np.argsort(parent_e, kind="stable")]  # children grouped by parent (CSR)
    ptr = np.concatenate([[0], np.cumsum(np.bincount(parent_e, minlength=n))])
    waiting = np.bincount(child_e, minlength=n)  # parents not placed yet
    depth = np.full(n, -1, dtype=np.int64)
    level, frontier = 0, np.flatnonzero(waiting == 0)
    while frontier.size:  # each level touches only its own edges: O(E) in all, even for a long chain
        depth[frontier] = level
        count = ptr[frontier + 1] - ptr[frontier]
        edges = np.repeat(ptr[frontier] - np.cumsum(count) + count, count) + np.arange(int(count.sum()))
        reached, placed = np.unique(kids[edges], return_counts=True)
        waiting[reached] -= placed
        level, frontier = level + 1, reached[waiting[reached] == 0]
    if (depth < 0).any():
        g = nx.DiGraph((nodes[c], nodes[p]) for c, ps in enumerate(parents) for p in ps)
        cycle = [c for c, _ in nx.find_cycle(g)]  # child -> parent edges
        raise TaxonomyError(
            f"{path}: the taxonomy has a cycle (child -> parent): {' -> '.join([*cycle, cycle[0]][:12])} "
            f"({int((depth < 0).sum())} nodes on or below cycles); a taxonomy must be a DAG"
        )
    return depth


def _sniff(first: str) -> str | None:
    """Delimiter of a table: tab, comma, or None (runs of whitespace)."""
    return "\t" if "\t" in first else ("," if "," in first else None)


def _table(path: Path, what: str) -> list[tuple[int, list[str]]]:
    """(line number, cells) of every non-empty, non-comment line of a CSV / TSV / whitespace file."""
    if not path.is_file():
        raise TaxonomyError(f"{path}: {what} file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise TaxonomyError(f"{path}: unreadable {what} file ({err})") from err
    lines = [(i + 1, ln) for i, ln in enumerate(text.splitlines()) if ln.strip() and not ln.startswith("#")]
    if not lines:
        raise TaxonomyError(f"{path}: empty {what} file")
    delim = _sniff(lines[0][1])
    if delim is None:
        return [(i, ln.split()) for i, ln in lines]
    try:
        rows = list(csv.reader([ln for _, ln in lines], delimiter=delim))
    except csv.Error as err:
        raise TaxonomyError(f"{path}: not a valid {what} table ({err})") from err
    return [(i, [c.strip() for c in row]) for (i, _), row in zip(lines, rows, strict=True)]


def read_taxonomy(
    path: str | Path, names: str | Path | None = None, *, parent_first: bool = False
) -> Taxonomy:
    """Read a taxonomy: child -> parent edges, optionally with a node id -> display name file.

    Edges: CSV, TSV or whitespace-separated, one edge per line; a header naming the columns ``child``
    and ``parent`` (any order, other columns ignored), else two columns ``child parent``
    (``parent_first``: ``parent child``, as WordNet's ``wordnet.is_a.txt``). Blank lines and lines
    starting with ``#`` are skipped. A node with several parents is allowed (a DAG); a cycle, a
    self-loop, an empty cell or a short line raises :class:`TaxonomyError` naming the file and line.

    Names: ``id<TAB>name`` (ImageNet's ``words.txt``), or a CSV with a header ``id,name``.
    """
    path = Path(path)
    rows = _table(path, "taxonomy")
    header = [c.lower() for c in rows[0][1]]
    if "child" in header and "parent" in header:
        ci, pi = header.index("child"), header.index("parent")
        rows = rows[1:]
    else:
        ci, pi = (1, 0) if parent_first else (0, 1)
    nodes: list[str] = []
    index: dict[str, int] = {}
    edges: set[tuple[int, int]] = set()

    def node(x: str) -> int:
        if x not in index:
            index[x] = len(nodes)
            nodes.append(x)
        return index[x]

    for line, cells in rows:
        if len(cells) <= max(ci, pi):
            raise TaxonomyError(f"{path} line {line}: expected a child and a parent, got {cells}")
        child, parent = cells[ci], cells[pi]
        if not child or not parent:
            raise TaxonomyError(f"{path} line {line}: empty node id in {cells}")
        if child == parent:
            raise TaxonomyError(f"{path} line {line}: {child!r} is its own parent (a cycle)")
        edges.add((node(child), node(parent)))
    if not edges:
        raise TaxonomyError(f"{path}: no edges (expected lines 'child,parent')")
    parents: list[list[int]] = [[] for _ in nodes]
    for c, p in sorted(edges):
        parents[c].append(p)
    depth = _generations(parents, path, nodes)  # a cycle raises here
    return Taxonomy(path, nodes, parents, read_names(names) if names is not None else {}, depth)


def read_names(path: str | Path) -> dict[str, str]:
    """A node id -> display name map: ``id<TAB>name`` lines (ImageNet's ``words.txt``), ``id,name``
    (CSV, optional header ``id,name``, quotes around names with commas) or ``id name``."""
    path = Path(path)
    if not path.is_file():
        raise TaxonomyError(f"{path}: taxonomy names file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise TaxonomyError(f"{path}: unreadable taxonomy names file ({err})") from err
    out: dict[str, str] = {}
    for line, raw in enumerate(text.splitlines(), 1):
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        sep = "\t" if "\t" in s else ("," if "," in s else None)
        key, _, name = s.partition(sep) if sep else s.partition(" ")
        key, name = key.strip(), name.strip().strip('"').strip()
        if (key.lower(), name.lower()) == ("id", "name"):
            continue
        if not key or not name:
            raise TaxonomyError(f"{path} line {line}: expected 'id<TAB>name', got {raw!r}")
        out[key] = name
    return out


# --------------------------------------------------------------------------------------------------
# Concepts -> classes -> nodes


@dataclasses.dataclass(frozen=True, slots=True)
class TaxonomyConfig:
    """How concepts are mapped to taxonomy nodes."""

    pooling: str = "mean"
    """Image-level activation whose mass is counted per class: 'mean' (patch codes averaged over the
    image, proportional to area x strength) or 'max' (the strongest patch)."""
    min_share: float = 0.5
    """A concept is mapped only if its node's subtree holds at least this fraction of its mass."""
    min_images: int = 5
    """A concept is mapped only if it fires on at least this many labelled images."""

    def __post_init__(self) -> None:
        if self.pooling not in ("mean", "max"):
            raise ConfigError(f"pooling must be 'mean' or 'max', got {self.pooling!r}")
        if not 0.0 <= self.min_share <= 1.0:
            raise ConfigError(f"min_share must be in [0, 1], got {self.min_share}")
        if self.min_images < 1:
            raise ConfigError(f"min_images must be >= 1, got {self.min_images}")


def class_statistics(
    pooled: PooledConcepts, rows: np.ndarray, y: np.ndarray, n_classes: int, pooling: str = "mean"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per concept and class: activation mass (m, C) float64, firing images (m, C) int64; images
    per class (C,). ``rows[i]`` is the pooled row of labelled image ``i`` and ``y[i]`` its class."""
    cls_of_row = np.full(pooled.n, -1, dtype=np.int64)
    cls_of_row[np.asarray(rows, dtype=np.int64)] = np.asarray(y, dtype=np.int64)
    indptr = pooled.indptr.cpu().numpy()
    row_e = np.repeat(np.arange(pooled.n), np.diff(indptr))
    cls_e = cls_of_row[row_e]
    keep = cls_e >= 0
    cols = pooled.cols_e.cpu().numpy()[keep]
    vals = (pooled.mean_e if pooling == "mean" else pooled.max_e).cpu().numpy()[keep].astype(np.float64)
    flat = cols * n_classes + cls_e[keep]
    size = pooled.m * n_classes
    mass = np.bincount(flat, weights=vals, minlength=size).reshape(pooled.m, n_classes)
    fires = np.bincount(flat, minlength=size).reshape(pooled.m, n_classes).astype(np.int64)
    counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=n_classes).astype(np.int64)
    return mass, fires, counts


@dataclasses.dataclass
class ConceptMapping:
    """Each concept's taxonomy node (index into the restricted taxonomy, -1 = unmapped)."""

    node_m: np.ndarray
    """(m,) node of each concept, -1 when unmapped."""
    share_m: np.ndarray
    """(m,) share of the concept's mass in its node's subtree (NaN when it never fires)."""
    coverage_m: np.ndarray
    """(m,) fraction of the node's subtree images where the concept fires."""
    f1_m: np.ndarray
    """(m,) F1 of share and coverage at the chosen node."""
    images_m: np.ndarray
    """(m,) labelled images the concept fires on."""
    top_class_m: np.ndarray
    """(m,) class with the largest share of the concept's mass (-1 when it never fires)."""
    top_class_share_m: np.ndarray
    """(m,) that share."""


def map_concepts(
    mass_mc: np.ndarray,
    fires_mc: np.ndarray,
    count_c: np.ndarray,
    member_nc: np.ndarray,
    depth_n: np.ndarray,
    cfg: TaxonomyConfig,
    block: int = 1024,
) -> ConceptMapping:
    """Map every concept to its best taxonomy node (see the module docstring).

    ``member_nc[n, c]``: class ``c`` lies in the subtree of node ``n`` (itself included). Scores are
    computed for ``block`` concepts at a time (memory O(block x nodes)).
    """
    total_m = mass_mc.sum(axis=1)
    images_m = fires_mc.sum(axis=1)
    order = np.argsort(-depth_n, kind="stable")  # deeper nodes first: argmax keeps the first best
    mem_nc = member_nc[order].astype(np.float64)
    images_n = mem_nc @ count_c.astype(np.float64)
    m = mass_mc.shape[0]
    best = np.zeros(m, dtype=np.int64)
    share, coverage, f1 = (np.full(m, np.nan) for _ in range(3))
    for lo in range(0, m, block):  # (block, nodes) scores at a time: 8192 x 1900 would be 125 MB each
        hi = min(lo + block, m)
        with np.errstate(divide="ignore", invalid="ignore"):
            share_bn = (mass_mc[lo:hi] @ mem_nc.T) / total_m[lo:hi, None]
            coverage_bn = (fires_mc[lo:hi].astype(np.float64) @ mem_nc.T) / images_n[None, :]
            f1_bn = np.nan_to_num(2 * share_bn * coverage_bn / (share_bn + coverage_bn), nan=-1.0)
        b = np.argmax(f1_bn, axis=1)
        r = np.arange(hi - lo)
        best[lo:hi] = b
        share[lo:hi], coverage[lo:hi], f1[lo:hi] = share_bn[r, b], coverage_bn[r, b], f1_bn[r, b]
    rows = np.arange(m)
    node = order[best].astype(np.int64)
    ok = (images_m >= cfg.min_images) & (np.nan_to_num(share, nan=0.0) >= cfg.min_share) & (total_m > 0)
    node[~ok] = -1
    with np.errstate(divide="ignore", invalid="ignore"):
        class_share = mass_mc / total_m[:, None]
    top = np.where(total_m > 0, np.argmax(np.nan_to_num(class_share, nan=-1.0), axis=1), -1)
    top_share = np.where(top >= 0, class_share[rows, np.maximum(top, 0)], np.nan)
    f1 = np.where(f1 < 0, np.nan, f1)
    return ConceptMapping(node, share, coverage, f1, images_m, top.astype(np.int64), top_share)


# --------------------------------------------------------------------------------------------------
# Agreement


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman rank correlation (average ranks for ties); None when undefined (fewer than 3 points
    or a constant side)."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size < 3 or np.all(a == a[0]) or np.all(b == b[0]):
        return None
    rho = float(spearmanr(a, b).statistic)
    return rho if math.isfinite(rho) else None


@dataclasses.dataclass
class Alignment:
    """Agreement of a family DAG and the Matryoshka groups with a taxonomy."""

    n_concepts: int
    n_mapped: int
    n_nodes_mapped: int
    n_edges: int
    """Family edges in the DAG."""
    n_edges_evaluated: int
    """Family edges with both ends mapped."""
    n_edges_agree: int
    n_edges_collapsed: int
    """Both ends on the same node."""
    n_taxonomy_pairs: int
    """(ancestor, descendant) taxonomy pairs among the mapped nodes."""
    n_taxonomy_pairs_recovered: int
    depth_corr_family: float | None
    depth_corr_group: float | None
    edge_agree_e: np.ndarray
    """(E,) 1 agree, 0 collapsed, -1 disagree, -2 not evaluated (an end unmapped)."""

    @property
    def precision(self) -> float | None:
        return self.n_edges_agree / self.n_edges_evaluated if self.n_edges_evaluated else None

    @property
    def precision_with_collapsed(self) -> float | None:
        """Edges that do not contradict the taxonomy (agree or collapse) over evaluated edges."""
        ok = self.n_edges_agree + self.n_edges_collapsed
        return ok / self.n_edges_evaluated if self.n_edges_evaluated else None

    @property
    def recall(self) -> float | None:
        return self.n_taxonomy_pairs_recovered / self.n_taxonomy_pairs if self.n_taxonomy_pairs else None

    def summary(self) -> dict[str, Any]:
        return {
            "edge_precision": self.precision,
            "edge_recall": self.recall,
            "edge_precision_with_collapsed": self.precision_with_collapsed,
            "depth_spearman_family": self.depth_corr_family,
            "depth_spearman_group": self.depth_corr_group,
            "n_concepts": self.n_concepts,
            "n_mapped": self.n_mapped,
            "n_nodes_mapped": self.n_nodes_mapped,
            "n_edges": self.n_edges,
            "n_edges_evaluated": self.n_edges_evaluated,
            "n_edges_agree": self.n_edges_agree,
            "n_edges_collapsed": self.n_edges_collapsed,
            "n_taxonomy_pairs": self.n_taxonomy_pairs,
            "n_taxonomy_pairs_recovered": self.n_taxonomy_pairs_recovered,
        }


def align(
    node_m: np.ndarray, families: Families, anc_nn: np.ndarray, depth_n: np.ndarray, group_m: np.ndarray
) -> Alignment:
    """Edge agreement and depth correlations of a mapping (``anc_nn[a, d]``: a proper ancestor of d)."""
    node_m = np.asarray(node_m, dtype=np.int64)
    mapped = node_m >= 0
    p_node, c_node = node_m[families.parent_e], node_m[families.child_e]
    evaluated = (p_node >= 0) & (c_node >= 0)
    status = np.full(families.n_edges, -2, dtype=np.int64)
    ev_p, ev_c = p_node[evaluated], c_node[evaluated]
    status[evaluated] = np.where(anc_nn[ev_p, ev_c], 1, np.where(ev_p == ev_c, 0, -1))
    nodes = np.unique(node_m[mapped])
    sub = anc_nn[np.ix_(nodes, nodes)]
    pairs = {(int(nodes[a]), int(nodes[d])) for a, d in zip(*np.nonzero(sub), strict=True)}
    found: set[tuple[int, int]] = set()
    for c in np.flatnonzero(mapped):
        for a in families.ancestors(int(c)):
            if node_m[a] >= 0:
                found.add((int(node_m[a]), int(node_m[c])))
    ids = np.flatnonzero(mapped)
    tax_depth = depth_n[node_m[ids]] if ids.size else np.zeros(0)
    return Alignment(
        n_concepts=int(node_m.size),
        n_mapped=int(mapped.sum()),
        n_nodes_mapped=int(nodes.size),
        n_edges=int(families.n_edges),
        n_edges_evaluated=int(evaluated.sum()),
        n_edges_agree=int((status == 1).sum()),
        n_edges_collapsed=int((status == 0).sum()),
        n_taxonomy_pairs=len(pairs),
        n_taxonomy_pairs_recovered=len(pairs & found),
        depth_corr_family=spearman(tax_depth, families.depth_m[ids]),
        depth_corr_group=spearman(tax_depth, np.asarray(group_m)[ids]),
        edge_agree_e=status,
    )
