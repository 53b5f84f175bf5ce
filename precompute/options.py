"""Option groups shared by the stage jobs and ``build``: one definition per setting.

Each stage job nests the groups it needs (``ExtractJob.source``, ``TrainSaeJob.sae``, ...) and
``build`` nests all of them, so a setting, its default and its help text are written once. On the
command line the groups are flattened (``Flat``): ``--dict-size 4096`` works for ``train-sae`` and
``build`` alike, and ``--help`` lists each group under its own heading.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, cast

import tyro

from insight_core.concepts.cooccurrence import DEFAULT_FLOOR
from insight_core.concepts.image_search import ImageSearchConfig
from insight_core.concepts.index import IndexConfig
from insight_core.concepts.stats import StatsConfig
from insight_core.data.images import DEFAULT_MAX_PIXELS
from insight_core.data.sources import HFDatasetSpec, ImageSource, make_source
from insight_core.errors import ConfigError
from insight_core.models.backbone import (
    DENSE_VARIANTS,
    PAPER_ARCH,
    PAPER_PRETRAINED,
    BackboneConfig,
    DenseVariant,
    Precision,
    ResizeMode,
)
from insight_core.models.dinoiser import Dinoiser
from insight_core.models.msae import DEFAULT_K_LEVELS, MSAEConfig, Weighting
from insight_core.models.probe import check_codes, check_pooling
from insight_core.models.sae import PAPER_GROUP_FRACTIONS, SAEConfig
from insight_core.models.sae_kinds import SAE_KINDS, SaeKindName
from insight_core.models.timm_backbone import HUB_WEIGHTS, TOKEN_KINDS, TimmConfig, parse_backbone
from insight_core.training.sae import TrainConfig

log = logging.getLogger(__name__)

DEFAULT_BATCHTOPK_K = 12
"""The paper's k (App. B.2), the matryoshka kind's default --k."""

Flat = tyro.conf.OmitArgPrefixes
"""``Annotated[Group, Flat]``: the group's flags keep their plain names (no ``--group.`` prefix)."""


@dataclasses.dataclass(frozen=True, slots=True)
class SourceOptions:
    """Where the images come from (one of three sources) and how they are planned into shards."""

    images: Path | None = None
    """Image source 1: a folder of images (searched recursively; jpg, png, webp, bmp, gif, tiff)."""
    webdataset: str | None = None
    """Image source 2: webdataset tar shards: a folder of .tar files, one .tar, a glob or a brace
    pattern (``shards/train-{0000..0099}.tar``); image members are used, others ignored."""
    hf_dataset: str | None = None
    """Image source 3: a Hugging Face dataset (hub name, local dataset folder or builder such as
    ``imagefolder``), streamed."""
    hf_split: str = "train"
    """Split of --hf-dataset."""
    hf_config: str | None = None
    """Configuration (subset) of --hf-dataset."""
    hf_image_column: str | None = None
    """Image column of --hf-dataset (default: the first Image column)."""
    hf_revision: str | None = None
    """Revision of --hf-dataset (pin it for reproducible atlases)."""
    hf_data_dir: str | None = None
    """data_dir of --hf-dataset (for builders such as imagefolder)."""
    max_images: int | None = None
    """Use only the first N images (of the sorted folder, the shard order, or the stream)."""
    shard_size: int = 1024
    """Images per feature shard (the unit of resumption of extract)."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Larger images are refused as decompression bombs."""

    @property
    def given(self) -> bool:
        """Whether any image source is set."""
        return any(x is not None for x in (self.images, self.webdataset, self.hf_dataset))

    def open(self) -> ImageSource:
        """The image source (exactly one must be given; ``make_source`` says so otherwise)."""
        hf = None
        if self.hf_dataset:
            hf = HFDatasetSpec(
                name=self.hf_dataset,
                split=self.hf_split,
                config=self.hf_config,
                image_column=self.hf_image_column,
                revision=self.hf_revision,
                data_dir=self.hf_data_dir,
            )
        return make_source(self.images, self.webdataset, hf, self.max_pixels)


