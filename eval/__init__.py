"""Evaluation of CLIP-style encoders: zero-shot classification and image-text retrieval.

Works on any `Encoder` (our checkpoints via `clip_train.load`, open_clip models via
`load_open_clip`) and knows nothing of training.
"""

from data_tools.errors import ClipTrainError, ConfigError, DataError
from eval.encoder import Encoder, OpenClipEncoder, load_open_clip
from eval.metrics import classification_metrics, retrieval_metrics
from eval.retrieval import evaluate_retrieval
from eval.tasks import retrieval_task, zero_shot_task
from eval.zero_shot import build_zero_shot_classifier, evaluate_zero_shot

__all__ = [
    "ClipTrainError",
    "ConfigError",
    "DataError",
    "Encoder",
    "OpenClipEncoder",
    "build_zero_shot_classifier",
    "classification_metrics",
    "evaluate_retrieval",
    "evaluate_zero_shot",
    "load_open_clip",
    "retrieval_metrics",
    "retrieval_task",
    "zero_shot_task",
]
