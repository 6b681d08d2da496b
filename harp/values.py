"""Type checks for values read from JSON files and traced graphs (torch-free).

bool is an int subclass in Python, but `true` is never a count or a budget here.
"""

from __future__ import annotations

import math
from typing import Any


def is_int(value: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
