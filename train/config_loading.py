"""Load a run config from a Python file path (`configs/tiny.py`) or module (`configs.tiny`)."""
from __future__ import annotations

import importlib
import importlib.util
import os


def load_config(spec: str, attr: str = "CONFIG", expected: type = None):
    """The `attr` (CONFIG) of a config module or file; `expected`: the type it must have."""
    if spec.endswith(".py") or os.sep in spec:
        if not os.path.exists(spec):
            raise FileNotFoundError(f"--config {spec}: no such file")
        name = "_jaxkv_config_" + os.path.splitext(os.path.basename(spec))[0]
        module_spec = importlib.util.spec_from_file_location(name, spec)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(spec)
    if not hasattr(module, attr):
        raise ValueError(f"--config {spec}: the module defines no {attr}")
    value = getattr(module, attr)
    if expected is not None and not isinstance(value, expected):
        raise ValueError(f"--config {spec}: {attr} is a {type(value).__name__}, expected a "
                         f"{expected.__module__}.{expected.__name__}")
    return value
