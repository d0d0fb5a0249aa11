"""Exceptions that name the offending input and say how to fix it."""

import math
import os
from typing import Optional

import numpy as np


class ConfigError(ValueError):
    """A model config field is missing, malformed or not supported."""


class CheckpointError(ValueError):
    """A checkpoint is unreadable, truncated, or has missing or misshaped tensors."""


class TaskError(ValueError):
    """A task's prompts, metric or canonical circuit are inconsistent."""


class MetricError(ValueError):
    """A metric returned NaN or a value of the wrong shape."""


class FlatMetricWarning(UserWarning):
    """Cutting every edge at once barely moves the metric: a run is likely to remove every edge."""


class MetricFallsWarning(UserWarning):
    """Cutting every edge at once lowers the metric: it may be higher-is-better, where ACDC minimises."""


class MetricAtMinimumWarning(UserWarning):
    """A gradient method takes its gradient where the metric is at its minimum (KL or L2 to the full model)."""


def positive_setting(name: str, unit: str = "") -> Optional[int]:
    """The environment variable `name` as a positive whole number (of
    `unit`), None where it is unset or empty; anything else raises, naming it."""
    raw = os.environ.get(name, "")
    if not raw:
        return None
    if not (raw.isdigit() and int(raw) > 0):
        raise ValueError(f"{name} must be a positive whole number{unit}, got {raw!r}; unset it for the default.")
    return int(raw)


def check_whole(value, what: str, low: int = 0, high: Optional[int] = None, error=ValueError) -> int:
    """`value` as an int (a Python or numpy integer, not a bool), or an
    `error` naming `what` and the range it must lie in."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or (
            high is not None and value > high):
        span = f"a whole number between {low} and {high}" if high is not None else f"a whole number >= {low}"
        raise error(f"{what} must be {span}, got {value!r}.")
    return int(value)


def check_number(value, what: str, low: Optional[float] = None, high: Optional[float] = None, *,
                 above: bool = False, error=ValueError) -> float:
    """`value` as a finite float (>= `low`, or > it with `above`, and <=
    `high`), or an `error` naming `what` and the range."""
    fine = not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(
        value) and (low is None or value > low if above else low is None or value >= low) and (
        high is None or value <= high)
    if not fine:
        span = " and ".join(s for s in (low is not None and f"{'>' if above else '>='} {low:g}",
                                         high is not None and f"<= {high:g}") if s)
        raise error(f"{what} must be a finite number{' ' + span if span else ''}, got {value!r}.")
    return float(value)


def check_stop_after(seconds) -> None:
    """`stop_after` (--stop-after) is None or a number of seconds >= 0 (0: stop after the first pass or step)."""
    if seconds is not None:
        check_number(seconds, "stop_after (seconds, --stop-after)", 0)


def check_finite(values, what: str):
    """`values` (a metric or its gradients), or a MetricError naming `what`
    holds NaN or infinity: such a value would rank or decide silently wrong."""
    array = np.asarray(values, np.float64)
    if not np.isfinite(array).all():
        bad = array[~np.isfinite(array)].flat[0]
        raise MetricError(f"{what} is {bad}; it must be a finite number. Check the metric function (a log or a "
                          "division by zero?) and the prompts' answers.")
    return values
