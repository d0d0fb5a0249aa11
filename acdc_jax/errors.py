"""Exceptions that name the offending input and say how to fix it."""


class ConfigError(ValueError):
    """A model config field is missing, malformed or not supported."""


class CheckpointError(ValueError):
    """A checkpoint is unreadable, truncated, or has missing or misshaped tensors."""


class TaskError(ValueError):
    """A task's prompts, metric or canonical circuit are inconsistent."""


class MetricError(ValueError):
    """A metric returned NaN or a value of the wrong shape."""
