"""clip-train: contrastive image-text pretraining.

`clip_train.load(path)` returns an encoder (`encode_image`, `encode_text`, `tokenizer`,
`preprocess`) from an export, a run directory or a checkpoint directory.
"""

from data_tools.errors import ClipTrainError, ConfigError, DataError

__all__ = ["ClipTrainError", "ConfigError", "DataError", "load"]


def load(path, device="cpu"):
    """See `clip_train.export.load`; imported lazily so `import clip_train` stays light."""
    from clip_train.export import load as _load

    return _load(path, device=device)
