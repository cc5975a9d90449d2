"""In-training evaluation: the one place where clip_train uses clip_eval.

Imports between the two packages go one way: clip_train -> clip_eval. Evaluation is the
lower layer; it takes any encoder and knows nothing of training (docs/architecture.md), so
`clip-eval` works on open_clip models without clip_train. The trainer reaches it only through this
module, and only when the config asks for an evaluation (the imports are local, so a run
without eval does not load the evaluators). `clip-eval` loads our run and export directories
through the loader named in `clip_eval.encoder.MODEL_DIR_LOADER`, not an import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from clip_train.config import Config
from clip_train.encoder import ClipEncoder
from data_tools.errors import ConfigError


def load_eval_suite(cfg: Config) -> Any:
    """The configured `eval.suite`, read now (a bad suite file fails before the run, not hours
    into it), or None."""
    if not cfg.eval.suite:
        return None
    from clip_eval.suite import load_suite

    suite = load_suite(cfg.eval.suite)
    taken = {"zeroshot": cfg.data.zeroshot, "retrieval": cfg.data.retrieval}
    clash = [t.name for t in suite.tasks if taken.get(t.name)]
    if clash:
        raise ConfigError(
            f"eval.suite task name(s) {clash} are used by data.zeroshot/"
            f"data.retrieval results; rename them in {cfg.eval.suite}"
        )
    return suite


def evaluate(
    model: torch.nn.Module,
    cfg: Config,
    device: torch.device,
    suite: Any = None,
    output_dir: Path | None = None,
) -> dict[str, dict[str, float]]:
    """Zero-shot and retrieval on the configured held-out splits, then the eval suite if any."""
    from clip_eval.tasks import retrieval_task, zero_shot_task

    encoder = ClipEncoder(model)
    results: dict[str, dict[str, float]] = {}
    opts = dict(batch_size=cfg.eval.batch_size, num_workers=cfg.eval.num_workers, device=device)
    if cfg.data.zeroshot:
        results["zeroshot"] = zero_shot_task(encoder, cfg.data.zeroshot, **opts)
    if cfg.data.retrieval:
        results["retrieval"] = retrieval_task(encoder, cfg.data.retrieval, **opts)
    if suite is not None:
        from clip_eval.suite import run_suite

        results.update(run_suite(encoder, suite, device, output_dir=output_dir))
    return results
