"""User-facing errors.

Every error a user can cause (bad path, bad config key, bad sample) is a `ClipTrainError`
whose message names the file, key or sample and says what to do. CLIs print it on one line
and exit 2. It lives in `data_tools` because that package imports neither of the others;
`clip_train` and `eval` re-export it.
"""


class ClipTrainError(Exception):
    """Base class for errors caused by user input; the message is shown as is."""


class DataError(ClipTrainError):
    """A shard, table, image or caption that cannot be used."""


class ConfigError(ClipTrainError):
    """A config key that is unknown, has the wrong type or conflicts with another."""
