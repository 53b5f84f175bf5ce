"""Deep links: the query strings that open a view, and reading them back from a request.

``?concept=ID`` opens a concept page, ``?family=ID&depth=N`` a family graph, ``?tab=NAME`` a tab,
``?example=NAME`` (with optional ``k`` and ``group``) explains a shipped example photo and
``?compare=NAME,NAME`` compares two. Links are relative (``?concept=12``): resolved against the
page's own address they work on localhost, behind a proxy path and on a Hugging Face Space (whose
page forwards its query string to the app). Uploaded images are never stored, so only the shipped
example photos can be linked.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlencode

TABS = ("explain", "concepts", "families", "steer", "compare", "classify", "segment", "similar",
        "bias", "sae-report")
"""Tab ids ``?tab=`` accepts (the ``id`` of each ``gr.Tab``)."""
MAX_DEPTH = 6
"""Largest family depth a link may ask for (the slider's maximum)."""


@dataclasses.dataclass(frozen=True)
class DeepLink:
    """What a page load was asked to open (all None: nothing, the default view)."""

    tab: str | None = None
    concept: int | None = None
    family: int | None = None
    depth: int = 2
    example: str | None = None
    compare: tuple[str, str] | None = None
    k: int | None = None
    group: int | None = None
    errors: tuple[str, ...] = ()
    """What could not be used (shown to the user, escaped)."""

    @property
    def target_tab(self) -> str | None:
        """The tab to select: the one of the view asked for, else ``tab``."""
        if self.concept is not None:
            return "concepts"
        if self.family is not None:
            return "families"
        if self.compare is not None:
            return "compare"
        if self.example is not None:
            return "explain"
        return self.tab


def _int(params: Mapping[str, str], key: str, lo: int, hi: int, errors: list[str]) -> int | None:
    raw = params.get(key)
    if raw is None or raw == "":
        return None
    try:
        value = int(str(raw).strip().lstrip("#"))
    except ValueError:
        errors.append(f"{key}={raw!r} is not a number")
        return None
    if not lo <= value <= hi:
        errors.append(f"{key}={value} is outside {lo}..{hi}")
        return None
    return value


def _example(raw: str, examples: Sequence[str], key: str, errors: list[str]) -> str | None:
    name = Path(str(raw).strip()).name  # never a path: only the shipped examples by file name
    if name in examples:
        return name
    errors.append(f"{key}={raw!r} is not one of the example photos ({', '.join(examples) or 'none'})")
    return None


def parse(params: Mapping[str, str], m: int | None, examples: Sequence[str], n_groups: int = 1) -> DeepLink:
    """Read a page's query parameters; bad values are collected in ``errors``, never raised.

    ``m`` is the number of concepts (None: no atlas loaded, concept/family links are kept as given
    and checked once it is); ``examples`` the example photo file names.
    """
    errors: list[str] = []
    hi = (m - 1) if m else 2**31
    tab = params.get("tab")
    if tab is not None and tab not in TABS:
        errors.append(f"tab={tab!r} is not a tab ({', '.join(TABS)})")
        tab = None
    concept = _int(params, "concept", 0, hi, errors)
    family = _int(params, "family", 0, hi, errors)
    depth = _int(params, "depth", 1, MAX_DEPTH, errors)
    k = _int(params, "k", 1, 16, errors)
    group = _int(params, "group", 0, max(n_groups - 1, 0), errors)
    example = _example(params["example"], examples, "example", errors) if params.get("example") else None
    compare = None
    if params.get("compare"):
        parts = [p for p in str(params["compare"]).split(",") if p.strip()]
        if len(parts) != 2:
            errors.append(f"compare={params['compare']!r}: expected two example names separated by a comma")
        else:
            a, b = (_example(p, examples, "compare", errors) for p in parts)
            compare = (a, b) if a and b else None
    return DeepLink(tab=tab, concept=concept, family=family, depth=depth or 2, example=example,
                    compare=compare, k=k, group=group, errors=tuple(errors))  # fmt: skip


def concept_link(cid: int) -> str:
    return "?" + urlencode({"concept": int(cid)})


def family_link(cid: int, depth: int = 2) -> str:
    return "?" + urlencode({"family": int(cid), "depth": int(depth)})


def example_link(name: str, k: int | None = None, group: int | None = None) -> str:
    params: dict[str, str | int] = {"example": name}
    if k is not None:
        params["k"] = int(k)
    if group is not None:
        params["group"] = int(group)
    return "?" + urlencode(params)


def compare_link(a: str, b: str) -> str:
    return "?" + urlencode({"compare": f"{a},{b}"})


def tab_link(tab: str) -> str:
    return "?" + urlencode({"tab": tab})


def similar_link(concepts: str, exclude: str = "", subtract: bool = False) -> str:
    """``?tab=similar&concepts=12:1,40:0.5[&exclude=7][&subtract=1]``: a concept search (the Similar tab)."""
    params: dict[str, str] = {"tab": "similar", "concepts": concepts}
    if exclude:
        params["exclude"] = exclude
    if subtract:
        params["subtract"] = "1"
    return "?" + urlencode(params, safe=":,")
