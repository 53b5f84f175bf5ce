"""Spaces front matter: the project README parses as a Space config, and preload_from_hub entries."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from insight_core.atlas.spaces import front_matter, preload_entry, preload_hint, preloaded_repos, with_preload
from insight_core.errors import ConfigError
from precompute.__main__ import main

ROOT = Path(__file__).resolve().parents[3]
README = ROOT / "README.md"


def _requirement(name: str) -> Requirement:
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and Requirement(line).name == name:
            return Requirement(line)
    raise AssertionError(f"{name} not in requirements.txt")


def test_project_readme_is_a_valid_space_config() -> None:
    config = front_matter(README.read_text(encoding="utf-8"))
    assert config["sdk"] == "gradio"
    assert (ROOT / config["app_file"]).is_file()
    assert _requirement("gradio").specifier.contains(
        config["sdk_version"]
    )  # the Space runs the tested gradio
    assert isinstance(config["python_version"], str)  # "3.11", not the float 3.11
    assert SpecifierSet(">=3.10").contains(config["python_version"] + ".0")
    assert all(kind == "dataset" for kind, _ in preloaded_repos(config))  # atlases are dataset repos


def test_preload_entries_and_adding_one() -> None:
    assert preload_entry("me/atlas") == "datasets/me/atlas"
    assert preload_entry("me/atlas", "model") == "me/atlas"
    with pytest.raises(ConfigError, match="not a Hub repo id"):
        preload_entry("atlas")
    text = README.read_text(encoding="utf-8")
    body = text.split("\n---\n", 1)[1]
    once = with_preload(text, "datasets/me/atlas")
    assert with_preload(once, "datasets/me/atlas") == once  # idempotent
    twice = with_preload(once, "datasets/me/other")
    config = front_matter(twice)
    assert config["preload_from_hub"] == ["datasets/me/atlas", "datasets/me/other"]
    assert {k: v for k, v in config.items() if k != "preload_from_hub"} == front_matter(text)
    assert twice.endswith(body)  # only the front matter changed
    assert preloaded_repos(config) == {("dataset", "me/atlas"), ("dataset", "me/other")}


def test_adding_to_an_existing_list_and_bad_front_matter() -> None:
    text = (
        "---\nsdk: gradio\npreload_from_hub:\n  - openai-community/gpt2 config.json\n\nlicense: mit\n---\nb\n"
    )
    out = with_preload(text, "datasets/me/atlas")
    assert front_matter(out)["preload_from_hub"] == ["openai-community/gpt2 config.json", "datasets/me/atlas"]
    assert front_matter(out)["license"] == "mit"
    with pytest.raises(ConfigError, match="block list"):
        with_preload("---\npreload_from_hub: [a/b]\n---\n", "datasets/me/atlas")
    with pytest.raises(ConfigError, match="no YAML front matter"):
        front_matter("# just markdown\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        front_matter("---\nsdk: [gradio\n---\n")
    with pytest.raises(ConfigError, match="mapping"):
        front_matter("---\n- a\n---\n")


def test_preload_hint() -> None:
    text = "---\nsdk: gradio\npreload_from_hub:\n  - datasets/me/atlas\n---\n"
    assert preload_hint(text, "me/atlas") is None
    assert preload_hint(text, "./demo_atlas") is None  # a local folder needs no preload
    hint = preload_hint(text, "me/other")
    assert hint is not None
    assert "datasets/me/other" in hint
    assert "space-readme" in hint


def test_space_readme_command(tmp_path: Path, caplog) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(README.read_text(encoding="utf-8"), encoding="utf-8")
    with caplog.at_level(logging.INFO):
        assert main(["space-readme", "--atlas-repo", "me/atlas", "--readme", str(readme)]) == 0
    assert front_matter(readme.read_text(encoding="utf-8"))["preload_from_hub"] == ["datasets/me/atlas"]
    assert "INSIGHT_ATLAS=me/atlas" in caplog.text
    assert main(["space-readme", "--atlas-repo", "me/atlas", "--readme", str(readme)]) == 0
    assert "already preloads" in caplog.text
    assert main(["space-readme", "--atlas-repo", "not-a-repo", "--readme", str(readme)]) == 2
