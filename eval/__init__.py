"""Evaluation of CLIP-style encoders: zero-shot classification, retrieval, probes and suites.

Works on any `Encoder` (our checkpoints via `clip_train.load`, open_clip models via
`load_open_clip`) and knows nothing of training. The trainer's entry point is
`load_suite(path)` once and `run_suite(encoder, suite, device, output_dir=None, progress=False)`
every `eval.every` steps (see `eval.suite`).
"""

from clip_eval.encoder import Encoder, OpenClipEncoder, load_open_clip
from clip_eval.metrics import classification_metrics, retrieval_metrics
from clip_eval.probe import few_shot, linear_probe
from clip_eval.retrieval import evaluate_retrieval
from clip_eval.suite import Suite, Task, load_suite, run_suite
from clip_eval.tasks import few_shot_task, linear_probe_task, retrieval_task, zero_shot_task
from clip_eval.text import encode_texts
from clip_eval.zero_shot import build_zero_shot_classifier, evaluate_zero_shot
from data_tools.errors import ClipTrainError, ConfigError, DataError

__all__ = [
    "ClipTrainError",
    "ConfigError",
    "DataError",
    "Encoder",
    "OpenClipEncoder",
    "Suite",
    "Task",
    "build_zero_shot_classifier",
    "classification_metrics",
    "encode_texts",
    "evaluate_retrieval",
    "evaluate_zero_shot",
    "few_shot",
    "few_shot_task",
    "linear_probe",
    "linear_probe_task",
    "load_open_clip",
    "load_suite",
    "retrieval_metrics",
    "retrieval_task",
    "run_suite",
    "zero_shot_task",
]
