"""Every named endpoint through gradio_client against the launched app (one server per session)."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from gradio_client import handle_file
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[2] / "assets" / "examples"
EXAMPLE = EXAMPLES / "coco_214753_horses_beach.jpg"


def test_api_lists_the_named_endpoints(client) -> None:
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/explain", "/compare", "/concept", "/search", "/family", "/caption", "/steer"} <= names


def test_explain_endpoint(client, app_state) -> None:
    out = client.predict(handle_file(str(EXAMPLE)), 5, -1, api_name="/explain")
    assert out["random_weights"] is True
    assert out["grid"] == [14, 14]
    tops = out["top_concepts"]
    assert 1 <= len(tops) <= 5
    assert all(0 <= t["id"] < app_state.m for t in tops)
    first = np.asarray(out["maps"][str(tops[0]["id"])])
    assert first.shape == (14, 14)
    assert first.sum() == pytest.approx(tops[0]["mass"], rel=1e-3)
    coarse = client.predict(handle_file(str(EXAMPLE)), 50, 0, api_name="/explain")
    assert all(t["group"] == 0 for t in coarse["top_concepts"])
    tree = out["tree"]  # the foldable hierarchy: every active concept once
    ids: list[int] = []
    todo = list(tree["roots"])
    while todo:
        node = todo.pop()
        ids.append(node["id"])
        todo += node["children"]
    assert len(ids) == len(set(ids))
    assert tops[0]["id"] in ids


def test_compare_endpoint(client) -> None:
    other = EXAMPLES / "coco_126107_bird_sand.jpg"
    out = client.predict(handle_file(str(EXAMPLE)), handle_file(str(other)), 5, api_name="/compare")
    assert 0 <= out["jaccard"] <= 1
    assert len(out["shared"]) <= 5
    assert out["n_shared"] >= len(out["shared"])
    same = client.predict(handle_file(str(EXAMPLE)), handle_file(str(EXAMPLE)), 5, api_name="/compare")
    assert same["jaccard"] == 1.0
    assert same["only_a"] == same["only_b"] == []


def test_concept_search_family_endpoints(client, app_state) -> None:
    cid = int(app_state.concepts.sort_values("frequency").index[-1])
    page = client.predict(str(cid), api_name="/concept")
    assert page["id"] == cid
    assert page["name"] == app_state.name(cid)
    assert "alternatives" in page
    assert page["histogram"]["total"] == page["freq_patches"]
    assert page["range_exemplars"]
    assert page["cooccurring"]
    assert page["permalink"] == f"?concept={cid}"
    hits = client.predict(app_state.name(cid), "name", 10, api_name="/search")
    assert cid in [h["id"] for h in hits]
    assert len(client.predict("a horse", "text", 4, api_name="/search")) == 4
    fam = client.predict(str(cid), 2, api_name="/family")
    assert fam["center"] == cid
    assert any(n["id"] == cid for n in fam["nodes"])


def test_caption_and_steer_endpoints(client, app_state) -> None:
    base = client.predict(handle_file(str(EXAMPLE)), api_name="/caption")
    assert base["caption"]
    assert base["steered_caption"] == base["caption"]
    tops = client.predict(handle_file(str(EXAMPLE)), 8, -1, api_name="/explain")["top_concepts"]
    edits = json.dumps({str(t["id"]): 0.0 for t in tops[:4]})
    out = client.predict(handle_file(str(EXAMPLE)), edits, api_name="/steer")
    assert out["caption"] == base["caption"]
    assert len(out["edits"]) == 4
    assert all(e["activation_after"] == 0 for e in out["edits"])


def _write(tmp: Path, name: str, data: bytes) -> str:
    (tmp / name).write_bytes(data)
    return str(tmp / name)


def test_bad_input_gives_clear_errors_and_the_app_keeps_serving(client, tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.new("1", (8000, 7000)).save(buf, format="PNG")
    cases = {
        _write(tmp_path, "corrupt.jpg", b"\xff\xd8\xff\xe0 not really a jpeg"): "cannot use this image",
        _write(tmp_path, "notes.txt", b"just text"): "cannot use this image",
        _write(tmp_path, "huge.png", buf.getvalue()): "pixels",
    }
    for path, match in cases.items():
        with pytest.raises(Exception, match=match) as exc:
            client.predict(handle_file(path), 5, -1, api_name="/explain")
        assert str(Path(path).parent) not in str(exc.value)  # no server folder in the message
        assert "/gradio/" not in str(exc.value), exc.value
    for cid in ("999999", "-3", "dog"):
        with pytest.raises(Exception, match="concept"):
            client.predict(cid, api_name="/concept")
    with pytest.raises(Exception, match="unknown concept"):
        client.predict("999999", 2, api_name="/family")
    with pytest.raises(Exception, match="JSON"):
        client.predict(handle_file(str(EXAMPLE)), "{oops", api_name="/steer")
    assert client.predict("0", api_name="/concept")["id"] == 0  # still serving


def test_concurrent_explain_requests(client) -> None:
    def one(i: int) -> int:
        path = EXAMPLES / sorted(p.name for p in EXAMPLES.glob("*.jpg"))[i % 6]
        return len(client.predict(handle_file(str(path)), 3, -1, api_name="/explain")["top_concepts"])

    with ThreadPoolExecutor(8) as pool:
        assert all(n >= 1 for n in pool.map(one, range(8)))
