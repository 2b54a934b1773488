"""Where jaxkv keeps per-user files (calibration tables of real models): never inside the
installed package.

    $JAXKV_CACHE_DIR, else $XDG_CACHE_HOME/jaxkv, else ~/.cache/jaxkv
"""
from __future__ import annotations

import os


def user_cache_dir() -> str:
    root = os.environ.get("JAXKV_CACHE_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "jaxkv")
    return root


__all__ = ["user_cache_dir"]
