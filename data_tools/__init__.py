"""Shard tools: build, validate and stream WebDataset image-caption shards."""

from data_tools.errors import ClipTrainError, ConfigError, DataError

__all__ = ["ClipTrainError", "ConfigError", "DataError"]
