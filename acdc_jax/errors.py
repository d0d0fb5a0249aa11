"""Exceptions that name the offending input and say how to fix it."""


class ConfigError(ValueError):
    """A model config field is missing, malformed or not supported."""


class CheckpointError(ValueError):
    """A checkpoint is unreadable, truncated, or has missing or misshaped tensors."""


class TaskError(ValueError):
    """A task's prompts, metric or canonical circuit are inconsistent."""


class MetricError(ValueError):
    """A metric returned NaN or a value of the wrong shape."""


def check_finite(values, what: str):
    """`values` (a metric or its gradients), or a MetricError naming `what`
    holds NaN or infinity: such a value would rank or decide silently wrong."""
    import numpy as np

    array = np.asarray(values, np.float64)
    if not np.isfinite(array).all():
        bad = array[~np.isfinite(array)].flat[0]
        raise MetricError(f"{what} is {bad}; it must be a finite number. Check the metric function (a log or a "
                          "division by zero?) and the prompts' answers.")
    return values
