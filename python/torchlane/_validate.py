"""Argument checks shared by torchlane's Python modules, with torch's convention: a value of the
wrong type raises TypeError, a value of the right type outside its range raises ValueError, and
both messages name the argument."""

from __future__ import annotations

import math
import numbers


def check_int(name, value, minimum=None, *, allow_none=False, where=""):
    prefix = f"{where}: " if where else ""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{prefix}{name} must be an int{' or None' if allow_none else ''}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{prefix}{name} must be >= {minimum}, got {value}")
    return int(value)


def check_real(name, value, minimum=-math.inf, maximum=math.inf, *, positive=False, where=""):
    """A finite number in [minimum, maximum] (> 0 with positive=True)."""
    prefix = f"{where}: " if where else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{prefix}{name} must be a number, got {value!r}")
    if not math.isfinite(value) or not minimum <= value <= maximum or (positive and not value > 0):
        bounds = "> 0" if positive else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{prefix}{name} must be a finite number {bounds}, got {value}")
    return float(value)


def check_bool(name, value, *, where=""):
    if not isinstance(value, bool):
        prefix = f"{where}: " if where else ""
        raise TypeError(f"{prefix}{name} must be True or False, got {value!r}")
    return value
