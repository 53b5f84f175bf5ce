"""The atlas: the one contract between the precompute jobs and the app (see docs/atlas.md).

- :mod:`~insight_core.atlas.layout`: where every file lives (the only place paths are spelled);
- :mod:`~insight_core.atlas.records`: stage records, how a stage knows it is already done;
- :mod:`~insight_core.atlas.manifest`: ``manifest.json``, opening and validating an atlas;
- :mod:`~insight_core.atlas.verify`: SHA-256 checks with a per-user cache (reopening is instant);
- :mod:`~insight_core.atlas.hub`: sharing atlases on the Hugging Face Hub.
"""

from insight_core.atlas.layout import (
    ATLAS_FILES,
    EVAL_FILES,
    MANIFEST,
    PROBE_FILES,
    REQUIRED_ROLES,
    AtlasLayout,
    CaptionerLayout,
    EvalLayout,
    FeaturesLayout,
    MasksLayout,
    ProbeLayout,
    SynthLayout,
    WorldLayout,
)
from insight_core.atlas.manifest import (
    ATLAS_FORMAT,
    SCHEMA_VERSION,
    Atlas,
    AtlasError,
    VerifyMode,
    reading,
    register_evals,
    register_probes,
    write_manifest,
)
from insight_core.atlas.records import StageRecord, fingerprint, read_json_data, read_json_dict

__all__ = [
    "ATLAS_FILES",
    "ATLAS_FORMAT",
    "EVAL_FILES",
    "MANIFEST",
    "PROBE_FILES",
    "REQUIRED_ROLES",
    "SCHEMA_VERSION",
    "Atlas",
    "AtlasError",
    "AtlasLayout",
    "CaptionerLayout",
    "EvalLayout",
    "FeaturesLayout",
    "MasksLayout",
    "ProbeLayout",
    "StageRecord",
    "SynthLayout",
    "VerifyMode",
    "WorldLayout",
    "fingerprint",
    "read_json_data",
    "read_json_dict",
    "reading",
    "register_evals",
    "register_probes",
    "write_manifest",
]
