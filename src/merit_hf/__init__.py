"""merit_hf: MERIT (Multimodal ECG Representation via Information Theory) as a Hugging Face-native library."""

from transformers import AutoConfig, AutoFeatureExtractor, AutoModel, AutoModelForPreTraining, AutoProcessor

from .configuration_merit import STANDARD_LEAD_NAMES, MeritConfig, MeritEcgConfig
from .feature_extraction_merit import MeritFeatureExtractor
from .modeling_merit import (
    MeritEcgModel,
    MeritForEcgClassification,
    MeritForPreTraining,
    MeritModel,
)
from .processing_merit import MeritProcessor

__version__ = "0.1.0"

AutoConfig.register(MeritEcgConfig.model_type, MeritEcgConfig, exist_ok=True)
AutoConfig.register(MeritConfig.model_type, MeritConfig, exist_ok=True)
AutoModel.register(MeritEcgConfig, MeritEcgModel, exist_ok=True)
AutoModel.register(MeritConfig, MeritModel, exist_ok=True)
AutoModelForPreTraining.register(MeritConfig, MeritForPreTraining, exist_ok=True)
AutoFeatureExtractor.register(MeritConfig, MeritFeatureExtractor, exist_ok=True)
AutoFeatureExtractor.register(MeritEcgConfig, MeritFeatureExtractor, exist_ok=True)
AutoProcessor.register(MeritConfig, MeritProcessor, exist_ok=True)

# `save_pretrained` then writes `auto_map` and copies the code files, so the Hub folder loads with
# `trust_remote_code=True` for users who never installed merit_hf.
MeritEcgConfig.register_for_auto_class()
MeritConfig.register_for_auto_class()
MeritEcgModel.register_for_auto_class("AutoModel")
MeritModel.register_for_auto_class("AutoModel")
MeritForPreTraining.register_for_auto_class("AutoModelForPreTraining")
MeritFeatureExtractor.register_for_auto_class("AutoFeatureExtractor")
MeritProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "STANDARD_LEAD_NAMES",
    "MeritConfig",
    "MeritEcgConfig",
    "MeritEcgModel",
    "MeritFeatureExtractor",
    "MeritForEcgClassification",
    "MeritForPreTraining",
    "MeritModel",
    "MeritProcessor",
]
