"""Type checks for values read from JSON files and traced graphs, and strict JSON for output (torch-free).

bool is an int subclass in Python, but `true` is never a count or a budget here.
"""

from __future__ import annotations

import json
import math
from typing import Any

FLOAT32_MAX = 3.4028234663852886e38  # options end up in float32 tensors (lr, eps, beta, images)


def is_int(value: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def json_text(obj: Any) -> str:
    """`obj` as strict JSON for stdout: NaN and infinities (a diverged loss in a checkpoint's history)
    become null, which every JSON parser reads, instead of Python's bare NaN, which many reject."""
    return json.dumps(_finite_or_none(obj), allow_nan=False)


def _finite_or_none(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite_or_none(v) for v in obj]
    return obj
