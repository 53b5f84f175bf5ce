"""Checks on what an atlas publishes."""

from __future__ import annotations

from pathlib import Path


def assert_reports_name_no_builder_folder(atlas: Path, builder: Path) -> None:
    """No published evaluation file of ``atlas`` names ``builder`` (the folder its inputs came from,
    outside the atlas): reports name outside inputs by file name only."""
    files = [p for p in (atlas / "evals").rglob("*") if p.suffix in (".json", ".md")]
    assert files, f"no evaluation reports under {atlas / 'evals'}"
    for folder in {str(builder), str(builder.resolve())}:
        for path in files:
            assert folder not in path.read_text(), f"{path} names the builder's folder {folder}"
