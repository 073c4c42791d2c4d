"""merit_hf: MERIT (Multimodal ECG Representation via Information Theory) as a Hugging Face-native library.

Layers, each importing only those before it (`tests/test_layers.py`): `utils` and `models` (the Hub remote-code
files, WFDB I/O) <- `data` <- `evaluation` <- `training` <- apps (`quickstart`, `embedding`, `hub`).
"""

from .models.merit import (
    STANDARD_LEAD_NAMES,
    MeritConfig,
    MeritEcgConfig,
    MeritEcgModel,
    MeritFeatureExtractor,
    MeritForEcgClassification,
    MeritForPreTraining,
    MeritForReportGeneration,
    MeritModel,
    MeritProcessor,
    MeritReportConfig,
    ZeroShotEcgClassificationPipeline,
    pool_window_embeddings,
)
from .models.merit.pipeline_merit import zero_shot_classify

__version__ = "0.1.0"

__all__ = [
    "STANDARD_LEAD_NAMES",
    "MeritConfig",
    "MeritEcgConfig",
    "MeritEcgModel",
    "MeritFeatureExtractor",
    "MeritForEcgClassification",
    "MeritForPreTraining",
    "MeritForReportGeneration",
    "MeritModel",
    "MeritProcessor",
    "MeritReportConfig",
    "ZeroShotEcgClassificationPipeline",
    "pool_window_embeddings",
    "zero_shot_classify",
]
