"""Deep links: parsing is forgiving (errors collected, never raised) and round-trips the builders."""

from __future__ import annotations

from urllib.parse import parse_qsl

import pytest

from app import links as L

EXAMPLES = ["a.jpg", "b.jpg"]


def _params(query: str) -> dict[str, str]:
    return dict(parse_qsl(query.lstrip("?")))


def test_builders_round_trip() -> None:
    assert L.parse(_params(L.concept_link(12)), 100, EXAMPLES).concept == 12
    fam = L.parse(_params(L.family_link(7, 3)), 100, EXAMPLES)
    assert (fam.family, fam.depth, fam.target_tab) == (7, 3, "families")
    ex = L.parse(_params(L.example_link("b.jpg", 5, 1)), 100, EXAMPLES, n_groups=4)
    assert (ex.example, ex.k, ex.group, ex.target_tab) == ("b.jpg", 5, 1, "explain")
    cmp_ = L.parse(_params(L.compare_link("a.jpg", "b.jpg")), 100, EXAMPLES)
    assert cmp_.compare == ("a.jpg", "b.jpg")
    assert cmp_.target_tab == "compare"
    assert L.parse(_params(L.tab_link("steer")), 100, EXAMPLES).target_tab == "steer"
    assert L.parse({}, 100, EXAMPLES) == L.DeepLink()
    assert L.concept_link(3) == "?concept=3"  # relative: resolves against the page's own address


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"concept": "100"}, "outside 0..99"),
        ({"concept": "dog"}, "not a number"),
        ({"family": "-1"}, "outside"),
        ({"family": "3", "depth": "99"}, "depth=99 is outside 1..6"),
        ({"tab": "<script>"}, "is not a tab"),
        ({"example": "../../etc/passwd"}, "not one of the example photos"),
        ({"compare": "a.jpg"}, "expected two example names"),
        ({"compare": "a.jpg,zzz.jpg"}, "not one of the example photos"),
        ({"group": "9"}, "group=9 is outside 0..3"),
    ],
)
def test_bad_values_are_reported_not_raised(params: dict[str, str], match: str) -> None:
    link = L.parse(params, 100, EXAMPLES, n_groups=4)
    assert any(match in e for e in link.errors), link.errors
    assert link.concept is None or "concept" not in params
    assert link.example is None
    assert link.compare is None


def test_paths_never_escape_the_examples() -> None:
    link = L.parse({"example": "/tmp/a.jpg"}, 10, EXAMPLES)  # only the file name counts
    assert link.example == "a.jpg"
    assert L.parse({"example": "../b.jpg"}, 10, EXAMPLES).example == "b.jpg"


def test_without_an_atlas_ids_are_kept_for_later() -> None:
    assert L.parse({"concept": "5000"}, None, EXAMPLES).concept == 5000  # checked once it is loaded
