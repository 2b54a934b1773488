"""Argument checks shared by the package: each raises a ValueError naming the argument, the value
and what is allowed."""
from __future__ import annotations

from typing import Optional

import numpy as np


def check_int(name: str, value, minimum: int, maximum: Optional[int] = None) -> int:
    """`value` as a Python int if it is an integer (Python or numpy, not a bool) in
    [minimum, maximum]; a ValueError naming `name` otherwise."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
            or value < minimum or (maximum is not None and value > maximum):
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name}={value!r}: must be an integer {allowed}")
    return int(value)
