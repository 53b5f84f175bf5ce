"""``demo``: a small but complete atlas from the shipped example photos (plus a folder of yours).

The README's main command builds it when no atlas is configured. It runs every ``build`` stage with
sizes that fit 2 CPU cores in a few minutes: the SAE dictionary scales with the number of patches,
naming uses the first ``max_words`` words of the shipped vocabulary with one template per part of
speech. ``--pretrained auto`` uses the paper's CLIP weights (open_clip ``laion2b_s34b_b88k``, else
OpenAI's) when they are cached or the Hub is reachable, and otherwise a random-init backbone --
announced loudly, and recorded in the atlas manifest so the app shows it. The features follow the
paper's released dense path; images are squashed (not centre-cropped) so that heatmaps cover whole
photos (``--resize crop`` for the paper's preprocessing). A tiny captioner learns the example
photos' COCO captions so that caption steering can be tried, and a tiny probe learns the example
photos' main COCO objects (from their file names) so that the Classify tab has a probe: both are
plumbing demos that memorise six photos, not models. Rerunning reuses finished stages. A build holds
the file lock ``OUT-work/build.lock`` while it runs: a second build of the same atlas waits for it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from pathlib import Path

from insight_core import progress
from insight_core.atlas import Atlas, AtlasLayout
from insight_core.atlas.layout import EXAMPLE_CAPTIONS, EXAMPLES_DIR
from insight_core.data.images import list_image_files
from insight_core.errors import ConfigError, ImageLoadError
from insight_core.io import atomic_write
from insight_core.locks import holding
from insight_core.models.backbone import PAPER_PRETRAINED
from insight_core.models.clip_weights import weights_available
from insight_core.training.probe import ProbeTrainConfig
from precompute import build, captioner, probe
from precompute.common import RANDOM_BANNER
from precompute.options import BackboneOptions, NamingOptions, SaeOptions, SourceOptions

log = logging.getLogger(__name__)

DEMO_GROUP_FRACTIONS = (0.05, 0.1, 0.2, 0.65)
"""Four coarse-to-fine Matryoshka groups: the paper's six shells are too fine for a 128-concept SAE."""
PATCHES_PER_IMAGE = 196


@dataclasses.dataclass(frozen=True, slots=True)
class DemoJob:
    """Build the demo atlas: example photos (+ --images FOLDER) -> a complete atlas."""

    out: Path = Path("demo_atlas")
    """Atlas directory (the work folder with features and the image links is OUT-work next to it)."""
    images: Path | None = None
    """A folder of your own photos to add (searched recursively)."""
    examples: bool = True
    """Include the shipped example photos (assets/examples, CC BY 2.0 COCO images)."""
    max_images: int = 1500
    """Cap on your photos (1500 photos take about 10 minutes on 2 CPU cores)."""
    arch: str = "ViT-B-16"
    """open_clip architecture."""
    pretrained: str = "auto"
    """'auto' (the paper's laion2b_s34b_b88k weights, else OpenAI's, when reachable; else random init),
    an open_clip tag, a weights file or 'none'."""
    resize: str = "squash"
    """'squash' (heatmaps cover the whole photo) or 'crop' (the paper's centre crop)."""
    dinoiser: Path | None = None
    """A DINOiser head (CLIP-DINOiser's last.pt or train-adapter's) to pool with; default: raw CLIP
    affinities."""
    dict_size: int | None = None
    """SAE concepts (None: patches / 8, as a power of two in [128, 4096])."""
    k: int = 8
    """Mean active concepts per patch."""
    steps: int = 800
    """SAE training steps."""
    max_words: int = 1000
    """Vocabulary words embedded for naming (the shipped lists start with the most common words)."""
    templates_per_pos: int = 1
    """Prompt templates per part of speech for naming."""
    captioner: bool = True
    """Train the demo captioner (a tiny LM trained from scratch on the 30 COCO captions of the example
    photos, assets/examples/captions.json): enough to watch captions change when steering concepts."""
    captioner_epochs: int = 60
    """Epochs of the demo captioner."""
    probe: bool = True
    """Train the demo probe (needs --examples): the example photos' main objects from their file names
    (bird, clock, horses, ...), one photo per class, validated on the same photos (a plumbing demo)."""
    device: str = "auto"
    """'auto', 'cpu' or 'cuda'."""
    progress: bool = True
    """Show progress bars."""
    progress_file: Path | None = None
    """Also write machine-readable progress here: JSON lines (stage, done, total, ETA), rewritten
    atomically (``insight_core.progress``); the explorer polls it while it builds the demo atlas."""


