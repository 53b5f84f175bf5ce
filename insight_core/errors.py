"""Exception types shared by the library.

Every error raised for bad *input* (a file, an array, a checkpoint, a config value) derives from
:class:`InsightError` and names the offending input in its message, so that batch jobs can catch
one type, count the failure and move on, and the CLI/app can show the message verbatim.
"""

from __future__ import annotations


class InsightError(Exception):
    """Base class for all input errors raised by ``insight_core``."""


class ImageLoadError(InsightError, ValueError):
    """An image could not be read or is unusable (corrupt, truncated, too large, not an image)."""


class FeatureFileError(InsightError, ValueError):
    """A feature array file has the wrong format, shape or dtype, or holds NaN/inf values."""


class CheckpointError(InsightError, ValueError):
    """A model checkpoint is missing, malformed or incompatible with the requested model."""


class ConfigError(InsightError, ValueError):
    """A configuration value is out of range or inconsistent with other values."""


class LabelsError(InsightError, ValueError):
    """A labels file (image -> class) is unreadable, empty, or names images the features do not have."""


class MaskFileError(InsightError, ValueError):
    """A segmentation-mask folder is malformed or does not match its feature shards (count, order,
    label values, class list)."""


class VocabularyMismatchError(InsightError, ValueError):
    """Vocabulary embeddings were made by another text encoder (arch / pretrained tag) than the atlas's,
    or their manifest does not describe their contents."""
