"""``convert-features``: an fp16/fp32 feature folder -> int8 shards with float16 scales (0.516x the bytes).

``insight convert-features --features IN --out OUT --dtype int8`` converts array by array (resumable:
a rerun skips finished arrays), copies ids and other files and carries the manifest over with its
``dtype`` and ``scale`` block; see :mod:`insight_core.data.feature_convert` and docs/scale.md. Every
feature reader (``train-sae``, ``stats``, ``index``, ``probe``, ``eval-*`` ...) reads OUT like IN.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Literal

from tqdm.auto import tqdm

from insight_core.data.feature_convert import ConvertConfig, convert_folder
from insight_core.data.quantise import DEFAULT_GROUP_SIZE
from insight_core.errors import ConfigError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class ConvertFeaturesJob:
    """Convert a float16/float32 feature folder to int8 shards (per-patch-and-group float16 scales)."""

    features: Path
    """Input feature folder (written by extract or synth, or your own .npy arrays)."""
    out: Path
    """Output feature folder (outside the input); rerun the same command to resume."""
    dtype: Literal["int8"] = "int8"
    """Output dtype (int8 is the only conversion)."""
    group_size: int = DEFAULT_GROUP_SIZE
    """Dims sharing one scale (must divide the feature dim; the dim itself = one scale per patch)."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if self.dtype != "int8":
            raise ConfigError(f"--dtype must be 'int8', got {self.dtype!r}")


def run(job: ConvertFeaturesJob) -> dict:
    n_arrays = sum(1 for p in Path(job.features).rglob("*.npy")) if Path(job.features).is_dir() else 0
    with tqdm(
        total=n_arrays, disable=not job.progress, unit="file", desc="convert", dynamic_ncols=True
    ) as bar:
        summary = convert_folder(
            job.features, job.out, ConvertConfig(group_size=job.group_size), on_file=lambda _: bar.update()
        )
    return summary
