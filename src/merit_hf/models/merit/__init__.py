"""MERIT's model files: configs, models, feature extractor, processor and the zero-shot pipeline.

The `*_merit*.py` files of this folder are also the Hub remote code: `save_pretrained` copies them next to the
weights, so they import only torch, numpy, scipy, transformers, huggingface_hub and each other. Importing this package
registers the classes with the Auto classes and the `"zero-shot-ecg-classification"` task with transformers'
pipeline registry.
"""

from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForPreTraining,
    AutoModelForSequenceClassification,
    AutoProcessor,
)
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_merit import STANDARD_LEAD_NAMES, MeritConfig, MeritEcgConfig, MeritReportConfig
from .feature_extraction_merit import MeritFeatureExtractor
from .modeling_merit import (
    MeritEcgModel,
    MeritForEcgClassification,
    MeritForEcgClassificationFromEncoder,
    MeritForPreTraining,
    MeritModel,
    pool_window_embeddings,
)
from .modeling_merit_report import MeritForReportGeneration

# The pipeline itself is Hub remote code (pipeline_merit.py travels with a saved two-tower folder, where
# `pipeline("zero-shot-ecg-classification", model=folder, trust_remote_code=True)` finds it without merit_hf).
from .pipeline_merit import (
    ECG_CLASSIFICATION_TASK,
    ECG_FEATURE_EXTRACTION_TASKS,
    ZERO_SHOT_ECG_TASK,
    MeritEcgClassificationPipeline,
    MeritEcgFeatureExtractionPipeline,
    ZeroShotEcgClassificationPipeline,
    zero_shot_classify,
)
from .processing_merit import MeritProcessor

AutoConfig.register(MeritEcgConfig.model_type, MeritEcgConfig, exist_ok=True)
AutoConfig.register(MeritConfig.model_type, MeritConfig, exist_ok=True)
AutoModel.register(MeritEcgConfig, MeritEcgModel, exist_ok=True)
AutoModel.register(MeritConfig, MeritModel, exist_ok=True)
AutoModelForPreTraining.register(MeritConfig, MeritForPreTraining, exist_ok=True)
AutoModelForSequenceClassification.register(MeritConfig, MeritForEcgClassification, exist_ok=True)
# an encoder-only folder's classifier (a `MeritForEcgClassification`, built by this stand-in: transformers registers a
# model class only under its own config class)
AutoModelForSequenceClassification.register(MeritEcgConfig, MeritForEcgClassificationFromEncoder, exist_ok=True)
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

PIPELINE_REGISTRY.register_pipeline(
    ZERO_SHOT_ECG_TASK,
    pipeline_class=ZeroShotEcgClassificationPipeline,
    pt_model=AutoModel,
    type="multimodal",
)
# The ECG tasks of a saved folder's `custom_pipelines`, also for a model in memory (`pipeline(task, model=model,
# feature_extractor=...)`). transformers' own `feature-extraction` (text) stays its own: `ecg-feature-extraction`.
PIPELINE_REGISTRY.register_pipeline(
    ECG_CLASSIFICATION_TASK,
    pipeline_class=MeritEcgClassificationPipeline,
    pt_model=AutoModelForSequenceClassification,
    type="audio",  # one signal in, as audio pipelines take
)
PIPELINE_REGISTRY.register_pipeline(
    ECG_FEATURE_EXTRACTION_TASKS[1], pipeline_class=MeritEcgFeatureExtractionPipeline, pt_model=AutoModel, type="audio"
)

__all__ = [
    "STANDARD_LEAD_NAMES",
    "ZERO_SHOT_ECG_TASK",
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