STAGES: tuple[tuple[str, str], ...] = (
    ("photos", "linking the photos and choosing the backbone"),
    *build.STAGES,
    ("probe", "training the demo classification probe"),
    ("captioner", "training the demo captioner (steering)"),
)
"""The demo's stages in order (the ``--progress-file`` stage list; ``probe`` and ``captioner`` are left
out when they are off)."""


def resolve_pretrained(arch: str, pretrained: str) -> str:
    """'auto' -> the paper's weights (else OpenAI's) when they can be loaded now, else 'none' (with
    the reason logged)."""
    if pretrained != "auto":
        return pretrained
    reasons = []
    for tag in (PAPER_PRETRAINED, "openai"):
        ok, why = weights_available(arch, tag)
        if ok:
            log.info("using %s CLIP weights %s (%s)", arch, tag, why)
            return tag
        reasons.append(f"{tag}: {why}")
    log.warning("pretrained weights unavailable: %s", "; ".join(reasons))
    return "none"


def auto_dict_size(n_images: int) -> int:
    """A power of two near patches / 8, in [128, 4096]: small data gets a small dictionary."""
    target = max(n_images * PATCHES_PER_IMAGE / 8, 1.0)
    return int(min(4096, max(128, 2 ** round(math.log2(target)))))


def stage_images(job: DemoJob, folder: Path) -> int:
    """Link the example photos and the user's photos into ``folder`` (one tree, stable names)."""
    sources: list[tuple[str, Path, list[Path]]] = []
    if job.examples:
        sources.append(("examples", EXAMPLES_DIR, list_image_files(EXAMPLES_DIR)))
    if job.images is not None:
        if not Path(job.images).is_dir():
            raise ImageLoadError(f"--images {job.images}: folder not found")
        yours = list_image_files(job.images)
        if len(yours) > job.max_images:
            log.warning(
                "using the first %d of %d photos in %s (--max-images)", job.max_images, len(yours), job.images
            )
        sources.append(("yours", Path(job.images), yours[: job.max_images]))
    wanted: dict[Path, Path] = {}
    for prefix, root, files in sources:
        for f in files:
            wanted[folder / prefix / f.relative_to(root)] = f.resolve()
    if not wanted:
        raise ConfigError("no photos: keep the examples (--examples) or give --images FOLDER with photos")
    for link in sorted(folder.rglob("*")):  # photos removed since the last run
        if link.is_symlink() and link not in wanted:
            link.unlink()
    for link, target in wanted.items():
        if link.is_symlink() and Path(os.readlink(link)) == target:
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(target)
    return len(wanted)


def run(job: DemoJob) -> Atlas:
    skipped = {"probe"} if not (job.probe and job.examples) else set()
    skipped |= {"captioner"} if not job.captioner else set()
    stages = tuple((name, label) for name, label in STAGES if name not in skipped)
    # one build of an atlas at a time; the app reads a held lock as "a build is running"
    with (
        holding(AtlasLayout(job.out).demo_lock, f"the demo build of {job.out}"),
        progress.reporting(job.progress_file, stages, job="demo"),
    ):
        return _run(job)


