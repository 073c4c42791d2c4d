"""merit_hf: MERIT (Multimodal ECG Representation via Information Theory) as a Hugging Face-native library.

Layers, each importing only those before it (`tests/test_layers.py`): `utils` and `models` (the Hub remote-code
files, WFDB I/O) <- `data` <- `evaluation` <- `training` <- apps (`quickstart`, `embedding`, `hub`).
"""

from .models import merit
from .models.merit import (
    STANDARD_LEAD_NAMES,
    ZERO_SHOT_ECG_TASK,
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
    zero_shot_classify,
)

__version__ = "0.1.0"

__all__ = list(merit.__all__)  # the public names are the model layer's; the layers are imported by name
