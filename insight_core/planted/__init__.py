"""The planted-concept world: synthetic patch features with a KNOWN concept hierarchy (ground truth).

- :mod:`~insight_core.planted.world`: the world (atoms, hierarchy, names, vocabulary), save/load;
- :mod:`~insight_core.planted.sampling`: images drawn from it (layouts, features, feature shards);
- :mod:`~insight_core.planted.metrics`: the oracle SAE and the recovery metrics.
"""

from insight_core.planted.metrics import (
    AtomRecovery,
    EdgeRecovery,
    MapIoU,
    NameRecovery,
    atom_recovery,
    edge_recovery,
    map_iou,
    name_recovery,
    oracle_codes,
    oracle_decoder,
    oracle_sae,
)
from insight_core.planted.sampling import (
    PlantedLayout,
    PlantedSample,
    load_layout,
    object_labels,
    sample_images,
    write_feature_shards,
)
from insight_core.planted.world import (
    KINDS,
    PlantedWorld,
    WorldConfig,
    ancestor_pairs,
    context_naming_accuracy,
    load_world,
    make_world,
    save_world,
)

__all__ = [
    "KINDS",
    "AtomRecovery",
    "EdgeRecovery",
    "MapIoU",
    "NameRecovery",
    "PlantedLayout",
    "PlantedSample",
    "PlantedWorld",
    "WorldConfig",
    "ancestor_pairs",
    "atom_recovery",
    "context_naming_accuracy",
    "edge_recovery",
    "load_layout",
    "load_world",
    "make_world",
    "map_iou",
    "name_recovery",
    "object_labels",
    "oracle_codes",
    "oracle_decoder",
    "oracle_sae",
    "sample_images",
    "save_world",
    "write_feature_shards",
]
