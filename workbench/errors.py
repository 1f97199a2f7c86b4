"""User-facing errors.

Anything a user can cause with a bad file, flag or directory raises a subclass of `WorkbenchError`
whose message names the thing (file, config key, field) and what was expected. `workbench.cli` prints
that message on one line and exits with status 2; anything else is a bug and keeps its traceback.
"""


class WorkbenchError(Exception):
    """An error caused by user input, reported on one line without a traceback."""


class ConfigError(WorkbenchError):
    """A config file or override is malformed: unknown key, wrong type or out-of-range value."""


class CheckpointError(WorkbenchError):
    """A checkpoint or model directory is missing, incomplete, corrupt or does not fit the model."""


class DataError(WorkbenchError):
    """A data path, corpus, shard or tokenizer is missing or unusable."""
