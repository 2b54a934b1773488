"""Atomic JSON files: written to a temporary file in the same folder, fsynced, then moved over
the target with os.replace, so a reader never sees a half-written file."""
from __future__ import annotations

import json
import os
import tempfile


def write_json_atomic(obj, path, *, indent: int = 1, sort_keys: bool = False, default=None,
                      trailing_newline: bool = False) -> None:
    """Write `obj` as JSON to `path` atomically (the folder is created if missing)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent, sort_keys=sort_keys, default=default)
            if trailing_newline:
                f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
