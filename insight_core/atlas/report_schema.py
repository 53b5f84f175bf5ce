"""Declared schemas of the reports inside an atlas as their readers take them: ``evals/NAME/report.json``
per kind (the app's views, the ``leaderboard`` job), ``sae_metrics.json`` and ``index/meta.json``.

Reports come from someone else's atlas: every model is a :class:`~insight_core.schema.LenientModel`,
so a value of the wrong type reads as None (or an empty container) and renders as "-"; a list item or
dict value that does not fit reads as None on its own (:data:`~insight_core.schema.OR_NONE`). Text is
still escaped where it is shown. Keys not declared here pass through (``model_extra``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from insight_core.schema import OR_NONE, LenientModel, Num

Text = Annotated[str | None, OR_NONE]


class BiasRow(LenientModel):
    """One concept more active in a group (``eval-bias``)."""

    id: int | None = None
    d: Num = None
    """Cohen's d, group vs the other images, with its 95 % interval (``d_low``, ``d_high``)."""
    d_low: Num = None
    d_high: Num = None
    q: Num = None
    """Benjamini-Hochberg adjusted p-value."""
    mean: Num = None
    mean_rest: Num = None
    firing: Num = None
    firing_rest: Num = None


class BiasSettings(LenientModel):
    pooling: str = "mean"


class BiasReport(LenientModel):
    """``kind: bias``: group sizes, tests, significant counts and the top concepts per group."""

    groups: dict[str, Num] = Field(default_factory=dict)
    """Group -> number of images."""
    n_significant_fdr: dict[str, Num] = Field(default_factory=dict)
    settings: BiasSettings = Field(default_factory=BiasSettings)
    n_concepts_tested: Num = None
    n_tests: Num = None
    alpha: Num = None
    top: dict[str, Annotated[list[Annotated[BiasRow | None, OR_NONE]] | None, OR_NONE]] = Field(
        default_factory=dict
    )
    """Group -> its rows, most over-represented first (None: not a list)."""


class TaxonomyLayer(LenientModel):
    """One row of a taxonomy alignment's layer x metric table (``eval-taxonomy``)."""

    layer: Annotated[str | int | None, OR_NONE] = None
    edge_precision: Num = None
    edge_recall: Num = None
    edge_precision_with_collapsed: Num = None
    depth_spearman_family: Num = None
    depth_spearman_group: Num = None
    n_mapped: Num = None
    n_concepts: Num = None
    n_edges_evaluated: Num = None


class TaxonomyFile(LenientModel):
    file: str = "?"
    nodes_used: Num = None


class TaxonomyReport(LenientModel):
    """``kind: taxonomy``."""

    layers: list[Annotated[TaxonomyLayer | None, OR_NONE]] = Field(default_factory=list)
    taxonomy: TaxonomyFile = Field(default_factory=TaxonomyFile)


class SuiteFigures(LenientModel):
    """The figures of one SAE (or baseline) in an ``eval-sae`` suite; ``app.sae_report.FIGURES`` names
    the columns."""

    fve: Num = None
    l0: Num = None
    dead_fraction: Num = None
    cosine: Num = None
    zero_shot_accuracy_reconstructed: Num = None
    zero_shot_recovered: Num = None
    downstream_preservation: Num = None
    localization_morans_i: Num = None
    monosemanticity: Num = None


class SparseProbing(LenientModel):
    top1_accuracy: Num = None
    binary_accuracy: Num = None


class MonoEvaluator(LenientModel):
    label: Text = None
    random_weights: Any = None
    """Shown as a warning when truthy."""


class SuiteSettings(LenientModel):
    """The suite settings the panel explains a missing figure with."""

    min_active_patches: Num = None
    min_images_per_latent: Num = None


class SuiteReport(SuiteFigures):
    """``kind: sae-suite``: this SAE's figures, its baselines' (PCA, random SAE), sparse probing."""

    settings: SuiteSettings = Field(default_factory=SuiteSettings)

    baselines: dict[str, Annotated[SuiteFigures | None, OR_NONE]] = Field(default_factory=dict)
    zero_shot_accuracy: Num = None
    sparse_probing: dict[str, Annotated[SparseProbing | None, OR_NONE]] = Field(default_factory=dict)
    """k latents per class -> accuracies."""
    monosemanticity_evaluator: MonoEvaluator | None = None
    monosemanticity_n_scored: Num = None


LatentId = Annotated[int | None, OR_NONE]


class AbsorptionParent(LenientModel):
    node_name: Text = None
    n_examples: Num = None
    main_latents: list[LatentId] = Field(default_factory=list)
    """Latent ids, shown with the atlas's own names (``main_names`` is the builder's naming)."""
    absorption_rate: Num = None
    absorbing_latents: list[LatentId] = Field(default_factory=list)


class AbsorptionReport(LenientModel):
    """``kind: absorption``: the mean rate and the parents with the most absorption."""

    n_parents: Num = None
    absorption_rate: Num = None
    parents: list[Annotated[AbsorptionParent | None, OR_NONE]] = Field(default_factory=list)


class ConceptsReport(LenientModel):
    """``kind: concepts`` (``eval-concepts``): the dataset-level interpretability figures."""

    locality: Num = None
    consistency: Num = None
    impurity: Num = None
    min_images: int | None = None
    """Concepts active in fewer images are left out of the impurity average."""


class OvsSettings(LenientModel):
    background_prompt: Any = None
    """Truthy when class 0 is a background prompt (the Segment tab has its own switch)."""


class OvsClass(LenientModel):
    """One class of an OVS evaluation: the concepts that explain it most."""

    class_: Any = Field(default=None, alias="class")
    top_concepts: list[Any] = Field(default_factory=list)
    top_contributions_per_patch: list[Num] = Field(default_factory=list)


class OvsInsight(LenientModel):
    miou: Num = None


class OvsReport(LenientModel):
    """``kind: ovs`` (``eval-ovs``): the class list, per-class explanations and the mIoU."""

    classes: list[Any] = Field(default_factory=list)
    settings: OvsSettings = Field(default_factory=OvsSettings)
    per_class: list[Annotated[OvsClass | None, OR_NONE]] = Field(default_factory=list)
    insight: OvsInsight = Field(default_factory=OvsInsight)


class SaeMetricsBlock(LenientModel):
    fve_per_shell: list[float] | None = None
    """Held-out FVE of each Matryoshka shell (None unless every value is a number)."""


class TrainSplit(LenientModel):
    """The held-out split ``train-sae`` used (``sae-pareto`` evaluates on the same rows)."""

    held_out_fraction: Num = None
    seed: Annotated[int | None, OR_NONE] = None


class SaeMetrics(SaeMetricsBlock):
    """``sae_metrics.json`` (``train-sae``) as the app and ``sae-pareto`` read it; older files nest the
    shell FVE in ``metrics``."""

    metrics: SaeMetricsBlock = Field(default_factory=SaeMetricsBlock)
    fve_per_level: dict[str, Num] = Field(default_factory=dict)
    """An MSAE's held-out FVE per trained k (keys are k as text; a value that is not a number: None)."""
    train_config: TrainSplit = Field(default_factory=TrainSplit)


class ThumbSettings(LenientModel):
    resize: Literal["squash", "crop"] = "squash"
    """How exemplar thumbnails were cut from their image."""


class IndexMeta(LenientModel):
    """``index/meta.json`` (``index``): the thumbnail settings the concept pages need."""

    thumbs: ThumbSettings = Field(default_factory=ThumbSettings)
