"""``demo-planted``: the SAE and concept stages on a planted-concept world with known ground truth.

1. ``synth``: a planted world (known concepts, hierarchy, masks, names) and its feature shards;
2. ``train-sae``: the Matryoshka BatchTopK SAE on those features (a size that fits the world);
3. ``eval-synth``: recovery of the planted concepts (atoms, concept maps, names);
4. the CLIP backbone's dense joint-space features on example photos (``assets/examples``).

Every step is idempotent, so rerunning ``make demo-planted`` reuses finished work. (``demo`` builds
the browsable demo atlas from photos instead.)
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from insight_core.atlas import SynthLayout
from insight_core.atlas.layout import EXAMPLES_DIR
from insight_core.data.images import LoadReport, iter_images, list_image_files
from insight_core.models.backbone import BackboneConfig, ClipBackbone
from precompute import synth, train_sae
from precompute.common import RANDOM_BANNER
from precompute.options import SaeOptions

log = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True, slots=True)
class PlantedDemoJob:
    """Run the demo pipeline: planted world -> SAE -> recovery report, and the backbone on example photos."""

    out: Path = Path("demo_planted")
    """Output directory (planted world, atlas, reports)."""
    n_images: int = 2000
    """Planted-world images (196 patches each)."""
    dict_size: int = 512
    """SAE concepts for the planted world (it has 464 true concepts)."""
    k: int = 3
    """Mean active concepts per patch."""
    steps: int = 1200
    """SAE training steps (batch 4096)."""
    images: Path | None = None
    """Folder of photos for the backbone step (default: assets/examples)."""
    arch: str = "ViT-B-16"
    """open_clip architecture for the backbone step."""
    pretrained: str = "none"
    """open_clip pretrained tag, a local weights file, or 'none' (random init; no downloads in the demo)."""
    device: str = "auto"
    """Device for both the SAE and the backbone."""


def run(job: PlantedDemoJob) -> dict:
    t0 = time.perf_counter()
    planted, atlas = SynthLayout(job.out / "planted"), job.out / "atlas"
    if not planted.world.config.is_file() or not planted.features.root.is_dir():
        synth.run_synth(synth.SynthJob(out=planted.root, n_images=job.n_images))
    sae_job = train_sae.TrainSaeJob(
        features=planted.features.root,
        out=atlas,
        sae=SaeOptions(dict_size=job.dict_size, k=job.k, batch_size=4096, steps=job.steps, lr=1e-3,
                       warmup_steps=100, threshold_start_step=job.steps // 3),
        device=job.device,
    )  # fmt: skip
    sae_metrics = train_sae.run(sae_job)
    recovery = synth.run_eval_synth(synth.EvalSynthJob(planted=planted.root, atlas=atlas))
    backbone = _backbone_step(job)
    print(_summary(sae_metrics, recovery, backbone, time.perf_counter() - t0, job))
    return {"sae": sae_metrics, "recovery": recovery, "backbone": backbone}


def _backbone_step(job: PlantedDemoJob) -> dict:
    folder = job.images or EXAMPLES_DIR
    report = LoadReport()
    images = [img for _, img in iter_images(list_image_files(folder), report=report)]
    model = ClipBackbone(BackboneConfig(arch=job.arch, pretrained=job.pretrained, device=job.device))
    if model.is_random:
        log.warning(RANDOM_BANNER)
    t = time.perf_counter()
    dense = model.dense_features(images) if images else None
    seconds = time.perf_counter() - t
    return {
        "folder": str(folder),
        "images": len(images),
        "skipped": report.skipped,
        "shape": list(dense.patches_bhwd.shape) if dense is not None else None,
        "images_per_second": len(images) / seconds if images else 0.0,
        "random_weights": model.is_random,
        "arch": job.arch,
        "pretrained": job.pretrained,
    }


def _summary(sae: dict, rec: dict, bb: dict, seconds: float, job: PlantedDemoJob) -> str:
    shells = " ".join(f"{v:.2f}" for v in sae["fve_per_shell"])
    size = f"m={sae['sae_config']['dict_size']} k={sae['sae_config']['k']}"
    lines = [
        "",
        f"INSIGHT demo finished in {seconds:.0f} s -> {job.out}",
        f"  SAE        {size}: held-out FVE {sae['fve']:.3f} "
        f"(per shell {shells}), L0 {sae['l0']:.1f}, dead {sae['dead_fraction']:.1%}, "
        f"{sae['patches_per_second']:,.0f} patches/s",
        f"  recovery   atoms {rec['atoms_recovered']:.1%} (mean best cos {rec['mean_max_cos']:.3f}), "
        f"concept-map IoU {rec['map_iou_mean']:.3f}, bare names {rec['names_recovered_bare']:.1%}",
        f"  backbone   {bb['arch']} ({'RANDOM weights' if bb['random_weights'] else bb['pretrained']}): "
        f"{bb['images']} photos -> dense features {bb['shape']}, {bb['images_per_second']:.1f} img/s"
        + (f", {bb['skipped']} unreadable skipped" if bb["skipped"] else ""),
    ]
    return "\n".join(lines)
