"""The `"zero-shot-ecg-classification"` pipeline, registered with transformers when `merit_hf` is imported.

Example:

```python
>>> import merit_hf  # registers the task (a saved folder also runs it without merit_hf: trust_remote_code=True)
>>> from transformers import pipeline
>>> classifier = pipeline("zero-shot-ecg-classification", model="path/to/merit")  # doctest: +SKIP
>>> classifier("records100/00000/00001_lr", candidate_labels=["NORM", "MI"],
...            class_descriptions="superclass")  # doctest: +SKIP
[{'label': 'NORM', 'score': 0.41}, {'label': 'MI', 'score': 0.12}]
```

The scores are per class (cosine similarities, see `merit_hf.evaluation.zero_shot`); the list is sorted by score, as
transformers' other zero-shot pipelines are. For scores in the order of `candidate_labels`, call
`merit_hf.zero_shot_classify`.
"""

from __future__ import annotations

from transformers import AutoModel
from transformers.pipelines import PIPELINE_REGISTRY

# The pipeline itself is Hub remote code (pipeline_merit.py travels with a saved two-tower folder, where
# `pipeline("zero-shot-ecg-classification", model=folder, trust_remote_code=True)` finds it without merit_hf).
from .pipeline_merit import ZERO_SHOT_ECG_TASK, ZeroShotEcgClassificationPipeline

PIPELINE_REGISTRY.register_pipeline(
    ZERO_SHOT_ECG_TASK,
    pipeline_class=ZeroShotEcgClassificationPipeline,
    pt_model=AutoModel,
    type="multimodal",
)

__all__ = ["ZERO_SHOT_ECG_TASK", "ZeroShotEcgClassificationPipeline"]