@dataclasses.dataclass(frozen=True, slots=True)
class BackboneOptions:
    """The vision backbone and the pooling that produce the features (defaults: the paper's)."""

    arch: str = PAPER_ARCH
    """open_clip architecture."""
    pretrained: str = PAPER_PRETRAINED
    """open_clip pretrained tag (the paper's laion2b_s34b_b88k; 'openai' for its classification
    table), a local weights file, or 'none' (random init: no semantics)."""
    dense: str = "released"
    """Dense feature path: 'released' (CLIP-DINOiser's MaskCLIP: value path + residual + MLP of the
    last block) or 'value' (value path only; atlases built before the released path)."""
    pool: str = "auto"
    """DINOiser guided pooling: 'head' (needs --dinoiser), 'raw' (CLIP's own affinities), 'none', or
    'auto' = 'head' when --dinoiser is given, else 'raw'."""
    dinoiser: Path | None = None
    """DINOiser head for --pool head: CLIP-DINOiser's released last.pt or a head from train-adapter
    (dinoiser.safetensors)."""
    resize: str = "crop"
    """'crop' (the paper's: shorter side to 224, centre crop) or 'squash' (the whole image, so patch
    maps cover it: whole-image heatmaps)."""
    precision: str = "auto"
    """Backbone compute precision: 'auto' (fp32 on CPU, bf16/fp16 autocast on CUDA), 'fp32' (exactly
    the released computation), 'fp16' or 'bf16'."""
    backbone: str = "open_clip"
    """'open_clip' (the CLIP model of --arch: text-aligned features) or 'timm:NAME', any timm ViT
    (e.g. timm:vit_small_patch14_dinov2.lvd142m): block tokens, not text-aligned, so naming, text
    search, zero-shot, segmentation and captioning are off. For timm, --pretrained is 'hub' (timm's
    weights; also what the CLIP default tag means here), a local weights file or 'none'."""
    layer: tuple[int, ...] = (-1,)
    """timm: the block(s) whose output tokens are the features (-1 = last). Several (--layer -1 -4 -8)
    come from one forward pass, one feature folder each: OUT/layer_-1/, OUT/layer_-4/, ..."""
    tokens: str = "patch"
    """timm: 'patch' (n, gh*gw, d) shards, 'cls' (n, d) class tokens (global embeddings), or 'both'
    (n, 1 + gh*gw, d): the class token first, then the patches in row-major order."""
    image_size: int | None = 224
    """timm: square input size (224: a 16x16 grid for patch 14); 'None' = the model's default."""
    final_norm: bool = False
    """timm: apply the model's final norm to the block tokens (default: the raw residual stream)."""

    def __post_init__(self) -> None:
        if self.tokens not in TOKEN_KINDS:
            raise ConfigError(f"--tokens must be one of {', '.join(TOKEN_KINDS)}, got {self.tokens!r}")
        timm_name = parse_backbone(self.backbone)  # ConfigError on a malformed --backbone
        if timm_name is None and (self.layer != (-1,) or self.tokens != "patch"):
            raise ConfigError("--layer and --tokens choose timm blocks: use them with --backbone timm:NAME")
        if timm_name is not None and self.pool in ("raw", "head"):
            raise ConfigError(f"--pool {self.pool} is CLIP-DINOiser pooling; timm backbones use --pool none")
        if self.pool not in ("auto", "none", "raw", "head"):
            raise ConfigError(f"--pool must be auto, none, raw or head, got {self.pool!r}")
        if self.resize not in ("squash", "crop"):
            raise ConfigError(f"--resize must be squash or crop, got {self.resize!r}")
        if self.dense not in DENSE_VARIANTS:
            raise ConfigError(f"--dense must be one of {', '.join(DENSE_VARIANTS)}, got {self.dense!r}")

    def backbone_config(self, device: str = "auto", batch_size: int = 32) -> BackboneConfig:
        return BackboneConfig(arch=self.arch, pretrained=self.pretrained, device=device,
                              resize=cast(ResizeMode, self.resize), dense=cast(DenseVariant, self.dense),
                              precision=cast(Precision, self.precision), batch_size=batch_size)  # fmt: skip

    @property
    def timm_name(self) -> str | None:
        """The timm model of ``--backbone timm:NAME`` (None: the open_clip CLIP backbone)."""
        return parse_backbone(self.backbone)

    def timm_config(self, device: str = "auto", batch_size: int = 32) -> TimmConfig:
        """The timm backbone of ``--backbone timm:NAME`` (every ``--layer``)."""
        name = self.timm_name
        if name is None:
            raise ConfigError("timm_config needs --backbone timm:NAME")
        weights = HUB_WEIGHTS if self.pretrained == PAPER_PRETRAINED else self.pretrained
        return TimmConfig(name=name, pretrained=weights, layers=tuple(self.layer), image_size=self.image_size,
                          norm=self.final_norm, resize=self.resize, device=device,  # type: ignore[arg-type]
                          precision=self.precision, batch_size=batch_size)  # type: ignore[arg-type]  # fmt: skip

    def pool_mode(self, head: Path | None = None) -> str:
        """The pooling mode with 'auto' resolved ('head' when a head file is given; 'none' for timm)."""
        if self.pool != "auto":
            return self.pool
        if self.timm_name is not None:
            return "none"
        return "head" if (self.dinoiser or head) is not None else "raw"

    def pooling(self, head: Path | None = None) -> Dinoiser:
        """The guided pooling; ``head`` is where to find a trained head when --dinoiser is not given."""
        mode = self.pool_mode(head)
        if mode != "head":
            if self.dinoiser is not None:
                log.warning("--dinoiser %s is ignored with --pool %s", self.dinoiser, mode)
            return Dinoiser(mode=mode)  # type: ignore[arg-type]
        path = self.dinoiser or head
        if path is None:
            raise ConfigError(
                "--pool head needs --dinoiser PATH (CLIP-DINOiser's last.pt or a head trained by "
                "train-adapter)"
            )
        if not Path(path).is_file():
            raise ConfigError(f"--pool head needs a trained head: {path} not found (pass --dinoiser)")
        return Dinoiser.load(path)


