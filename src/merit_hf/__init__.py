"""merit_hf: MERIT (Multimodal ECG Representation via Information Theory) as a Hugging Face-native library."""

from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForPreTraining,
    AutoModelForSequenceClassification,
    AutoProcessor,
)

from .configuration_merit import STANDARD_LEAD_NAMES, MeritConfig, MeritEcgConfig, MeritReportConfig
from .evaluation.zero_shot import zero_shot_classify
from .feature_extraction_merit import MeritFeatureExtractor
from .modeling_merit import (
    MeritEcgModel,
    MeritForEcgClassification,
    MeritForPreTraining,
    MeritModel,
    pool_window_embeddings,
)
from .modeling_merit_report import MeritForReportGeneration
from .pipelines import ZeroShotEcgClassificationPipeline  # importing it registers "zero-shot-ecg-classification"
from .processing_merit import MeritProcessor

__version__ = "0.1.0"

AutoConfig.register(MeritEcgConfig.model_type, MeritEcgConfig, exist_ok=True)
AutoConfig.register(MeritConfig.model_type, MeritConfig, exist_ok=True)
AutoModel.register(MeritEcgConfig, MeritEcgModel, exist_ok=True)
AutoModel.register(MeritConfig, MeritModel, exist_ok=True)
AutoModelForPreTraining.register(MeritConfig, MeritForPreTraining, exist_ok=True)
AutoModelForSequenceClassification.register(MeritConfig, MeritForEcgClassification, exist_ok=True)
AutoFeatureExtractor.register(MeritConfig, MeritFeatureExtractor, exist_ok=True)
AutoFeatureExtractor.register(MeritEcgConfig, MeritFeatureExtractor, exist_ok=True)
AutoProcessor.register(MeritConfig, MeritProcessor, exist_ok=True)
AutoConfig.register(MeritReportConfig.model_type, MeritReportConfig, exist_ok=True)
AutoModelForCausalLM.register(MeritReportConfig, MeritForReportGeneration, exist_ok=True)
AutoFeatureExtractor.register(MeritReportConfig, MeritFeatureExtractor, exist_ok=True)
AutoProcessor.register(MeritReportConfig, MeritProcessor, exist_ok=True)

# `save_pretrained` then writes `auto_map` and copies the code files, so the Hub folder loads with
# `trust_remote_code=True` for users who never installed merit_hf.
MeritEcgConfig.register_for_auto_class()
MeritConfig.register_for_auto_class()
MeritEcgModel.register_for_auto_class("AutoModel")
MeritModel.register_for_auto_class("AutoModel")
MeritForPreTraining.register_for_auto_class("AutoModelForPreTraining")
MeritForEcgClassification.register_for_auto_class("AutoModelForSequenceClassification")
MeritFeatureExtractor.register_for_auto_class("AutoFeatureExtractor")
MeritProcessor.register_for_auto_class("AutoProcessor")
MeritReportConfig.register_for_auto_class()
MeritForReportGeneration.register_for_auto_class("AutoModelForCausalLM")

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