def _run(job: DemoJob) -> Atlas:
    t0 = time.perf_counter()
    out = Path(job.out)
    layout = AtlasLayout(out)
    with progress.stage("photos"):
        n_images = stage_images(job, layout.demo_images_dir)
        pretrained = resolve_pretrained(job.arch, job.pretrained)
    if pretrained == "none":
        log.warning(RANDOM_BANNER)
    dict_size = job.dict_size or auto_dict_size(n_images)
    log.info("demo atlas: %d photos, %d concepts, k=%d -> %s", n_images, dict_size, job.k, out)
    build.run(
        build.BuildJob(
            atlas=out,
            features=layout.demo_features_dir,
            source=SourceOptions(images=layout.demo_images_dir, shard_size=256),
            backbone=BackboneOptions(
                arch=job.arch, pretrained=pretrained, resize=job.resize, dinoiser=job.dinoiser
            ),
            sae=SaeOptions(
                dict_size=dict_size,
                k=job.k,
                group_fractions=DEMO_GROUP_FRACTIONS,
                steps=job.steps,
                batch_size=min(2048, n_images * PATCHES_PER_IMAGE // 2),  # the train split must hold a batch
                lr=1e-3,
                warmup_steps=min(100, job.steps // 4),
                threshold_start_step=job.steps // 2,
                checkpoint_every=max(job.steps // 2, 1),
            ),
            naming=NamingOptions(max_words=job.max_words, templates_per_pos=job.templates_per_pos),
            device=job.device,
            progress=job.progress,
        )
    )
    if job.probe and job.examples:
        with progress.stage("probe"):
            _train_probe(job, layout, pretrained)
    if job.captioner:
        with progress.stage("captioner"):
            _train_captioner(job, out, pretrained)
    atlas = Atlas.open(out)  # reopened: the probe and the captioner listed themselves in the manifest
    print(_summary(atlas, n_images, time.perf_counter() - t0))
    return atlas


DEMO_PROBE = "examples"
"""Name of the demo atlas's probe."""


def example_labels() -> list[tuple[str, str]]:
    """(image id in the demo features, label) of every example photo: ``coco_<id>_<object>_<context>.jpg``
    -> ``<object>``. The ids are the paths under the demo's image folder (``examples/<file>``)."""
    out = []
    for path in list_image_files(EXAMPLES_DIR):
        parts = path.stem.split("_")
        label = parts[2] if len(parts) > 2 else path.stem
        out.append((f"examples/{path.relative_to(EXAMPLES_DIR).as_posix()}", label))
    return out


def _train_probe(job: DemoJob, layout: AtlasLayout, pretrained: str) -> None:
    """A probe that memorises the example photos' objects (validation = training photos: plumbing only)."""
    rows = example_labels()
    text = "image,label\n" + "".join(f"{image},{label}\n" for image, label in rows)
    if not layout.demo_labels.is_file() or layout.demo_labels.read_text() != text:  # same mtime: no retrain
        atomic_write(layout.demo_labels, lambda tmp: tmp.write_text(text))
    note = (
        f"Plumbing demo: the {len(rows)} example photos, one per class (their main COCO object, from the "
        "file name), validated on the same photos: it memorises them and is not a classifier."
    )
    if pretrained == "none":
        note += " Built on a random-init backbone."
    probe.run(
        probe.ProbeJob(
            atlas=layout.root,
            features=layout.demo_features_dir,
            labels=layout.demo_labels,
            name=DEMO_PROBE,
            val_labels=layout.demo_labels,
            train=ProbeTrainConfig(lr=1e-2, batch_size=len(rows), epochs=100, l1=0.1),
            description=note,
            device=job.device,
            progress=job.progress,
        )
    )


def _train_captioner(job: DemoJob, out: Path, pretrained: str) -> None:
    """Memorise the example captions (validation = training images: a plumbing demo, not a model)."""
    captions = EXAMPLE_CAPTIONS
    captioner.run(
        captioner.CaptionerJob(
            atlas=out,
            captions=captions,
            images=EXAMPLES_DIR,
            val_captions=captions,
            val_images=EXAMPLES_DIR,
            lm="tiny",
            d_model=128,
            epochs=job.captioner_epochs,
            batch_size=30,
            lr=1e-3,
            warmup_steps=10,
            baseline=False,
            meteor="off",
            arch=job.arch,
            pretrained=pretrained,
            device=job.device,
            progress=job.progress,
        )
    )


def _summary(atlas: Atlas, n_images: int, seconds: float) -> str:
    manifest = atlas.manifest
    counts = manifest.get("counts", {})
    lines = [
        "",
        f"demo atlas ready in {seconds:.0f} s: {atlas.root}",
        f"  {n_images} photos, {counts.get('n_concepts', '?')} concepts, "
        f"{counts.get('n_edges', '?')} family edges (depth {counts.get('max_depth', '?')})",
        f"  backbone {manifest['backbone'].get('arch')} / {manifest['backbone'].get('pretrained')}",
    ]
    if atlas.probes:
        lines.append(f"  classification probes: {', '.join(sorted(atlas.probes))} (Classify tab)")
    if atlas.random_weights:
        lines.append(
            "  RANDOM-INIT BACKBONE: concepts, names and heatmaps carry no semantics (plumbing demo only)"
        )
    return "\n".join(lines)