@dataclasses.dataclass(frozen=True, slots=True)
class SaeOptions:
    """The SAE and its training (the paper's Matryoshka BatchTopK kind, App. B.2 defaults; or MSAE)."""

    kind: SaeKindName = "matryoshka"
    """SAE kind: 'matryoshka' (the paper's Matryoshka BatchTopK SAE, nested groups) or 'msae' (MSAE,
    arXiv 2502.20578: one dictionary, per-input TopK at every --k-levels, loss summed over the levels)."""
    dict_size: int = 8192
    """Number of concepts m."""
    k: int | None = None
    """matryoshka: mean active concepts per patch (BatchTopK; default 12, the paper's). msae: the
    inference level, latents kept per input by encode (default: the largest of --k-levels)."""
    group_fractions: tuple[float, ...] = PAPER_GROUP_FRACTIONS
    """Nested Matryoshka group size ratios (coarse to fine), summing to 1 (matryoshka kind only)."""
    k_levels: tuple[int, ...] = DEFAULT_K_LEVELS
    """msae: the TopK levels whose reconstructions the loss sums (ascending, each <= --dict-size)."""
    weighting: Weighting = "uniform"
    """msae: level weights, 'uniform' (MSAE UW) or 'reverse' (MSAE RW: L, L-1, ..., 1, the sparsest
    level weighs most)."""
    epochs: float | None = None
    """Passes over the training split (ignored if --steps is given); default: the paper's 3, but at
    least --min-steps steps."""
    steps: int | None = None
    """Total optimisation steps; overrides --epochs."""
    min_steps: int = 1000
    """Without --steps and --epochs: train at least this many steps (small data sets)."""
    batch_size: int | None = None
    """Patches per step; default: the paper's 16384, capped so an epoch has >= 64 steps."""
    lr: float | None = None
    """Adam learning rate; default: 1e-4 * sqrt(8192 / dict-size) (the paper's 1e-4 at 8192)."""
    concept_threshold_k: int = 12
    """Per-concept thresholds = each concept's k-th largest training activation (paper App. B.5)."""
    seed: int = 0
    """Seed for initialisation, split and batch order."""
    held_out_fraction: float = 0.1
    """Fraction of images held out for the metrics."""
    aux_alpha: float = 1 / 32
    """Dead-latent aux loss weight (0 disables)."""
    dead_after_samples: int = 10_000_000
    """Samples without firing after which a latent counts as dead (capped at one epoch)."""
    warmup_steps: int = 1000
    """Learning-rate warmup steps (capped at 10 % of the run)."""
    threshold_start_step: int = 1000
    """Step from which the inference threshold is estimated (capped at half the run)."""
    checkpoint_every: int = 500
    """Steps between resumable checkpoints."""

    def sae_config(self, d_in: int) -> SAEConfig:
        """The SAE's config: an :class:`MSAEConfig` for ``--kind msae``, else an :class:`SAEConfig`."""
        if self.kind == "msae":
            return MSAEConfig(
                d_in=d_in, dict_size=self.dict_size, k=self.k or 0, k_levels=self.k_levels,
                weighting=self.weighting,
            )  # fmt: skip
        if self.kind != "matryoshka":
            raise ConfigError(f"--kind must be one of {sorted(SAE_KINDS)}, got {self.kind!r}")
        k = DEFAULT_BATCHTOPK_K if self.k is None else self.k
        return SAEConfig(d_in=d_in, dict_size=self.dict_size, k=k, group_fractions=self.group_fractions)

    def train_config(self, device: str) -> TrainConfig:
        return TrainConfig(**_shared(self, TrainConfig), device=device)


