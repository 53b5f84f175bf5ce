"""INSIGHT core library: backbone, DINOiser, Matryoshka SAE, planted-concept world.

This package holds no CLI or UI code; ``precompute`` (jobs) and ``app`` (Gradio) are thin layers on top.
"""

from insight_core.errors import CheckpointError, ConfigError, FeatureFileError, ImageLoadError, InsightError

__all__ = ["CheckpointError", "ConfigError", "FeatureFileError", "ImageLoadError", "InsightError"]
__version__ = "0.1.0"
