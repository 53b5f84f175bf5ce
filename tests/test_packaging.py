"""Packaging: console scripts (insight, insight-app) and the one-step GPU requirements file."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements(name: str) -> list[str]:
    lines = [line.split("#")[0].strip() for line in (ROOT / name).read_text().splitlines()]
    return [line for line in lines if line]


@pytest.mark.parametrize(
    ("script", "expected", "text"),
    [
        ("insight", "precompute.__main__:main", "export-graph"),
        ("insight-precompute", "precompute.__main__:main", "space-readme"),
        ("insight-app", "app.cli:main", "--atlas"),
    ],
)
def test_console_scripts_resolve_and_answer_help(script: str, expected: str, text: str, capsys) -> None:
    target = _pyproject()["project"]["scripts"][script]
    assert target == expected
    module, func = target.split(":")
    main = getattr(importlib.import_module(module), func)
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert text in capsys.readouterr().out


def test_cli_names_itself_as_called() -> None:
    from precompute.__main__ import prog_name

    assert prog_name("/venv/bin/insight") == "insight"
    assert prog_name("/repo/precompute/__main__.py") == "python -m precompute"


def test_gpu_requirements_are_the_cpu_set_with_faiss_gpu() -> None:
    cpu, gpu = _requirements("requirements.txt"), _requirements("requirements-gpu.txt")
    names = lambda reqs: {Requirement(r).name for r in reqs}  # noqa: E731
    assert names(cpu) - names(gpu) == {"faiss-cpu"}
    assert names(gpu) - names(cpu) == {"faiss-gpu"}
    assert [r for r in cpu if not r.startswith("faiss")] == [r for r in gpu if not r.startswith("faiss")]
    assert Requirement(next(r for r in gpu if r.startswith("faiss-gpu"))).specifier.contains("1.15.1")
    deps = _pyproject()["tool"]["setuptools"]["dynamic"]["dependencies"]["file"]
    assert deps == ["requirements.txt"]  # pip install -e . stays the CPU set