@dataclasses.dataclass(frozen=True, slots=True)
class StreamOptions:
    """Streaming: compute patch features on the fly from the image source instead of storing shards
    (docs/scale.md, "Stored or streamed features")."""

    stream: bool = False
    """Never write feature arrays: plan the images (one decode each, to list the unreadable ones),
    then every stage computes the features it reads (epochs re-run the backbone)."""
    shuffle_images: int = 512
    """Streamed training: images whose patches are shuffled together before batches are cut (the
    shuffle buffer; more mixes better and holds more rows in memory)."""
    image_batch: int = 32
    """Streamed reads: images per backbone pass."""
    decode_workers: int = 4
    """Threads decoding images (the plan and streamed reads)."""

    def __post_init__(self) -> None:
        for name in ("shuffle_images", "image_batch", "decode_workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True, slots=True)
class StatsOptions:
    """The statistics pass (exemplars, w_ia, co-occurrence)."""

    images_per_batch: int = 64
    """Images encoded per step."""
    top_n: int = 64
    """Exemplar patches kept per concept."""
    top_w: int = 30
    """Top patches per concept used for w_ia (paper App. B.4)."""
    cooc_floor: float = DEFAULT_FLOOR
    """Co-occurrence entries D[j, j'] below this are not saved (0: all); families need
    --min-confidence >= it (see insight_core/concepts/cooccurrence.py)."""
    pair_budget_gb: float = 0.0
    """Memory for the co-occurrence pair sums before they spill to disk under the atlas (0: never
    spill); the result is identical. Set it when a large image set sees more distinct concept pairs
    than fit in RAM (16 bytes each; docs/scale.md)."""

    def stats_config(self) -> StatsConfig:
        return StatsConfig(top_n=self.top_n, top_w=self.top_w, cooc_floor=self.cooc_floor)


@dataclasses.dataclass(frozen=True, slots=True)
class NamingOptions:
    """Naming concepts against a vocabulary (paper Sec. 3.4, App. B.4)."""

    vocab_embeddings: Path | None = None
    """Precomputed vocabulary embeddings (.npz from `insight vocab-embed` / `vocab-pull`, or your own with
    'words' and 'embeddings'); bypasses the text encoder. A file whose manifest names another backbone
    or tag than the atlas's is refused."""
    vocab_dir: Path | None = None
    """Folder with the paper's word lists (CLIP-Dissect 20k, LAION uni/bigrams, optional Brysbaert
    concreteness table); default: the shipped assets/vocab (without the Brysbaert table)."""
    max_words: int | None = None
    """Keep only the first N words of the vocabulary union (overrides --naming-budget)."""
    naming_budget: float = 600.0
    """Seconds of text encoding name may spend computing vocabulary embeddings (timed on one batch
    first). Over it: one loud warning, and on CPU the largest subset that fits, the most concrete words
    first (on a GPU the whole vocabulary anyway). Not used with a precomputed or cached vocabulary."""
    full_vocabulary: bool = False
    """Embed the whole vocabulary whatever the budget (about 11 hours on 2 CPU cores; minutes on a GPU)."""
    vocab_repo: str | None = None
    """Hugging Face Hub repo of published vocabulary embeddings (`insight vocab-push`) to fetch a file
    for this exact backbone + tag from (SHA-256 verified) before computing."""
    templates_per_pos: int | None = None
    """Use only the first N of the ten templates per part of speech (None: all ten, as in the paper)."""
    alpha: float = 1.33
    """Weight of the concept's own decoder row in Eq. B.9."""
    top_k: int = 5
    """Names kept per concept (best + alternatives)."""
    use_parents: bool = True
    """Family-informed vectors (Eq. B.9); --no-use-parents names decoder rows alone."""

    def __post_init__(self) -> None:
        if not (self.naming_budget > 0):  # also refuses NaN
            raise ConfigError(f"--naming-budget must be > 0 seconds, got {self.naming_budget!r}")
        if self.max_words is not None and self.max_words < 1:
            raise ConfigError(f"--max-words must be >= 1, got {self.max_words}")
        if self.max_words is not None and self.full_vocabulary:
            raise ConfigError("--max-words and --full-vocabulary contradict each other: give one")


@dataclasses.dataclass(frozen=True, slots=True)
class IndexOptions:
    """FAISS indexes of concepts and exemplar patches, and exemplar thumbnails."""

    thumb_size: int = 160
    """Longest side of the WebP thumbnails, in pixels."""
    max_exemplars: int = 16
    """Top exemplar patches per concept to index (at most the stats' top_n)."""
    ivf_threshold: int = 1_000_000
    """Use IVF-PQ at or above this many vectors, an exact flat index below."""
    nlist: int | None = None
    """IVF inverted lists (None: about 4 * sqrt(n))."""
    pq_m: int = 64
    """PQ sub-quantizers of IVF-PQ indexes (falls back to a divisor of d)."""
    nprobe: int = 16
    """Inverted lists visited per query, stored in IVF indexes."""
    use_gpu: str = "auto"
    """IVF k-means on a GPU: 'auto' (when faiss sees one), 'never' or 'always'."""
    threads: int | None = None
    """OpenMP threads for faiss while building (None: all cores)."""
    thumb_workers: int = 4
    """Threads decoding and resizing images for thumbnails."""

    def __post_init__(self) -> None:
        if self.thumb_size < 8:
            raise ConfigError(f"--thumb-size must be >= 8 pixels, got {self.thumb_size}")
        if self.max_exemplars < 1:
            raise ConfigError(f"--max-exemplars must be >= 1, got {self.max_exemplars}")
        if self.thumb_workers < 1:
            raise ConfigError(f"--thumb-workers must be >= 1, got {self.thumb_workers}")

    def index_config(self) -> IndexConfig:
        return IndexConfig(**_shared(self, IndexConfig))


@dataclasses.dataclass(frozen=True, slots=True)
class ImageIndexOptions:
    """Concept-based image search (``image-index``): every image indexed by its pooled concepts."""

    image_index: bool = True
    """Build the image search index (``build``; ``--no-image-index`` skips it)."""
    image_pooling: str = "max"
    """Image vector: max (a concept anywhere in the image counts fully), mean (area-weighted) or both."""
    image_codes: str = "global"
    """Codes pooled: global (the SAE's learned threshold) or concept (per-concept thresholds)."""
    image_top_t: int = 64
    """Strongest concepts stored per image (shared concepts, exclusion, IVF re-scoring)."""
    image_flat_max_mb: int = 256
    """Exact flat index while the dense vectors fit in this many MiB; IVF-PQ above."""
    image_pq_m: int = 128
    """PQ bytes per image of an IVF-PQ image index."""
    image_nprobe: int = 32
    """Inverted lists visited per query (IVF-PQ)."""
    image_thumb_size: int = 96
    """Longest side of the search-result thumbnails, in pixels."""
    image_max_thumbs: int = 20_000
    """Most images given a search-result thumbnail (the first ones, in feature order); results beyond
    show the exemplar thumbnail when there is one, else the image id and source path."""

    def __post_init__(self) -> None:
        if self.image_thumb_size < 8:
            raise ConfigError(f"--image-thumb-size must be >= 8 pixels, got {self.image_thumb_size}")
        if self.image_max_thumbs < 0:
            raise ConfigError(f"--image-max-thumbs must be >= 0, got {self.image_max_thumbs}")
        if self.image_flat_max_mb < 1:
            raise ConfigError(f"--image-flat-max-mb must be >= 1, got {self.image_flat_max_mb}")
        check_pooling(self.image_pooling, "--image-pooling")
        check_codes(self.image_codes, "--image-codes")
        for name in ("image_top_t", "image_pq_m", "image_nprobe"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")

    def search_config(self, threads: int | None = None) -> ImageSearchConfig:
        return ImageSearchConfig(
            pooling=self.image_pooling,
            codes=self.image_codes,
            top_t=self.image_top_t,
            flat_max_bytes=self.image_flat_max_mb * 2**20,
            pq_m=self.image_pq_m,
            nprobe=self.image_nprobe,
            threads=threads,
        )


def _shared(options: Any, config: type) -> dict[str, Any]:
    """The fields of ``options`` that ``config`` (a dataclass) also has."""
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(config) if hasattr(options, f.name)}


@dataclasses.dataclass(frozen=True, slots=True)
class EvalRunOptions:
    """How an evaluation job runs (``eval-ovs``, ``eval-concepts``, ``eval-taxonomy``, ``eval-bias``,
    ``eval-sae``, ``eval-absorption``)."""

    thresholded: bool = False
    """Encode with per-concept thresholds, the paper's thresholded variant (needs an SAE that has them)."""
    name: str | None = None
    """Evaluation name (folder under A/evals/); default: from the inputs (ovs-<masks folder>[-bg][-thr],
    concepts-<masks folder>[-thr], taxonomy-<labels file stem>, bias-<attributes file stem>)."""
    images_per_batch: int = 64
    """Images encoded per step (eval-ovs and eval-concepts default to 16: they keep dense maps)."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda' or 'cuda:N'."""
    force: bool = False
    """Recompute even if up to date."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        if self.images_per_batch < 1:
            raise ConfigError(f"--images-per-batch must be >= 1, got {self.images_per_batch}")
